// The KMIP requests pgphi sends and the answers it reads, on the TTLV codec
// (kmip_ttlv.hpp). Pure functions, so the unit tests and the fuzz target
// reach them without a server.
//
// pgphi speaks KMIP 1.4: authenticated additional data in Encrypt and
// Decrypt (the DEK's key id and version) appeared in 1.4. Operations: Locate
// (a KEK named by its Name attribute), Get Attributes (State), Create and
// Activate (a KEK pgphi creates on request), Encrypt and Decrypt (AES-GCM),
// Revoke and Destroy (a dedicated KEK, when its pgphi key is destroyed).
// There is no Get: the KEK never leaves the server.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "bytes.hpp"
#include "kmip_ttlv.hpp"
#include "secure_bytes.hpp"

namespace pgphi::kmip {

inline constexpr int kProtocolMajor = 1;
inline constexpr int kProtocolMinor = 4;

enum class Operation : uint32_t {
    Create = 0x01,
    Locate = 0x08,
    GetAttributes = 0x0B,
    Activate = 0x12,
    Revoke = 0x13,
    Destroy = 0x14,
    Encrypt = 0x1F,
    Decrypt = 0x20,
};

// Result Reason values (KMIP 1.4, 9.1.3.2.29) pgphi tells apart.
namespace reason {
inline constexpr uint32_t ItemNotFound = 0x01;
inline constexpr uint32_t AuthenticationNotSuccessful = 0x03;
inline constexpr uint32_t InvalidMessage = 0x04;
inline constexpr uint32_t OperationNotSupported = 0x05;
inline constexpr uint32_t CryptographicFailure = 0x0A;
inline constexpr uint32_t IllegalOperation = 0x0B;
inline constexpr uint32_t PermissionDenied = 0x0C;
inline constexpr uint32_t ObjectArchived = 0x0D;
} // namespace reason

// State values (9.1.3.2.18).
enum class State : uint32_t {
    PreActive = 1,
    Active = 2,
    Deactivated = 3,
    Compromised = 4,
    Destroyed = 5,
    DestroyedCompromised = 6,
};
const char* state_name(uint32_t state);
const char* reason_name(uint32_t reason);

inline constexpr size_t kGcmIvSize = 12;
inline constexpr size_t kGcmTagSize = 16;

// A whole Request Message with one batch item.
std::vector<uint8_t> request_message(Operation operation, Item payload);

// Symmetric keys named `name`; only the active ones when `active_only`.
Item locate_by_name(const std::string& name, bool active_only = true);
Item get_state(const std::string& unique_id);
Item create_aes256(const std::string& name);         // usable to encrypt and decrypt
Item activate(const std::string& unique_id);
// Revoke with reason Cessation of Operation: the object becomes Deactivated,
// which Destroy requires of an object that was Active.
Item revoke_ceased(const std::string& unique_id);
Item destroy(const std::string& unique_id);
Item encrypt(const std::string& unique_id, ByteView plaintext, ByteView iv, ByteView aad);
Item decrypt(const std::string& unique_id, ByteView ciphertext, ByteView iv, ByteView aad, ByteView tag);

// One answer: the batch item's status, and its payload when it succeeded.
struct Response {
    uint32_t status = 0;           // 0 Success, 1 Operation Failed, 2 Pending, 3 Undone
    uint32_t reason = 0;           // when failed (0: none given)
    std::string message;           // Result Message, as the server wrote it
    Item payload;                  // Response Payload (empty structure if absent)
    bool ok() const { return status == 0; }
};

// Parses a Response Message to `operation`. Refuses (ProviderError) a
// malformed one, one with other than one batch item, or an answer to
// another operation.
Response parse_response(ByteView message, Operation operation);

std::vector<std::string> located_ids(const Item& payload);
uint32_t state_of(const Item& payload);              // Get Attributes (State)
std::string unique_id_of(const Item& payload);       // Create, Activate

struct Encrypted {
    std::vector<uint8_t> ciphertext;
    std::vector<uint8_t> tag;
};
Encrypted encrypted_of(const Item& payload, size_t expected_size);
SecureBytes decrypted_of(const Item& payload, size_t expected_size);

} // namespace pgphi::kmip
