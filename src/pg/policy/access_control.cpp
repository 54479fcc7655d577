#include "shared/postgres.hpp"

extern "C" {
#include "access/xact.h"
#include "catalog/namespace.h"
#include "libpq/auth.h"
#include "libpq/libpq-be.h"
#include "utils/acl.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/plancache.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
}

#include <sys/socket.h>

#include <algorithm>

#include "policy/access_control.hpp"
#include "shared/audit.hpp"
#include "shared/key_access.hpp"
#include "shared/shared_state.hpp"

namespace pgphi::pg {

namespace {

// ---------------------------------------------------------------------------
// Per-key grants
// ---------------------------------------------------------------------------

// A grant to a group covers the members it had when it was made (and those
// a custodian approved since, pgphi.key_grant_members). Any member of a role
// can act as that role: SET ROLE to it, write a SECURITY DEFINER function it
// owns that someone else then calls, or, for a LOGIN role, set its password
// and log in as it. So a grant lets the current role in only if every member
// of that role is covered by the grant too.

// One cached answer. The cache is direct-mapped and small: a session uses a
// handful of keys under a handful of roles.
struct GrantAnswer {
    bool valid;
    bool allowed;
    KeyUse use;
    Oid role;
    uint32_t key_id;
    uint64_t generation;
    TimestampTz only_for_statement; // read in parallel mode: good for this statement only; 0 if not
    TimestampTz expires_at;         // the latest expiry of the time-limited grants that allow it;
                                    // DT_NOEND when a grant without expiry does
};

constexpr int kGrantCacheSize = 64;
GrantAnswer g_grant_cache[kGrantCacheSize];

// Bumped by every invalidation that can change an answer: a committed change
// to pgphi.key_grants or pgphi.key_grant_members (or the key tables), and any
// change to roles or role memberships. Answers from an older generation are
// ignored.
uint64_t g_grant_generation = 1;
Oid g_grants_relid = InvalidOid;
Oid g_members_relid = InvalidOid;
SPIPlanPtr g_plan_grantees = nullptr;
SPIPlanPtr g_plan_grantees_before_members = nullptr;

// valid_until (0.3.0: time-limited grants) through to_jsonb, which gives
// NULL on a 0.2.0 catalog without the column. Its text is ISO 8601, which
// timestamptz input reads whatever the session's DateStyle. The third column
// says whether the grant covers role $3 (the current role): it is the
// grantee, or the grant recorded it as a member when it was made or a
// custodian approved it since. The fourth whether $3 has a member the grant
// does not cover.
constexpr const char* kSelectGrantees =
    "SELECT g.grantee::pg_catalog.oid, "
    "(pg_catalog.to_jsonb(g) OPERATOR(pg_catalog.->>) 'valid_until')::pg_catalog.timestamptz, "
    "g.grantee::pg_catalog.oid OPERATOR(pg_catalog.=) $3 OR EXISTS (SELECT FROM pgphi.key_grant_members m "
    "WHERE m.key_id OPERATOR(pg_catalog.=) g.key_id AND m.privilege OPERATOR(pg_catalog.=) g.privilege "
    "AND m.grantee::pg_catalog.oid OPERATOR(pg_catalog.=) g.grantee::pg_catalog.oid "
    "AND m.member::pg_catalog.oid OPERATOR(pg_catalog.=) $3), "
    "EXISTS (SELECT FROM pg_catalog.pg_roles r "
    "WHERE r.oid OPERATOR(pg_catalog.<>) $3 AND NOT r.rolsuper "
    "AND r.oid OPERATOR(pg_catalog.<>) g.grantee::pg_catalog.oid "
    "AND pg_catalog.pg_has_role(r.oid, $3, 'MEMBER') "
    "AND NOT EXISTS (SELECT FROM pgphi.key_grant_members m "
    "WHERE m.key_id OPERATOR(pg_catalog.=) g.key_id AND m.privilege OPERATOR(pg_catalog.=) g.privilege "
    "AND m.grantee::pg_catalog.oid OPERATOR(pg_catalog.=) g.grantee::pg_catalog.oid "
    "AND m.member::pg_catalog.oid OPERATOR(pg_catalog.=) r.oid)) "
    "FROM pgphi.key_grants g "
    "WHERE g.key_id OPERATOR(pg_catalog.=) $1 AND g.privilege OPERATOR(pg_catalog.=) $2";
// A catalog that predates key_grant_members (0.2.0, not yet updated): a
// grant covers every role with the grantee's privileges, as it did then.
constexpr const char* kSelectGranteesBeforeMembers =
    "SELECT g.grantee::pg_catalog.oid, "
    "(pg_catalog.to_jsonb(g) OPERATOR(pg_catalog.->>) 'valid_until')::pg_catalog.timestamptz, "
    "$3 IS NOT NULL, false "
    "FROM pgphi.key_grants g "
    "WHERE g.key_id OPERATOR(pg_catalog.=) $1 AND g.privilege OPERATOR(pg_catalog.=) $2";

void on_relcache_invalidation(Datum, Oid relid)
{
    if (relid == InvalidOid || relid == g_grants_relid || relid == g_members_relid)
        ++g_grant_generation;
}

void on_role_change(Datum, int, uint32) { ++g_grant_generation; }

const char* use_name(KeyUse use) { return use == KeyUse::Encrypt ? "encrypt" : "decrypt"; }

// What the grants of one key and use say for a role.
struct Verdict {
    bool allowed;
    bool expired;           // a grant that would let the role in has expired
    Oid not_covered_by;     // the role joined this grantee after its grant (InvalidOid: no such refusal)
    Oid uncovered_members_by; // the role acts for another and has members this grantee's grant does not cover
    TimestampTz expires_at; // see GrantAnswer
};

struct GranteeScan {
    Oid role;
    TimestampTz now;
    Verdict verdict;
};

void check_grantee(HeapTuple row, TupleDesc desc, void* arg)
{
    auto* scan = static_cast<GranteeScan*>(arg);
    bool isnull;
    Datum grantee_datum = SPI_getbinval(row, desc, 1, &isnull);
    if (isnull)
        return;
    Oid grantee = DatumGetObjectId(grantee_datum);
    if (!has_privs_of_role(scan->role, grantee))
        return;
    bool covered_null;
    if (!DatumGetBool(SPI_getbinval(row, desc, 3, &covered_null)) || covered_null) {
        scan->verdict.not_covered_by = grantee;
        return;
    }
    bool no_expiry;
    Datum valid_until = SPI_getbinval(row, desc, 2, &no_expiry);
    TimestampTz until = no_expiry ? DT_NOEND : DatumGetTimestampTz(valid_until);
    if (until != DT_NOEND && until <= scan->now) {
        scan->verdict.expired = true;
        return;
    }
    bool uncovered_null;
    if (DatumGetBool(SPI_getbinval(row, desc, 4, &uncovered_null)) && !uncovered_null) {
        scan->verdict.uncovered_members_by = grantee;
        return;
    }
    // The answer holds until the latest expiry among the grants that allow it.
    if (!scan->verdict.allowed || (scan->verdict.expires_at != DT_NOEND && until > scan->verdict.expires_at))
        scan->verdict.expires_at = until;
    scan->verdict.allowed = true;
}

// Reads the key's grantees and checks the role against each. Returns whether
// the answer may outlive the statement (not when read with the statement's
// snapshot, in parallel mode).
bool lookup_grant(Oid role, uint32_t key_id, KeyUse use, Verdict* verdict)
{
    *verdict = Verdict{false, false, InvalidOid, InvalidOid, DT_NOEND};
    if (superuser_arg(role)) {
        verdict->allowed = true;
        return true;
    }
    Oid nsp = get_namespace_oid("pgphi", true);
    g_grants_relid = OidIsValid(nsp) ? get_relname_relid("key_grants", nsp) : InvalidOid;
    g_members_relid = OidIsValid(nsp) ? get_relname_relid("key_grant_members", nsp) : InvalidOid;
    if (!OidIsValid(g_grants_relid)) {
        // The database still runs pgphi 0.1.0 (ALTER EXTENSION pgphi UPDATE
        // not yet run), which had no per-key grants: its roles decide alone.
        verdict->allowed = true;
        return true;
    }
    Oid argtypes[3] = {INT4OID, TEXTOID, OIDOID};
    Datum args[3] = {Int32GetDatum(static_cast<int32>(key_id)), CStringGetTextDatum(use_name(use)),
                     ObjectIdGetDatum(role)};
    GranteeScan scan{role, GetCurrentTimestamp(), *verdict};
    bool latest = false;
    if (OidIsValid(g_members_relid))
        query_catalog(&g_plan_grantees, kSelectGrantees, 3, argtypes, args, 0, check_grantee, &scan, &latest);
    else
        query_catalog(&g_plan_grantees_before_members, kSelectGranteesBeforeMembers, 3, argtypes, args, 0,
                      check_grantee, &scan, &latest);
    *verdict = scan.verdict;
    if (verdict->allowed) {
        verdict->expired = false;
        verdict->not_covered_by = verdict->uncovered_members_by = InvalidOid;
    } else {
        verdict->expires_at = DT_NOEND;
        if (OidIsValid(verdict->not_covered_by) || OidIsValid(verdict->uncovered_members_by))
            verdict->expired = false; // the refusal is about membership, not expiry
    }
    return latest;
}

// Whether now is before `expires_at`, per value. The kernel's coarse clock
// (a vDSO read of the time at the last tick, no timer read) lags the real
// one by at most a tick, a few milliseconds: while it shows the expiry more
// than kCoarseSlackUs (a second, far more than a tick) away, the real clock
// is before it too; closer than that, the real clock decides. So the check
// stays exact and, for nearly every value, costs less than
// GetCurrentTimestamp().
constexpr int64_t kCoarseSlackUs = 1'000'000;
bool before_expiry(TimestampTz expires_at)
{
    return coarse_timestamp() < expires_at - kCoarseSlackUs || GetCurrentTimestamp() < expires_at;
}

// The role's answer for a key and use, from the session's cache or the
// catalog. Refusals for an expired grant or a later member are not cached:
// the next use reads again (and is audited again; identical events
// coalesce), and a custodian's approval works at once.
Verdict decide(Oid role, uint32_t key_id, KeyUse use)
{
    GrantAnswer& answer = g_grant_cache[(key_id * 31u + role * 7u +
                                         static_cast<unsigned>(use)) %
                                        kGrantCacheSize];
    // A time-limited answer is re-checked against the real clock (only for
    // such answers), so a grant stops working at its expiry also inside a
    // statement that started before it; once past, the grants are read again
    // (another grant may still allow it).
    if (answer.valid && answer.generation == g_grant_generation && answer.role == role &&
        answer.key_id == key_id && answer.use == use &&
        (answer.only_for_statement == 0 || answer.only_for_statement == GetCurrentStatementStartTimestamp()) &&
        (!answer.allowed || answer.expires_at == DT_NOEND || before_expiry(answer.expires_at)))
        return Verdict{answer.allowed, false, InvalidOid, InvalidOid, answer.expires_at};
    uint64_t generation = g_grant_generation;
    Verdict verdict;
    bool cacheable = lookup_grant(role, key_id, use, &verdict);
    answer = GrantAnswer{true, verdict.allowed, use, role, key_id, generation,
                         cacheable ? 0 : GetCurrentStatementStartTimestamp(), verdict.expires_at};
    if (!verdict.allowed &&
        (verdict.expired || OidIsValid(verdict.not_covered_by) || OidIsValid(verdict.uncovered_members_by)))
        answer.valid = false;
    return verdict;
}

// ---------------------------------------------------------------------------
// Plaintext transport
// ---------------------------------------------------------------------------

enum PlaintextTransport { TransportAny, TransportTlsOrLocal, TransportTls };

const struct config_enum_entry kTransportOptions[] = {
    {"any", TransportAny, false},
    {"tls_or_local", TransportTlsOrLocal, false},
    {"tls", TransportTls, false},
    {nullptr, 0, false},
};

int g_plaintext_transport = TransportAny;

// How this session's client connected: "tls", "local" (Unix socket), "tcp"
// (no TLS), or "" for processes without a client. Set once by the
// authentication hook as a setting, because settings are what parallel
// workers inherit from their leader; the override source outranks anything
// a client or ALTER ROLE could set.
char* g_client_transport = nullptr;
ClientAuthentication_hook_type g_prev_client_auth_hook = nullptr;

void record_client_transport(Port* port, int status)
{
    if (g_prev_client_auth_hook)
        g_prev_client_auth_hook(port, status);
    const char* transport = port->ssl_in_use                       ? "tls"
                            : port->raddr.addr.ss_family == AF_UNIX ? "local"
                                                                    : "tcp";
    SetConfigOption("pgphi.client_transport", transport, PGC_BACKEND, PGC_S_OVERRIDE);
}

bool transport_allowed()
{
    const char* transport = g_client_transport ? g_client_transport : "";
    if (transport[0] == '\0' || strcmp(transport, "tls") == 0)
        return true; // no client connection (background worker), or TLS
    return g_plaintext_transport == TransportTlsOrLocal && strcmp(transport, "local") == 0;
}

} // namespace

KeyUseAnswer check_key_use(const DataKey& key, KeyUse use)
{
    Oid role = GetUserId();
    // The generation before the decision: an invalidation during it makes
    // the answer stale for a caller that keeps it.
    uint64_t generation = g_grant_generation;
    Verdict verdict = decide(role, key.ref().key_id, use);
    if (verdict.allowed)
        return KeyUseAnswer{role, generation, verdict.expires_at,
                            IsInParallelMode() ? GetCurrentStatementStartTimestamp() : 0};
    char* role_name = GetUserNameFromId(role, true);
    if (verdict.expired) {
        queue_audit_event(use_name(use), AuditOutcome::Refused, key,
                          use == KeyUse::Encrypt ? "encrypt grant expired" : "decrypt grant expired");
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
                        errmsg("permission denied to %s with pgphi key \"%s\"", use_name(use), key.name().c_str()),
                        errdetail("The time-limited %s grant of role \"%s\" on the key has expired.", use_name(use),
                                  role_name ? role_name : "?"),
                        errhint("A key custodian can grant it again with pgphi.grant_%s('%s', '%s', valid_until => ...).",
                                use_name(use), key.name().c_str(), role_name ? role_name : "role")));
    }
    if (OidIsValid(verdict.not_covered_by)) {
        char* group = GetUserNameFromId(verdict.not_covered_by, true);
        queue_audit_event(use_name(use), AuditOutcome::Refused, key, "member not covered by the grant");
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
                        errmsg("permission denied to %s with pgphi key \"%s\"", use_name(use), key.name().c_str()),
                        errdetail("The key is granted to role \"%s\", which role \"%s\" joined after the grant "
                                  "was made; the grant covers the roles that were members then.",
                                  group ? group : "?", role_name ? role_name : "?"),
                        errhint("A key custodian other than whoever added the member can run "
                                "pgphi.approve_grant_member('%s', '%s', '%s', '%s').",
                                key.name().c_str(), use_name(use), group ? group : "group",
                                role_name ? role_name : "role")));
    }
    if (OidIsValid(verdict.uncovered_members_by)) {
        char* group = GetUserNameFromId(verdict.uncovered_members_by, true);
        queue_audit_event(use_name(use), AuditOutcome::Refused, key, "role has members not covered");
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
                        errmsg("permission denied to %s with pgphi key \"%s\"", use_name(use), key.name().c_str()),
                        errdetail("Role \"%s\" has members that joined after the key was granted to role "
                                  "\"%s\", and any of them can act as it (SET ROLE, a SECURITY DEFINER function, "
                                  "its password).",
                                  role_name ? role_name : "?", group ? group : "?"),
                        errhint("A key custodian can approve those members with pgphi.approve_grant_member('%s', "
                                "'%s', '%s', ...); pgphi.access_review() lists them.",
                                key.name().c_str(), use_name(use), group ? group : "group")));
    }
    queue_audit_event(use_name(use), AuditOutcome::Refused, key, "no grant on the key");
    ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
                    errmsg("permission denied to %s with pgphi key \"%s\"", use_name(use), key.name().c_str()),
                    errdetail("Role \"%s\" holds no %s grant on the key.", role_name ? role_name : "?",
                              use_name(use)),
                    errhint("A key custodian can run pgphi.grant_%s('%s', '%s').", use_name(use),
                            key.name().c_str(), role_name ? role_name : "role")));
}

