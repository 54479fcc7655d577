#include "shared/postgres.hpp"

extern "C" {
#include "access/htup_details.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "storage/ipc.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/snapmgr.h"
#include "access/xact.h"
#include "utils/syscache.h"
}

#include <algorithm>
#include <cstring>
#include <string_view>

#include "core/key_ring.hpp"
#include "shared/audit.hpp"
#include "shared/error_bridge.hpp"
#include "shared/key_access.hpp"
#include "shared/shared_state.hpp"

namespace pgphi::pg {

namespace {

KeyRing g_ring;
NonceSource g_nonces;

// Set by the relcache callback when the key catalog changed; the ring is
// cleared at the next lookup, never inside the callback, so pointers handed
// out for the current row stay valid.
bool g_ring_stale = false;
// The shared invalidation generation the ring was filled under: the broker
// bumps it when a key manager revokes a key or a key expires unrefreshed.
uint64_t g_ring_generation = 0;
Oid g_keys_relid = InvalidOid;
Oid g_versions_relid = InvalidOid;

constexpr int64_t kUseReportIntervalMs = 500;
// How many uses of a key may pass, within one statement, between two reads
// of the clock for its use report (see note_use).
constexpr uint32_t kUsesPerClockRead = 16;
// The statement in which note_use last read the clock.
TimestampTz g_clock_statement = 0;

SPIPlanPtr g_plan_by_name = nullptr;
SPIPlanPtr g_plan_by_ref = nullptr;
SPIPlanPtr g_plan_by_name_version = nullptr;

// Columns 4 and 5 are the provider and KEK that wrap the version's DEK: the
// key's, or while pgphi.rekey moves the version, the ones it is leaving.
// Columns 9..11 are the key's purpose and blind-index settings (0.2.0), 12 the
// KEK (version) that wrapped the DEK, 13
// whether the key or the version is suspended and 14 whether the version is
// marked compromised (0.3.0, docs/key-lifecycle.md). They are read through
// to_jsonb, which gives NULL for a column that does not exist, so this
// library also serves a 0.1.0 catalog (every key is then an encryption key)
// until ALTER EXTENSION pgphi UPDATE has run.
#define PGPHI_KEY_COLUMNS                                                                                        \
    "SELECT k.key_id, v.version, k.name, "                                                                       \
    "COALESCE(pg_catalog.to_jsonb(v) OPERATOR(pg_catalog.->>) 'rekey_source_provider', k.provider), "   \
    "COALESCE(pg_catalog.to_jsonb(v) OPERATOR(pg_catalog.->>) 'rekey_source_kek', k.kek_ref), "         \
    "v.state, v.wrapped_dek, v.xmin, "                                                                            \
    "pg_catalog.to_jsonb(k) OPERATOR(pg_catalog.->>) 'purpose', "                                                \
    "pg_catalog.to_jsonb(k) OPERATOR(pg_catalog.->>) 'normalization', "                                          \
    "pg_catalog.to_jsonb(k) OPERATOR(pg_catalog.->>) 'index_bytes', v.kek_version, "                           \
    "(pg_catalog.to_jsonb(k) OPERATOR(pg_catalog.->>) 'suspended_at') IS NOT NULL "                                \
    "OR (pg_catalog.to_jsonb(v) OPERATOR(pg_catalog.->>) 'suspended_at') IS NOT NULL, "                             \
    "(pg_catalog.to_jsonb(v) OPERATOR(pg_catalog.->>) 'compromised_at') IS NOT NULL "

// By name: the key's active version; a key without one (all versions
// rotated out or destroyed) still returns a row, with a NULL version.
constexpr const char* kSelectByName =
    PGPHI_KEY_COLUMNS
    "FROM pgphi.keys k LEFT JOIN pgphi.key_versions v ON v.key_id OPERATOR(pg_catalog.=) k.key_id "
    "AND v.state OPERATOR(pg_catalog.=) 'active' WHERE k.name OPERATOR(pg_catalog.=) $1";
constexpr const char* kSelectByRef =
    PGPHI_KEY_COLUMNS
    "FROM pgphi.keys k JOIN pgphi.key_versions v ON v.key_id OPERATOR(pg_catalog.=) k.key_id "
    "WHERE v.key_id OPERATOR(pg_catalog.=) $1 AND v.version OPERATOR(pg_catalog.=) $2";
// By name and version; a NULL version when the key exists without it.
constexpr const char* kSelectByNameVersion =
    PGPHI_KEY_COLUMNS
    "FROM pgphi.keys k LEFT JOIN pgphi.key_versions v ON v.key_id OPERATOR(pg_catalog.=) k.key_id "
    "AND v.version OPERATOR(pg_catalog.=) $2 WHERE k.name OPERATOR(pg_catalog.=) $1";

// One row of the key catalog, copied out of SPI into the caller's context.
struct CatalogKey {
    uint32 key_id;
    uint32 version;
    char* name;
    char* provider;
    char* kek_ref;
    char* state;
    bytea* wrapped_dek; // NULL once the version is destroyed
    TransactionId created_by_xid;
    bool from_latest_snapshot; // false in parallel mode: see fetch_catalog_key
    char* purpose;       // NULL on a 0.1.0 catalog
    char* normalization; // blind-index keys only
    char* index_bytes;   // blind-index keys only
    char* kek_version;   // which KEK (version) wrapped the DEK; NULL without a version
    bool suspended;      // the key or this version is suspended (0.3.0)
    bool compromised;    // this version is marked compromised (0.3.0)
};

// Before a key leaves the ring, its seals are added to the shared count.
void report_all_seals()
{
    g_ring.for_each([](DataKey& key) { report_seals(key, MyDatabaseId); });
}

void wipe_keys_at_exit(int, Datum)
{
    report_all_seals();
    g_ring.clear();
}

// The statement whose start last processed pending invalidations.
TimestampTz g_invalidations_statement = 0;

void flush_if_stale()
{
    // Once per statement, take in the catalog changes other sessions (or,
    // on a standby, the primary) committed: a suspension or a revocation
    // then reaches the next statement of a session even inside a
    // transaction block, whose relations are already locked (PostgreSQL
    // would otherwise look at invalidations only when it takes a new lock).
    // Cheap when none are pending.
    TimestampTz statement = GetCurrentStatementStartTimestamp();
    if (statement != g_invalidations_statement) {
        g_invalidations_statement = statement;
        AcceptInvalidationMessages();
    }
    uint64_t generation = shared_state()->invalidation_generation.load(std::memory_order_acquire);
    if (g_ring_stale || generation != g_ring_generation) {
        report_all_seals();
        g_ring.clear();
        g_ring_stale = false;
        g_ring_generation = generation;
    }
}

// The use report of a key handed out for one more value.
void note_use(DataKey* key, TimestampTz statement)
{
    // Tell the broker the key is in use, so it re-validates it before its
    // TTL ends instead of letting it expire as idle. By the real clock: with
    // the statement's start, a statement longer than the TTL would never
    // report its key, and the broker would let it expire. The coarse clock
    // (a tick behind at most) is as good for a report due every few seconds.
    // Even so a clock read per value was a tenth of pgphi's cost per value in
    // a scan, so it is read at each statement's first use and then every
    // kUsesPerClockRead uses of the key: a scan passes those in microseconds.
    // A statement that spaces its values out reports a little later, which
    // at worst lets the broker expire the key as idle: the next lookup then
    // asks the key manager again (a cost, never a key kept longer).
    uint32_t uses = key->uses_since_clock_read() + 1;
    if (uses < kUsesPerClockRead && statement == g_clock_statement) {
        key->set_uses_since_clock_read(uses);
        return;
    }
    key->set_uses_since_clock_read(0);
    g_clock_statement = statement;
    int64_t real_now = coarse_timestamp() / 1000;
    if (real_now - key->use_reported_ms() >= kUseReportIntervalMs) {
        report_key_use(key->cache_slot(), real_now);
        key->set_use_reported_ms(real_now);
    }
}

// A key from the ring, unless its time in this process is up. The statement
// start time costs no system call; a key thus outlives its TTL by at most one
// statement, and a revocation reaches running statements through the
// generation check.
DataKey* still_valid(DataKey* key)
{
    TimestampTz statement = GetCurrentStatementStartTimestamp();
    if (!key || key->valid_until_ms() <= statement / 1000)
        return nullptr;
    note_use(key, statement);
    return key;
}

void copy_field(char* dst, size_t size, const char* src, const char* what)
{
    if (strlen(src) >= size)
        ereport(ERROR, (errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
                        errmsg("pgphi key catalog entry has an overlong %s", what)));
    strlcpy(dst, src, size);
}

void on_relcache_invalidation(Datum, Oid relid)
{
    if (relid == InvalidOid || relid == g_keys_relid || relid == g_versions_relid)
        g_ring_stale = true;
}

// The role that owns the key catalog (the extension's installer). Lookups
// run as this role so callers need no privilege on the key tables.
Oid catalog_owner()
{
    Oid nsp = get_namespace_oid("pgphi", true);
    g_keys_relid = OidIsValid(nsp) ? get_relname_relid("keys", nsp) : InvalidOid;
    g_versions_relid = OidIsValid(nsp) ? get_relname_relid("key_versions", nsp) : InvalidOid;
    if (!OidIsValid(g_keys_relid) || !OidIsValid(g_versions_relid))
        ereport(ERROR, (errcode(ERRCODE_UNDEFINED_OBJECT),
                        errmsg("extension pgphi is not installed in this database"),
                        errhint("Run CREATE EXTENSION pgphi.")));

    HeapTuple tuple = SearchSysCache1(RELOID, ObjectIdGetDatum(g_keys_relid));
    if (!HeapTupleIsValid(tuple))
        elog(ERROR, "cache lookup failed for relation %u", g_keys_relid);
    Oid owner = ((Form_pg_class)GETSTRUCT(tuple))->relowner;
    ReleaseSysCache(tuple);
    return owner;
}

// SPI_getvalue allocates in the current context, the caller's here.
char* copy_text_column(HeapTuple row, TupleDesc desc, int column) { return SPI_getvalue(row, desc, column); }

// Copies the first row of a key lookup into a CatalogKey.
void copy_catalog_key(HeapTuple row, TupleDesc desc, void* arg)
{
    auto* out = static_cast<CatalogKey*>(arg);
    bool isnull;
    out->key_id = DatumGetInt32(SPI_getbinval(row, desc, 1, &isnull));
    Datum version = SPI_getbinval(row, desc, 2, &isnull);
    out->version = isnull ? 0 : DatumGetInt32(version); // 0: no active version
    out->name = copy_text_column(row, desc, 3);
    out->provider = copy_text_column(row, desc, 4);
    out->kek_ref = copy_text_column(row, desc, 5);
    out->state = copy_text_column(row, desc, 6);
    Datum wrapped = SPI_getbinval(row, desc, 7, &isnull);
    out->wrapped_dek = isnull ? nullptr : DatumGetByteaPCopy(wrapped);
    Datum xmin = SPI_getbinval(row, desc, 8, &isnull);
    out->created_by_xid = isnull ? InvalidTransactionId : DatumGetTransactionId(xmin);
    out->purpose = copy_text_column(row, desc, 9);
    out->normalization = copy_text_column(row, desc, 10);
    out->index_bytes = copy_text_column(row, desc, 11);
    out->kek_version = copy_text_column(row, desc, 12);
    Datum suspended = SPI_getbinval(row, desc, 13, &isnull);
    out->suspended = !isnull && DatumGetBool(suspended);
    Datum compromised = SPI_getbinval(row, desc, 14, &isnull);
    out->compromised = !isnull && DatumGetBool(compromised);
}

// Runs one of the two lookups and copies the row into `out`. Returns false
// when no row matched.
bool fetch_catalog_key(SPIPlanPtr* plan, const char* query, int nargs, Oid* argtypes, Datum* args,
                       CatalogKey* out)
{
    return query_catalog(plan, query, nargs, argtypes, args, 1, copy_catalog_key, out,
                         &out->from_latest_snapshot) > 0;
}

// What the catalog row says the key is for. The catalog's CHECK constraints
// allow only valid settings; anything else is a damaged catalog.
KeySpec spec_of(const CatalogKey& key)
{
    KeySpec spec;
    if (key.purpose == nullptr || strcmp(key.purpose, "encryption") == 0)
        return spec;
    int index_bytes = key.index_bytes ? atoi(key.index_bytes) : 0;
    if (strcmp(key.purpose, "blind_index") != 0 || key.normalization == nullptr ||
        !normalization_from_name(key.normalization, &spec.normalization) ||
        index_bytes < static_cast<int>(kMinBlindIndexBytes) || index_bytes > static_cast<int>(kMaxBlindIndexBytes))
        ereport(ERROR, (errcode(ERRCODE_DATA_CORRUPTED),
                        errmsg("pgphi key \"%s\" has an invalid purpose or blind-index setting in the key catalog",
                               key.name)));
    spec.purpose = KeyPurpose::BlindIndex;
    spec.index_bytes = static_cast<uint8_t>(index_bytes);
    return spec;
}

// Gets a catalog row's DEK from the shared cache (the broker unwraps it on a
// miss) and adds it to the ring.
DataKey* install_catalog_key(const CatalogKey& key)
{
    static bool exit_hook_registered = false;
    if (key.wrapped_dek == nullptr)
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                        errmsg("pgphi key \"%s\" version %u has been destroyed", key.name, key.version),
                        errdetail("Values encrypted under a destroyed key version cannot be decrypted.")));
    if (!exit_hook_registered) {
        // before_shmem_exit: the seal counts go to shared memory.
        before_shmem_exit(wipe_keys_at_exit, 0);
        exit_hook_registered = true;
    }

