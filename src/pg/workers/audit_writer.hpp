// The audit writer: a short-lived worker per database that moves the
// events and key-use counts queued in shared memory (shared/audit.hpp) into
// that database's pgphi.audit_log and pgphi.key_use_stats, and anchors its
// chain when one is due.
#pragma once

namespace pgphi::pg {

// From the key broker's loop: starts an audit writer for each database with
// queued events, or with counts older than the flush interval. When no
// worker slot is free, the events stay queued and the next loop retries (a
// WARNING at most once a minute); only writers that started and failed
// count against the events.
void launch_audit_writers();

} // namespace pgphi::pg
