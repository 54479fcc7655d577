#include "shared/postgres.hpp"

#include <cstring>

#include "shared/error_bridge.hpp"

namespace pgphi::pg {

namespace {

void copy_text(char* dst, size_t size, const char* src) noexcept
{
    strlcpy(dst, src ? src : "", size);
}

// The SQLSTATE a user sees for each kind of core error.
int sqlstate_for(ErrorCode code)
{
    switch (code) {
    case ErrorCode::NotCiphertext:
    case ErrorCode::Truncated:
        return ERRCODE_INVALID_BINARY_REPRESENTATION;      // 22P03
    case ErrorCode::UnsupportedVersion:
    case ErrorCode::UnknownAlgorithm:
        return ERRCODE_FEATURE_NOT_SUPPORTED;              // 0A000
    case ErrorCode::AuthenticationFailed:
        // An integrity check failed, as with a page checksum: XX001.
        return ERRCODE_DATA_CORRUPTED;
    case ErrorCode::KeyNotFound:
        return ERRCODE_UNDEFINED_OBJECT;                   // 42704
    case ErrorCode::KeyMismatch:
    case ErrorCode::InvalidArgument:
        return ERRCODE_INVALID_PARAMETER_VALUE;            // 22023
    case ErrorCode::WrongKeyPurpose:
        return ERRCODE_WRONG_OBJECT_TYPE;                  // 42809
    case ErrorCode::ConfigError:
    case ErrorCode::SecretFileInvalid:
    case ErrorCode::KekMismatch:
        return ERRCODE_CONFIG_FILE_ERROR;                  // F0000
    case ErrorCode::SecretFileMissing:
        return ERRCODE_UNDEFINED_FILE;                     // 58P01
    case ErrorCode::WrappedDekInvalid:
        return ERRCODE_DATA_CORRUPTED;                     // XX001
    case ErrorCode::KeyManagerDenied:
        return ERRCODE_INSUFFICIENT_PRIVILEGE;             // 42501
    case ErrorCode::KeyManagerKeyDisabled:
        return ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE;   // 55000
    case ErrorCode::KeyManagerUnavailable:
        // The key manager is a remote server pgphi could not use, as
        // postgres_fdw reports an unreachable remote server.
        return ERRCODE_CONNECTION_FAILURE;                 // 08006
    case ErrorCode::ProviderError:
        return ERRCODE_SYSTEM_ERROR;                       // 58000
    case ErrorCode::DiskFull:
        return ERRCODE_DISK_FULL;                          // 53100
    case ErrorCode::FileAccessDenied:
        // As PostgreSQL reports a file it may not write.
        return ERRCODE_INSUFFICIENT_PRIVILEGE;             // 42501
    case ErrorCode::Io:
        return ERRCODE_IO_ERROR;                           // 58030
    case ErrorCode::Internal:
        break;
    }
    return ERRCODE_INTERNAL_ERROR;
}

} // namespace

void CoreFailure::capture(ErrorCode c, const char* msg, const char* det, const char* hnt) noexcept
{
    code = c;
    copy_text(message, sizeof(message), msg);
    copy_text(detail, sizeof(detail), det);
    copy_text(hint, sizeof(hint), hnt);
}

void raise_core_failure(const CoreFailure& failure, int sqlstate)
{
    // errhidestmt: the statement may hold plaintext literals; keep it out of the log.
    ereport(ERROR, (errcode(sqlstate != 0 ? sqlstate : sqlstate_for(failure.code)),
                    errmsg_internal("%s", failure.message), errhidestmt(true),
                    failure.detail[0] ? errdetail_internal("%s", failure.detail) : 0,
                    failure.hint[0] ? errhint("%s", failure.hint) : 0));
    pg_unreachable();
}

} // namespace pgphi::pg
