#include "key_provider.hpp"

namespace pgphi {

GeneratedDek KeyProvider::generate_dek(const std::string& kek_ref, const DekBinding& binding)
{
    GeneratedDek generated;
    generated.plaintext = SecureBytes::random(kDekSize);
    generated.wrapped = wrap(kek_ref, generated.plaintext, binding);
    return generated;
}

} // namespace pgphi
