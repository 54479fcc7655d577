// See compat.hpp.
#include "shared/postgres.hpp"
#include "shared/compat.hpp"

namespace pgphi::compat {

uint32 key_broker_wait_event()
{
#if PG_VERSION_NUM >= 170000
    // Registered in shared memory on first use, then the same id in every
    // process; cached here so the lookup is paid once per backend.
    static uint32 event = 0;
    if (event == 0)
        event = WaitEventExtensionNew("PgphiKeyBroker");
    return event;
#else
    return PG_WAIT_EXTENSION;
#endif
}

} // namespace pgphi::compat
