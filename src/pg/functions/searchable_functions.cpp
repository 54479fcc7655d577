// Searchable encrypted columns: the comparison and hash functions behind the
// operators and operator classes of pgphi.encrypted, which accept
// deterministic values only; the type's ANALYZE support; and blind indexes.
#include "shared/postgres.hpp"
#include "shared/compat.hpp"

extern "C" {
#include "commands/vacuum.h"
#include "common/hashfn.h"
#include "mb/pg_wchar.h"
}

#include <algorithm>
#include <cstring>

#include "core/ciphertext_format.hpp"
#include "policy/access_control.hpp"
#include "shared/audit.hpp"
#include "shared/error_bridge.hpp"
#include "shared/key_access.hpp"

using namespace pgphi;
using namespace pgphi::pg;

namespace {

// Raises unless the value is a deterministic pgphi value; returns its key id.
uint32 deterministic_key_of(const bytea* value)
{
    format::ParsedValue parsed;
    call_core([&] { parsed = format::parse(view_of(value)); });
    if (!parsed.deterministic())
        ereport(ERROR,
                (errhidestmt(true), errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
                 errmsg("randomized pgphi values cannot be compared"),
                 errdetail("Only values encrypted with deterministic => true have equality, ordering and hashing; "
                           "randomized values of one plaintext all differ."),
                 errhint("Encrypt the column and the search value with encrypt_phi(..., deterministic => true), "
                         "search a blind index, or compare decrypted values.")));
    return parsed.key.key_id;
}

// Two deterministic values under the same key (any versions): only they
// compare. Returns memcmp-style order of their bytes, which is total and
// consistent with equality but says nothing about the plaintexts.
int compare_encrypted(FunctionCallInfo fcinfo)
{
    bytea* a = PG_GETARG_BYTEA_PP(0);
    bytea* b = PG_GETARG_BYTEA_PP(1);
    uint32 key_a = deterministic_key_of(a);
    uint32 key_b = deterministic_key_of(b);
    if (key_a != key_b)
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_DATATYPE_MISMATCH),
                        errmsg("cannot compare pgphi values encrypted under different keys"),
                        errdetail("One value is under key id %u, the other under key id %u.", key_a, key_b),
                        errhint("Encrypt the search value with the key of the column.")));
    size_t len_a = VARSIZE_ANY_EXHDR(a), len_b = VARSIZE_ANY_EXHDR(b);
    int order = memcmp(VARDATA_ANY(a), VARDATA_ANY(b), std::min(len_a, len_b));
    if (order == 0)
        order = (len_a > len_b) - (len_a < len_b);
    PG_FREE_IF_COPY(a, 0);
    PG_FREE_IF_COPY(b, 1);
    return order;
}

// ANALYZE: pgphi.encrypted has default btree and hash operator classes, so
// the standard analysis would sort a column's sample with them, which fails
// for randomized values. Columns whose sample is all deterministic under one
// key get the standard statistics (for row estimates of lookups); others get
// only the null fraction and width, as a type without ordering would.
struct EncryptedAnalyzeData {
    AnalyzeAttrComputeStatsFunc std_compute_stats;
    void* std_extra_data;
};

bool sample_is_comparable(VacAttrStats* stats, AnalyzeAttrFetchFunc fetchfunc, int samplerows)
{
    bool have_key = false;
    uint32 first_key = 0;
    for (int i = 0; i < samplerows; ++i) {
        compat::analyze_delay_point();
        bool isnull;
        Datum value = fetchfunc(stats, i, &isnull);
        if (isnull)
            continue;
        // Only the header is read: a large randomized value is not detoasted whole.
        struct varlena* head = PG_DETOAST_DATUM_SLICE(value, 0, format::kPrefixSize);
        uint32 key_id = 0;
        bool deterministic = format::is_deterministic_prefix(view_of(head), &key_id);
        if (head != reinterpret_cast<struct varlena*>(DatumGetPointer(value)))
            pfree(head);
        if (!deterministic || (have_key && key_id != first_key))
            return false;
        have_key = true;
        first_key = key_id;
    }
    return true;
}

void compute_encrypted_stats(VacAttrStatsP stats, AnalyzeAttrFetchFunc fetchfunc, int samplerows, double totalrows)
{
    auto* data = static_cast<EncryptedAnalyzeData*>(stats->extra_data);
    if (sample_is_comparable(stats, fetchfunc, samplerows)) {
        stats->extra_data = data->std_extra_data;
        data->std_compute_stats(stats, fetchfunc, samplerows, totalrows);
        stats->extra_data = data;
        return;
    }
    int nulls = 0, nonnulls = 0;
    double total_width = 0;
    for (int i = 0; i < samplerows; ++i) {
        compat::analyze_delay_point();
        bool isnull;
        Datum value = fetchfunc(stats, i, &isnull);
        if (isnull) {
            ++nulls;
            continue;
        }
        ++nonnulls;
        total_width += VARSIZE_ANY(DatumGetPointer(value));
    }
    stats->stats_valid = true;
    stats->stanullfrac = static_cast<float4>(nulls) / samplerows;
    stats->stawidth = nonnulls > 0 ? static_cast<int32>(total_width / nonnulls) : 0;
    stats->stadistinct = 0.0; // unknown
}

