#pragma once

#include "shared/shared_state.hpp"

namespace pgphi::pg {

// From broker 0's loop: starts a worker in the key's database that rotates
// it, for every key version past pgphi.dek_rotation_threshold; again after a
// minute if the key was not rotated.
void launch_rotations(SharedState* state);

} // namespace pgphi::pg
