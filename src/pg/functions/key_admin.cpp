// Key administration support. pgphi.create_key (SQL) inserts the catalog rows;
// the broker generates and wraps the DEK, and only its wrapped form returns.
#include "shared/postgres.hpp"

extern "C" {
#include "access/htup_details.h"
#include "access/xact.h"
}

#include <cstring>

#include "shared/key_access.hpp"
#include "shared/shared_state.hpp"

using namespace pgphi;
using namespace pgphi::pg;

namespace {

void copy_text_arg(const text* value, char* dst, size_t size, const char* what)
{
    if (VARSIZE_ANY_EXHDR(value) >= size)
        ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
                        errmsg("pgphi %s is too long", what),
                        errdetail("At most %zu bytes are allowed.", size - 1)));
    text_to_cstring_buffer(value, dst, size);
}

SPIPlanPtr g_plan_key_row = nullptr;

void note_row(HeapTuple, TupleDesc, void*) {}

SPIPlanPtr g_plan_kek_version = nullptr;

struct KekVersionOut {
    char* buffer;
    size_t size;
};

void copy_kek_version(HeapTuple row, TupleDesc desc, void* arg)
{
    auto* out = static_cast<KekVersionOut*>(arg);
    char* value = SPI_getvalue(row, desc, 1);
    if (value && strlen(value) < out->size)
        strlcpy(out->buffer, value, out->size);
}

// The catalog's record of which KEK wrapped this DEK version: KMS rewraps
// name that key (ReEncrypt's SourceKeyId), whatever an alias points to now.
void wrapped_by_from_catalog(cache::UnwrapRequest* key, bytea* wrapped)
{
    Oid argtypes[3] = {INT4OID, INT4OID, BYTEAOID};
    Datum args[3] = {Int32GetDatum(static_cast<int32>(key->key_id)), Int32GetDatum(static_cast<int32>(key->key_version)),
                     PointerGetDatum(wrapped)};
    KekVersionOut out{key->wrapped_by, sizeof(key->wrapped_by)};
    query_catalog(&g_plan_kek_version,
                  "SELECT kek_version FROM pgphi.key_versions WHERE key_id OPERATOR(pg_catalog.=) $1 "
                  "AND version OPERATOR(pg_catalog.=) $2 AND wrapped_dek OPERATOR(pg_catalog.=) $3",
                  3, argtypes, args, 1, copy_kek_version, &out, nullptr);
}

// The broker logs what it fails to do with a key's name and provider, so
// they must be those of a catalog row (the one create_key has just inserted,
// or rotate_key and rewrap_keys read): an argument that is not, which could
// be PHI passed by mistake, is refused here without being repeated.
void require_catalog_key(FunctionCallInfo fcinfo)
{
    Oid argtypes[4] = {INT4OID, TEXTOID, TEXTOID, TEXTOID};
    Datum args[4] = {PG_GETARG_DATUM(2), PG_GETARG_DATUM(4), PG_GETARG_DATUM(0), PG_GETARG_DATUM(1)};
    if (query_catalog(&g_plan_key_row,
                      "SELECT FROM pgphi.keys WHERE key_id OPERATOR(pg_catalog.=) $1 AND name OPERATOR(pg_catalog.=) $2 "
                      "AND provider OPERATOR(pg_catalog.=) $3 AND kek_ref OPERATOR(pg_catalog.=) $4",
                      4, argtypes, args, 1, note_row, nullptr, nullptr) == 0)
        ereport(ERROR, (errcode(ERRCODE_UNDEFINED_OBJECT), errmsg("pgphi key does not exist"),
                        errdetail("pgphi does not repeat a name that names no key: a misplaced argument could be PHI."),
                        errhint("DEKs are generated and rewrapped for keys of the key catalog, by pgphi.create_key(), "
                                "pgphi.rotate_key() and pgphi.rewrap_keys().")));
}

