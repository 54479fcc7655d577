// The KMIP client's TTLV codec and messages (src/core/kmip_ttlv.*,
// src/core/kmip_messages.*, the wrapped-DEK format of kmip_provider.*),
// against byte strings from the OASIS KMIP documents:
//  - KMIP Specification v1.1 (and 1.0 .. 1.4 alike), section 9.1.2
//    "Examples": one item of each type, tag 0x420020;
//  - KMIP Test Cases v1.1, section 3.1.1 (Create a symmetric key: request
//    and response) and section 3.1.3 (a Locate response), as also carried by
//    PyKMIP's unit tests (kmip/tests/unit/core/messages/test_messages.py).
// Plus malformed input: every truncation, wrong and huge lengths, deep
// nesting, trailing bytes; each is a clear ProviderError, never a crash.
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "error.hpp"
#include "kmip_messages.hpp"
#include "kmip_provider.hpp"
#include "kmip_ttlv.hpp"
#include "refusal.hpp"

using namespace pgphi;
using pgphi::test_support::refusal;
using pgphi::test_support::refusal_text;
using namespace pgphi::kmip;

namespace {

using Bytes = std::vector<uint8_t>;

Bytes hex(const std::string& text)
{
    Bytes out;
    std::string digits;
    for (char c : text)
        if (std::isxdigit(static_cast<unsigned char>(c)))
            digits.push_back(c);
    for (size_t i = 0; i + 1 < digits.size(); i += 2)
        out.push_back(static_cast<uint8_t>(std::stoi(digits.substr(i, 2), nullptr, 16)));
    return out;
}

ByteView view(const Bytes& b) { return ByteView(b.data(), b.size()); }

constexpr uint32_t kExampleTag = 0x420020;

// KMIP Specification v1.1, section 9.1.2, in its order.
struct SpecExample {
    const char* what;
    Item item;
    const char* encoding;
};

std::vector<SpecExample> spec_examples()
{
    Item structure = Item::structure(0x420020, {Item::enumeration(0x420004, 254), Item::integer(0x420005, 255)});
    return {
        {"Integer 8", Item::integer(kExampleTag, 8), "42 00 20 | 02 | 00 00 00 04 | 00 00 00 08 00 00 00 00"},
        {"Long Integer 123456789000000000", Item::long_integer(kExampleTag, 123456789000000000LL),
         "42 00 20 | 03 | 00 00 00 08 | 01 B6 9B 4B A5 74 92 00"},
        {"Big Integer 1234567890000000000000000000",
         Item::big_integer(kExampleTag, hex("00 00 00 00 03 FD 35 EB 6B C2 DF 46 18 08 00 00")),
         "42 00 20 | 04 | 00 00 00 10 | 00 00 00 00 03 FD 35 EB 6B C2 DF 46 18 08 00 00"},
        {"Enumeration 255", Item::enumeration(kExampleTag, 255),
         "42 00 20 | 05 | 00 00 00 04 | 00 00 00 FF 00 00 00 00"},
        {"Boolean True", Item::boolean(kExampleTag, true), "42 00 20 | 06 | 00 00 00 08 | 00 00 00 00 00 00 00 01"},
        {"Text String Hello World", Item::text(kExampleTag, "Hello World"),
         "42 00 20 | 07 | 00 00 00 0B | 48 65 6C 6C 6F 20 57 6F 72 6C 64 00 00 00 00 00"},
        {"Byte String 01 02 03", Item::byte_string(kExampleTag, ByteView(hex("010203").data(), 3)),
         "42 00 20 | 08 | 00 00 00 03 | 01 02 03 00 00 00 00 00"},
        {"Date-Time Friday, March 14, 2008, 11:56:40 GMT", Item::date_time(kExampleTag, 0x47DA67F8),
         "42 00 20 | 09 | 00 00 00 08 | 00 00 00 00 47 DA 67 F8"},
        {"Interval 10 days", Item::interval(kExampleTag, 10 * 86400),
         "42 00 20 | 0A | 00 00 00 04 | 00 0D 2F 00 00 00 00 00"},
        {"Structure of Enumeration 254 (420004) and Integer 255 (420005)", structure,
         "42 00 20 | 01 | 00 00 00 20 | 42 00 04 | 05 | 00 00 00 04 | 00 00 00 FE 00 00 00 00 | "
         "42 00 05 | 02 | 00 00 00 04 | 00 00 00 FF 00 00 00 00"},
    };
}

// KMIP Test Cases v1.1, 3.1.1: the Create request (protocol 1.1; AES, 128
// bits, usage mask Encrypt|Decrypt).
const char* kCreateRequest11 =
    "42007801000001204200770100000038420069010000002042006A0200000004"
    "000000010000000042006B0200000004000000010000000042000D0200000004"
    "000000010000000042000F01000000D842005C05000000040000000100000000"
    "42007901000000C04200570500000004000000020000000042009101000000A8"
    "420008010000003042000A070000001743727970746F6772617068696320416C"
    "676F726974686D0042000B050000000400000003000000004200080100000030"
    "42000A070000001443727970746F67726170686963204C656E67746800000000"
    "42000B02000000040000008000000000420008010000003042000A0700000018"
    "43727970746F67726170686963205573616765204D61736B42000B0200000004"
    "0000000C00000000";

// 3.1.1: the Create response (unique identifier fb4b5b9c-...).
const char* kCreateResponse11 =
    "42007B01000000C042007A0100000048420069010000002042006A0200000004"
    "000000010000000042006B020000000400000001000000004200920900000008"
    "000000004F9A54E542000D0200000004000000010000000042000F0100000068"
    "42005C0500000004000000010000000042007F05000000040000000000000000"
    "42007C0100000040420057050000000400000002000000004200940700000024"
    "66623462356239632D363138382D346336332D383134322D6665396333323831"
    "3239666300000000";

// 3.1.3: a Locate response (one identifier, 49a1ca88-...).
const char* kLocateResponse11 =
    "42007B01000000B042007A0100000048420069010000002042006A0200000004"
    "000000010000000042006B020000000400000001000000004200920900000008"
    "000000004F9A54E642000D0200000004000000010000000042000F0100000058"
    "42005C0500000004000000080000000042007F05000000040000000000000000"
    "42007C0100000030420094070000002434396131636138382D366265612D3466"
    "62322D623435302D37653538383032633330333800000000";

} // namespace

