// Reads a secret (a KEK, a Vault token, an AppRole secret id, AWS keys) from
// a file the way PostgreSQL treats its own key files: it must be a regular
// file owned by the server's account and inaccessible to group and others.
#pragma once

#include <string>

#include <unistd.h>

#include "secure_bytes.hpp"

namespace pgphi {

// Closes a file descriptor when it goes out of scope (negative: nothing open).
struct FileCloser {
    int fd;
    ~FileCloser()
    {
        if (fd >= 0)
            close(fd);
    }
};

// `what` names the file in messages ("local KEK file", "Vault token file").
// Throws SecretFileMissing when absent and SecretFileInvalid for every other
// problem; files larger than `max_size` are refused.
SecureBytes read_secret_file(const std::string& path, const std::string& what, size_t max_size);

// The file's contents without surrounding whitespace, for token-like secrets.
std::string read_secret_text(const std::string& path, const std::string& what);

// An identity token another system writes and rotates: a Kubernetes service
// account token, an EKS web identity or Pod Identity token. Those files are
// projected by the kubelet, owned by root and often readable by the pod's
// group, so the owner and read bits are not checked; the file must be a
// regular file that neither group nor others can write, at most 16 kB. Read
// afresh at each use, so a rotated token is picked up. Trimmed; refused when
// empty (SecretFileInvalid) or absent (SecretFileMissing).
std::string read_identity_token_file(const std::string& path, const std::string& what);

} // namespace pgphi
