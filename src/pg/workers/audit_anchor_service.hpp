// The key broker's side of audit anchors: it alone holds the key-manager
// credentials and the local KEK, so sessions and audit writers ask it for
// the MAC of an anchor, or for the check of one (shared/audit_internal.hpp).
#pragma once

namespace pgphi::pg {

// From the key broker's loop: computes or checks the MACs of audit anchors
// that sessions and audit writers asked for. See pgphi.audit_anchors.
void serve_audit_anchors();

} // namespace pgphi::pg
