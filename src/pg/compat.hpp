// Differences between the PostgreSQL major versions pgphi supports (15, 17
// and 18), kept in this one header so the rest of src/pg reads as if there
// were a single version. Each entry names the version that changed and why
// pgphi cares. Include after postgres.hpp.
#pragma once

extern "C" {
#include "utils/wait_event.h"
}

namespace pgphi::compat {

// The wait event a session shows in pg_stat_activity while it waits for the
// key broker. PostgreSQL 17 lets an extension name its own wait events
// ("PgphiKeyBroker"); before that, only the generic "Extension" exists.
uint32 key_broker_wait_event();

} // namespace pgphi::compat
