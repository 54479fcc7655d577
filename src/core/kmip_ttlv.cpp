#include "kmip_ttlv.hpp"

#include <openssl/crypto.h>

#include "error.hpp"

namespace pgphi::kmip {

namespace {

[[noreturn]] void malformed(const std::string& what)
{
    throw Error(ErrorCode::ProviderError, "the KMIP server sent a malformed message: " + what,
                "pgphi refuses a KMIP (TTLV) message whose lengths or types do not follow the specification.");
}

size_t padded(size_t n) { return (n + 7) & ~size_t(7); }

uint32_t read_be32(const uint8_t* p)
{
    return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}

uint64_t read_be64(const uint8_t* p) { return (uint64_t(read_be32(p)) << 32) | read_be32(p + 4); }

void put_be32(std::vector<uint8_t>& out, uint32_t v)
{
    for (int shift = 24; shift >= 0; shift -= 8)
        out.push_back(static_cast<uint8_t>(v >> shift));
}

void put_be64(std::vector<uint8_t>& out, uint64_t v)
{
    put_be32(out, static_cast<uint32_t>(v >> 32));
    put_be32(out, static_cast<uint32_t>(v));
}

bool known_type(uint8_t t) { return t >= 0x01 && t <= 0x0A; }

// Decodes the item at `p` (with `avail` bytes left); returns the bytes used.
size_t decode_at(const uint8_t* p, size_t avail, int depth, Item& item)
{
    if (depth > kMaxDepth)
        malformed("structures nested deeper than " + std::to_string(kMaxDepth));
    if (avail < 8)
        malformed("an item header is truncated");
    item.tag = (uint32_t(p[0]) << 16) | (uint32_t(p[1]) << 8) | uint32_t(p[2]);
    if ((item.tag >> 16) != 0x42 && (item.tag >> 16) != 0x54)
        malformed("a tag is outside the KMIP (0x42xxxx) and extension (0x54xxxx) ranges");
    if (!known_type(p[3]))
        malformed("an item has an unknown type");
    item.type = static_cast<Type>(p[3]);
    uint32_t length = read_be32(p + 4);
    size_t rest = avail - 8;
    if (length > rest)
        malformed("an item's length runs past the end of the message");
    size_t total = padded(length);
    // The last item may not be cut off before its padding either.
    if (total > rest)
        malformed("an item's padding runs past the end of the message");
    const uint8_t* v = p + 8;

    auto need = [&](uint32_t expected) {
        if (length != expected)
            malformed("an item of type " + std::to_string(int(p[3])) + " has length " + std::to_string(length));
    };
    switch (item.type) {
    case Type::Structure: {
        size_t used = 0;
        if (length % 8 != 0)
            malformed("a structure's length is not a multiple of 8");
        while (used < length) {
            Item child;
            used += decode_at(v + used, length - used, depth + 1, child);
            item.children.push_back(std::move(child));
        }
        break;
    }
    case Type::Integer:
        need(4);
        item.number = static_cast<int32_t>(read_be32(v));
        break;
    case Type::Enumeration:
    case Type::Interval:
        need(4);
        item.number = read_be32(v);
        break;
    case Type::LongInteger:
    case Type::DateTime:
        need(8);
        item.number = static_cast<int64_t>(read_be64(v));
        break;
    case Type::Boolean: {
        need(8);
        uint64_t b = read_be64(v);
        if (b > 1)
            malformed("a boolean is neither 0 nor 1");
        item.number = static_cast<int64_t>(b);
        break;
    }
    case Type::BigInteger:
        if (length == 0 || length % 8 != 0)
            malformed("a big integer's length is not a positive multiple of 8");
        item.bytes.assign(v, v + length);
        break;
    case Type::TextString:
    case Type::ByteString:
        item.bytes.assign(v, v + length);
        break;
    }
    return 8 + total;
}

} // namespace

Item::~Item() { OPENSSL_cleanse(bytes.data(), bytes.size()); }

Item Item::structure(uint32_t t, std::vector<Item> children)
{
    Item i;
    i.tag = t;
    i.type = Type::Structure;
    i.children = std::move(children);
    return i;
}

Item Item::integer(uint32_t t, int32_t value)
{
    Item i;
    i.tag = t;
    i.type = Type::Integer;
    i.number = value;
    return i;
}

Item Item::long_integer(uint32_t t, int64_t value)
{
    Item i;
    i.tag = t;
    i.type = Type::LongInteger;
    i.number = value;
    return i;
}

Item Item::big_integer(uint32_t t, std::vector<uint8_t> twos_complement)
{
    if (twos_complement.empty() || twos_complement.size() % 8 != 0)
        throw Error(ErrorCode::Internal, "a KMIP big integer must be a positive multiple of 8 bytes");
    Item i;
    i.tag = t;
    i.type = Type::BigInteger;
    i.bytes = std::move(twos_complement);
    return i;
}

Item Item::enumeration(uint32_t t, uint32_t value)
{
    Item i;
    i.tag = t;
    i.type = Type::Enumeration;
    i.number = value;
    return i;
}

Item Item::boolean(uint32_t t, bool value)
{
    Item i;
    i.tag = t;
    i.type = Type::Boolean;
    i.number = value ? 1 : 0;
    return i;
}

Item Item::text(uint32_t t, const std::string& value)
{
    Item i;
    i.tag = t;
    i.type = Type::TextString;
    i.bytes.assign(value.begin(), value.end());
    return i;
}

Item Item::byte_string(uint32_t t, ByteView value)
{
    Item i;
    i.tag = t;
    i.type = Type::ByteString;
    i.bytes.assign(value.data, value.data + value.size);
    return i;
}

Item Item::date_time(uint32_t t, int64_t seconds)
{
    Item i;
    i.tag = t;
    i.type = Type::DateTime;
    i.number = seconds;
    return i;
}

Item Item::interval(uint32_t t, uint32_t seconds)
{
    Item i;
    i.tag = t;
    i.type = Type::Interval;
    i.number = seconds;
    return i;
}

Item& Item::add(Item child)
{
    children.push_back(std::move(child));
    return *this;
}

const Item* Item::find(uint32_t t) const
{
    for (const Item& c : children)
        if (c.tag == t)
            return &c;
    return nullptr;
}

const Item* Item::find(uint32_t t, Type ty) const
{
    for (const Item& c : children)
        if (c.tag == t && c.type == ty)
            return &c;
    return nullptr;
}

void encode_into(const Item& item, std::vector<uint8_t>& out)
{
    out.push_back(static_cast<uint8_t>(item.tag >> 16));
    out.push_back(static_cast<uint8_t>(item.tag >> 8));
    out.push_back(static_cast<uint8_t>(item.tag));
    out.push_back(static_cast<uint8_t>(item.type));
    size_t length_at = out.size();
    put_be32(out, 0);
    size_t start = out.size();
    switch (item.type) {
    case Type::Structure:
        for (const Item& c : item.children)
            encode_into(c, out);
        break;
    case Type::Integer:
    case Type::Enumeration:
    case Type::Interval:
        put_be32(out, static_cast<uint32_t>(item.number));
        break;
    case Type::LongInteger:
    case Type::DateTime:
    case Type::Boolean:
        put_be64(out, static_cast<uint64_t>(item.number));
        break;
    case Type::BigInteger:
    case Type::TextString:
    case Type::ByteString:
        out.insert(out.end(), item.bytes.begin(), item.bytes.end());
        break;
    }
    size_t length = out.size() - start;
    if (length > kMaxMessageSize)
        throw Error(ErrorCode::Internal, "a KMIP message pgphi built is too large");
    for (int i = 0; i < 4; ++i)
        out[length_at + i] = static_cast<uint8_t>(length >> (24 - 8 * i));
    out.resize(start + padded(length), 0);
}

// The encoded size, so that the output is allocated once: a request may
// carry a plaintext DEK, and a grown vector would leave a copy behind.
size_t encoded_size(const Item& item)
{
    size_t value = 0;
    switch (item.type) {
    case Type::Structure:
        for (const Item& c : item.children)
            value += encoded_size(c);
        break;
    case Type::Integer:
    case Type::Enumeration:
    case Type::Interval:
        value = 4;
        break;
    case Type::LongInteger:
    case Type::DateTime:
    case Type::Boolean:
        value = 8;
        break;
    default:
        value = item.bytes.size();
    }
    return 8 + padded(value);
}

std::vector<uint8_t> encode(const Item& item)
{
    std::vector<uint8_t> out;
    out.reserve(encoded_size(item));
    encode_into(item, out);
    return out;
}

Item decode(ByteView input)
{
    if (input.size > kMaxMessageSize + 8)
        malformed("the message is larger than pgphi accepts");
    Item item;
    size_t used = decode_at(input.data, input.size, 0, item);
    if (used != input.size)
        malformed("bytes follow the message");
    return item;
}

size_t message_size(const uint8_t header[8])
{
    if (header[0] != 0x42 || header[3] != static_cast<uint8_t>(Type::Structure))
        malformed("the message is not a KMIP structure");
    uint32_t length = read_be32(header + 4);
    if (length > kMaxMessageSize)
        malformed("the message announces " + std::to_string(length) + " bytes, more than pgphi accepts");
    if (length % 8 != 0)
        malformed("a structure's length is not a multiple of 8");
    return 8 + size_t(length);
}

} // namespace pgphi::kmip