TEST(KmipTtlv, SpecificationExamplesEncode)
{
    for (const SpecExample& e : spec_examples())
        EXPECT_EQ(encode(e.item), hex(e.encoding)) << e.what;
}

TEST(KmipTtlv, SpecificationExamplesDecode)
{
    for (const SpecExample& e : spec_examples()) {
        Bytes bytes = hex(e.encoding);
        Item item = decode(view(bytes));
        EXPECT_EQ(item.tag, e.item.tag) << e.what;
        EXPECT_EQ(item.type, e.item.type) << e.what;
        EXPECT_EQ(item.number, e.item.number) << e.what;
        EXPECT_EQ(item.bytes, e.item.bytes) << e.what;
        EXPECT_EQ(item.children.size(), e.item.children.size()) << e.what;
        EXPECT_EQ(encode(item), bytes) << e.what;
    }
    Item s = decode(view(hex(spec_examples().back().encoding)));
    ASSERT_EQ(s.children.size(), 2u);
    EXPECT_EQ(s.children[0].tag, 0x420004u);
    EXPECT_EQ(s.children[0].number, 254);
    EXPECT_EQ(s.children[1].number, 255);
}

TEST(KmipTtlv, TestCaseCreateRequestEncodes)
{
    auto attribute = [](const char* name, Item value) {
        value.tag = tag::AttributeValue;
        return Item::structure(tag::Attribute, {Item::text(tag::AttributeName, name), std::move(value)});
    };
    Item message = Item::structure(
        tag::RequestMessage,
        {Item::structure(tag::RequestHeader,
                         {Item::structure(tag::ProtocolVersion, {Item::integer(tag::ProtocolVersionMajor, 1),
                                                                 Item::integer(tag::ProtocolVersionMinor, 1)}),
                          Item::integer(tag::BatchCount, 1)}),
         Item::structure(
             tag::BatchItem,
             {Item::enumeration(tag::Operation, 1),
              Item::structure(tag::RequestPayload,
                              {Item::enumeration(tag::ObjectType, 2),
                               Item::structure(tag::TemplateAttribute,
                                               {attribute("Cryptographic Algorithm", Item::enumeration(0, 3)),
                                                attribute("Cryptographic Length", Item::integer(0, 128)),
                                                attribute("Cryptographic Usage Mask", Item::integer(0, 12))})})})});
    Bytes expected = hex(kCreateRequest11);
    EXPECT_EQ(encode(message), expected);
    EXPECT_EQ(encode(decode(view(expected))), expected);
}