// The wrapped DEK of argument `arg`, and which KEK (version) the catalog
// says wrapped it.
void wrapped_dek_from_arg(FunctionCallInfo fcinfo, int arg, cache::UnwrapRequest* key)
{
    bytea* wrapped = PG_GETARG_BYTEA_PP(arg);
    if (VARSIZE_ANY_EXHDR(wrapped) > sizeof(key->wrapped))
        ereport(ERROR, (errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED), errmsg("wrapped DEK is too large")));
    memcpy(key->wrapped, VARDATA_ANY(wrapped), VARSIZE_ANY_EXHDR(wrapped));
    key->wrapped_size = static_cast<uint16_t>(VARSIZE_ANY_EXHDR(wrapped));
    wrapped_by_from_catalog(key, PG_DETOAST_DATUM(PG_GETARG_DATUM(arg)));
}

// Arguments 0..4 of both functions below: provider, kek_ref, key_id,
// version, key_name.
void key_identity_from_args(FunctionCallInfo fcinfo, cache::UnwrapRequest* key)
{
    require_catalog_key(fcinfo);
    memset(key, 0, sizeof(*key));
    copy_text_arg(PG_GETARG_TEXT_PP(0), key->provider, sizeof(key->provider), "provider name");
    copy_text_arg(PG_GETARG_TEXT_PP(1), key->kek_ref, sizeof(key->kek_ref), "KEK reference");
    copy_text_arg(PG_GETARG_TEXT_PP(4), key->key_name, sizeof(key->key_name), "key name");
    key->key_id = static_cast<uint32>(PG_GETARG_INT32(2));
    key->key_version = static_cast<uint32>(PG_GETARG_INT32(3));
}

// (wrapped_dek bytea, kek_version text) from a finished request.
Datum wrapped_result(FunctionCallInfo fcinfo, const AdminRequest& result)
{
    bytea* wrapped = static_cast<bytea*>(palloc(VARHDRSZ + result.wrapped_size));
    SET_VARSIZE(wrapped, VARHDRSZ + result.wrapped_size);
    memcpy(VARDATA(wrapped), result.wrapped, result.wrapped_size);

    TupleDesc desc;
    if (get_call_result_type(fcinfo, nullptr, &desc) != TYPEFUNC_COMPOSITE)
        elog(ERROR, "return type must be a row type");
    desc = BlessTupleDesc(desc);
    Datum values[2] = {PointerGetDatum(wrapped), CStringGetTextDatum(result.kek_version)};
    bool nulls[2] = {false, false};
    return HeapTupleGetDatum(heap_form_tuple(desc, values, nulls));
}

} // namespace

// pgphi._generate_wrapped_dek(provider, kek_ref, key_id, version, key_name,
//                             may_create_local_kek) RETURNS (wrapped_dek bytea, kek_version text)
// STRICT. The key broker asks the provider; this backend never does.
PGPHI_FUNCTION(pgphi_generate_wrapped_dek)
{
    cache::UnwrapRequest key;
    key_identity_from_args(fcinfo, &key);
    // Only the first local key may create the KEK file: once local keys
    // exist, a missing file means the KEK was lost or moved, and a new one
    // would silently split the keys between two KEKs.
    bool may_create_local_kek = PG_GETARG_BOOL(5);

    AdminRequest* result = static_cast<AdminRequest*>(palloc0(sizeof(AdminRequest)));
    run_admin_request(AdminRequest::Operation::Generate, key, may_create_local_kek, result);
    // The new version's first seals are reserved with it, in the same
    // transaction: a version that exists can encrypt at once.
    reserve_first_seals(key.key_id, key.key_version);
    if (result->created_local_kek_file)
        ereport(WARNING, (errmsg("pgphi created a new local KEK file"),
                          errdetail("Back it up: without it, no key of the local provider can be unwrapped."),
                          errhint("The local provider is for development; use a key manager in production.")));
    PG_RETURN_DATUM(wrapped_result(fcinfo, *result));
}

