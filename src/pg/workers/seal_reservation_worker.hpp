#pragma once

#include "shared/shared_state.hpp"

namespace pgphi::pg {

// From broker 0's loop: starts a worker that commits the next seal
// reservation, for every key version whose sessions asked for one.
void launch_reservations(SharedState* state);

} // namespace pgphi::pg