TEST(KmipMessages, TestCaseResponsesParse)
{
    Bytes create = hex(kCreateResponse11);
    Response r = parse_response(view(create), Operation::Create);
    EXPECT_TRUE(r.ok());
    EXPECT_EQ(unique_id_of(r.payload), "fb4b5b9c-6188-4c63-8142-fe9c328129fc");

    Bytes locate = hex(kLocateResponse11);
    Response l = parse_response(view(locate), Operation::Locate);
    EXPECT_TRUE(l.ok());
    EXPECT_EQ(located_ids(l.payload), std::vector<std::string>{"49a1ca88-6bea-4fb2-b450-7e58802c3038"});

    // An answer to another operation than the one asked is refused.
    EXPECT_EQ(refusal([&] { parse_response(view(create), Operation::Decrypt); }), ErrorCode::ProviderError);
}

TEST(KmipMessages, RequestsCarryWhatTheSpecificationAsks)
{
    Bytes dek(32, 0xAB), iv(12, 0x01), aad = {1, 2, 3};
    Bytes message = request_message(Operation::Encrypt, encrypt("uid-1", view(dek), view(iv), view(aad)));
    Item root = decode(view(message));
    ASSERT_EQ(root.tag, tag::RequestMessage);
    const Item* header = root.find(tag::RequestHeader);
    ASSERT_NE(header, nullptr);
    const Item* version = header->find(tag::ProtocolVersion);
    ASSERT_NE(version, nullptr);
    EXPECT_EQ(version->find(tag::ProtocolVersionMajor)->number, 1);
    EXPECT_EQ(version->find(tag::ProtocolVersionMinor)->number, 4);
    const Item* batch = root.find(tag::BatchItem);
    ASSERT_NE(batch, nullptr);
    EXPECT_EQ(batch->find(tag::Operation)->number, 0x1F);
    const Item* payload = batch->find(tag::RequestPayload);
    ASSERT_NE(payload, nullptr);
    // In the specification's order: identifier, parameters, data, IV, AAD.
    std::vector<uint32_t> order;
    for (const Item& c : payload->children)
        order.push_back(c.tag);
    EXPECT_EQ(order, (std::vector<uint32_t>{tag::UniqueIdentifier, tag::CryptographicParameters, tag::Data,
                                            tag::IvCounterNonce, tag::AuthenticatedEncryptionAdditionalData}));
    const Item* params = payload->find(tag::CryptographicParameters);
    EXPECT_EQ(params->find(tag::BlockCipherMode)->number, 9);        // GCM
    EXPECT_EQ(params->find(tag::CryptographicAlgorithm)->number, 3); // AES
    EXPECT_EQ(params->find(tag::TagLength)->number, 16);
    EXPECT_EQ(payload->find(tag::Data)->bytes, dek);

    // No request pgphi builds is a Get (operation 0x0A): the KEK never leaves the server.
    for (Item p : {locate_by_name("k"), get_state("u"), create_aes256("k"), activate("u")}) {
        Bytes m = request_message(Operation::Locate, std::move(p));
        EXPECT_NE(decode(view(m)).find(tag::BatchItem)->find(tag::Operation)->number, 0x0A);
    }
}

