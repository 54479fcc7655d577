// The ProcessUtility hook that puts on record what switches pgphi's DDL
// guard off (src/pg/policy/utility_guard.cpp).
#pragma once

namespace pgphi::pg {

void register_utility_guard(); // from _PG_init

} // namespace pgphi::pg