// The blind index of a text value under `key`. The value is hashed in UTF-8
// whatever the database encoding, so an index does not depend on where it
// was computed.
Datum blind_index_of(DataKey* key, text* value)
{
    require_purpose(*key, KeyPurpose::BlindIndex);
    // Computing an index is like encrypting: it needs the key's encrypt grant.
    check_key_use(*key, KeyUse::Encrypt);
    count_key_use(key->ref().key_id, KeyUse::Encrypt);
    int length = VARSIZE_ANY_EXHDR(value);
    char* utf8 = pg_server_to_any(VARDATA_ANY(value), length, PG_UTF8);
    bool converted = utf8 != VARDATA_ANY(value);
    if (converted)
        length = strlen(utf8);
    bytea* result = static_cast<bytea*>(palloc(VARHDRSZ + key->blind_index_size()));
    SET_VARSIZE(result, VARHDRSZ + key->blind_index_size());
    CoreFailure failure;
    bool ok = run_core(failure, [&] {
        key->blind_index(ByteView(reinterpret_cast<const uint8_t*>(utf8), length),
                         reinterpret_cast<uint8_t*>(VARDATA(result)));
    });
    if (converted) {
        explicit_bzero(utf8, length);
        pfree(utf8);
    }
    if (!ok)
        raise_core_failure(failure);
    PG_RETURN_BYTEA_P(result);
}

} // namespace

PGPHI_FUNCTION(pgphi_encrypted_eq)
{
    PG_RETURN_BOOL(compare_encrypted(fcinfo) == 0);
}

PGPHI_FUNCTION(pgphi_encrypted_ne)
{
    PG_RETURN_BOOL(compare_encrypted(fcinfo) != 0);
}

PGPHI_FUNCTION(pgphi_encrypted_lt)
{
    PG_RETURN_BOOL(compare_encrypted(fcinfo) < 0);
}

PGPHI_FUNCTION(pgphi_encrypted_le)
{
    PG_RETURN_BOOL(compare_encrypted(fcinfo) <= 0);
}

PGPHI_FUNCTION(pgphi_encrypted_gt)
{
    PG_RETURN_BOOL(compare_encrypted(fcinfo) > 0);
}

PGPHI_FUNCTION(pgphi_encrypted_ge)
{
    PG_RETURN_BOOL(compare_encrypted(fcinfo) >= 0);
}

PGPHI_FUNCTION(pgphi_encrypted_cmp)
{
    PG_RETURN_INT32(compare_encrypted(fcinfo));
}

// Equal values are equal bytes, so hashing the bytes is consistent with =.
PGPHI_FUNCTION(pgphi_encrypted_hash)
{
    bytea* value = PG_GETARG_BYTEA_PP(0);
    deterministic_key_of(value);
    Datum hash = hash_any(reinterpret_cast<unsigned char*>(VARDATA_ANY(value)), VARSIZE_ANY_EXHDR(value));
    PG_FREE_IF_COPY(value, 0);
    return hash;
}

PGPHI_FUNCTION(pgphi_encrypted_hash_extended)
{
    bytea* value = PG_GETARG_BYTEA_PP(0);
    deterministic_key_of(value);
    Datum hash = hash_any_extended(reinterpret_cast<unsigned char*>(VARDATA_ANY(value)), VARSIZE_ANY_EXHDR(value),
                                   PG_GETARG_INT64(1));
    PG_FREE_IF_COPY(value, 0);
    return hash;
}

PGPHI_FUNCTION(pgphi_encrypted_typanalyze)
{
    VacAttrStats* stats = reinterpret_cast<VacAttrStats*>(PG_GETARG_POINTER(0));
    if (!std_typanalyze(stats))
        PG_RETURN_BOOL(false);
    auto* data = static_cast<EncryptedAnalyzeData*>(palloc(sizeof(EncryptedAnalyzeData)));
    data->std_compute_stats = stats->compute_stats;
    data->std_extra_data = stats->extra_data;
    stats->compute_stats = compute_encrypted_stats;
    stats->extra_data = data;
    PG_RETURN_BOOL(true);
}

// pgphi.blind_index(value text, key_name text): under the key's active version.
PGPHI_FUNCTION(pgphi_blind_index)
{
    return blind_index_of(key_for_encrypt(PG_GETARG_TEXT_PP(1)), PG_GETARG_TEXT_PP(0));
}

// pgphi.blind_index(value text, key_name text, version integer): under an
// active or decrypt-only version (lookups during a rotation).
PGPHI_FUNCTION(pgphi_blind_index_version)
{
    int32 version = PG_GETARG_INT32(2);
    if (version <= 0)
        ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("pgphi key versions are positive")));
    return blind_index_of(key_for_version(PG_GETARG_TEXT_PP(1), static_cast<uint32>(version)),
                          PG_GETARG_TEXT_PP(0));
}

// pgphi._blind_index_version_of(value bytea, key_id integer): the key version
// a blind index value was computed under, if it has the shape of one of that
// key; NULL otherwise. For the rebuild procedure and the retirement scan.
PGPHI_FUNCTION(pgphi_blind_index_version_of)
{
    bytea* value = PG_GETARG_BYTEA_PP(0);
    size_t size = VARSIZE_ANY_EXHDR(value);
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(VARDATA_ANY(value));
    if (size < kBlindIndexPrefixSize + kMinBlindIndexBytes || size > kBlindIndexPrefixSize + kMaxBlindIndexBytes ||
        format::read_be32(bytes) != static_cast<uint32>(PG_GETARG_INT32(1)))
        PG_RETURN_NULL();
    uint32 version = format::read_be32(bytes + 4);
    if (version == 0 || version > static_cast<uint32>(PG_INT32_MAX))
        PG_RETURN_NULL();
    PG_RETURN_INT32(static_cast<int32>(version));
}
