#include "pkcs11_provider.hpp"

#include <algorithm>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include <dlfcn.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "error.hpp"
#include "secret_file.hpp"

// Debian's p11-kit ships the standard header (libp11-kit-dev). It defines
// lower-case macros (value, count, parameter, ...), so it comes after every
// other header, and the code below avoids those names.
#include <p11-kit/pkcs11.h>

namespace pgphi {

namespace {

constexpr uint8_t kLayoutVersion = 1;
constexpr uint8_t kMechGcm = 1;
constexpr uint8_t kMechKwp = 2;
constexpr size_t kHeaderSize = 6;
constexpr size_t kIvSize = 12;
constexpr size_t kTagSize = 16;
constexpr size_t kGcmWrappedSize = kHeaderSize + kIvSize + KeyProvider::kDekSize + kTagSize; // 66
constexpr size_t kBoundSize = 8 + KeyProvider::kDekSize;                                      // key id, version, DEK
constexpr size_t kKwpWrappedSize = kHeaderSize + 48;                                          // RFC 5649 of 40 bytes
constexpr const char kAadLabel[] = "pgphi pkcs11 DEK v1";

const char* rv_name(CK_RV rv)
{
    switch (rv) {
#define PGPHI_CKR(x) \
    case x: return #x;
        PGPHI_CKR(CKR_OK)
        PGPHI_CKR(CKR_HOST_MEMORY)
        PGPHI_CKR(CKR_SLOT_ID_INVALID)
        PGPHI_CKR(CKR_GENERAL_ERROR)
        PGPHI_CKR(CKR_FUNCTION_FAILED)
        PGPHI_CKR(CKR_ARGUMENTS_BAD)
        PGPHI_CKR(CKR_ATTRIBUTE_SENSITIVE)
        PGPHI_CKR(CKR_ATTRIBUTE_TYPE_INVALID)
        PGPHI_CKR(CKR_ATTRIBUTE_VALUE_INVALID)
        PGPHI_CKR(CKR_DATA_LEN_RANGE)
        PGPHI_CKR(CKR_DEVICE_ERROR)
        PGPHI_CKR(CKR_DEVICE_MEMORY)
        PGPHI_CKR(CKR_DEVICE_REMOVED)
        PGPHI_CKR(CKR_ENCRYPTED_DATA_INVALID)
        PGPHI_CKR(CKR_ENCRYPTED_DATA_LEN_RANGE)
        PGPHI_CKR(CKR_FUNCTION_NOT_SUPPORTED)
        PGPHI_CKR(CKR_KEY_HANDLE_INVALID)
        PGPHI_CKR(CKR_KEY_SIZE_RANGE)
        PGPHI_CKR(CKR_KEY_TYPE_INCONSISTENT)
        PGPHI_CKR(CKR_KEY_FUNCTION_NOT_PERMITTED)
        PGPHI_CKR(CKR_KEY_NOT_WRAPPABLE)
        PGPHI_CKR(CKR_KEY_UNEXTRACTABLE)
        PGPHI_CKR(CKR_MECHANISM_INVALID)
        PGPHI_CKR(CKR_MECHANISM_PARAM_INVALID)
        PGPHI_CKR(CKR_OBJECT_HANDLE_INVALID)
        PGPHI_CKR(CKR_OPERATION_ACTIVE)
        PGPHI_CKR(CKR_PIN_INCORRECT)
        PGPHI_CKR(CKR_PIN_INVALID)
        PGPHI_CKR(CKR_PIN_LEN_RANGE)
        PGPHI_CKR(CKR_PIN_EXPIRED)
        PGPHI_CKR(CKR_PIN_LOCKED)
        PGPHI_CKR(CKR_SESSION_CLOSED)
        PGPHI_CKR(CKR_SESSION_COUNT)
        PGPHI_CKR(CKR_SESSION_HANDLE_INVALID)
        PGPHI_CKR(CKR_TEMPLATE_INCOMPLETE)
        PGPHI_CKR(CKR_TEMPLATE_INCONSISTENT)
        PGPHI_CKR(CKR_TOKEN_NOT_PRESENT)
        PGPHI_CKR(CKR_TOKEN_NOT_RECOGNIZED)
        PGPHI_CKR(CKR_TOKEN_WRITE_PROTECTED)
        PGPHI_CKR(CKR_USER_NOT_LOGGED_IN)
        PGPHI_CKR(CKR_USER_PIN_NOT_INITIALIZED)
        PGPHI_CKR(CKR_WRAPPED_KEY_INVALID)
        PGPHI_CKR(CKR_WRAPPED_KEY_LEN_RANGE)
        PGPHI_CKR(CKR_BUFFER_TOO_SMALL)
        PGPHI_CKR(CKR_CRYPTOKI_NOT_INITIALIZED)
        PGPHI_CKR(CKR_CRYPTOKI_ALREADY_INITIALIZED)
#undef PGPHI_CKR
    default:
        return nullptr;
    }
}

std::string rv_text(CK_RV rv)
{
    if (const char* n = rv_name(rv))
        return n;
    char buf[32];
    snprintf(buf, sizeof(buf), "CKR 0x%lx", static_cast<unsigned long>(rv));
    return buf;
}

// Errors after which the session (or the module) must be set up again: the
// token was reset, removed or logged out.
bool session_lost(CK_RV rv)
{
    switch (rv) {
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_CLOSED:
    case CKR_USER_NOT_LOGGED_IN:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_TOKEN_NOT_RECOGNIZED:
    case CKR_DEVICE_REMOVED:
    case CKR_DEVICE_ERROR:
    case CKR_DEVICE_MEMORY:
    case CKR_GENERAL_ERROR:
    case CKR_SLOT_ID_INVALID:
    case CKR_CRYPTOKI_NOT_INITIALIZED:
        return true;
    default:
        return false;
    }
}

// Thrown inside one attempt when the session must be rebuilt; the caller
// retries once, then reports the token unavailable.
struct SessionLost {
    CK_RV rv;
    std::string what;
};

// Thrown when a cached object handle no longer names an object.
struct StaleHandle {};

[[noreturn]] void raise_rv(CK_RV rv, const std::string& what)
{
    std::string detail = "The PKCS#11 module returned " + rv_text(rv) + ".";
    switch (rv) {
    case CKR_PIN_INCORRECT:
    case CKR_PIN_INVALID:
    case CKR_PIN_LEN_RANGE:
        throw Error(ErrorCode::KeyManagerDenied, "permission denied by the PKCS#11 token: the PIN is incorrect",
                    detail, "Check pgphi.pkcs11_pin_file. pgphi does not try a refused PIN again until the file changes.");
    case CKR_PIN_LOCKED:
        throw Error(ErrorCode::KeyManagerDenied, "permission denied by the PKCS#11 token: the user PIN is locked",
                    detail, "The token's security officer must unlock or reset the user PIN.");
    case CKR_PIN_EXPIRED:
    case CKR_USER_PIN_NOT_INITIALIZED:
        throw Error(ErrorCode::KeyManagerDenied,
                    "permission denied by the PKCS#11 token: the user PIN is expired or not initialised", detail,
                    "The token's security officer must set the user PIN.");
    case CKR_ENCRYPTED_DATA_INVALID:
    case CKR_ENCRYPTED_DATA_LEN_RANGE:
    case CKR_WRAPPED_KEY_INVALID:
    case CKR_WRAPPED_KEY_LEN_RANGE:
    case CKR_DATA_LEN_RANGE:
        throw Error(ErrorCode::WrappedDekInvalid, "the PKCS#11 token cannot unwrap the DEK: " + what, detail,
                    "The wrapped DEK is damaged, moved to another key, or wrapped by another KEK.");
    case CKR_KEY_FUNCTION_NOT_PERMITTED:
    case CKR_KEY_TYPE_INCONSISTENT:
    case CKR_KEY_SIZE_RANGE:
    case CKR_KEY_HANDLE_INVALID:
    case CKR_OBJECT_HANDLE_INVALID:
        throw Error(ErrorCode::KeyManagerKeyDisabled, "the PKCS#11 KEK is not usable: " + what, detail);
    default:
        break;
    }
    if (session_lost(rv))
        throw Error(ErrorCode::KeyManagerUnavailable, "the PKCS#11 token is unavailable: " + what, detail,
                    "Check that the token (or the HSM's network connection) is present; cached DEKs keep working "
                    "for pgphi.key_manager_grace.");
    throw Error(ErrorCode::ProviderError, "the PKCS#11 token failed: " + what, detail);
}

void put_be32(uint8_t* p, uint32_t v)
{
    p[0] = static_cast<uint8_t>(v >> 24);
    p[1] = static_cast<uint8_t>(v >> 16);
    p[2] = static_cast<uint8_t>(v >> 8);
    p[3] = static_cast<uint8_t>(v);
}

uint32_t get_be32(const uint8_t* p)
{
    return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

// A parsed KEK reference.
struct KekRef {
    bool by_label = true;
    std::string label;
    std::vector<uint8_t> id;
};

KekRef parse_kek_ref(const std::string& ref)
{
    KekRef out;
    const char* hint = "A PKCS#11 KEK is named label:NAME (its CKA_LABEL) or id:HEX (its CKA_ID).";
    if (ref.rfind("label:", 0) == 0 && ref.size() > 6 && ref.size() <= 6 + 200) {
        out.label = ref.substr(6);
        for (unsigned char c : out.label)
            if (c < 0x20 || c == 0x7f)
                throw Error(ErrorCode::InvalidArgument, "invalid PKCS#11 KEK reference", {}, hint);
        return out;
    }
    if (ref.rfind("id:", 0) == 0 && ref.size() > 3 && (ref.size() - 3) % 2 == 0 && ref.size() - 3 <= 128) {
        out.by_label = false;
        for (size_t i = 3; i < ref.size(); i += 2) {
            auto nib = [](char c) -> int {
                if (c >= '0' && c <= '9')
                    return c - '0';
                if (c >= 'a' && c <= 'f')
                    return c - 'a' + 10;
                if (c >= 'A' && c <= 'F')
                    return c - 'A' + 10;
                return -1;
            };
            int hi = nib(ref[i]), lo = nib(ref[i + 1]);
            if (hi < 0 || lo < 0)
                throw Error(ErrorCode::InvalidArgument, "invalid PKCS#11 KEK reference", {}, hint);
            out.id.push_back(static_cast<uint8_t>(hi * 16 + lo));
        }
        return out;
    }
    // Not repeated: a misplaced argument could be PHI.
    throw Error(ErrorCode::InvalidArgument, "invalid PKCS#11 KEK reference", {}, hint);
}

// The version an object's label or id gives it under `ref`; 0: not a version of it.
uint32_t version_of(const KekRef& ref, const std::string& label, const std::vector<uint8_t>& id)
{
    if (ref.by_label) {
        if (label == ref.label)
            return 1;
        std::string prefix = ref.label + ".v";
        if (label.size() <= prefix.size() || label.size() > prefix.size() + 9 || label.compare(0, prefix.size(), prefix) != 0)
            return 0;
        std::string digits = label.substr(prefix.size());
        if (digits[0] == '0' || !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }))
            return 0;
        unsigned long n = std::stoul(digits);
        return n >= 2 && n <= 0xffff ? static_cast<uint32_t>(n) : 0;
    }
    if (id == ref.id)
        return 1;
    if (id.size() != ref.id.size() + 2 || !std::equal(ref.id.begin(), ref.id.end(), id.begin()))
        return 0;
    uint32_t n = (uint32_t{id[id.size() - 2]} << 8) | id[id.size() - 1];
    return n >= 2 ? n : 0;
}

} // namespace