    cache::UnwrapRequest request;
    memset(&request, 0, sizeof(request));
    copy_field(request.provider, sizeof(request.provider), key.provider, "provider");
    copy_field(request.kek_ref, sizeof(request.kek_ref), key.kek_ref, "KEK reference");
    if (key.kek_version)
        copy_field(request.wrapped_by, sizeof(request.wrapped_by), key.kek_version, "KEK version");
    copy_field(request.key_name, sizeof(request.key_name), key.name, "key name");
    request.key_id = key.key_id;
    request.key_version = key.version;
    size_t wrapped_size = VARSIZE(key.wrapped_dek) - VARHDRSZ;
    if (wrapped_size > sizeof(request.wrapped))
        ereport(ERROR, (errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
                        errmsg("wrapped DEK of pgphi key \"%s\" is too large", key.name)));
    memcpy(request.wrapped, VARDATA(key.wrapped_dek), wrapped_size);
    request.wrapped_size = static_cast<uint16_t>(wrapped_size);

    // Everything that can raise comes before the plaintext DEK is on the stack.
    KeySpec spec = spec_of(key);
    uint8_t dek[cache::kDekSize];
    int64_t valid_until_ms = 0;
    uint32_t slot_index = UINT32_MAX;
    get_dek(request, dek, &valid_until_ms, &slot_index);
    if (!key.from_latest_snapshot)
        valid_until_ms = std::min<int64_t>(valid_until_ms, GetCurrentStatementStartTimestamp() / 1000 + 1);

