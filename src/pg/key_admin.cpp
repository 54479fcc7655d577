// Key administration support. pgphi.create_key (SQL) inserts the catalog rows;
// the DEK is generated and wrapped here, and only its wrapped form leaves.
#include "postgres.hpp"

extern "C" {
#include "access/htup_details.h"
}

#include <cstring>

#include "../core/local_provider.hpp"
#include "error_bridge.hpp"
#include "providers.hpp"

using namespace pgphi;
using namespace pgphi::pg;

namespace {

// Large enough for every provider's wrapped DEK (Vault and KMS blobs are a
// few hundred bytes).
constexpr size_t kMaxWrappedSize = 8192;
constexpr size_t kMaxKekVersion = 256;

} // namespace

// pgphi._generate_wrapped_dek(provider, kek_ref, key_id, version, key_name,
//                             may_create_local_kek) RETURNS (wrapped_dek bytea, kek_version text)
// STRICT; an empty kek_ref means the provider's default KEK.
PGPHI_FUNCTION(pgphi_generate_wrapped_dek)
{
    char* provider_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
    char* kek_ref = text_to_cstring(PG_GETARG_TEXT_PP(1));
    uint32 key_id = static_cast<uint32>(PG_GETARG_INT32(2));
    uint32 version = static_cast<uint32>(PG_GETARG_INT32(3));
    char* key_name = text_to_cstring(PG_GETARG_TEXT_PP(4));
    // Only the first local key may create the KEK file: once local keys
    // exist, a missing file means the KEK was lost or moved, and a new one
    // would silently split the keys between two KEKs.
    bool may_create_local_kek = PG_GETARG_BOOL(5);

    bytea* wrapped = static_cast<bytea*>(palloc(VARHDRSZ + kMaxWrappedSize));
    char kek_version[kMaxKekVersion];
    bool created_kek_file = false;

    call_core([&] {
        KeyProvider& provider = provider_named(provider_name);
        auto* local = dynamic_cast<LocalKeyProvider*>(&provider);
        if (local && may_create_local_kek)
            created_kek_file = local->ensure_kek_file();
        GeneratedDek dek = provider.generate_dek(kek_ref, DekBinding{key_id, version, key_name});
        if (dek.wrapped.blob.size() > kMaxWrappedSize || dek.wrapped.kek_version.size() >= kMaxKekVersion)
            throw Error(ErrorCode::ProviderError, "key provider returned an oversized wrapped DEK");
        std::memcpy(VARDATA(wrapped), dek.wrapped.blob.data(), dek.wrapped.blob.size());
        SET_VARSIZE(wrapped, VARHDRSZ + dek.wrapped.blob.size());
        std::strcpy(kek_version, dek.wrapped.kek_version.c_str());
    });

    if (created_kek_file)
        ereport(WARNING, (errmsg("pgphi created a new local KEK file"),
                          errdetail("Back it up: without it, no key of the local provider can be unwrapped."),
                          errhint("The local provider is for development; use a key manager in production.")));

    TupleDesc desc;
    if (get_call_result_type(fcinfo, nullptr, &desc) != TYPEFUNC_COMPOSITE)
        elog(ERROR, "pgphi_generate_wrapped_dek must return a record");
    desc = BlessTupleDesc(desc);
    Datum values[2] = {PointerGetDatum(wrapped), CStringGetTextDatum(kek_version)};
    bool nulls[2] = {false, false};
    PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(desc, values, nulls)));
}
