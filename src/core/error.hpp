// Errors raised by the core. The core never talks to PostgreSQL; the glue in
// src/pg/ catches these and maps each ErrorCode to a SQLSTATE (see
// src/pg/error_bridge.cpp), so every code here must mean one thing to a user.
#pragma once

#include <cerrno>
#include <stdexcept>
#include <string>

namespace pgphi {

enum class ErrorCode {
    NotCiphertext,        // bytes are not a pgphi value at all
    Truncated,            // a pgphi value cut short
    UnsupportedVersion,   // format version this build does not know
    UnknownAlgorithm,     // algorithm id this build does not know
    AuthenticationFailed, // tag mismatch: tampered, wrong context or wrong DEK
    KeyNotFound,          // no such key name, or no such key id/version
    KeyMismatch,          // value was encrypted under another key than named
    WrongKeyPurpose,      // an encryption key used for blind indexing, or the reverse
    InvalidArgument,      // bad argument from the caller
    ConfigError,          // a provider setting is missing or unusable
    SecretFileMissing,    // a KEK, token or credentials file is absent
    SecretFileInvalid,    // ... or unreadable, of the wrong size, mode or owner
    KekMismatch,          // DEK was wrapped by another KEK than configured
    WrappedDekInvalid,    // the wrapped DEK does not unwrap: damaged, moved, or wrong context
    KeyManagerDenied,     // the key manager refused: permissions, expired credentials
    KeyManagerKeyDisabled,// the KEK is disabled or pending deletion
    KeyManagerUnavailable,// unreachable, timed out, TLS failure, throttled or failing
    ProviderError,        // the key provider failed for another reason
    DiskFull,             // a file could not be written for lack of space (or a file-size limit)
    FileAccessDenied,     // the server account may not create or write a file there
    Io,                   // operating-system I/O failure
    Internal,             // a bug or an OpenSSL failure that should not happen
};

// An error with a message fit for the user: it never contains key bytes or
// plaintext. `detail` and `hint` are optional and follow PostgreSQL's style.
class Error : public std::runtime_error {
public:
    Error(ErrorCode code, std::string message, std::string detail = {}, std::string hint = {})
        : std::runtime_error(std::move(message)), code_(code), detail_(std::move(detail)),
          hint_(std::move(hint)) {}

    ErrorCode code() const noexcept { return code_; }
    const std::string& detail() const noexcept { return detail_; }
    const std::string& hint() const noexcept { return hint_; }

private:
    ErrorCode code_;
    std::string detail_;
    std::string hint_;
};

// The code for a failed file operation's errno, as PostgreSQL classifies
// its own file errors: no space, no permission, or another I/O failure.
inline ErrorCode file_error_code(int err) noexcept
{
    switch (err) {
    case ENOSPC:
    case EDQUOT:
    case EFBIG: // past RLIMIT_FSIZE (PostgreSQL ignores SIGXFSZ) or the filesystem's limit
        return ErrorCode::DiskFull;
    case EACCES:
    case EPERM:
    case EROFS:
        return ErrorCode::FileAccessDenied;
    default:
        return ErrorCode::Io;
    }
}

} // namespace pgphi
