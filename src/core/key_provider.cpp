#include "key_provider.hpp"

#include "error.hpp"

namespace pgphi {

GeneratedDek KeyProvider::generate_dek(const std::string& kek_ref, const DekBinding& binding)
{
    GeneratedDek generated;
    generated.plaintext = SecureBytes::random(kDekSize);
    generated.wrapped = wrap(kek_ref, generated.plaintext, binding);
    return generated;
}

std::optional<WrappedDek> KeyProvider::rewrap_to(const std::string&, const std::string&, ByteView, const DekBinding&)
{
    return std::nullopt;
}

std::string KeyProvider::create_kek(const std::string&)
{
    throw Error(ErrorCode::ConfigError, std::string("the ") + name() + " key provider cannot create KEKs", {},
                "Create or rotate the KEK in the key manager itself, then run pgphi.rewrap_keys(); pgphi creates "
                "KEKs in KMIP servers and PKCS#11 tokens only.");
}

std::string KeyProvider::create_dedicated_kek(const std::string&, const std::string&)
{
    throw Error(ErrorCode::ConfigError, std::string("the ") + name() + " key provider cannot make a KEK for one key",
                {}, "Dedicated KEKs live in Vault, AWS KMS, a KMIP server or a PKCS#11 token; the local provider has "
                    "one KEK file.");
}

std::string KeyProvider::delete_dedicated_kek(const std::string&)
{
    throw Error(ErrorCode::ConfigError, std::string("the ") + name() + " key provider has no dedicated KEKs");
}

std::string KeyProvider::audit_mac(const std::string&, ByteView)
{
    throw Error(ErrorCode::ConfigError, std::string("the ") + name() + " key provider cannot anchor the audit log");
}

bool KeyProvider::verify_audit_mac(const std::string&, ByteView, const std::string&)
{
    throw Error(ErrorCode::ConfigError, std::string("the ") + name() + " key provider cannot anchor the audit log");
}

} // namespace pgphi
