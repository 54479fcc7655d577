#include "kmip_provider.hpp"

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include "error.hpp"

namespace pgphi {

namespace {

constexpr uint8_t kWrappedVersion = 1;
constexpr size_t kMaxUniqueId = 255;
const char kAadLabel[] = "pgphi kmip dek v1";

// Wipes a received message (a Decrypt answer carries the DEK).
struct WipeVector {
    std::vector<uint8_t>& v;
    ~WipeVector() { OPENSSL_cleanse(v.data(), v.size()); }
};

[[noreturn]] void invalid_wrapped(const char* what)
{
    throw Error(ErrorCode::WrappedDekInvalid, std::string("wrapped DEK is not a KMIP-wrapped DEK: ") + what,
                "The key catalog entry may have been created by another provider or damaged.");
}

} // namespace

std::vector<uint8_t> KmipWrapped::serialize() const
{
    std::vector<uint8_t> out;
    out.reserve(3 + unique_id.size() + iv.size() + tag.size() + ciphertext.size());
    out.push_back(kWrappedVersion);
    out.push_back(static_cast<uint8_t>(unique_id.size() >> 8));
    out.push_back(static_cast<uint8_t>(unique_id.size()));
    out.insert(out.end(), unique_id.begin(), unique_id.end());
    out.insert(out.end(), iv.begin(), iv.end());
    out.insert(out.end(), tag.begin(), tag.end());
    out.insert(out.end(), ciphertext.begin(), ciphertext.end());
    return out;
}

KmipWrapped KmipWrapped::parse(ByteView blob)
{
    if (blob.size < 3 || blob.data[0] != kWrappedVersion)
        invalid_wrapped("unknown format");
    size_t id_size = (size_t(blob.data[1]) << 8) | blob.data[2];
    if (id_size == 0 || id_size > kMaxUniqueId)
        invalid_wrapped("bad object identifier length");
    if (blob.size != 3 + id_size + kmip::kGcmIvSize + kmip::kGcmTagSize + KeyProvider::kDekSize)
        invalid_wrapped("wrong length");
    KmipWrapped w;
    const uint8_t* p = blob.data + 3;
    w.unique_id.assign(reinterpret_cast<const char*>(p), id_size);
    p += id_size;
    w.iv.assign(p, p + kmip::kGcmIvSize);
    p += kmip::kGcmIvSize;
    w.tag.assign(p, p + kmip::kGcmTagSize);
    p += kmip::kGcmTagSize;
    w.ciphertext.assign(p, p + KeyProvider::kDekSize);
    for (char c : w.unique_id)
        if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7f)
            invalid_wrapped("bad object identifier");
    return w;
}

std::vector<uint8_t> kmip_dek_aad(const DekBinding& binding)
{
    std::vector<uint8_t> aad(kAadLabel, kAadLabel + sizeof(kAadLabel) - 1);
    for (uint32_t v : {binding.key_id, binding.version})
        for (int shift = 24; shift >= 0; shift -= 8)
            aad.push_back(static_cast<uint8_t>(v >> shift));
    return aad;
}

KmipKeyProvider::KmipKeyProvider(KmipSettings settings)
    : settings_(std::move(settings)), client_(settings_.client)
{
}

void KmipKeyProvider::check_ref(const std::string& kek_ref)
{
    if (kek_ref.empty() || kek_ref.size() > kMaxUniqueId)
        throw Error(ErrorCode::InvalidArgument, "the KEK reference is not a KMIP key name or unique identifier",
                    {}, "Pass the KMIP key's Name or Unique Identifier as kek, for example kek => 'pgphi-kek'.");
    for (char c : kek_ref)
        if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f)
            throw Error(ErrorCode::InvalidArgument, "the KEK reference contains a control character");
}

