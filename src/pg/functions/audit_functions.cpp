#include "shared/postgres.hpp"

extern "C" {
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "storage/lwlock.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"
}

#include <atomic>
#include <cstring>

#include "shared/audit_internal.hpp"
#include "shared/error_bridge.hpp"


using namespace pgphi::pg::audit_detail;

// pgphi.audit_queue_status(): events waiting for the audit writer, and what
// was lost because the queue or the count table was full.
PGPHI_FUNCTION(pgphi_audit_queue_status)
{
    using namespace pgphi::pg;
    TupleDesc desc;
    if (get_call_result_type(fcinfo, nullptr, &desc) != TYPEFUNC_COMPOSITE)
        elog(ERROR, "pgphi_audit_queue_status must return a composite type");
    AuditCounters counters = audit_counters();
    // 0.2.0 declared the first three columns; 0.3.0 adds overflow_events.
    Datum values[4] = {Int32GetDatum(static_cast<int32>(counters.queued_events)),
                       Int64GetDatum(static_cast<int64>(counters.dropped_events)),
                       Int64GetDatum(static_cast<int64>(counters.dropped_counts)),
                       Int64GetDatum(static_cast<int64>(counters.overflow_events))};
    bool nulls[4] = {false, false, false, false};
    if (desc->natts != 3 && desc->natts != 4)
        elog(ERROR, "pgphi_audit_queue_status: unexpected result type");
    PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc), values, nulls)));
}

// pgphi.anchor_audit_log(): anchors the chain's head now (custodians and
// auditors), unless the last anchor covers it; returns that anchor.
PGPHI_FUNCTION(pgphi_anchor_audit_log)
{
    using namespace pgphi::pg;
    TupleDesc desc;
    if (get_call_result_type(fcinfo, nullptr, &desc) != TYPEFUNC_COMPOSITE)
        elog(ERROR, "pgphi_anchor_audit_log must return a composite type");
    AnchorResult anchored;
    SPI_connect();
    anchor_chain(&anchored);
    SPI_finish();
    Datum values[4] = {Int64GetDatum(anchored.anchor_seq), Int64GetDatum(anchored.audit_seq),
                       CStringGetTextDatum(anchored.audit_hash), CStringGetTextDatum(anchored.mac)};
    bool nulls[4] = {!anchored.exists, !anchored.exists, !anchored.exists, !anchored.exists};
    PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc), values, nulls)));
}

// pgphi._verify_audit_anchor(anchor_seq, anchored_at, audit_seq, audit_hash,
// prev_mac, provider, key_ref, mac): whether the key manager vouches for
// the anchor. Raises the key manager's error when it cannot be asked.
PGPHI_FUNCTION(pgphi_verify_audit_anchor)
{
    using namespace pgphi::pg;
    int64 anchor_seq = PG_GETARG_INT64(0);
    TimestampTz anchored_at = PG_GETARG_TIMESTAMPTZ(1);
    int64 audit_seq = PG_GETARG_INT64(2);
    bytea* hash = PG_GETARG_BYTEA_PP(3);
    char* prev_mac = text_to_cstring(PG_GETARG_TEXT_PP(4));
    char* provider = text_to_cstring(PG_GETARG_TEXT_PP(5));
    char* key_ref = text_to_cstring(PG_GETARG_TEXT_PP(6));
    char* mac = text_to_cstring(PG_GETARG_TEXT_PP(7));
    AnchorRequest request;
    memset(&request, 0, sizeof(request));
    request.verify = true;
    request.database = MyDatabaseId;
    // Anything that does not fit what pgphi makes is simply not authentic.
    if (!known_provider(provider) || strlen(key_ref) >= sizeof(request.key_ref) ||
        strlen(mac) >= sizeof(request.mac) || strlen(prev_mac) >= kAnchorMacSize ||
        !build_anchor_message(request, anchor_seq, anchored_at, audit_seq,
                              reinterpret_cast<const uint8_t*>(VARDATA_ANY(hash)), VARSIZE_ANY_EXHDR(hash),
                              prev_mac))
        PG_RETURN_BOOL(false);
    strlcpy(request.provider, provider, sizeof(request.provider));
    strlcpy(request.key_ref, key_ref, sizeof(request.key_ref));
    strlcpy(request.mac, mac, sizeof(request.mac));
    ask_broker(request);
    if (!request.ok)
        raise_core_failure(request.failure);
    PG_RETURN_BOOL(request.valid);
}

// pgphi._audit_anchor_last_known(): the last anchor of this database known
// to have committed (kept across restarts in the data directory), or NULL.
PGPHI_FUNCTION(pgphi_audit_anchor_last_known)
{
    using namespace pgphi::pg;
    int64_t last = 0;
    LWLockAcquire(g_audit->lock, LW_SHARED);
    AnchorDatabase* entry = anchor_database(MyDatabaseId, false);
    if (entry)
        last = entry->committed_seq;
    LWLockRelease(g_audit->lock);
    if (last == 0)
        PG_RETURN_NULL();
    PG_RETURN_INT64(last);
}