    // A key being replaced (its TTL here ran out) reports what it sealed first.
    if (DataKey* previous = g_ring.find(format::KeyRef{key.key_id, key.version}))
        report_seals(*previous, MyDatabaseId);

    DataKey* installed = nullptr;
    // A compromised version seals nothing: it is neither the key's active
    // version in the ring nor a live one for lookups.
    bool active = strcmp(key.state, "active") == 0 && !key.compromised;
    bool live = (strcmp(key.state, "active") == 0 || strcmp(key.state, "decrypt_only") == 0) && !key.compromised;
    int64_t installed_at_ms = now_ms();
    CoreFailure failure;
    bool ok = run_core(failure, [&] {
        installed = &g_ring.install(format::KeyRef{key.key_id, key.version}, key.name, active,
                                    SecureBytes(dek, sizeof(dek)), spec);
        installed->set_live(live);
        installed->set_compromised(key.compromised);
        installed->set_valid_until_ms(valid_until_ms);
        installed->set_cache_slot(slot_index);
        installed->set_use_reported_ms(installed_at_ms);
    });
    explicit_bzero(dek, sizeof(dek));
    explicit_bzero(&request, sizeof(request));
    if (!ok)
        raise_core_failure(failure);
    return installed;
}

// A name that names no key is not repeated: a misplaced argument (the value
// where the key name belongs) could be PHI, and errors reach the server log.
[[noreturn]] void raise_unknown_key_name()
{
    ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_UNDEFINED_OBJECT), errmsg("pgphi key does not exist"),
                    errdetail("pgphi does not repeat a name that names no key: a misplaced argument could be PHI."),
                    errhint("Check the key name argument; pgphi.create_key() creates a key.")));
    pg_unreachable();
}