// Revoke and Destroy of a dedicated KEK, byte for byte as the TTLV rules of
// KMIP 1.4 (9.1) lay them out: the identifier a Text String padded to 8
// bytes, the reason a structure holding the Revocation Reason Code
// enumeration (6, Cessation of Operation), the payload's length the sum.
TEST(KmipMessages, RevokeAndDestroyPayloads)
{
    const std::string uid = "fc8833de-70d2-4ece-b063-fede3a3c59fe"; // 36 bytes
    std::string uid_hex;
    for (unsigned char c : uid) {
        static const char* digits = "0123456789abcdef";
        uid_hex += digits[c >> 4];
        uid_hex += digits[c & 15];
    }
    std::string uid_item = "42009407" "00000024" + uid_hex + "00000000";
    EXPECT_EQ(encode(destroy(uid)), hex("42007901" "00000030" + uid_item));
    EXPECT_EQ(encode(revoke_ceased(uid)), hex("42007901" "00000048" + uid_item +
                                              "42008101" "00000010" "42008205" "00000004" "00000006" "00000000"));
    Bytes message = request_message(Operation::Destroy, destroy(uid));
    EXPECT_EQ(decode(view(message)).find(tag::BatchItem)->find(tag::Operation)->number, 0x14);
    message = request_message(Operation::Revoke, revoke_ceased(uid));
    EXPECT_EQ(decode(view(message)).find(tag::BatchItem)->find(tag::Operation)->number, 0x13);
}

TEST(KmipMessages, FailedAnswersAndDecryptedData)
{
    auto response = [](std::vector<Item> batch_items) {
        Item root = Item::structure(
            tag::ResponseMessage,
            {Item::structure(tag::ResponseHeader,
                             {Item::structure(tag::ProtocolVersion, {Item::integer(tag::ProtocolVersionMajor, 1),
                                                                     Item::integer(tag::ProtocolVersionMinor, 4)}),
                              Item::date_time(tag::TimeStamp, 0), Item::integer(tag::BatchCount, 1)}),
             Item::structure(tag::BatchItem, std::move(batch_items))});
        return encode(root);
    };
    Bytes denied = response({Item::enumeration(tag::Operation, 0x20), Item::enumeration(tag::ResultStatus, 1),
                             Item::enumeration(tag::ResultReason, reason::PermissionDenied),
                             Item::text(tag::ResultMessage, "The decryption key must be in the Active state\n")});
    Response r = parse_response(view(denied), Operation::Decrypt);
    EXPECT_FALSE(r.ok());
    EXPECT_EQ(r.reason, reason::PermissionDenied);
    EXPECT_EQ(r.message, "The decryption key must be in the Active state?");

    Bytes dek(32, 0x5A);
    Bytes decrypted = response({Item::enumeration(tag::Operation, 0x20), Item::enumeration(tag::ResultStatus, 0),
                                Item::structure(tag::ResponsePayload, {Item::text(tag::UniqueIdentifier, "7"),
                                                                       Item::byte_string(tag::Data, view(dek))})});
    Response d = parse_response(view(decrypted), Operation::Decrypt);
    SecureBytes plain = decrypted_of(d.payload, 32);
    EXPECT_EQ(Bytes(plain.data(), plain.data() + plain.size()), dek);
    EXPECT_EQ(refusal([&] { decrypted_of(d.payload, 16); }), ErrorCode::ProviderError);

    Bytes state = response({Item::enumeration(tag::Operation, 0x0B), Item::enumeration(tag::ResultStatus, 0),
                            Item::structure(tag::ResponsePayload,
                                            {Item::text(tag::UniqueIdentifier, "7"),
                                             Item::structure(tag::Attribute,
                                                             {Item::text(tag::AttributeName, "State"),
                                                              Item::enumeration(tag::AttributeValue, 3)})})});
    EXPECT_EQ(state_of(parse_response(view(state), Operation::GetAttributes).payload), 3u);
    EXPECT_STREQ(state_name(3), "deactivated");

    // Success without a payload, and two batch items, are refused.
    Bytes empty = response({Item::enumeration(tag::Operation, 0x20), Item::enumeration(tag::ResultStatus, 0)});
    EXPECT_EQ(refusal([&] { parse_response(view(empty), Operation::Decrypt); }), ErrorCode::ProviderError);
}

