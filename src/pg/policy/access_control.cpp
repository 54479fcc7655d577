#include "shared/postgres.hpp"

extern "C" {
#include "catalog/namespace.h"
#include "libpq/auth.h"
#include "libpq/libpq-be.h"
#include "utils/acl.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
}

#include <sys/socket.h>

#include <algorithm>

#include "policy/access_control.hpp"
#include "shared/audit.hpp"
#include "shared/key_access.hpp"

namespace pgphi::pg {

namespace {

// ---------------------------------------------------------------------------
// Per-key grants
// ---------------------------------------------------------------------------

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
// to pgphi.key_grants (or the key tables), and any change to roles or role
// memberships. Answers from an older generation are ignored.
uint64_t g_grant_generation = 1;
Oid g_grants_relid = InvalidOid;
SPIPlanPtr g_plan_grantees = nullptr;

// valid_until (0.3.0: time-limited grants) through to_jsonb, which gives
// NULL on a 0.2.0 catalog without the column. Its text is ISO 8601, which
// timestamptz input reads whatever the session's DateStyle.
constexpr const char* kSelectGrantees =
    "SELECT g.grantee::pg_catalog.oid, "
    "(pg_catalog.to_jsonb(g) OPERATOR(pg_catalog.->>) 'valid_until')::pg_catalog.timestamptz "
    "FROM pgphi.key_grants g "
    "WHERE g.key_id OPERATOR(pg_catalog.=) $1 AND g.privilege OPERATOR(pg_catalog.=) $2";

void on_relcache_invalidation(Datum, Oid relid)
{
    if (relid == InvalidOid || relid == g_grants_relid)
        ++g_grant_generation;
}

void on_role_change(Datum, int, uint32) { ++g_grant_generation; }

const char* use_name(KeyUse use) { return use == KeyUse::Encrypt ? "encrypt" : "decrypt"; }

struct GranteeScan {
    Oid role;
    TimestampTz now;
    bool allowed;
    bool expired;           // a grant that would allow it has expired
    TimestampTz expires_at; // see GrantAnswer
};

void check_grantee(HeapTuple row, TupleDesc desc, void* arg)
{
    auto* scan = static_cast<GranteeScan*>(arg);
    bool isnull;
    Datum grantee = SPI_getbinval(row, desc, 1, &isnull);
    if (isnull || !has_privs_of_role(scan->role, DatumGetObjectId(grantee)))
        return;
    bool no_expiry;
    Datum valid_until = SPI_getbinval(row, desc, 2, &no_expiry);
    if (no_expiry) {
        scan->allowed = true;
        scan->expires_at = DT_NOEND;
    } else if (DatumGetTimestampTz(valid_until) > scan->now) {
        if (!scan->allowed || scan->expires_at != DT_NOEND)
            scan->expires_at = scan->allowed ? std::max(scan->expires_at, DatumGetTimestampTz(valid_until))
                                             : DatumGetTimestampTz(valid_until);
        scan->allowed = true;
    } else {
        scan->expired = true;
    }
}

// Reads the key's grantees and checks the role against each. Returns whether
// the answer may outlive the statement (not when read with the statement's
// snapshot, in parallel mode).
bool lookup_grant(Oid role, uint32_t key_id, KeyUse use, bool* allowed, bool* expired, TimestampTz* expires_at)
{
    *expired = false;
    *expires_at = DT_NOEND;
    if (superuser_arg(role)) {
        *allowed = true;
        return true;
    }
    Oid nsp = get_namespace_oid("pgphi", true);
    g_grants_relid = OidIsValid(nsp) ? get_relname_relid("key_grants", nsp) : InvalidOid;
    if (!OidIsValid(g_grants_relid)) {
        // The database still runs pgphi 0.1.0 (ALTER EXTENSION pgphi UPDATE
        // not yet run), which had no per-key grants: its roles decide alone.
        *allowed = true;
        return true;
    }
    Oid argtypes[2] = {INT4OID, TEXTOID};
    Datum args[2] = {Int32GetDatum(static_cast<int32>(key_id)), CStringGetTextDatum(use_name(use))};
    GranteeScan scan{role, GetCurrentTimestamp(), false, false, DT_NOEND};
    bool latest = false;
    query_catalog(&g_plan_grantees, kSelectGrantees, 2, argtypes, args, 0, check_grantee, &scan, &latest);
    *allowed = scan.allowed;
    *expired = !scan.allowed && scan.expired;
    *expires_at = scan.allowed ? scan.expires_at : DT_NOEND;
    return latest;
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

void check_key_use(const DataKey& key, KeyUse use)
{
    Oid role = GetUserId();
    uint32_t key_id = key.ref().key_id;
    GrantAnswer& answer = g_grant_cache[(key_id * 31u + role * 7u + static_cast<unsigned>(use)) % kGrantCacheSize];
    bool expired = false;
    // A time-limited answer is re-checked against the real clock (a vDSO
    // read, only for such answers), so a grant stops working at its expiry
    // also inside a statement that started before it; once past, the grants
    // are read again (another grant may still allow it).
    if (answer.valid && answer.generation == g_grant_generation && answer.role == role &&
        answer.key_id == key_id && answer.use == use &&
        (answer.only_for_statement == 0 || answer.only_for_statement == GetCurrentStatementStartTimestamp()) &&
        (!answer.allowed || answer.expires_at == DT_NOEND || GetCurrentTimestamp() < answer.expires_at)) {
        if (answer.allowed)
            return;
    } else {
        uint64_t generation = g_grant_generation;
        bool allowed = false;
        TimestampTz expires_at = DT_NOEND;
        bool cacheable = lookup_grant(role, key_id, use, &allowed, &expired, &expires_at);
        answer = GrantAnswer{true, allowed, use, role, key_id, generation,
                             cacheable ? 0 : GetCurrentStatementStartTimestamp(), expires_at};
        if (allowed)
            return;
        // An expired answer is not cached: the next use reads again, and is
        // audited as an expiry again (identical events coalesce).
        if (expired)
            answer.valid = false;
    }
    char* role_name = GetUserNameFromId(role, true);
    if (expired) {
        queue_audit_event(use_name(use), AuditOutcome::Refused, key,
                          use == KeyUse::Encrypt ? "encrypt grant expired" : "decrypt grant expired");
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
                        errmsg("permission denied to %s with pgphi key \"%s\"", use_name(use), key.name().c_str()),
                        errdetail("The time-limited %s grant of role \"%s\" on the key has expired.", use_name(use),
                                  role_name ? role_name : "?"),
                        errhint("A key custodian can grant it again with pgphi.grant_%s('%s', '%s', valid_until => ...).",
                                use_name(use), key.name().c_str(), role_name ? role_name : "role")));
    }
    queue_audit_event(use_name(use), AuditOutcome::Refused, key, "no grant on the key");
    ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
                    errmsg("permission denied to %s with pgphi key \"%s\"", use_name(use), key.name().c_str()),
                    errdetail("Role \"%s\" holds no %s grant on the key.", role_name ? role_name : "?",
                              use_name(use)),
                    errhint("A key custodian can run pgphi.grant_%s('%s', '%s').", use_name(use),
                            key.name().c_str(), role_name ? role_name : "role")));
}

void check_plaintext_transport(const DataKey& key)
{
    if (g_plaintext_transport == TransportAny || transport_allowed())
        return;
    queue_audit_event("decrypt", AuditOutcome::Refused, key, "client connection without TLS");
    ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
                    errmsg("pgphi does not return plaintext over a connection without TLS"),
                    errdetail("pgphi.plaintext_transport is \"%s\".",
                              g_plaintext_transport == TransportTls ? "tls" : "tls_or_local"),
                    errhint("Connect with sslmode=require or stronger.")));
}

void register_access_control()
{
    DefineCustomEnumVariable("pgphi.plaintext_transport",
                             "Which client connections may receive decrypted values: any, tls_or_local "
                             "(TLS or a Unix-domain socket) or tls.",
                             nullptr, &g_plaintext_transport, TransportAny, kTransportOptions, PGC_SUSET, 0,
                             nullptr, nullptr, nullptr);
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