// Suspension (docs/key-lifecycle.md): nothing is encrypted or decrypted
// under a suspended key or version. A suspended version is never put into
// the ring, and suspending clears every ring, so only this path sees one.
[[noreturn]] void raise_suspended(const CatalogKey& key, const char* use)
{
    queue_audit_event(use, AuditOutcome::Refused, key.key_id, key.version, key.name, "key is suspended");
    ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                    errmsg("pgphi key \"%s\" version %u is suspended", key.name, key.version),
                    errdetail("A key custodian suspended the key or this version: nothing is encrypted or "
                              "decrypted under it."),
                    errhint("Two key custodians can lift the suspension with pgphi.approve_resume() and "
                            "pgphi.resume_key().")));
    pg_unreachable();
}

[[noreturn]] void raise_compromised(uint32 key_id, uint32 version, const char* name, const char* use)
{
    queue_audit_event(use, AuditOutcome::Refused, key_id, version, name, "key version is compromised");
    if (strcmp(use, "encrypt") == 0)
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                        errmsg("pgphi key \"%s\" version %u is marked compromised", name, version),
                        errdetail("Nothing is encrypted under a compromised key version."),
                        errhint("A key custodian can run pgphi.rotate_key('%s') to make a new active version.",
                                name)));
    ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                    errmsg("pgphi key \"%s\" version %u is marked compromised", name, version),
                    errdetail("Values under a compromised key version are decrypted only to re-encrypt them."),
                    errhint("Rotate the key and run CALL pgphi.reencrypt() on the columns that use it.")));
    pg_unreachable();
}

} // namespace