bool key_use_still_allowed(const KeyUseAnswer& answer)
{
    return answer.generation == g_grant_generation && answer.role == GetUserId() &&
           (answer.only_for_statement == 0 || answer.only_for_statement == GetCurrentStatementStartTimestamp()) &&
           (answer.expires_at == DT_NOEND || before_expiry(answer.expires_at));
}

const char* plaintext_transport_refusing()
{
    if (g_plaintext_transport == TransportAny || transport_allowed())
        return nullptr;
    return g_plaintext_transport == TransportTls ? "tls" : "tls_or_local";
}

void check_plaintext_transport(const DataKey& key)
{
    if (plaintext_transport_refusing() == nullptr)
        return;
    queue_audit_event("decrypt", AuditOutcome::Refused, key, "client connection without TLS");
    ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
                    errmsg("pgphi does not return plaintext over a connection without TLS"),
                    errdetail("pgphi.plaintext_transport is \"%s\".",
                              g_plaintext_transport == TransportTls ? "tls" : "tls_or_local"),
                    errhint("Connect with sslmode=require or stronger.")));
}

namespace {

// Statements on a Citus node are checked when planned (citus_transport.cpp):
// when the setting changes, this backend's cached plans are planned again.
void replan_on_change(int newval, void*)
{
    if (newval != g_plaintext_transport)
        ResetPlanCache();
}

} // namespace