// pgphi._rewrap_dek(provider, kek_ref, key_id, version, key_name, wrapped_dek)
//   RETURNS (wrapped_dek bytea, kek_version text)
// The broker rewraps under the KEK's newest version; the DEK stays the same.
PGPHI_FUNCTION(pgphi_rewrap_dek)
{
    cache::UnwrapRequest key;
    key_identity_from_args(fcinfo, &key);
    wrapped_dek_from_arg(fcinfo, 5, &key);

    AdminRequest* result = static_cast<AdminRequest*>(palloc0(sizeof(AdminRequest)));
    run_admin_request(AdminRequest::Operation::Rewrap, key, false, result);
    PG_RETURN_DATUM(wrapped_result(fcinfo, *result));
}

namespace {

// The rekey's catalog row: the version still wrapped by (provider, kek) and
// its key's destination (to_provider, to_kek), as pgphi._rekey_start left
// them. Arguments: provider, kek, key_id, version, key_name, wrapped,
// to_provider, to_kek.
SPIPlanPtr g_plan_rekey_row = nullptr;

void require_rekey_row(FunctionCallInfo fcinfo)
{
    Oid argtypes[8] = {INT4OID, INT4OID, TEXTOID, TEXTOID, TEXTOID, BYTEAOID, TEXTOID, TEXTOID};
    Datum args[8] = {PG_GETARG_DATUM(2), PG_GETARG_DATUM(3), PG_GETARG_DATUM(4), PG_GETARG_DATUM(0),
                     PG_GETARG_DATUM(1), PG_GETARG_DATUM(5), PG_GETARG_DATUM(6), PG_GETARG_DATUM(7)};
    if (query_catalog(&g_plan_rekey_row,
                      "SELECT FROM pgphi.keys k JOIN pgphi.key_versions v ON v.key_id OPERATOR(pg_catalog.=) k.key_id "
                      "WHERE k.key_id OPERATOR(pg_catalog.=) $1 AND v.version OPERATOR(pg_catalog.=) $2 "
                      "AND k.name OPERATOR(pg_catalog.=) $3 AND v.rekey_source_provider OPERATOR(pg_catalog.=) $4 "
                      "AND v.rekey_source_kek OPERATOR(pg_catalog.=) $5 AND v.wrapped_dek OPERATOR(pg_catalog.=) $6 "
                      "AND k.provider OPERATOR(pg_catalog.=) $7 AND k.kek_ref OPERATOR(pg_catalog.=) $8",
                      8, argtypes, args, 1, note_row, nullptr, nullptr) == 0)
        ereport(ERROR, (errcode(ERRCODE_UNDEFINED_OBJECT), errmsg("pgphi key version is not being rekeyed"),
                        errdetail("pgphi does not repeat a name that names no key: a misplaced argument could be PHI."),
                        errhint("CALL pgphi.rekey() moves a key's DEK versions to another provider or KEK.")));
}

} // namespace

// pgphi._rekey_dek(provider, kek, key_id, version, key_name, wrapped_dek,
//                  to_provider, to_kek) RETURNS (wrapped_dek bytea, kek_version text)
// STRICT. The brokers of both providers move the DEK (run_rekey in
// workers/key_broker.cpp); only the new wrapped DEK comes back.
PGPHI_FUNCTION(pgphi_rekey_dek)
{
    require_rekey_row(fcinfo);
    cache::UnwrapRequest source;
    memset(&source, 0, sizeof(source));
    copy_text_arg(PG_GETARG_TEXT_PP(0), source.provider, sizeof(source.provider), "provider name");
    copy_text_arg(PG_GETARG_TEXT_PP(1), source.kek_ref, sizeof(source.kek_ref), "KEK reference");
    copy_text_arg(PG_GETARG_TEXT_PP(4), source.key_name, sizeof(source.key_name), "key name");
    source.key_id = static_cast<uint32>(PG_GETARG_INT32(2));
    source.key_version = static_cast<uint32>(PG_GETARG_INT32(3));
    wrapped_dek_from_arg(fcinfo, 5, &source);

    char to_provider[cache::kMaxProvider];
    char to_kek_ref[cache::kMaxKekRef];
    copy_text_arg(PG_GETARG_TEXT_PP(6), to_provider, sizeof(to_provider), "provider name");
    copy_text_arg(PG_GETARG_TEXT_PP(7), to_kek_ref, sizeof(to_kek_ref), "KEK reference");

    AdminRequest* result = static_cast<AdminRequest*>(palloc0(sizeof(AdminRequest)));
    run_rekey_request(source, to_provider, to_kek_ref, result);
    PG_RETURN_DATUM(wrapped_result(fcinfo, *result));
}