struct Pkcs11KeyProvider::State {
    Pkcs11Settings settings;
    void* library = nullptr;
    CK_FUNCTION_LIST_PTR fn = nullptr;
    bool initialized = false;       // C_Initialize succeeded in this process
    bool we_initialized = false;    // ... and it was this provider that did it
    pid_t initialized_pid = 0;
    CK_SLOT_ID slot = 0;
    CK_SESSION_HANDLE session = CK_INVALID_HANDLE;
    bool have_session = false;
    bool logged_in = false;
    uint8_t refused_pin_digest[32] = {};
    bool pin_refused = false;
    uint64_t calls = 0;
    // Handles of KEK versions found before: kek_ref -> version -> handle.
    std::map<std::string, std::map<uint32_t, CK_OBJECT_HANDLE>> handles;

    ~State() { shut_down(); }

    CK_RV call(CK_RV rv)
    {
        ++calls;
        return rv;
    }

    void load()
    {
        if (fn)
            return;
        if (settings.module_path.empty())
            throw Error(ErrorCode::ConfigError, "pgphi.pkcs11_module is not set", {},
                        "Set it to the path of the token's PKCS#11 library.");
        if (settings.pin_file.empty())
            throw Error(ErrorCode::ConfigError, "pgphi.pkcs11_pin_file is not set");
        if (settings.token_label.empty() && settings.slot_id < 0)
            throw Error(ErrorCode::ConfigError, "neither pgphi.pkcs11_token_label nor pgphi.pkcs11_slot is set");
        void* lib = dlopen(settings.module_path.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!lib) {
            const char* why = dlerror();
            throw Error(ErrorCode::KeyManagerUnavailable,
                        "the PKCS#11 token is unavailable: its module \"" + settings.module_path + "\" could not be loaded",
                        why ? why : "", "Check pgphi.pkcs11_module.");
        }
        auto get = reinterpret_cast<CK_C_GetFunctionList>(dlsym(lib, "C_GetFunctionList"));
        CK_FUNCTION_LIST_PTR list = nullptr;
        if (!get || get(&list) != CKR_OK || !list) {
            dlclose(lib);
            throw Error(ErrorCode::ConfigError,
                        "\"" + settings.module_path + "\" is not a PKCS#11 module (no C_GetFunctionList)");
        }
        library = lib;
        fn = list;
    }