TEST(KmipTtlv, EveryTruncationIsRefused)
{
    for (const char* text : {kCreateResponse11, kLocateResponse11, kCreateRequest11}) {
        Bytes whole = hex(text);
        for (size_t n = 0; n < whole.size(); ++n) {
            Bytes cut(whole.begin(), whole.begin() + n);
            EXPECT_EQ(refusal([&] { decode(view(cut)); }), ErrorCode::ProviderError) << n;
        }
    }
}

TEST(KmipTtlv, WrongAndHugeLengthsAreRefused)
{
    const char* bad[] = {
        "42 00 20 | 02 | 00 00 00 08 | 00 00 00 08 00 00 00 00",               // Integer of length 8
        "42 00 20 | 05 | 00 00 00 03 | 00 00 FF 00 00 00 00 00",               // Enumeration of length 3
        "42 00 20 | 06 | 00 00 00 04 | 00 00 00 01 00 00 00 00",               // Boolean of length 4
        "42 00 20 | 06 | 00 00 00 08 | 00 00 00 00 00 00 00 02",               // Boolean 2
        "42 00 20 | 03 | 00 00 00 04 | 00 00 00 01 00 00 00 00",               // Long Integer of length 4
        "42 00 20 | 09 | 00 00 00 10 | 00 00 00 00 47 DA 67 F8 00 00 00 00 00 00 00 00", // Date-Time of 16
        "42 00 20 | 04 | 00 00 00 04 | 00 00 00 01 00 00 00 00",               // Big Integer not a multiple of 8
        "42 00 20 | 0A | 00 00 00 08 | 00 0D 2F 00 00 00 00 00",               // Interval of length 8
        "42 00 20 | 07 | FF FF FF F8 | 48 65 6C 6C 6F 20 57 6F",               // huge text length
        "42 00 20 | 08 | 7F FF FF FF | 01 02 03 00 00 00 00 00",               // huge byte string
        "42 00 20 | 01 | FF FF FF F8 | 42 00 04 | 05 | 00 00 00 04 | 00 00 00 FE 00 00 00 00", // huge structure
        "42 00 20 | 01 | 00 00 00 18 | 42 00 04 | 05 | 00 00 00 04 | 00 00 00 FE 00 00 00 00 | "
        "42 00 05 | 02 | 00 00 00 04 | 00 00 00 FF 00 00 00 00",               // structure shorter than its children
        "42 00 20 | 01 | 00 00 00 0C | 42 00 04 | 05 | 00 00 00 04 | 00 00 00 FE 00 00 00 00", // not a multiple of 8
        "42 00 20 | 0B | 00 00 00 04 | 00 00 00 08 00 00 00 00",               // unknown type
        "13 00 20 | 02 | 00 00 00 04 | 00 00 00 08 00 00 00 00",               // tag outside 42xxxx / 54xxxx
        "42 00 20 | 02 | 00 00 00 04 | 00 00 00 08 00 00 00 00 | 00",          // trailing byte
        "42 00 20 | 07 | 00 00 00 03 | 41 42 43",                              // padding cut off
    };
    for (const char* text : bad) {
        Bytes bytes = hex(text);
        EXPECT_EQ(refusal([&] { decode(view(bytes)); }), ErrorCode::ProviderError) << text;
    }

    uint8_t huge[8] = {0x42, 0x00, 0x7B, 0x01, 0xFF, 0xFF, 0xFF, 0xF8};
    EXPECT_EQ(refusal([&] { message_size(huge); }), ErrorCode::ProviderError);
    uint8_t scalar[8] = {0x42, 0x00, 0x7B, 0x02, 0x00, 0x00, 0x00, 0x04};
    EXPECT_EQ(refusal([&] { message_size(scalar); }), ErrorCode::ProviderError);
    uint8_t fine[8] = {0x42, 0x00, 0x7B, 0x01, 0x00, 0x00, 0x00, 0xC0};
    EXPECT_EQ(message_size(fine), 8u + 0xC0);
}

