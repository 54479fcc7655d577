// The pgphi.encrypted type: bytea underneath (binary-coercible both ways), but
// its input, receive and cast-from-bytea functions refuse anything that is
// not a well-formed pgphi ciphertext, so plaintext cannot land in an
// encrypted column by mistake. Output and send are bytea's own.
#include "shared/postgres.hpp"

extern "C" {
#include "access/htup_details.h"
}

#include "core/ciphertext_format.hpp"
#include "shared/error_bridge.hpp"

using namespace pgphi;
using namespace pgphi::pg;

namespace {

// Structural check only: the tag needs the key, and type I/O must not.
void check_well_formed(const bytea* value, int sqlstate)
{
    call_core([&] { format::parse(view_of(value)); }, sqlstate);
}

} // namespace

PGPHI_FUNCTION(pgphi_encrypted_in)
{
    Datum value = DirectFunctionCall1(byteain, PG_GETARG_DATUM(0));
    check_well_formed(DatumGetByteaPP(value), ERRCODE_INVALID_TEXT_REPRESENTATION);
    return value;
}

PGPHI_FUNCTION(pgphi_encrypted_recv)
{
    Datum value = DirectFunctionCall1(bytearecv, PG_GETARG_DATUM(0));
    check_well_formed(DatumGetByteaPP(value), ERRCODE_INVALID_BINARY_REPRESENTATION);
    return value;
}

// bytea -> pgphi.encrypted (assignment cast).
PGPHI_FUNCTION(pgphi_encrypted_from_bytea)
{
    check_well_formed(PG_GETARG_BYTEA_PP(0), 0);
    PG_RETURN_DATUM(PG_GETARG_DATUM(0));
}

// What a value's header says, without decrypting it.
PGPHI_FUNCTION(pgphi_ciphertext_info)
{
    bytea* value = PG_GETARG_BYTEA_PP(0);
    format::ParsedValue parsed;
    call_core([&] { parsed = format::parse(view_of(value)); });

    TupleDesc desc;
    if (get_call_result_type(fcinfo, nullptr, &desc) != TYPEFUNC_COMPOSITE)
        elog(ERROR, "pgphi_ciphertext_info must return a record");
    desc = BlessTupleDesc(desc);
    Datum values[5] = {
        Int32GetDatum(parsed.format_version),
        CStringGetTextDatum(parsed.deterministic() ? "AES-256-SIV" : "AES-256-GCM"),
        Int32GetDatum(static_cast<int32>(parsed.key.key_id)),
        Int32GetDatum(static_cast<int32>(parsed.key.version)),
        Int32GetDatum(static_cast<int32>(parsed.plaintext_size())),
    };
    bool nulls[5] = {false, false, false, false, false};
    PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(desc, values, nulls)));
}