// pgphi.create_kek(provider, kek_name) RETURNS text, STRICT: a new KEK made
// in the key manager by the provider's broker (KMIP: Create and Activate an
// AES-256 key with that Name; PKCS#11: C_GenerateKey of the next version of
// that label or id). Returns the new KEK's own reference (KMIP: its Unique
// Identifier; PKCS#11: its version). A KEK of an existing name becomes its
// newest version: pgphi.rewrap_keys() then moves that name's DEKs onto it.
namespace {

// The provider and KEK name of a request for a new KEK. The broker logs the
// provider of a failed request: only a known one gets there (an unknown name
// is not repeated; it could be PHI).
void new_kek_from_args(FunctionCallInfo fcinfo, cache::UnwrapRequest* key)
{
    memset(key, 0, sizeof(*key));
    copy_text_arg(PG_GETARG_TEXT_PP(0), key->provider, sizeof(key->provider), "provider name");
    bool known = strcmp(key->provider, "local") == 0;
    for (int i = 1; i < kBrokers; ++i)
        known |= strcmp(key->provider, kBrokerProviders[i]) == 0;
    if (!known)
        ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("unknown pgphi key provider"),
                        errhint("Available providers: local, vault, aws_kms, kmip, pkcs11.")));
    copy_text_arg(PG_GETARG_TEXT_PP(1), key->kek_ref, sizeof(key->kek_ref), "KEK name");
}

} // namespace

PGPHI_FUNCTION(pgphi_create_kek)
{
    cache::UnwrapRequest key;
    new_kek_from_args(fcinfo, &key);
    AdminRequest* result = static_cast<AdminRequest*>(palloc0(sizeof(AdminRequest)));
    run_admin_request(AdminRequest::Operation::CreateKek, key, false, result);
    PG_RETURN_TEXT_P(cstring_to_text(result->kek_version));
}

// pgphi._create_dedicated_kek(provider, kek_name, key_name) RETURNS text,
// STRICT: a KEK for one pgphi key alone, made by the provider's broker before
// create_key inserts the key (which checked the key's name); returns the new
// KEK's reference (KMS: its ARN).
PGPHI_FUNCTION(pgphi_create_dedicated_kek)
{
    cache::UnwrapRequest key;
    new_kek_from_args(fcinfo, &key);
    copy_text_arg(PG_GETARG_TEXT_PP(2), key.key_name, sizeof(key.key_name), "key name");
    AdminRequest* result = static_cast<AdminRequest*>(palloc0(sizeof(AdminRequest)));
    run_admin_request(AdminRequest::Operation::CreateDedicatedKek, key, false, result);
    PG_RETURN_TEXT_P(cstring_to_text(result->kek_version));
}

namespace {

// The dedicated KEK named must be this key's, and nothing must be left that
// it wraps or may be asked to wrap: no version's DEK, no other key naming it.
SPIPlanPtr g_plan_unused_dedicated_kek = nullptr;

} // namespace