TEST(KmipTtlv, DeepNestingIsRefused)
{
    auto nested = [](int depth) {
        Item item = Item::integer(0x420020, 1);
        for (int i = 0; i < depth; ++i)
            item = Item::structure(0x420020, {std::move(item)});
        return encode(item);
    };
    Bytes fine = nested(kMaxDepth);
    EXPECT_NO_THROW(decode(view(fine)));
    Bytes deep = nested(kMaxDepth + 1);
    EXPECT_EQ(refusal([&] { decode(view(deep)); }), ErrorCode::ProviderError);
}

TEST(KmipProvider, WrappedDekFormat)
{
    KmipWrapped w;
    w.unique_id = "42";
    w.iv.assign(12, 1);
    w.tag.assign(16, 2);
    w.ciphertext.assign(32, 3);
    Bytes blob = w.serialize();
    KmipWrapped back = KmipWrapped::parse(view(blob));
    EXPECT_EQ(back.unique_id, "42");
    EXPECT_EQ(back.iv, w.iv);
    EXPECT_EQ(back.tag, w.tag);
    EXPECT_EQ(back.ciphertext, w.ciphertext);
    for (size_t n = 0; n < blob.size(); ++n) {
        Bytes cut(blob.begin(), blob.begin() + n);
        EXPECT_EQ(refusal([&] { KmipWrapped::parse(view(cut)); }), ErrorCode::WrappedDekInvalid) << n;
    }
    Bytes longer = blob;
    longer.push_back(0);
    EXPECT_EQ(refusal([&] { KmipWrapped::parse(view(longer)); }), ErrorCode::WrappedDekInvalid);
    Bytes vault(std::string("vault:v1:abc").begin(), std::string("vault:v1:abc").end());
    EXPECT_EQ(refusal([&] { KmipWrapped::parse(view(vault)); }), ErrorCode::WrappedDekInvalid);

    // The authenticated data names the key id and version, so a DEK moved
    // to another key or version does not unwrap.
    EXPECT_NE(kmip_dek_aad(DekBinding{1, 1, "a"}), kmip_dek_aad(DekBinding{1, 2, "a"}));
    EXPECT_NE(kmip_dek_aad(DekBinding{1, 1, "a"}), kmip_dek_aad(DekBinding{2, 1, "a"}));
    EXPECT_EQ(kmip_dek_aad(DekBinding{1, 1, "a"}), kmip_dek_aad(DekBinding{1, 1, "b"}));
}

TEST(KmipProvider, SettingsAreChecked)
{
    KmipSettings s;
    EXPECT_EQ(refusal([&] { KmipKeyProvider p(s); }), ErrorCode::ConfigError); // no host
    s.client.host = "127.0.0.1";
    EXPECT_EQ(refusal([&] { KmipKeyProvider p(s); }), ErrorCode::ConfigError); // no client certificate
}
