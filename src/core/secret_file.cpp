#include "secret_file.hpp"

#include <cerrno>
#include <cstring>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "error.hpp"

namespace pgphi {

namespace {

SecureBytes read_file(const std::string& path, const std::string& what, size_t max_size, bool private_file)
{
    std::string named = what + " \"" + path + "\"";
    // O_NONBLOCK: a FIFO planted at the path must not block the backend in
    // open(); it is refused as not a regular file just below.
    FileCloser file{open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK)};
    if (file.fd < 0) {
        int err = errno;
        if (err == ENOENT)
            throw Error(ErrorCode::SecretFileMissing, named + " does not exist");
        throw Error(ErrorCode::SecretFileInvalid, "could not open " + named + ": " + std::strerror(err));
    }
    struct stat st;
    if (fstat(file.fd, &st) != 0)
        throw Error(ErrorCode::Io, "could not stat " + named + ": " + std::strerror(errno));
    if (!S_ISREG(st.st_mode))
        throw Error(ErrorCode::SecretFileInvalid, named + " is not a regular file");
    if (!private_file && (st.st_mode & (S_IWGRP | S_IWOTH)) != 0)
        throw Error(ErrorCode::SecretFileInvalid, named + " is writable by group or others", {},
                    "Run chmod go-w on the file.");
    if (private_file && st.st_uid != geteuid())
        throw Error(ErrorCode::SecretFileInvalid, named + " is not owned by the database server's user", {},
                    "chown the file to the account the server runs as.");
    if (private_file && (st.st_mode & (S_IRWXG | S_IRWXO)) != 0)
        throw Error(ErrorCode::SecretFileInvalid, named + " is accessible by group or others", {},
                    "Run chmod 0600 on the file.");
    if (static_cast<size_t>(st.st_size) > max_size)
        throw Error(ErrorCode::SecretFileInvalid, named + " is too large");

    SecureBytes contents(static_cast<size_t>(st.st_size));
    size_t done = 0;
    while (done < contents.size()) {
        ssize_t n = read(file.fd, contents.data() + done, contents.size() - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            throw Error(ErrorCode::Io, "could not read " + named + (n < 0 ? std::string(": ") + std::strerror(errno) : ""));
        done += static_cast<size_t>(n);
    }
    return contents;
}

std::string trimmed_text(const SecureBytes& raw, const std::string& path, const std::string& what)
{
    const char* begin = reinterpret_cast<const char*>(raw.data());
    const char* end = begin + raw.size();
    while (begin < end && std::strchr(" \t\r\n", *begin))
        ++begin;
    while (end > begin && std::strchr(" \t\r\n", end[-1]))
        --end;
    if (begin == end)
        throw Error(ErrorCode::SecretFileInvalid, what + " \"" + path + "\" is empty");
    return std::string(begin, end);
}

} // namespace

SecureBytes read_secret_file(const std::string& path, const std::string& what, size_t max_size)
{
    return read_file(path, what, max_size, true);
}

std::string read_secret_text(const std::string& path, const std::string& what)
{
    return trimmed_text(read_file(path, what, 64 * 1024, true), path, what);
}

std::string read_identity_token_file(const std::string& path, const std::string& what)
{
    return trimmed_text(read_file(path, what, 16 * 1024, false), path, what);
}

} // namespace pgphi
