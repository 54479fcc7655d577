#include "shared/postgres.hpp"

extern "C" {
#include "access/xact.h"
#include "access/xlog.h"
#include "commands/dbcommands.h"
#include "executor/spi.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/condition_variable.h"
#include "storage/fd.h"
#include "storage/shmem.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
}

#include <atomic>
#include <cstring>

#include "shared/audit_internal.hpp"
#include "shared/error_bridge.hpp"
#include "shared/providers.hpp"
#include "shared/shared_state.hpp"
#include "workers/audit_anchor_service.hpp"

namespace pgphi::pg {

using namespace audit_detail;

namespace {

// In the broker: answers one request.
void serve_anchor_request(int index)
{
    AnchorRequest& shared = g_audit->anchors[index];
    AnchorRequest job;
    LWLockAcquire(g_audit->lock, LW_EXCLUSIVE);
    if (shared.state != AnchorRequest::State::Pending) {
        LWLockRelease(g_audit->lock);
        return;
    }
    shared.state = AnchorRequest::State::InFlight;
    job = shared;
    // An anchor must come after the last one this server made for the
    // database: a lower number means anchors were removed and are being
    // redone over a rewritten chain. (A destruction certificate is no
    // anchor: it can be signed any number of times.)
    if (!job.verify && !job.certificate) {
        AnchorDatabase* known = anchor_database(job.database, false);
        if (known && known->committed_seq != 0 &&
            (job.anchor_seq <= known->committed_seq || job.audit_seq < known->committed_audit_seq)) {
            job.regressed = true;
            job.last_anchor_seq = known->committed_seq;
        }
    }
    LWLockRelease(g_audit->lock);

    ByteView message(reinterpret_cast<const uint8_t*>(job.message), job.message_size);
    if (job.verify) {
        job.ok = run_core(job.failure, [&] {
            job.valid = provider_named(job.provider).verify_audit_mac(job.key_ref, message, std::string(job.mac));
        });
    } else if (!job.regressed) {
        strlcpy(job.provider, anchor_provider_name(), sizeof(job.provider));
        const char* key = g_anchor_key && g_anchor_key[0] ? g_anchor_key
                          : g_anchor_provider == 0       ? "default"
                                                         : "";
        strlcpy(job.key_ref, key, sizeof(job.key_ref));
        job.ok = run_core(job.failure, [&] {
            if (job.key_ref[0] == '\0')
                throw Error(ErrorCode::ConfigError, "pgphi.audit_anchor_key is not set",
                            "The Vault and AWS KMS providers anchor with a key named by that setting.");
            std::string mac = provider_named(job.provider).audit_mac(job.key_ref, message);
            if (mac.size() >= sizeof(job.mac))
                throw Error(ErrorCode::ProviderError, "the key provider returned an oversized MAC");
            memcpy(job.mac, mac.c_str(), mac.size() + 1);
        });
    }
    LWLockAcquire(g_audit->lock, LW_EXCLUSIVE);
    if (shared.ticket == job.ticket && shared.state == AnchorRequest::State::InFlight) {
        shared = job;
        shared.state = AnchorRequest::State::Done;
        shared.done_at_ms = now_ms();
    }
    LWLockRelease(g_audit->lock);
    ConditionVariableBroadcast(&g_audit->anchor_done);
}

// In the broker: the committed anchors from the file ("database anchor_seq
// audit_seq" per line), once after server start.
void load_anchor_state()
{
    FILE* in = AllocateFile(kAnchorStateFile, PG_BINARY_R);
    if (!in)
        return;
    unsigned database;
    long long anchor_seq, audit_seq;
    LWLockAcquire(g_audit->lock, LW_EXCLUSIVE);
    while (fscanf(in, "%u %lld %lld", &database, &anchor_seq, &audit_seq) == 3) {
        AnchorDatabase* entry = anchor_database(database, true);
        if (entry && anchor_seq > entry->committed_seq) {
            entry->committed_seq = anchor_seq;
            entry->committed_audit_seq = audit_seq;
        }
    }
    LWLockRelease(g_audit->lock);
    FreeFile(in);
}

// In the broker: replaces the file atomically with the committed anchors.
// A failure is logged and retried at the next loop.
void save_anchor_state()
{
    if (!g_audit->anchor_state_dirty.exchange(false))
        return;
    AnchorDatabase entries[kAnchorDatabases];
    LWLockAcquire(g_audit->lock, LW_SHARED);
    memcpy(entries, g_audit->anchor_databases, sizeof(entries));
    LWLockRelease(g_audit->lock);
    char temp[MAXPGPATH];
    snprintf(temp, sizeof(temp), "%s.tmp", kAnchorStateFile);
    FILE* out = AllocateFile(temp, PG_BINARY_W);
    bool ok = out != nullptr;
    for (int i = 0; ok && i < kAnchorDatabases; ++i)
        if (OidIsValid(entries[i].database) && entries[i].committed_seq > 0)
            fprintf(out, "%u %lld %lld\n", entries[i].database, static_cast<long long>(entries[i].committed_seq),
                    static_cast<long long>(entries[i].committed_audit_seq));
    if (out) {
        ok = fflush(out) == 0 && !ferror(out);
        if (FreeFile(out) != 0)
            ok = false;
    }
    if (!ok || durable_rename(temp, kAnchorStateFile, LOG) != 0) {
        if (!ok)
            ereport(LOG, (errcode_for_file_access(),
                          errmsg("pgphi could not save the audit anchors it made to \"%s\": %m", kAnchorStateFile)));
        unlink(temp);
        g_audit->anchor_state_dirty.store(true);
    }
}

} // namespace

void serve_audit_anchors()
{
    if (!g_audit)
        return;
    if (!g_audit->anchor_state_loaded) {
        load_anchor_state();
        g_audit->anchor_state_loaded = true;
    }
    static bool save_at_exit_registered = false;
    if (!save_at_exit_registered) {
        before_shmem_exit(
            [](int, Datum) {
                if (LWLockHeldByMe(g_audit->lock)) // an error while the broker held it
                    LWLockRelease(g_audit->lock);
                save_anchor_state();
            },
            0);
        save_at_exit_registered = true;
    }
    save_anchor_state();
    for (int i = 0; i < kAnchorRequests; ++i) {
        serve_anchor_request(i);
        CHECK_FOR_INTERRUPTS();
    }
}

} // namespace pgphi::pg
