// Tracking of the pgphi function that writes the catalog (see catalog_audit.cpp).
#pragma once

namespace pgphi::pg {

// From _PG_init: installs the function manager hooks.
void register_catalog_writer_tracking();

} // namespace pgphi::pg