kmip::Response KmipKeyProvider::call(kmip::Operation operation, kmip::Item payload)
{
    std::vector<uint8_t> request = kmip::request_message(operation, std::move(payload));
    WipeVector wipe_request{request};
    kmip::Response response;
    Error last_error(ErrorCode::KeyManagerUnavailable, "the KMIP server did not answer");
    bool done = with_retries(settings_.retry, [&](int) {
        try {
            std::vector<uint8_t> answer = client_.exchange(request);
            WipeVector wipe_answer{answer};
            response = kmip::parse_response(ByteView(answer.data(), answer.size()), operation);
        } catch (const Error& e) {
            if (e.code() != ErrorCode::KeyManagerUnavailable)
                throw;
            last_error = e;
            return false;
        }
        return true;
    });
    if (!done)
        throw last_error;
    return response;
}

void KmipKeyProvider::refuse(kmip::Operation operation, const kmip::Response& response, const std::string& unique_id,
                             bool show_id)
{
    // The server's own message often repeats the object's identifier: it is
    // left out when that identifier is the caller's reference.
    bool quote_server = !response.message.empty() &&
                        (show_id || response.message.find(unique_id) == std::string::npos);
    std::string said = std::string(kmip::reason_name(response.reason)) + (quote_server ? ": " + response.message : "");
    std::string object = show_id ? "the KMIP KEK object \"" + unique_id + "\"" : std::string("the KMIP KEK");
    bool uses_key = operation == kmip::Operation::Encrypt || operation == kmip::Operation::Decrypt;
    if (response.status != 1)
        throw Error(ErrorCode::ProviderError, "the KMIP server did not complete the request (status " +
                                                  std::to_string(response.status) + "): " + said);
    if (response.reason == kmip::reason::PermissionDenied && uses_key) {
        // PyKMIP and others refuse a key that is not active this way; the
        // key's state tells a lifecycle refusal from a denial.
        kmip::Response state = call(kmip::Operation::GetAttributes, kmip::get_state(unique_id));
        if (state.ok()) {
            uint32_t s = kmip::state_of(state.payload);
            if (s != static_cast<uint32_t>(kmip::State::Active))
                throw Error(ErrorCode::KeyManagerKeyDisabled, object + " is " + kmip::state_name(s),
                            "The KMIP server keeps a key that is not active from encrypting or decrypting.",
                            s == static_cast<uint32_t>(kmip::State::PreActive)
                                ? "Activate the key on the KMIP server."
                                : "Rewrap the keys under an active KEK (pgphi.rewrap_keys) while one is usable.");
        }
    }
    switch (response.reason) {
    case kmip::reason::PermissionDenied:
    case kmip::reason::AuthenticationNotSuccessful:
        throw Error(ErrorCode::KeyManagerDenied, "permission denied by the KMIP server: " + said,
                    "The KMIP server identifies pgphi by its client certificate; check that the key "
                    "belongs to, or is shared with, that identity.");
    case kmip::reason::ItemNotFound:
        if (operation == kmip::Operation::Decrypt)
            throw Error(ErrorCode::KeyManagerKeyDisabled,
                        object + " that wrapped this DEK no longer exists: " + said,
                        "It was destroyed on the KMIP server; DEKs wrapped only by it cannot be unwrapped.");
        throw Error(ErrorCode::KeyNotFound, "the KMIP server has no such key: " + said, {},
                    "kek names a symmetric key by its Name attribute or its Unique Identifier; the key must "
                    "belong to the identity of pgphi's client certificate.");
    case kmip::reason::ObjectArchived:
        throw Error(ErrorCode::KeyManagerKeyDisabled, object + " is archived");
    case kmip::reason::CryptographicFailure:
        if (operation == kmip::Operation::Decrypt)
            throw Error(ErrorCode::WrappedDekInvalid, "the KMIP server could not unwrap the DEK: " + said,
                        "The wrapped DEK was altered, or moved to another key or version in the catalog.");
        break;
    case kmip::reason::OperationNotSupported:
    case 0x08: // Feature Not Supported
        throw Error(ErrorCode::ProviderError, "the KMIP server does not support what pgphi needs: " + said, {},
                    "pgphi needs KMIP 1.4 Encrypt and Decrypt with AES-GCM and additional data.");
    default:
        break;
    }
    throw Error(ErrorCode::ProviderError, "the KMIP server refused the request: " + said);
}