uint64 query_catalog(SPIPlanPtr* plan, const char* query, int nargs, Oid* argtypes, Datum* args, long max_rows,
                     CatalogRowFn on_row, void* arg, bool* from_latest_snapshot)
{
    MemoryContext caller_context = CurrentMemoryContext;
    Oid owner = catalog_owner();
    Oid saved_user;
    int saved_security;
    volatile uint64 rows = 0;

    GetUserIdAndSecContext(&saved_user, &saved_security);
    SetUserIdAndSecContext(owner, saved_security | SECURITY_LOCAL_USERID_CHANGE |
                                      SECURITY_RESTRICTED_OPERATION);
    PG_TRY();
    {
        if (SPI_connect() != SPI_OK_CONNECT)
            elog(ERROR, "pgphi: SPI_connect failed");
        if (*plan == nullptr) {
            SPIPlanPtr prepared = SPI_prepare(query, nargs, argtypes);
            if (prepared == nullptr || SPI_keepplan(prepared) != 0)
                elog(ERROR, "pgphi: could not prepare key catalog lookup: %s",
                     SPI_result_code_string(SPI_result));
            *plan = prepared;
        }
        // A fresh snapshot, not the statement's: a change committed before we
        // look has already sent its invalidation, so an older snapshot could
        // cache a stale row that no later invalidation would clear. Parallel
        // mode forbids a new snapshot; the statement's is used, and callers
        // keep what they read for this statement only.
        bool latest = !IsInParallelMode();
        if (from_latest_snapshot)
            *from_latest_snapshot = latest;
        int rc = SPI_execute_snapshot(*plan, args, nullptr, latest ? GetLatestSnapshot() : GetActiveSnapshot(),
                                      InvalidSnapshot, true, false, max_rows);
        if (rc != SPI_OK_SELECT)
            elog(ERROR, "pgphi: key catalog lookup failed: %s", SPI_result_code_string(rc));
        MemoryContext spi_context = MemoryContextSwitchTo(caller_context);
        for (uint64 i = 0; i < SPI_processed; ++i)
            on_row(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, arg);
        MemoryContextSwitchTo(spi_context);
        rows = SPI_processed;
        SPI_finish();
    }
    PG_FINALLY();
    {
        SetUserIdAndSecContext(saved_user, saved_security);
    }
    PG_END_TRY();
    return rows;
}