// pgphi._delete_dedicated_kek(provider, kek_ref, key_id, key_name) RETURNS
// text, STRICT: the broker deletes the KEK (KMS: schedules its deletion) and
// says what the key manager did.
PGPHI_FUNCTION(pgphi_delete_dedicated_kek)
{
    Oid argtypes[4] = {INT4OID, TEXTOID, TEXTOID, TEXTOID};
    Datum args[4] = {PG_GETARG_DATUM(2), PG_GETARG_DATUM(3), PG_GETARG_DATUM(0), PG_GETARG_DATUM(1)};
    if (query_catalog(&g_plan_unused_dedicated_kek,
                      "SELECT FROM pgphi.keys k WHERE k.key_id OPERATOR(pg_catalog.=) $1 "
                      "AND k.name OPERATOR(pg_catalog.=) $2 AND k.provider OPERATOR(pg_catalog.=) $3 "
                      "AND k.kek_ref OPERATOR(pg_catalog.=) $4 AND k.kek_dedicated "
                      "AND NOT EXISTS (SELECT FROM pgphi.key_versions v WHERE v.key_id OPERATOR(pg_catalog.=) $1 "
                      "AND v.wrapped_dek IS NOT NULL) "
                      "AND NOT EXISTS (SELECT FROM pgphi.keys o WHERE o.key_id OPERATOR(pg_catalog.<>) $1 "
                      "AND o.provider OPERATOR(pg_catalog.=) $3 AND o.kek_ref OPERATOR(pg_catalog.=) $4) "
                      "AND NOT EXISTS (SELECT FROM pgphi.key_versions v WHERE v.wrapped_dek IS NOT NULL "
                      "AND v.rekey_source_provider OPERATOR(pg_catalog.=) $3 "
                      "AND v.rekey_source_kek OPERATOR(pg_catalog.=) $4) "
                      // Another key reaching the same KEK under another name (a KMS
                      // alias or key id, a KMIP Name): its versions record the KEK
                      // itself (KMS: "<ARN>#<material>", KMIP: the identifier).
                      "AND NOT EXISTS (SELECT FROM pgphi.key_versions v WHERE v.key_id OPERATOR(pg_catalog.<>) $1 "
                      "AND v.wrapped_dek IS NOT NULL AND (v.kek_version OPERATOR(pg_catalog.=) $4 "
                      "OR pg_catalog.starts_with(v.kek_version, $4 OPERATOR(pg_catalog.||) '#')))",
                      4, argtypes, args, 1, note_row, nullptr, nullptr) == 0)
        ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                        errmsg("pgphi will not delete that KEK"),
                        errdetail("Only a KEK dedicated to one key is deleted, once no DEK it wraps is left "
                                  "and no other key names it."),
                        errhint("pgphi.destroy_key() deletes a dedicated KEK when it destroys the key's last version.")));
    // The key manager's deletion cannot be rolled back: inside a transaction
    // block, a later ROLLBACK would undo the destruction and its audit record
    // but not the deletion. In its own statement, nothing follows but COMMIT.
    if (IsTransactionBlock())
        ereport(ERROR, (errcode(ERRCODE_ACTIVE_SQL_TRANSACTION),
                        errmsg("destroying the last version of a key with a KEK of its own cannot run inside a "
                               "transaction block"),
                        errdetail("It deletes the KEK in the key manager, which a rollback cannot undo."),
                        errhint("Call pgphi.destroy_key() for that version on its own, outside BEGIN ... COMMIT.")));
    cache::UnwrapRequest key;
    memset(&key, 0, sizeof(key));
    copy_text_arg(PG_GETARG_TEXT_PP(0), key.provider, sizeof(key.provider), "provider name");
    copy_text_arg(PG_GETARG_TEXT_PP(1), key.kek_ref, sizeof(key.kek_ref), "KEK reference");
    copy_text_arg(PG_GETARG_TEXT_PP(3), key.key_name, sizeof(key.key_name), "key name");
    key.key_id = static_cast<uint32>(PG_GETARG_INT32(2));
    AdminRequest* result = static_cast<AdminRequest*>(palloc0(sizeof(AdminRequest)));
    run_admin_request(AdminRequest::Operation::DeleteDedicatedKek, key, false, result);
    PG_RETURN_TEXT_P(cstring_to_text(result->kek_version));
}
