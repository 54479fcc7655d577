// pgphi's configuration parameters (GUCs), defined in _PG_init.
#pragma once

namespace pgphi::pg {

// pgphi.local_kek_file: the local provider's KEK file, relative to the data
// directory unless absolute. Superuser-only: hidden from pg_settings and SHOW
// for everyone else.
extern char* local_kek_file;

void define_settings();

} // namespace pgphi::pg