DataKey* key_for_encrypt(const text* key_name)
{
    flush_if_stale();
    std::string_view name(VARDATA_ANY(key_name), VARSIZE_ANY_EXHDR(key_name));
    if (DataKey* key = still_valid(g_ring.find_active(name)))
        return key;

    Oid argtypes[1] = {TEXTOID};
    Datum args[1] = {PointerGetDatum(key_name)};
    CatalogKey row;
    if (!fetch_catalog_key(&g_plan_by_name, kSelectByName, 1, argtypes, args, &row))
        raise_unknown_key_name();
    if (row.version == 0)
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                        errmsg("pgphi key \"%s\" has no active version", row.name),
                        errhint("pgphi.rotate_key() creates a new active version.")));
    if (row.suspended)
        raise_suspended(row, "encrypt");
    if (row.compromised)
        raise_compromised(row.key_id, row.version, row.name, "encrypt");
    // Nothing may be written under a DEK whose wrapped form is not committed:
    // if this transaction rolled back, such values could never be decrypted.
    if (TransactionIdIsCurrentTransactionId(row.created_by_xid))
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                        errmsg("pgphi key \"%s\" version %u was created or changed in this transaction", row.name,
                               row.version),
                        errdetail("Values are encrypted only under key versions that are committed."),
                        errhint("Commit the transaction that creates the key, then encrypt.")));
    return install_catalog_key(row);
}

DataKey* key_for_decrypt(format::KeyRef ref, bool for_reencrypt)
{
    flush_if_stale();
    if (DataKey* key = still_valid(g_ring.find(ref))) {
        if (key->compromised() && !for_reencrypt)
            raise_compromised(ref.key_id, ref.version, key->name().c_str(), "decrypt");
        return key;
    }

    Oid argtypes[2] = {INT4OID, INT4OID};
    Datum args[2] = {Int32GetDatum(static_cast<int32>(ref.key_id)), Int32GetDatum(static_cast<int32>(ref.version))};
    CatalogKey row;
    if (!fetch_catalog_key(&g_plan_by_ref, kSelectByRef, 2, argtypes, args, &row))
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_UNDEFINED_OBJECT),
                        errmsg("pgphi key id %u version %u does not exist in this database", ref.key_id,
                               ref.version),
                        errhint("The value was encrypted in a database whose pgphi key catalog is not "
                                "present here; restore the catalog with the data.")));
    // Retired means that no value uses the version (retire_key_version
    // checked it): one that still turns up was replayed or restored from
    // elsewhere, and is refused, as Vault's min_decryption_version refuses
    // old ciphertexts. Such a version is never put into the ring, and a
    // change of its state clears the ring, so the fast path above cannot
    // return one either.
    if (row.state != nullptr && strcmp(row.state, "retired") == 0) {
        queue_audit_event("decrypt", AuditOutcome::Refused, row.key_id, row.version, row.name,
                          "key version is retired");
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                        errmsg("pgphi key \"%s\" version %u is retired", row.name, row.version),
                        errdetail("Values under a retired key version are not decrypted."),
                        errhint("A key custodian can run pgphi.unretire_key_version('%s', %u) to re-encrypt "
                                "values still under it.",
                                row.name, row.version)));
    }
    if (row.suspended)
        raise_suspended(row, "decrypt");
    if (row.compromised && !for_reencrypt && row.wrapped_dek != nullptr)
        raise_compromised(row.key_id, row.version, row.name, "decrypt");
    return install_catalog_key(row);
}