    void initialize()
    {
        load();
        if (initialized && initialized_pid != getpid()) {
            // Forked after C_Initialize: the parent's sessions mean nothing
            // here, and the module must be initialised again (PKCS#11 6.7.7).
            initialized = false;
            have_session = false;
            logged_in = false;
            handles.clear();
            fn->C_Finalize(nullptr);
        }
        if (initialized)
            return;
        CK_C_INITIALIZE_ARGS args;
        std::memset(&args, 0, sizeof(args));
        args.flags = CKF_OS_LOCKING_OK;
        CK_RV rv = call(fn->C_Initialize(&args));
        if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED)
            raise_rv(rv == CKR_CANT_LOCK ? CKR_FUNCTION_FAILED : rv, "C_Initialize");
        initialized = true;
        we_initialized = rv == CKR_OK;
        initialized_pid = getpid();
    }

    // Forgets the session; with `finalize`, the module's state too, so that
    // the next call rescans slots (a token removed and put back).
    void reset(bool finalize)
    {
        if (fn && initialized && initialized_pid == getpid()) {
            if (have_session)
                fn->C_CloseSession(session);
            if (finalize && we_initialized) {
                fn->C_Finalize(nullptr);
                initialized = false;
            }
        }
        have_session = false;
        logged_in = false;
        handles.clear();
    }

    void shut_down()
    {
        reset(true);
        if (library)
            dlclose(library);
        library = nullptr;
        fn = nullptr;
    }

    CK_SLOT_ID find_slot()
    {
        CK_ULONG n = 0;
        CK_RV rv = call(fn->C_GetSlotList(CK_TRUE, nullptr, &n));
        if (rv != CKR_OK)
            throw SessionLost{rv, "C_GetSlotList"};
        std::vector<CK_SLOT_ID> slots(n);
        if (n > 0 && (rv = call(fn->C_GetSlotList(CK_TRUE, slots.data(), &n))) != CKR_OK)
            throw SessionLost{rv, "C_GetSlotList"};
        slots.resize(n);
        for (CK_SLOT_ID s : slots) {
            if (settings.slot_id >= 0) {
                if (s == static_cast<CK_SLOT_ID>(settings.slot_id))
                    return s;
                continue;
            }
            CK_TOKEN_INFO info;
            if (call(fn->C_GetTokenInfo(s, &info)) != CKR_OK)
                continue;
            std::string label(reinterpret_cast<const char*>(info.label), sizeof(info.label));
            label.erase(label.find_last_not_of(' ') + 1);
            if (label == settings.token_label)
                return s;
        }
        throw Error(ErrorCode::KeyManagerUnavailable, "the PKCS#11 token is unavailable: it is not present",
                    settings.slot_id >= 0 ? "No token in slot " + std::to_string(settings.slot_id) + "."
                                          : "No token labelled \"" + settings.token_label + "\" in any slot.",
                    "Check pgphi.pkcs11_token_label (or pgphi.pkcs11_slot) and that the token is connected; cached "
                    "DEKs keep working for pgphi.key_manager_grace.");
    }

    void login()
    {
        std::string pin = read_secret_text(settings.pin_file, "PKCS#11 PIN file");
        WipeOnExit wipe(pin);
        uint8_t digest[32];
        unsigned int digest_size = 0;
        EVP_Digest(pin.data(), pin.size(), digest, &digest_size, EVP_sha256(), nullptr);
        if (pin_refused && CRYPTO_memcmp(digest, refused_pin_digest, sizeof(digest)) == 0)
            throw Error(ErrorCode::KeyManagerDenied,
                        "permission denied by the PKCS#11 token: the PIN is incorrect",
                        "The token refused this PIN before; pgphi does not try it again, so as not to lock the PIN.",
                        "Put the right PIN into pgphi.pkcs11_pin_file.");
        CK_RV rv = call(fn->C_Login(session, CKU_USER, reinterpret_cast<CK_UTF8CHAR_PTR>(pin.data()),
                                    static_cast<CK_ULONG>(pin.size())));
        if (rv == CKR_PIN_INCORRECT) {
            std::memcpy(refused_pin_digest, digest, sizeof(digest));
            pin_refused = true;
        }
        OPENSSL_cleanse(digest, sizeof(digest));
        if (rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN) {
            pin_refused = false;
            logged_in = true;
            return;
        }
        if (session_lost(rv) && rv != CKR_USER_NOT_LOGGED_IN)
            throw SessionLost{rv, "C_Login"};
        raise_rv(rv, "C_Login");
    }

    void ensure_session()
    {
        initialize();
        if (have_session && logged_in)
            return;
        if (!have_session) {
            try {
                slot = find_slot();
            } catch (const Error&) {
                // Absent: the next call initialises the module again, which
                // rescans the slots (a token put back, an HSM reconnected).
                reset(true);
                throw;
            }
            CK_RV rv = call(fn->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &session));
            if (rv == CKR_TOKEN_WRITE_PROTECTED)
                rv = call(fn->C_OpenSession(slot, CKF_SERIAL_SESSION, nullptr, nullptr, &session));
            if (rv != CKR_OK) {
                if (session_lost(rv))
                    throw SessionLost{rv, "C_OpenSession"};
                raise_rv(rv, "C_OpenSession");
            }
            have_session = true;
        }
        login();
    }

    // Runs `op` in a logged-in session; after a lost session or a stale
    // handle, sets up again and retries once.
    template <typename Op>
    auto with_session(Op&& op) -> decltype(op())
    {
        for (int attempt = 0;; ++attempt) {
            try {
                ensure_session();
                return op();
            } catch (const SessionLost& lost) {
                bool deep = lost.rv != CKR_USER_NOT_LOGGED_IN && lost.rv != CKR_SESSION_HANDLE_INVALID &&
                            lost.rv != CKR_SESSION_CLOSED;
                reset(deep);
                if (attempt >= 1)
                    raise_rv(lost.rv, lost.what);
            } catch (const StaleHandle&) {
                handles.clear();
                if (attempt >= 1)
                    throw Error(ErrorCode::KeyManagerKeyDisabled,
                                "the PKCS#11 KEK is not usable: its object disappeared from the token");
            }
        }
    }

    // Checks an operation's result: a lost session or stale handle is
    // retried by with_session; everything else is final.
    void check(CK_RV rv, const char* what)
    {
        if (rv == CKR_OK)
            return;
        if (rv == CKR_OBJECT_HANDLE_INVALID || rv == CKR_KEY_HANDLE_INVALID)
            throw StaleHandle{};
        if (session_lost(rv))
            throw SessionLost{rv, what};
        raise_rv(rv, what);
    }

    std::vector<uint8_t> attribute_bytes(CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type)
    {
        CK_ATTRIBUTE attr{type, nullptr, 0};
        CK_RV rv = call(fn->C_GetAttributeValue(session, object, &attr, 1));
        if (rv == CKR_ATTRIBUTE_TYPE_INVALID || rv == CKR_ATTRIBUTE_SENSITIVE)
            return {};
        check(rv, "C_GetAttributeValue");
        if (attr.ulValueLen == CK_UNAVAILABLE_INFORMATION)
            return {};
        std::vector<uint8_t> out(attr.ulValueLen);
        attr.pValue = out.data();
        check(call(fn->C_GetAttributeValue(session, object, &attr, 1)), "C_GetAttributeValue");
        out.resize(attr.ulValueLen);
        return out;
    }

    // Every version of the KEK on the token, found afresh.
    std::map<uint32_t, CK_OBJECT_HANDLE> find_versions(const std::string& kek_ref, const KekRef& ref)
    {
        CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
        CK_KEY_TYPE type = CKK_AES;
        CK_ATTRIBUTE tmpl[] = {{CKA_CLASS, &cls, sizeof(cls)}, {CKA_KEY_TYPE, &type, sizeof(type)}};
        check(call(fn->C_FindObjectsInit(session, tmpl, 2)), "C_FindObjectsInit");
        std::vector<CK_OBJECT_HANDLE> found;
        for (;;) {
            CK_OBJECT_HANDLE batch[64];
            CK_ULONG got = 0;
            CK_RV rv = call(fn->C_FindObjects(session, batch, 64, &got));
            if (rv != CKR_OK) {
                fn->C_FindObjectsFinal(session);
                check(rv, "C_FindObjects");
            }
            found.insert(found.end(), batch, batch + got);
            if (got < 64)
                break;
        }
        check(call(fn->C_FindObjectsFinal(session)), "C_FindObjectsFinal");
        std::map<uint32_t, CK_OBJECT_HANDLE> versions;
        for (CK_OBJECT_HANDLE object : found) {
            std::vector<uint8_t> label = attribute_bytes(object, CKA_LABEL);
            std::vector<uint8_t> id = attribute_bytes(object, CKA_ID);
            uint32_t v = version_of(ref, std::string(label.begin(), label.end()), id);
            if (v == 0)
                continue;
            if (versions.count(v) != 0)
                throw Error(ErrorCode::KeyManagerKeyDisabled,
                            "the PKCS#11 KEK is not usable: the token holds two objects for version " +
                                std::to_string(v),
                            {}, "Delete or relabel one of them.");
            versions[v] = object;
        }
        handles[kek_ref] = versions;
        return versions;
    }

    // The object of one version, checked to be a usable KEK.
    CK_OBJECT_HANDLE object_of(const std::string& kek_ref, const KekRef& ref, uint32_t version, bool fresh)
    {
        auto cached = handles.find(kek_ref);
        if (!fresh && cached != handles.end() && cached->second.count(version) != 0)
            return cached->second[version];
        auto versions = find_versions(kek_ref, ref);
        auto it = versions.find(version);
        if (it == versions.end())
            throw Error(ErrorCode::KeyManagerKeyDisabled,
                        "the PKCS#11 KEK is not usable: version " + std::to_string(version) +
                            " of the KEK is not on the token",
                        "It may have been deleted, or the token is not the one the DEK was wrapped on.");
        require_safe(it->second);
        return it->second;
    }

    void require_safe(CK_OBJECT_HANDLE object)
    {
        CK_BBOOL extractable = CK_TRUE, sensitive = CK_FALSE;
        CK_ATTRIBUTE attrs[] = {{CKA_EXTRACTABLE, &extractable, sizeof(extractable)},
                                {CKA_SENSITIVE, &sensitive, sizeof(sensitive)}};
        check(call(fn->C_GetAttributeValue(session, object, attrs, 2)), "C_GetAttributeValue");
        if (extractable != CK_FALSE || sensitive != CK_TRUE)
            throw Error(ErrorCode::KeyManagerKeyDisabled,
                        "the PKCS#11 KEK is not usable: it is extractable or not sensitive",
                        "pgphi uses only AES keys with CKA_EXTRACTABLE false and CKA_SENSITIVE true.",
                        "Generate the KEK on the token as non-extractable and sensitive.");
    }

    uint32_t newest(const std::string& kek_ref, const KekRef& ref, CK_OBJECT_HANDLE* object)
    {
        auto versions = find_versions(kek_ref, ref);
        if (versions.empty())
            throw Error(ErrorCode::KeyManagerKeyDisabled, "the PKCS#11 KEK is not usable: it is not on the token",
                        "No AES secret-key object on the token has the KEK's label or id.",
                        "Create it (pgphi.create_kek('pkcs11', ...), or the token's own tools), or check the KEK reference.");
        require_safe(versions.rbegin()->second);
        *object = versions.rbegin()->second;
        return versions.rbegin()->first;
    }

    bool mechanism_ok(CK_MECHANISM_TYPE mech, CK_FLAGS needed)
    {
        CK_MECHANISM_INFO info;
        CK_RV rv = call(fn->C_GetMechanismInfo(slot, mech, &info));
        if (rv == CKR_MECHANISM_INVALID)
            return false;
        check(rv, "C_GetMechanismInfo");
        return (info.flags & needed) == needed;
    }

    uint8_t choose_mechanism()
    {
        const std::string& m = settings.mechanism;
        if (m == "aes_gcm")
            return kMechGcm;
        if (m == "aes_key_wrap_pad")
            return kMechKwp;
        if (mechanism_ok(CKM_AES_GCM, CKF_ENCRYPT | CKF_DECRYPT))
            return kMechGcm;
        if (mechanism_ok(CKM_AES_KEY_WRAP_PAD, CKF_WRAP | CKF_UNWRAP))
            return kMechKwp;
        throw Error(ErrorCode::ProviderError,
                    "the PKCS#11 token supports neither CKM_AES_GCM nor CKM_AES_KEY_WRAP_PAD");
    }

    static std::vector<uint8_t> aad_for(const uint8_t* header, const DekBinding& binding)
    {
        std::vector<uint8_t> aad(kAadLabel, kAadLabel + sizeof(kAadLabel) - 1);
        aad.insert(aad.end(), header, header + kHeaderSize);
        uint8_t ids[8];
        put_be32(ids, binding.key_id);
        put_be32(ids + 4, binding.version);
        aad.insert(aad.end(), ids, ids + 8);
        return aad;
    }

    std::vector<uint8_t> wrap_with(CK_OBJECT_HANDLE kek, uint32_t kek_version, uint8_t mech, const SecureBytes& dek,
                                   const DekBinding& binding)
    {
        if (dek.size() != KeyProvider::kDekSize)
            throw Error(ErrorCode::InvalidArgument, "a DEK has 32 bytes");
        std::vector<uint8_t> blob(kHeaderSize);
        blob[0] = kLayoutVersion;
        blob[1] = mech;
        put_be32(&blob[2], kek_version);
        if (mech == kMechGcm) {
            uint8_t iv[kIvSize];
            if (RAND_bytes(iv, sizeof(iv)) != 1)
                throw Error(ErrorCode::Internal, "could not draw a random IV");
            std::vector<uint8_t> aad = aad_for(blob.data(), binding);
            CK_GCM_PARAMS gcm;
            std::memset(&gcm, 0, sizeof(gcm));
            gcm.pIv = iv;
            gcm.ulIvLen = kIvSize;
            gcm.ulIvBits = kIvSize * 8;
            gcm.pAAD = aad.data();
            gcm.ulAADLen = aad.size();
            gcm.ulTagBits = kTagSize * 8;
            CK_MECHANISM mechanism{CKM_AES_GCM, &gcm, sizeof(gcm)};
            check(call(fn->C_EncryptInit(session, &mechanism, kek)), "C_EncryptInit");
            uint8_t out[KeyProvider::kDekSize + kTagSize + 16];
            CK_ULONG out_size = sizeof(out);
            check(call(fn->C_Encrypt(session, const_cast<uint8_t*>(dek.data()), dek.size(), out, &out_size)),
                  "C_Encrypt");
            if (out_size != KeyProvider::kDekSize + kTagSize)
                throw Error(ErrorCode::ProviderError, "the PKCS#11 token returned a ciphertext of the wrong size");
            // A token that makes its own IVs (FIPS mode) writes it back into pIv.
            blob.insert(blob.end(), iv, iv + kIvSize);
            blob.insert(blob.end(), out, out + out_size);
            return blob;
        }
        // Key wrap: the DEK and its binding as a short-lived session object.
        SecureBytes bound(kBoundSize);
        put_be32(bound.data(), binding.key_id);
        put_be32(bound.data() + 4, binding.version);
        std::memcpy(bound.data() + 8, dek.data(), dek.size());
        CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
        CK_KEY_TYPE type = CKK_GENERIC_SECRET;
        CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
        CK_ATTRIBUTE tmpl[] = {{CKA_CLASS, &cls, sizeof(cls)},       {CKA_KEY_TYPE, &type, sizeof(type)},
                               {CKA_TOKEN, &no, sizeof(no)},         {CKA_PRIVATE, &yes, sizeof(yes)},
                               {CKA_SENSITIVE, &no, sizeof(no)},     {CKA_EXTRACTABLE, &yes, sizeof(yes)},
                               {CKA_VALUE, bound.data(), bound.size()}};
        CK_OBJECT_HANDLE temp = CK_INVALID_HANDLE;
        check(call(fn->C_CreateObject(session, tmpl, sizeof(tmpl) / sizeof(tmpl[0]), &temp)), "C_CreateObject");
        CK_MECHANISM mechanism{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
        uint8_t out[64];
        CK_ULONG out_size = sizeof(out);
        CK_RV rv = call(fn->C_WrapKey(session, &mechanism, kek, temp, out, &out_size));
        fn->C_DestroyObject(session, temp);
        check(rv, "C_WrapKey");
        if (out_size != kKwpWrappedSize - kHeaderSize)
            throw Error(ErrorCode::ProviderError, "the PKCS#11 token returned a wrapped key of the wrong size");
        blob.insert(blob.end(), out, out + out_size);
        return blob;
    }

    // Tokens answer a failed GCM tag or key-wrap integrity check with
    // CKR_ENCRYPTED_DATA_INVALID, or (SoftHSM 2.6) CKR_GENERAL_ERROR: if the
    // session is still healthy, it was the wrapped DEK, not the device.
    CK_RV data_fault(CK_RV rv)
    {
        if (rv != CKR_GENERAL_ERROR && rv != CKR_FUNCTION_FAILED)
            return rv;
        CK_SESSION_INFO info;
        if (call(fn->C_GetSessionInfo(session, &info)) == CKR_OK &&
            (info.state == CKS_RW_USER_FUNCTIONS || info.state == CKS_RO_USER_FUNCTIONS))
            return CKR_ENCRYPTED_DATA_INVALID;
        return rv;
    }

    SecureBytes unwrap_with(CK_OBJECT_HANDLE kek, ByteView wrapped, const DekBinding& binding)
    {
        if (wrapped.data[1] == kMechGcm) {
            std::vector<uint8_t> aad = aad_for(wrapped.data, binding);
            uint8_t iv[kIvSize];
            std::memcpy(iv, wrapped.data + kHeaderSize, kIvSize);
            CK_GCM_PARAMS gcm;
            std::memset(&gcm, 0, sizeof(gcm));
            gcm.pIv = iv;
            gcm.ulIvLen = kIvSize;
            gcm.ulIvBits = kIvSize * 8;
            gcm.pAAD = aad.data();
            gcm.ulAADLen = aad.size();
            gcm.ulTagBits = kTagSize * 8;
            CK_MECHANISM mechanism{CKM_AES_GCM, &gcm, sizeof(gcm)};
            check(call(fn->C_DecryptInit(session, &mechanism, kek)), "C_DecryptInit");
            SecureBytes out(KeyProvider::kDekSize + kTagSize);
            CK_ULONG out_size = out.size();
            const uint8_t* body = wrapped.data + kHeaderSize + kIvSize;
            CK_RV rv = call(fn->C_Decrypt(session, const_cast<uint8_t*>(body), KeyProvider::kDekSize + kTagSize,
                                          out.data(), &out_size));
            check(data_fault(rv), "C_Decrypt");
            if (out_size != KeyProvider::kDekSize)
                throw Error(ErrorCode::WrappedDekInvalid, "the PKCS#11 token unwrapped a DEK of the wrong size");
            return SecureBytes(out.data(), KeyProvider::kDekSize);
        }
        CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
        CK_KEY_TYPE type = CKK_GENERIC_SECRET;
        CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
        CK_ATTRIBUTE tmpl[] = {{CKA_CLASS, &cls, sizeof(cls)},   {CKA_KEY_TYPE, &type, sizeof(type)},
                               {CKA_TOKEN, &no, sizeof(no)},     {CKA_PRIVATE, &yes, sizeof(yes)},
                               {CKA_SENSITIVE, &no, sizeof(no)}, {CKA_EXTRACTABLE, &yes, sizeof(yes)}};
        CK_MECHANISM mechanism{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
        CK_OBJECT_HANDLE temp = CK_INVALID_HANDLE;
        check(data_fault(call(fn->C_UnwrapKey(session, &mechanism, kek,
                                              const_cast<uint8_t*>(wrapped.data + kHeaderSize),
                                              wrapped.size - kHeaderSize, tmpl, sizeof(tmpl) / sizeof(tmpl[0]),
                                              &temp))),
              "C_UnwrapKey");
        SecureBytes bound(kBoundSize);
        CK_ATTRIBUTE attr{CKA_VALUE, bound.data(), bound.size()};
        CK_RV rv = call(fn->C_GetAttributeValue(session, temp, &attr, 1));
        fn->C_DestroyObject(session, temp);
        check(rv, "C_GetAttributeValue");
        uint8_t expect[8];
        put_be32(expect, binding.key_id);
        put_be32(expect + 4, binding.version);
        if (attr.ulValueLen != kBoundSize || CRYPTO_memcmp(expect, bound.data(), 8) != 0)
            throw Error(ErrorCode::WrappedDekInvalid,
                        "the PKCS#11 token cannot unwrap the DEK: it belongs to another key or version");
        return SecureBytes(bound.data() + 8, KeyProvider::kDekSize);
    }
};

namespace {

// The KEK version a wrapped DEK names, after checking its layout.
uint32_t parse_wrapped(ByteView wrapped)
{
    if (wrapped.size < kHeaderSize || wrapped.data[0] != kLayoutVersion ||
        !((wrapped.data[1] == kMechGcm && wrapped.size == kGcmWrappedSize) ||
          (wrapped.data[1] == kMechKwp && wrapped.size == kKwpWrappedSize)))
        throw Error(ErrorCode::WrappedDekInvalid, "the wrapped DEK is not one the PKCS#11 provider made");
    uint32_t v = get_be32(wrapped.data + 2);
    if (v == 0)
        throw Error(ErrorCode::WrappedDekInvalid, "the wrapped DEK is not one the PKCS#11 provider made");
    return v;
}

std::string version_text(uint32_t v) { return "v" + std::to_string(v); }

} // namespace

Pkcs11KeyProvider::Pkcs11KeyProvider(Pkcs11Settings settings) : state_(std::make_unique<State>())
{
    state_->settings = std::move(settings);
}

Pkcs11KeyProvider::~Pkcs11KeyProvider() = default;

uint64_t Pkcs11KeyProvider::token_calls() const { return state_->calls; }

void Pkcs11KeyProvider::drop_session_for_testing() { state_->reset(true); }

WrappedDek Pkcs11KeyProvider::wrap(const std::string& kek_ref, const SecureBytes& dek, const DekBinding& binding)
{
    KekRef ref = parse_kek_ref(kek_ref);
    State& s = *state_;
    return s.with_session([&] {
        CK_OBJECT_HANDLE kek;
        uint32_t v = s.newest(kek_ref, ref, &kek);
        uint8_t mech = s.choose_mechanism();
        return WrappedDek{s.wrap_with(kek, v, mech, dek, binding), version_text(v)};
    });
}

SecureBytes Pkcs11KeyProvider::unwrap(const std::string& kek_ref, ByteView wrapped, const DekBinding& binding)
{
    KekRef ref = parse_kek_ref(kek_ref);
    uint32_t v = parse_wrapped(wrapped);
    State& s = *state_;
    bool fresh = false;
    return s.with_session([&] {
        // A stale handle (StaleHandle) makes the retry look the object up again.
        CK_OBJECT_HANDLE kek = s.object_of(kek_ref, ref, v, fresh);
        fresh = true;
        return s.unwrap_with(kek, wrapped, binding);
    });
}

WrappedDek Pkcs11KeyProvider::rewrap(const std::string& kek_ref, ByteView wrapped, const DekBinding& binding)
{
    KekRef ref = parse_kek_ref(kek_ref);
    uint32_t v = parse_wrapped(wrapped);
    State& s = *state_;
    return s.with_session([&] {
        CK_OBJECT_HANDLE old_kek = s.object_of(kek_ref, ref, v, true);
        SecureBytes dek = s.unwrap_with(old_kek, wrapped, binding);
        CK_OBJECT_HANDLE kek;
        uint32_t newest = s.newest(kek_ref, ref, &kek);
        uint8_t mech = s.choose_mechanism();
        return WrappedDek{s.wrap_with(kek, newest, mech, dek, binding), version_text(newest)};
    });
}

KekDescription Pkcs11KeyProvider::describe(const std::string& kek_ref)
{
    KekRef ref = parse_kek_ref(kek_ref);
    State& s = *state_;
    return s.with_session([&] {
        CK_OBJECT_HANDLE kek;
        uint32_t v = s.newest(kek_ref, ref, &kek);
        return KekDescription{"pkcs11", kek_ref, version_text(v)};
    });
}

std::string Pkcs11KeyProvider::create_kek(const std::string& kek_ref)
{
    KekRef ref = parse_kek_ref(kek_ref);
    State& s = *state_;
    return s.with_session([&] {
        auto versions = s.find_versions(kek_ref, ref);
        uint32_t next = versions.empty() ? 1 : versions.rbegin()->first + 1;
        if (next > 0xffff)
            throw Error(ErrorCode::ProviderError, "the PKCS#11 KEK has too many versions");
        std::string label;
        std::vector<uint8_t> id;
        if (ref.by_label) {
            // No CKA_ID: a copy of version 1's would make that id name two
            // objects, and a KEK referenced by id then unusable.
            label = next == 1 ? ref.label : ref.label + ".v" + std::to_string(next);
        } else {
            id = ref.id;
            if (next > 1) {
                id.push_back(static_cast<uint8_t>(next >> 8));
                id.push_back(static_cast<uint8_t>(next));
            }
            label = "pgphi KEK v" + std::to_string(next);
        }
        CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
        CK_KEY_TYPE type = CKK_AES;
        CK_ULONG size = 32;
        CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
        std::vector<CK_ATTRIBUTE> tmpl = {
            {CKA_CLASS, &cls, sizeof(cls)},         {CKA_KEY_TYPE, &type, sizeof(type)},
            {CKA_VALUE_LEN, &size, sizeof(size)},   {CKA_TOKEN, &yes, sizeof(yes)},
            {CKA_PRIVATE, &yes, sizeof(yes)},       {CKA_SENSITIVE, &yes, sizeof(yes)},
            {CKA_EXTRACTABLE, &no, sizeof(no)},     {CKA_ENCRYPT, &yes, sizeof(yes)},
            {CKA_DECRYPT, &yes, sizeof(yes)},       {CKA_WRAP, &yes, sizeof(yes)},
            {CKA_UNWRAP, &yes, sizeof(yes)},        {CKA_MODIFIABLE, &no, sizeof(no)},
            {CKA_LABEL, label.data(), label.size()}};
        if (!id.empty())
            tmpl.push_back({CKA_ID, id.data(), id.size()});
        CK_MECHANISM mechanism{CKM_AES_KEY_GEN, nullptr, 0};
        CK_OBJECT_HANDLE object = CK_INVALID_HANDLE;
        s.check(s.call(s.fn->C_GenerateKey(s.session, &mechanism, tmpl.data(), tmpl.size(), &object)),
                "C_GenerateKey");
        s.handles.erase(kek_ref);
        return version_text(next);
    });
}

std::string Pkcs11KeyProvider::create_dedicated_kek(const std::string& kek_name, const std::string&)
{
    KekRef ref = parse_kek_ref(kek_name);
    bool exists = state_->with_session([&] { return !state_->find_versions(kek_name, ref).empty(); });
    if (exists)
        throw Error(ErrorCode::InvalidArgument, "a key of that reference already exists on the PKCS#11 token",
                    "A dedicated KEK is made for one pgphi key; an existing key may wrap other data.",
                    "Omit kek, and pgphi names a new key label:pgphi-dedicated-<key>-<random>.");
    create_kek(kek_name);
    return kek_name;
}

std::string Pkcs11KeyProvider::delete_dedicated_kek(const std::string& kek_ref)
{
    KekRef ref = parse_kek_ref(kek_ref);
    State& s = *state_;
    return s.with_session([&] {
        auto versions = s.find_versions(kek_ref, ref);
        for (const auto& [version, object] : versions)
            s.check(s.call(s.fn->C_DestroyObject(s.session, object)), "C_DestroyObject");
        s.handles.erase(kek_ref);
        return versions.empty() ? std::string("the PKCS#11 key was already destroyed")
                                : "the PKCS#11 key was destroyed on the token (" + std::to_string(versions.size()) +
                                      (versions.size() == 1 ? " version)" : " versions)");
    });
}

} // namespace pgphi