KmipKeyProvider::Resolved KmipKeyProvider::resolve(const std::string& kek_ref)
{
    check_ref(kek_ref);
    kmip::Response located = call(kmip::Operation::Locate, kmip::locate_by_name(kek_ref));
    if (!located.ok())
        refuse(kmip::Operation::Locate, located, kek_ref, false);
    std::vector<std::string> ids = kmip::located_ids(located.payload);
    if (!ids.empty())
        return Resolved{ids.front(), true}; // the newest active key of that name
    // No active key of that name: keys of that name that are not active
    // (their state is the answer), or the reference is a unique identifier.
    kmip::Response any = call(kmip::Operation::Locate, kmip::locate_by_name(kek_ref, false));
    if (any.ok()) {
        ids = kmip::located_ids(any.payload);
        if (!ids.empty()) {
            kmip::Response state = call(kmip::Operation::GetAttributes, kmip::get_state(ids.front()));
            if (!state.ok())
                refuse(kmip::Operation::GetAttributes, state, ids.front(), true);
            uint32_t s = kmip::state_of(state.payload);
            throw Error(ErrorCode::KeyManagerKeyDisabled,
                        "no key of the KEK's name is active on the KMIP server: the newest, \"" + ids.front() +
                            "\", is " + kmip::state_name(s),
                        {}, "Activate a key of that name, or create a new one (pgphi.create_kek).");
        }
    }
    return Resolved{kek_ref, false};
}

WrappedDek KmipKeyProvider::wrap(const std::string& kek_ref, const SecureBytes& dek, const DekBinding& binding)
{
    return wrap_under(resolve(kek_ref), dek, binding);
}

WrappedDek KmipKeyProvider::wrap_under(const Resolved& resolved, const SecureBytes& dek, const DekBinding& binding)
{
    if (dek.size() != kDekSize)
        throw Error(ErrorCode::Internal, "a DEK to wrap has the wrong size");
    const std::string& unique_id = resolved.unique_id;
    if (unique_id.size() > kMaxUniqueId)
        throw Error(ErrorCode::ProviderError, "the KMIP key's unique identifier is too long");
    KmipWrapped w;
    w.unique_id = unique_id;
    w.iv.resize(kmip::kGcmIvSize);
    if (RAND_bytes(w.iv.data(), static_cast<int>(w.iv.size())) != 1)
        throw Error(ErrorCode::Internal, "could not draw a GCM IV");
    std::vector<uint8_t> aad = kmip_dek_aad(binding);
    kmip::Response response =
        call(kmip::Operation::Encrypt, kmip::encrypt(unique_id, ByteView(dek.data(), dek.size()),
                                                     ByteView(w.iv.data(), w.iv.size()), ByteView(aad.data(), aad.size())));
    if (!response.ok())
        refuse(kmip::Operation::Encrypt, response, unique_id, resolved.known);
    kmip::Encrypted sealed = kmip::encrypted_of(response.payload, kDekSize);
    w.ciphertext = std::move(sealed.ciphertext);
    w.tag = std::move(sealed.tag);
    return WrappedDek{w.serialize(), unique_id};
}

SecureBytes KmipKeyProvider::unwrap(const std::string& kek_ref, ByteView wrapped, const DekBinding& binding)
{
    check_ref(kek_ref);
    KmipWrapped w = KmipWrapped::parse(wrapped);
    std::vector<uint8_t> aad = kmip_dek_aad(binding);
    kmip::Response response = call(
        kmip::Operation::Decrypt,
        kmip::decrypt(w.unique_id, ByteView(w.ciphertext.data(), w.ciphertext.size()), ByteView(w.iv.data(), w.iv.size()),
                      ByteView(aad.data(), aad.size()), ByteView(w.tag.data(), w.tag.size())));
    if (!response.ok())
        refuse(kmip::Operation::Decrypt, response, w.unique_id, true);
    return kmip::decrypted_of(response.payload, kDekSize);
}