DataKey* key_for_version(const text* key_name, uint32 version)
{
    flush_if_stale();
    std::string_view name(VARDATA_ANY(key_name), VARSIZE_ANY_EXHDR(key_name));
    // The key id comes from the active version, when that is in the ring.
    if (DataKey* active = g_ring.find_active(name))
        if (DataKey* key = still_valid(g_ring.find(format::KeyRef{active->ref().key_id, version})); key && key->live())
            return key;

    Oid argtypes[2] = {TEXTOID, INT4OID};
    Datum args[2] = {PointerGetDatum(key_name), Int32GetDatum(static_cast<int32>(version))};
    CatalogKey row;
    if (!fetch_catalog_key(&g_plan_by_name_version, kSelectByNameVersion, 2, argtypes, args, &row))
        raise_unknown_key_name();
    if (row.version == 0)
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_UNDEFINED_OBJECT),
                        errmsg("pgphi key \"%s\" has no version %u", row.name, version)));
    if (strcmp(row.state, "active") != 0 && strcmp(row.state, "decrypt_only") != 0 &&
        strcmp(row.state, "destroyed") != 0)
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                        errmsg("pgphi key \"%s\" version %u is %s", row.name, version, row.state),
                        errdetail("Only active and decrypt-only versions produce values.")));
    if (row.suspended)
        raise_suspended(row, "encrypt");
    if (row.compromised)
        raise_compromised(row.key_id, row.version, row.name, "encrypt");
    if (TransactionIdIsCurrentTransactionId(row.created_by_xid))
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                        errmsg("pgphi key \"%s\" version %u was created or changed in this transaction", row.name,
                               version),
                        errdetail("Values are computed only under key versions that are committed."),
                        errhint("Commit the transaction that changes the key first.")));
    return install_catalog_key(row);
}

void require_purpose(const DataKey& key, KeyPurpose purpose)
{
    call_core([&] { key.require(purpose); });
}

NonceSource& nonce_source() { return g_nonces; }

uint64_t key_cache_clears() { return g_ring.changes(); }

bool key_still_current(DataKey* key, uint64_t changes, TimestampTz statement)
{
    flush_if_stale();
    if (g_ring.changes() != changes || GetCurrentStatementStartTimestamp() != statement)
        return false;
    note_use(key, statement);
    return true;
}

void register_key_invalidation() { CacheRegisterRelcacheCallback(on_relcache_invalidation, 0); }

} // namespace pgphi::pg

// Statement-level trigger on the key catalog tables: queues a relcache
// invalidation that every backend of this database processes once the change
// commits (and this backend at once), clearing their KeyRings.
PGPHI_FUNCTION(pgphi_key_catalog_changed)
{
    if (!CALLED_AS_TRIGGER(fcinfo))
        ereport(ERROR, (errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
                        errmsg("pgphi_key_catalog_changed must be called as a trigger")));
    TriggerData* trigger = reinterpret_cast<TriggerData*>(fcinfo->context);
    CacheInvalidateRelcacheByRelid(RelationGetRelid(trigger->tg_relation));
    return PointerGetDatum(nullptr);
}