// pgphi._audit_chain_changed(): from the chain trigger, so the scheduled
// anchoring knows which databases' chains moved.
PGPHI_FUNCTION(pgphi_audit_chain_changed)
{
    using namespace pgphi::pg;
    if (g_audit && OidIsValid(MyDatabaseId)) {
        LWLockAcquire(g_audit->lock, LW_EXCLUSIVE);
        AnchorDatabase* entry = anchor_database(MyDatabaseId, true);
        if (entry)
            entry->chain_changed = true;
        LWLockRelease(g_audit->lock);
    }
    PG_RETURN_VOID();
}

// pgphi.destruction_certificate(name, version): the signed certificate of a
// destroyed key version (auditors and custodians). The document is built by
// pgphi._destruction_certificate_body from the audit log and the catalog,
// which also refuses what was not destroyed; this function MACs nothing it
// is given. The key broker MACs the SHA-256 of the document's canonical
// text (its jsonb text form) with the provider and key of the audit anchors,
// and the signature is added to the document as "signature".
PGPHI_FUNCTION(pgphi_destruction_certificate)
{
    using namespace pgphi::pg;
    Oid types[2] = {TEXTOID, INT4OID};
    Datum args[2] = {PG_ARGISNULL(0) ? Datum(0) : PG_GETARG_DATUM(0),
                     PG_ARGISNULL(1) ? Datum(0) : PG_GETARG_DATUM(1)};
    char nulls[3] = {PG_ARGISNULL(0) ? 'n' : ' ', PG_ARGISNULL(1) ? 'n' : ' ', '\0'};
    SPI_connect();
    if (SPI_execute_with_args("SELECT b::pg_catalog.text, pg_catalog.encode(pg_catalog.sha256("
                              "pg_catalog.convert_to(b::pg_catalog.text, 'UTF8')), 'hex') "
                              "FROM pgphi._destruction_certificate_body($1, $2) b",
                              2, types, args, nulls, true, 1) != SPI_OK_SELECT ||
        SPI_processed != 1)
        elog(ERROR, "pgphi: could not build the destruction certificate");
    char* body = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
    char* digest = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
    if (!body || !digest)
        elog(ERROR, "pgphi: could not build the destruction certificate");

    AnchorRequest request;
    memset(&request, 0, sizeof(request));
    request.verify = false;
    request.database = MyDatabaseId;
    if (!build_certificate_message(request, digest))
        elog(ERROR, "pgphi: the destruction certificate's message is malformed");
    ask_broker(request);
    if (!request.ok)
        raise_core_failure(request.failure);

    Oid sign_types[4] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID};
    Datum sign_args[4] = {CStringGetTextDatum(body), CStringGetTextDatum(request.provider),
                          CStringGetTextDatum(request.key_ref), CStringGetTextDatum(request.mac)};
    if (SPI_execute_with_args("SELECT ($1::pg_catalog.jsonb OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object("
                              "'signature', pg_catalog.jsonb_build_object('provider', $2, 'key', $3, 'mac', $4)"
                              "))::pg_catalog.text",
                              4, sign_types, sign_args, nullptr, true, 1) != SPI_OK_SELECT ||
        SPI_processed != 1)
        elog(ERROR, "pgphi: could not sign the destruction certificate");
    char* signed_text = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
    if (!signed_text)
        elog(ERROR, "pgphi: could not sign the destruction certificate");
    size_t size = strlen(signed_text);
    text* result = static_cast<text*>(SPI_palloc(VARHDRSZ + size));
    SET_VARSIZE(result, VARHDRSZ + size);
    memcpy(VARDATA(result), signed_text, size);
    SPI_finish();
    PG_RETURN_TEXT_P(result);
}

// pgphi._verify_destruction_certificate(body_sha256, provider, key_ref, mac):
// whether the key manager vouches for a certificate's MAC over the SHA-256
// (hex) of its canonical text without the signature. Raises the key
// manager's error when it cannot be asked.
PGPHI_FUNCTION(pgphi_verify_destruction_certificate)
{
    using namespace pgphi::pg;
    char* digest = text_to_cstring(PG_GETARG_TEXT_PP(0));
    char* provider = text_to_cstring(PG_GETARG_TEXT_PP(1));
    char* key_ref = text_to_cstring(PG_GETARG_TEXT_PP(2));
    char* mac = text_to_cstring(PG_GETARG_TEXT_PP(3));
    AnchorRequest request;
    memset(&request, 0, sizeof(request));
    request.verify = true;
    request.database = MyDatabaseId;
    // Anything that does not fit what pgphi makes is simply not authentic.
    if (!known_provider(provider) || strlen(key_ref) >= sizeof(request.key_ref) || key_ref[0] == '\0' ||
        strlen(mac) >= sizeof(request.mac) || !build_certificate_message(request, digest))
        PG_RETURN_BOOL(false);
    strlcpy(request.provider, provider, sizeof(request.provider));
    strlcpy(request.key_ref, key_ref, sizeof(request.key_ref));
    strlcpy(request.mac, mac, sizeof(request.mac));
    ask_broker(request);
    if (!request.ok)
        raise_core_failure(request.failure);
    PG_RETURN_BOOL(request.valid);
}
