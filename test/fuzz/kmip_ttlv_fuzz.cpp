// libFuzzer target for the KMIP client's reading of server messages
// (src/core/kmip_ttlv.cpp, src/core/kmip_messages.cpp, and the wrapped-DEK
// format of src/core/kmip_provider.cpp): each input is one message as read
// off the TLS connection. The framing (message_size), the TTLV decoder, the
// Response Message parser for each operation pgphi sends and the payload
// readers must return or refuse with a pgphi::Error (ProviderError for
// messages, WrappedDekInvalid for wrapped DEKs); a decoded item re-encodes to
// the same bytes.
#include <cstdint>
#include <cstring>
#include <vector>

#include "fuzz_support.hpp"
#include "kmip_messages.hpp"
#include "kmip_provider.hpp"
#include "kmip_ttlv.hpp"

using namespace pgphi;
using namespace pgphi::kmip;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size)
{
    const ByteView input(data, size);
    if (size >= 8)
        fuzz::refuses_cleanly("message_size", {ErrorCode::ProviderError}, [&] { message_size(data); });

    Item item;
    if (fuzz::refuses_cleanly("decode", {ErrorCode::ProviderError}, [&] { item = decode(input); })) {
        std::vector<uint8_t> again = encode(item);
        // Padding bytes are not kept: compare up to them only by length.
        fuzz::require(again.size() == size, "decode", "re-encoding changed the length");
    }

    for (Operation op : {Operation::Locate, Operation::GetAttributes, Operation::Create, Operation::Activate,
                         Operation::Encrypt, Operation::Decrypt}) {
        Response response;
        if (!fuzz::refuses_cleanly("parse_response", {ErrorCode::ProviderError},
                                   [&] { response = parse_response(input, op); }))
            continue;
        const Item& p = response.payload;
        fuzz::refuses_cleanly("located_ids", {ErrorCode::ProviderError}, [&] { located_ids(p); });
        fuzz::refuses_cleanly("state_of", {ErrorCode::ProviderError}, [&] { state_of(p); });
        fuzz::refuses_cleanly("unique_id_of", {ErrorCode::ProviderError}, [&] { unique_id_of(p); });
        fuzz::refuses_cleanly("encrypted_of", {ErrorCode::ProviderError}, [&] { encrypted_of(p, 32); });
        fuzz::refuses_cleanly("decrypted_of", {ErrorCode::ProviderError}, [&] { decrypted_of(p, 32); });
    }

    fuzz::refuses_cleanly("KmipWrapped::parse", {ErrorCode::WrappedDekInvalid}, [&] {
        KmipWrapped w = KmipWrapped::parse(input);
        std::vector<uint8_t> back = w.serialize();
        fuzz::require(back.size() == size && std::memcmp(back.data(), data, size) == 0, "KmipWrapped::parse",
                      "a parsed wrapped DEK serializes differently");
    });
    return 0;
}