WrappedDek KmipKeyProvider::rewrap(const std::string& kek_ref, ByteView wrapped, const DekBinding& binding)
{
    KmipWrapped old = KmipWrapped::parse(wrapped);
    Resolved current = resolve(kek_ref);
    if (current.unique_id == old.unique_id)
        return WrappedDek{std::vector<uint8_t>(wrapped.data, wrapped.data + wrapped.size), current.unique_id};
    // KMIP has no re-encrypt: the DEK is unwrapped and wrapped again in the
    // broker, and wiped there.
    SecureBytes dek = unwrap(kek_ref, wrapped, binding);
    return wrap_under(current, dek, binding);
}

KekDescription KmipKeyProvider::describe(const std::string& kek_ref)
{
    Resolved resolved = resolve(kek_ref);
    kmip::Response state = call(kmip::Operation::GetAttributes, kmip::get_state(resolved.unique_id));
    if (!state.ok())
        refuse(kmip::Operation::GetAttributes, state, resolved.unique_id, resolved.known);
    uint32_t s = kmip::state_of(state.payload);
    if (s != static_cast<uint32_t>(kmip::State::Active))
        throw Error(ErrorCode::KeyManagerKeyDisabled, std::string("the KMIP KEK is ") + kmip::state_name(s));
    return KekDescription{name(), kek_ref, resolved.unique_id};
}

std::string KmipKeyProvider::create_kek(const std::string& kek_name)
{
    check_ref(kek_name);
    kmip::Response created = call(kmip::Operation::Create, kmip::create_aes256(kek_name));
    if (!created.ok())
        refuse(kmip::Operation::Create, created, kek_name, false);
    std::string unique_id = kmip::unique_id_of(created.payload);
    kmip::Response activated = call(kmip::Operation::Activate, kmip::activate(unique_id));
    if (!activated.ok())
        refuse(kmip::Operation::Activate, activated, unique_id, true);
    return unique_id;
}

std::string KmipKeyProvider::create_dedicated_kek(const std::string& kek_name, const std::string&)
{
    check_ref(kek_name);
    kmip::Response any = call(kmip::Operation::Locate, kmip::locate_by_name(kek_name, false));
    if (!any.ok())
        refuse(kmip::Operation::Locate, any, kek_name, false);
    if (!kmip::located_ids(any.payload).empty())
        throw Error(ErrorCode::InvalidArgument, "a KMIP object of that name already exists",
                    "A dedicated KEK is made for one pgphi key; an existing object may wrap other data.",
                    "Omit kek, and pgphi names a new object pgphi-dedicated-<key>-<random>.");
    return create_kek(kek_name);
}

std::string KmipKeyProvider::delete_dedicated_kek(const std::string& kek_ref)
{
    check_ref(kek_ref);
    kmip::Response state = call(kmip::Operation::GetAttributes, kmip::get_state(kek_ref));
    if (!state.ok() && state.reason == kmip::reason::ItemNotFound)
        return "the KMIP object was already destroyed";
    if (!state.ok())
        refuse(kmip::Operation::GetAttributes, state, kek_ref, true);
    uint32_t s = kmip::state_of(state.payload);
    if (s == static_cast<uint32_t>(kmip::State::Destroyed) || s == static_cast<uint32_t>(kmip::State::DestroyedCompromised))
        return "the KMIP object was already destroyed";
    if (s == static_cast<uint32_t>(kmip::State::Active)) {
        kmip::Response revoked = call(kmip::Operation::Revoke, kmip::revoke_ceased(kek_ref));
        if (!revoked.ok())
            refuse(kmip::Operation::Revoke, revoked, kek_ref, true);
    }
    kmip::Response destroyed = call(kmip::Operation::Destroy, kmip::destroy(kek_ref));
    if (!destroyed.ok())
        refuse(kmip::Operation::Destroy, destroyed, kek_ref, true);
    return "the KMIP object was revoked and destroyed";
}

} // namespace pgphi