void register_access_control()
{
    DefineCustomEnumVariable("pgphi.plaintext_transport",
                             "Which client connections may receive decrypted values: any, tls_or_local "
                             "(TLS or a Unix-domain socket) or tls.",
                             nullptr, &g_plaintext_transport, TransportAny, kTransportOptions, PGC_SUSET, 0,
                             nullptr, replan_on_change, nullptr);
    DefineCustomStringVariable("pgphi.client_transport", "How this session's client connected (set by pgphi).",
                               nullptr, &g_client_transport, "", PGC_BACKEND,
                               GUC_NO_SHOW_ALL | GUC_NOT_IN_SAMPLE | GUC_DISALLOW_IN_FILE | GUC_NO_RESET_ALL, nullptr, nullptr,
                               nullptr);
    g_prev_client_auth_hook = ClientAuthentication_hook;
    ClientAuthentication_hook = record_client_transport;

    CacheRegisterRelcacheCallback(on_relcache_invalidation, 0);
    CacheRegisterSyscacheCallback(AUTHOID, on_role_change, 0);
    CacheRegisterSyscacheCallback(AUTHMEMMEMROLE, on_role_change, 0);
    CacheRegisterSyscacheCallback(AUTHMEMROLEMEM, on_role_change, 0);
}

} // namespace pgphi::pg
