#include "kmip_messages.hpp"

#include "error.hpp"

namespace pgphi::kmip {

namespace {

// Enumeration values (KMIP 1.4, section 9.1.3.2).
constexpr uint32_t kObjectTypeSymmetricKey = 0x02;
constexpr uint32_t kAlgorithmAes = 0x03;
constexpr uint32_t kModeGcm = 0x09;
constexpr uint32_t kNameTypeText = 0x01;
constexpr int32_t kUsageEncrypt = 0x04;
constexpr int32_t kUsageDecrypt = 0x08;

[[noreturn]] void bad_answer(const std::string& what)
{
    throw Error(ErrorCode::ProviderError, "the KMIP server's answer is unusable: " + what);
}

Item attribute(const std::string& name, Item value)
{
    value.tag = tag::AttributeValue;
    return Item::structure(tag::Attribute, {Item::text(tag::AttributeName, name), std::move(value)});
}

Item name_value(const std::string& name)
{
    return Item::structure(tag::AttributeValue,
                           {Item::text(tag::NameValue, name), Item::enumeration(tag::NameType, kNameTypeText)});
}

Item gcm_parameters()
{
    return Item::structure(tag::CryptographicParameters,
                           {Item::enumeration(tag::BlockCipherMode, kModeGcm),
                            Item::enumeration(tag::CryptographicAlgorithm, kAlgorithmAes),
                            Item::integer(tag::TagLength, static_cast<int32_t>(kGcmTagSize))});
}

const Item& need(const Item& parent, uint32_t t, Type type, const char* what)
{
    const Item* found = parent.find(t, type);
    if (!found)
        bad_answer(std::string("it has no ") + what);
    return *found;
}

} // namespace

const char* state_name(uint32_t state)
{
    switch (static_cast<State>(state)) {
    case State::PreActive: return "pre-active";
    case State::Active: return "active";
    case State::Deactivated: return "deactivated";
    case State::Compromised: return "compromised";
    case State::Destroyed: return "destroyed";
    case State::DestroyedCompromised: return "destroyed (compromised)";
    }
    return "in an unknown state";
}

const char* reason_name(uint32_t r)
{
    switch (r) {
    case reason::ItemNotFound: return "Item Not Found";
    case reason::AuthenticationNotSuccessful: return "Authentication Not Successful";
    case reason::InvalidMessage: return "Invalid Message";
    case reason::OperationNotSupported: return "Operation Not Supported";
    case 0x06: return "Missing Data";
    case 0x07: return "Invalid Field";
    case 0x08: return "Feature Not Supported";
    case reason::CryptographicFailure: return "Cryptographic Failure";
    case reason::IllegalOperation: return "Illegal Operation";
    case reason::PermissionDenied: return "Permission Denied";
    case reason::ObjectArchived: return "Object Archived";
    case 0x100: return "General Failure";
    }
    return "reason not known to pgphi";
}

std::vector<uint8_t> request_message(Operation operation, Item payload)
{
    payload.tag = tag::RequestPayload;
    payload.type = Type::Structure;
    Item header = Item::structure(
        tag::RequestHeader,
        {Item::structure(tag::ProtocolVersion, {Item::integer(tag::ProtocolVersionMajor, kProtocolMajor),
                                                Item::integer(tag::ProtocolVersionMinor, kProtocolMinor)}),
         Item::integer(tag::MaximumResponseSize, static_cast<int32_t>(kMaxMessageSize)),
         Item::integer(tag::BatchCount, 1)});
    Item batch = Item::structure(tag::BatchItem, {Item::enumeration(tag::Operation, static_cast<uint32_t>(operation))});
    batch.add(std::move(payload));
    Item message = Item::structure(tag::RequestMessage);
    message.add(std::move(header));
    message.add(std::move(batch));
    return encode(message);
}

Item locate_by_name(const std::string& name, bool active_only)
{
    Item payload = Item::structure(tag::RequestPayload,
                                   {Item::integer(tag::MaximumItems, 16),
                                    attribute("Object Type", Item::enumeration(0, kObjectTypeSymmetricKey))});
    if (active_only)
        payload.add(attribute("State", Item::enumeration(0, static_cast<uint32_t>(State::Active))));
    payload.add(attribute("Name", name_value(name)));
    return payload;
}

Item get_state(const std::string& unique_id)
{
    return Item::structure(tag::RequestPayload,
                           {Item::text(tag::UniqueIdentifier, unique_id), Item::text(tag::AttributeName, "State")});
}

Item create_aes256(const std::string& name)
{
    Item attributes = Item::structure(
        tag::TemplateAttribute,
        {attribute("Cryptographic Algorithm", Item::enumeration(0, kAlgorithmAes)),
         attribute("Cryptographic Length", Item::integer(0, 256)),
         attribute("Cryptographic Usage Mask", Item::integer(0, kUsageEncrypt | kUsageDecrypt)),
         attribute("Name", name_value(name))});
    return Item::structure(tag::RequestPayload,
                           {Item::enumeration(tag::ObjectType, kObjectTypeSymmetricKey), std::move(attributes)});
}

Item activate(const std::string& unique_id)
{
    return Item::structure(tag::RequestPayload, {Item::text(tag::UniqueIdentifier, unique_id)});
}

Item revoke_ceased(const std::string& unique_id)
{
    constexpr uint32_t kCessationOfOperation = 6; // Revocation Reason Code, 9.1.3.2.19
    return Item::structure(tag::RequestPayload,
                           {Item::text(tag::UniqueIdentifier, unique_id),
                            Item::structure(tag::RevocationReason,
                                            {Item::enumeration(tag::RevocationReasonCode, kCessationOfOperation)})});
}

Item destroy(const std::string& unique_id)
{
    return Item::structure(tag::RequestPayload, {Item::text(tag::UniqueIdentifier, unique_id)});
}

Item encrypt(const std::string& unique_id, ByteView plaintext, ByteView iv, ByteView aad)
{
    return Item::structure(tag::RequestPayload,
                           {Item::text(tag::UniqueIdentifier, unique_id), gcm_parameters(),
                            Item::byte_string(tag::Data, plaintext), Item::byte_string(tag::IvCounterNonce, iv),
                            Item::byte_string(tag::AuthenticatedEncryptionAdditionalData, aad)});
}

Item decrypt(const std::string& unique_id, ByteView ciphertext, ByteView iv, ByteView aad, ByteView auth_tag)
{
    return Item::structure(tag::RequestPayload,
                           {Item::text(tag::UniqueIdentifier, unique_id), gcm_parameters(),
                            Item::byte_string(tag::Data, ciphertext), Item::byte_string(tag::IvCounterNonce, iv),
                            Item::byte_string(tag::AuthenticatedEncryptionAdditionalData, aad),
                            Item::byte_string(tag::AuthenticatedEncryptionTag, auth_tag)});
}

Response parse_response(ByteView message, Operation operation)
{
    Item root = decode(message);
    if (root.tag != tag::ResponseMessage || root.type != Type::Structure)
        bad_answer("it is not a Response Message");
    need(root, tag::ResponseHeader, Type::Structure, "Response Header");
    const Item* batch = nullptr;
    for (const Item& c : root.children)
        if (c.tag == tag::BatchItem) {
            if (batch)
                bad_answer("it has more than one batch item");
            if (c.type != Type::Structure)
                bad_answer("its batch item is not a structure");
            batch = &c;
        }
    if (!batch)
        bad_answer("it has no batch item");
    // A failed batch item need not name its operation.
    if (const Item* op = batch->find(tag::Operation)) {
        if (op->type != Type::Enumeration || op->number != static_cast<int64_t>(operation))
            bad_answer("it answers another operation");
    }
    Response response;
    response.status = static_cast<uint32_t>(need(*batch, tag::ResultStatus, Type::Enumeration, "Result Status").number);
    if (const Item* r = batch->find(tag::ResultReason, Type::Enumeration))
        response.reason = static_cast<uint32_t>(r->number);
    if (const Item* m = batch->find(tag::ResultMessage, Type::TextString)) {
        // Shown in messages: keep it short and printable.
        for (uint8_t ch : m->bytes) {
            if (response.message.size() >= 160)
                break;
            response.message.push_back(ch >= 0x20 && ch < 0x7f ? static_cast<char>(ch) : '?');
        }
    }
    if (const Item* p = batch->find(tag::ResponsePayload, Type::Structure))
        response.payload = *p;
    else
        response.payload = Item::structure(tag::ResponsePayload);
    if (response.ok() && !batch->find(tag::ResponsePayload, Type::Structure))
        bad_answer("a successful answer has no payload");
    return response;
}

std::vector<std::string> located_ids(const Item& payload)
{
    std::vector<std::string> ids;
    for (const Item& c : payload.children)
        if (c.tag == tag::UniqueIdentifier) {
            if (c.type != Type::TextString || c.bytes.empty())
                bad_answer("a located unique identifier is not a text");
            ids.push_back(c.text_value());
        }
    return ids;
}

uint32_t state_of(const Item& payload)
{
    for (const Item& c : payload.children) {
        if (c.tag != tag::Attribute || c.type != Type::Structure)
            continue;
        const Item* name = c.find(tag::AttributeName, Type::TextString);
        if (!name || name->text_value() != "State")
            continue;
        return static_cast<uint32_t>(need(c, tag::AttributeValue, Type::Enumeration, "State value").number);
    }
    bad_answer("it has no State attribute");
}

std::string unique_id_of(const Item& payload)
{
    const Item& id = need(payload, tag::UniqueIdentifier, Type::TextString, "Unique Identifier");
    if (id.bytes.empty())
        bad_answer("its unique identifier is empty");
    return id.text_value();
}

Encrypted encrypted_of(const Item& payload, size_t expected_size)
{
    const Item& data = need(payload, tag::Data, Type::ByteString, "Data");
    const Item& auth_tag = need(payload, tag::AuthenticatedEncryptionTag, Type::ByteString, "authentication tag");
    if (data.bytes.size() != expected_size)
        bad_answer("its ciphertext has " + std::to_string(data.bytes.size()) + " bytes, not " +
                   std::to_string(expected_size));
    if (auth_tag.bytes.size() != kGcmTagSize)
        bad_answer("its authentication tag has " + std::to_string(auth_tag.bytes.size()) + " bytes");
    return Encrypted{data.bytes, auth_tag.bytes};
}

SecureBytes decrypted_of(const Item& payload, size_t expected_size)
{
    const Item& data = need(payload, tag::Data, Type::ByteString, "Data");
    if (data.bytes.size() != expected_size)
        bad_answer("its plaintext has " + std::to_string(data.bytes.size()) + " bytes, not " +
                   std::to_string(expected_size));
    return SecureBytes(data.bytes.data(), data.bytes.size());
}

} // namespace pgphi::kmip
