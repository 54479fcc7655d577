// KMIP's Tag-Type-Length-Value encoding (KMIP 1.x specification, section 9.1
// "TTLV Encoding"): every item is a 3-byte tag, a 1-byte type, a 4-byte
// big-endian length and the value, padded with zeros to a multiple of 8
// bytes. Structures hold a sequence of items; the other types are scalars.
//
// The decoder trusts no length: each one must fit the bytes that remain and
// the type's rule (4 for Integer, Enumeration and Interval; 8 for Long
// Integer, Boolean and Date-Time; a multiple of 8 for Big Integer; a
// Structure's length is exactly the sum of its padded children), nesting is
// bounded, and anything else is refused with ProviderError (58000), never a
// crash. Byte and text strings may carry a plaintext DEK (a Decrypt answer),
// so every item wipes its bytes when it is destroyed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "bytes.hpp"

namespace pgphi::kmip {

enum class Type : uint8_t {
    Structure = 0x01,
    Integer = 0x02,
    LongInteger = 0x03,
    BigInteger = 0x04,
    Enumeration = 0x05,
    Boolean = 0x06,
    TextString = 0x07,
    ByteString = 0x08,
    DateTime = 0x09,
    Interval = 0x0A,
};

// The tags pgphi uses (KMIP 1.4 specification, section 9.1.3.1 "Tags").
namespace tag {
inline constexpr uint32_t Attribute = 0x420008;
inline constexpr uint32_t AttributeName = 0x42000A;
inline constexpr uint32_t AttributeValue = 0x42000B;
inline constexpr uint32_t BatchCount = 0x42000D;
inline constexpr uint32_t BatchItem = 0x42000F;
inline constexpr uint32_t BlockCipherMode = 0x420011;
inline constexpr uint32_t CryptographicAlgorithm = 0x420028;
inline constexpr uint32_t CryptographicLength = 0x42002A;
inline constexpr uint32_t CryptographicParameters = 0x42002B;
inline constexpr uint32_t CryptographicUsageMask = 0x42002C;
inline constexpr uint32_t IvCounterNonce = 0x42003D;
inline constexpr uint32_t MaximumItems = 0x42004F;
inline constexpr uint32_t MaximumResponseSize = 0x420050;
inline constexpr uint32_t Name = 0x420053;
inline constexpr uint32_t NameType = 0x420054;
inline constexpr uint32_t NameValue = 0x420055;
inline constexpr uint32_t ObjectType = 0x420057;
inline constexpr uint32_t Operation = 0x42005C;
inline constexpr uint32_t ProtocolVersion = 0x420069;
inline constexpr uint32_t ProtocolVersionMajor = 0x42006A;
inline constexpr uint32_t ProtocolVersionMinor = 0x42006B;
inline constexpr uint32_t RequestHeader = 0x420077;
inline constexpr uint32_t RequestMessage = 0x420078;
inline constexpr uint32_t RequestPayload = 0x420079;
inline constexpr uint32_t ResponseHeader = 0x42007A;
inline constexpr uint32_t ResponseMessage = 0x42007B;
inline constexpr uint32_t ResponsePayload = 0x42007C;
inline constexpr uint32_t ResultMessage = 0x42007D;
inline constexpr uint32_t ResultReason = 0x42007E;
inline constexpr uint32_t ResultStatus = 0x42007F;
inline constexpr uint32_t RevocationReason = 0x420081;
inline constexpr uint32_t RevocationReasonCode = 0x420082;
inline constexpr uint32_t State = 0x42008D;
inline constexpr uint32_t TemplateAttribute = 0x420091;
inline constexpr uint32_t TimeStamp = 0x420092;
inline constexpr uint32_t UniqueBatchItemId = 0x420093;
inline constexpr uint32_t UniqueIdentifier = 0x420094;
inline constexpr uint32_t Data = 0x4200C2;
inline constexpr uint32_t TagLength = 0x4200CE;
inline constexpr uint32_t AuthenticatedEncryptionAdditionalData = 0x4200FE;
inline constexpr uint32_t AuthenticatedEncryptionTag = 0x4200FF;
} // namespace tag

// The largest message pgphi reads or writes, and the deepest nesting.
inline constexpr size_t kMaxMessageSize = 1 << 20;
inline constexpr int kMaxDepth = 16;

struct Item {
    uint32_t tag = 0;            // 24 bits
    Type type = Type::Structure;
    // Integer, Long Integer, Enumeration (unsigned 32), Boolean (0/1),
    // Date-Time (seconds since the epoch), Interval (unsigned 32 seconds).
    int64_t number = 0;
    // Text String (UTF-8 as sent), Byte String, Big Integer (big-endian two's
    // complement, as encoded, its length a multiple of 8).
    std::vector<uint8_t> bytes;
    std::vector<Item> children;  // Structure

    Item() = default;
    Item(const Item&) = default;
    Item(Item&&) noexcept = default;
    Item& operator=(const Item&) = default;
    Item& operator=(Item&&) noexcept = default;
    ~Item();

    static Item structure(uint32_t tag, std::vector<Item> children = {});
    static Item integer(uint32_t tag, int32_t value);
    static Item long_integer(uint32_t tag, int64_t value);
    static Item big_integer(uint32_t tag, std::vector<uint8_t> twos_complement);
    static Item enumeration(uint32_t tag, uint32_t value);
    static Item boolean(uint32_t tag, bool value);
    static Item text(uint32_t tag, const std::string& value);
    static Item byte_string(uint32_t tag, ByteView value);
    static Item date_time(uint32_t tag, int64_t seconds);
    static Item interval(uint32_t tag, uint32_t seconds);

    Item& add(Item child);

    // The first child with `tag` (and, when given, of `type`), or nullptr.
    const Item* find(uint32_t tag) const;
    const Item* find(uint32_t tag, Type type) const;
    std::string text_value() const { return std::string(bytes.begin(), bytes.end()); }
};

// The encoding of one item (with padding).
std::vector<uint8_t> encode(const Item& item);
// Appends the encoding to `out`.
void encode_into(const Item& item, std::vector<uint8_t>& out);

// Decodes exactly one item that fills `input` (trailing bytes are refused).
Item decode(ByteView input);

// The length of the whole message whose first 8 bytes are `header` (the
// outer item's tag, type and length), for reading a message off a stream:
// 8 + the outer length. Refuses a non-Structure or one over kMaxMessageSize.
size_t message_size(const uint8_t header[8]);

} // namespace pgphi::kmip
