// encrypt_phi and decrypt_phi: the SQL functions applications call per value.
// Arguments are detoasted and buffers allocated here, in PostgreSQL's world;
// only the sealing and opening run in the core (see error_bridge.hpp).
#include "shared/postgres.hpp"

extern "C" {
#include "mb/pg_wchar.h"
#include "utils/jsonb.h"
}

#include <string_view>

#include "core/ciphertext_format.hpp"
#include "policy/access_control.hpp"
#include "policy/decrypt_limits.hpp"
#include "policy/derived_data.hpp"
#include "shared/audit.hpp"
#include "shared/error_bridge.hpp"
#include "shared/key_access.hpp"
#include "shared/shared_state.hpp"

using namespace pgphi;
using namespace pgphi::pg;

namespace {

// The optional context argument (AAD); absent means empty.
ByteView context_arg(FunctionCallInfo fcinfo, int argno)
{
    return PG_NARGS() > argno ? view_of(PG_GETARG_TEXT_PP(argno)) : ByteView();
}

bytea* allocate_sealed(size_t sealed_size)
{
    size_t total = VARHDRSZ + sealed_size;
    if (total > MaxAllocSize)
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
                        errmsg("value is too large to encrypt"),
                        errdetail("Encrypted values are at most %zu bytes.", MaxAllocSize - VARHDRSZ)));
    bytea* result = static_cast<bytea*>(palloc(total));
    SET_VARSIZE(result, total);
    return result;
}

// Deterministic values (AES-256-SIV) use no nonce, so they neither count
// against the DEK's budget of random nonces nor need the primary's count:
// standbys compute them too, for lookups.
Datum seal_deterministic(DataKey* key, ByteView plaintext, ByteView context)
{
    bytea* result = allocate_sealed(format::deterministic_sealed_size(plaintext.size));
    call_core([&] { key->seal_deterministic(plaintext, context, reinterpret_cast<uint8_t*>(VARDATA(result))); });
    PG_RETURN_BYTEA_P(result);
}

// encrypt_phi(value, key_name [, context]) has the context at argument 2;
// encrypt_phi(value, key_name, deterministic [, context]) at argument 3.
Datum encrypt_bytes(FunctionCallInfo fcinfo, ByteView plaintext, bool deterministic, int context_argno)
{
    DataKey* key = key_for_encrypt(PG_GETARG_TEXT_PP(1));
    require_purpose(*key, KeyPurpose::Encryption);
    check_key_use(*key, KeyUse::Encrypt);
    ByteView context = context_arg(fcinfo, context_argno);
    if (deterministic) {
        count_key_use(key->ref().key_id, KeyUse::Encrypt);
        return seal_deterministic(key, plaintext, context);
    }

    bytea* result = allocate_sealed(format::sealed_size(plaintext.size));
    // Usage is counted in batches of kSealReportBatch: a shared write per
    // batch, not per value.
    if (key->unreported_seals() == 0)
        check_seal_budget(*key, MyDatabaseId);
    call_core([&] { key->seal(nonce_source(), plaintext, context, reinterpret_cast<uint8_t*>(VARDATA(result))); });
    if (key->unreported_seals() >= kSealReportBatch)
        report_seals(*key, MyDatabaseId);
    count_key_use(key->ref().key_id, KeyUse::Encrypt);
    PG_RETURN_BYTEA_P(result);
}

// jsonb is encrypted in its text form, which is stable across PostgreSQL
// versions and decrypts as text too (and, being canonical, gives equal
// deterministic values for equal documents).
Datum encrypt_jsonb(FunctionCallInfo fcinfo, bool deterministic, int context_argno)
{
    Jsonb* document = PG_GETARG_JSONB_P(0);
    char* json = JsonbToCString(nullptr, &document->root, VARSIZE(document));
    size_t length = strlen(json);
    Datum result =
        encrypt_bytes(fcinfo, ByteView(reinterpret_cast<const uint8_t*>(json), length), deterministic, context_argno);
    explicit_bzero(json, length);
    pfree(json);
    return result;
}

// What a decrypt call site (its fn_extra, one per expression) kept from the
// last value it decrypted: the value's header, its key and the grant answer.
// A column's values mostly share a header, so the next value with the same
// one skips the parse, the key lookup and the grant check, revalidating
// their results instead from counters that every change to them moves (see
// key_still_current and key_use_still_allowed). What is due per value still
// runs per value: the derivation and transport checks, the key name check,
// the decrypt limit charge, the audit count and the key-use report. It holds
// no key material: the key is the process's key ring's, used only while the
// ring has not changed since.
struct DecryptMemo {
    uint8_t prefix[format::kPrefixSize]; // of an AES-256-GCM value
    DataKey* key;                        // nullptr: nothing kept
    uint64_t ring_changes;
    TimestampTz statement;
    KeyUseAnswer grant;
};

DecryptMemo* decrypt_memo(FunctionCallInfo fcinfo, DecryptMemo* unkept)
{
    // A direct call (DirectFunctionCall) has no call site to keep it in.
    if (fcinfo->flinfo == nullptr) {
        *unkept = DecryptMemo{};
        return unkept;
    }
    if (fcinfo->flinfo->fn_extra == nullptr)
        fcinfo->flinfo->fn_extra = MemoryContextAllocZero(fcinfo->flinfo->fn_mcxt, sizeof(DecryptMemo));
    return static_cast<DecryptMemo*>(fcinfo->flinfo->fn_extra);
}

// The memo's key for `value` if it still holds, with `parsed` filled in as
// format::parse would (the header is the one parse accepted before).
DataKey* memo_key(const DecryptMemo& memo, ByteView value, format::ParsedValue& parsed)
{
    if (memo.key == nullptr || value.size < format::kGcmOverhead ||
        memcmp(value.data, memo.prefix, format::kPrefixSize) != 0 ||
        !key_still_current(memo.key, memo.ring_changes, memo.statement) || !key_use_still_allowed(memo.grant))
        return nullptr;
    parsed.format_version = format::kVersion1;
    parsed.algorithm = format::Algorithm::Aes256Gcm;
    parsed.key = memo.key->ref();
    parsed.prefix = ByteView(value.data, format::kPrefixSize);
    parsed.nonce = value.data + format::kPrefixSize;
    parsed.ciphertext = ByteView(parsed.nonce + format::kGcmNonceSize, value.size - format::kGcmOverhead);
    parsed.tag = value.data + value.size - format::kGcmTagSize;
    return memo.key;
}

// Parses the value, checks the key name if one was given, and returns the
// plaintext as a bytea-shaped varlena (text and bytea share the layout).
struct varlena* decrypt_to_varlena(FunctionCallInfo fcinfo)
{
    bytea* value = PG_GETARG_BYTEA_PP(0);
    // The tail of a value (ciphertext and tag) is often on a cache line the
    // scan has not touched yet: fetching it now overlaps that memory access
    // with the checks below instead of stalling the decryption on it.
    __builtin_prefetch(VARDATA_ANY(value) + VARSIZE_ANY_EXHDR(value) - 1);
    ByteView bytes = view_of(value);
    DecryptMemo unkept;
    DecryptMemo* memo = decrypt_memo(fcinfo, &unkept);
    format::ParsedValue parsed;
    DataKey* key = memo_key(*memo, bytes, parsed);
    if (key) {
        check_plaintext_derivation(*key);
        check_plaintext_transport(*key);
    } else {
        memo->key = nullptr;
        call_core([&] { format::parse(bytes, parsed); });
        key = key_for_decrypt(parsed.key);
        uint64_t ring_changes = key_cache_clears();
        check_plaintext_derivation(*key);
        KeyUseAnswer grant = check_key_use(*key, KeyUse::Decrypt);
        check_plaintext_transport(*key);
        // Kept only once every check has passed; deterministic values
        // (lookups, mostly one per statement) are not kept.
        if (!parsed.deterministic()) {
            *memo = DecryptMemo{{}, key, ring_changes, GetCurrentStatementStartTimestamp(), grant};
            memcpy(memo->prefix, bytes.data, format::kPrefixSize);
        }
    }
    if (PG_NARGS() > 1) {
        text* expected = PG_GETARG_TEXT_PP(1);
        std::string_view expected_name(VARDATA_ANY(expected), VARSIZE_ANY_EXHDR(expected));
        if (key->name() != expected_name)
            ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_INVALID_PARAMETER_VALUE),
                            errmsg("value was encrypted with pgphi key \"%s\", not with the key named in the call",
                                   key->name().c_str())));
    }
    ByteView context = context_arg(fcinfo, 2);
    // Decrypt limits and break-glass counts: a local count, a shared budget
    // taken in batches.
    charge_decrypt(*key);

    // Room for the whole body; the plaintext may be a byte shorter (SIV framing).
    struct varlena* plaintext = static_cast<struct varlena*>(palloc(VARHDRSZ + parsed.ciphertext.size));
    CoreFailure failure;
    if (!run_core(failure, [&] { key->open(parsed, context, reinterpret_cast<uint8_t*>(VARDATA(plaintext))); })) {
        // A value that fails authentication was tampered with (or is read
        // with the wrong context): evidence for the audit trail.
        if (failure.code == ErrorCode::AuthenticationFailed)
            queue_audit_event("decrypt", AuditOutcome::Failed, *key, "ciphertext failed authentication");
        raise_core_failure(failure);
    }
    SET_VARSIZE(plaintext, VARHDRSZ + parsed.plaintext_size());
    count_key_use(key->ref().key_id, KeyUse::Decrypt);
    return plaintext;
}

void wipe_and_free(struct varlena* v)
{
    explicit_bzero(VARDATA(v), VARSIZE(v) - VARHDRSZ);
    pfree(v);
}

// Text results must be valid in the database encoding; a value encrypted from
// bytea or in another database may not be.
void check_text_encoding(struct varlena* plaintext)
{
    if (!pg_verify_mbstr(GetDatabaseEncoding(), VARDATA(plaintext), VARSIZE(plaintext) - VARHDRSZ, true)) {
        wipe_and_free(plaintext);
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE),
                        errmsg("decrypted value is not valid text in encoding \"%s\"",
                               GetDatabaseEncodingName()),
                        errhint("Use decrypt_phi_bytea() for values that were encrypted from bytea.")));
    }
}

} // namespace

PGPHI_FUNCTION(pgphi_encrypt_text)
{
    return encrypt_bytes(fcinfo, view_of(PG_GETARG_TEXT_PP(0)), false, 2);
}

PGPHI_FUNCTION(pgphi_encrypt_bytea)
{
    return encrypt_bytes(fcinfo, view_of(PG_GETARG_BYTEA_PP(0)), false, 2);
}

PGPHI_FUNCTION(pgphi_encrypt_jsonb)
{
    return encrypt_jsonb(fcinfo, false, 2);
}

// encrypt_phi(value, key_name, deterministic boolean, context DEFAULT ''):
// STABLE in SQL, so that a comparison with a deterministic value can use an
// index. deterministic => false gives a randomized value, as encrypt_phi
// without the argument does.
PGPHI_FUNCTION(pgphi_encrypt_text_mode)
{
    return encrypt_bytes(fcinfo, view_of(PG_GETARG_TEXT_PP(0)), PG_GETARG_BOOL(2), 3);
}

PGPHI_FUNCTION(pgphi_encrypt_bytea_mode)
{
    return encrypt_bytes(fcinfo, view_of(PG_GETARG_BYTEA_PP(0)), PG_GETARG_BOOL(2), 3);
}

PGPHI_FUNCTION(pgphi_encrypt_jsonb_mode)
{
    return encrypt_jsonb(fcinfo, PG_GETARG_BOOL(2), 3);
}

// pgphi._encrypt_phi_version(value text|bytea, key_name, context, version):
// the deterministic value under a given active or decrypt-only version, for
// lookups that must also find values not yet re-encrypted.
PGPHI_FUNCTION(pgphi_encrypt_version)
{
    int32 version = PG_GETARG_INT32(3);
    if (version <= 0)
        ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("pgphi key versions are positive")));
    DataKey* key = key_for_version(PG_GETARG_TEXT_PP(1), static_cast<uint32>(version));
    require_purpose(*key, KeyPurpose::Encryption);
    check_key_use(*key, KeyUse::Encrypt);
    count_key_use(key->ref().key_id, KeyUse::Encrypt);
    return seal_deterministic(key, view_of(PG_GETARG_BYTEA_PP(0)), context_arg(fcinfo, 2));
}

PGPHI_FUNCTION(pgphi_decrypt_text)
{
    struct varlena* plaintext = decrypt_to_varlena(fcinfo);
    check_text_encoding(plaintext);
    PG_RETURN_TEXT_P(plaintext);
}

PGPHI_FUNCTION(pgphi_decrypt_bytea)
{
    PG_RETURN_BYTEA_P(decrypt_to_varlena(fcinfo));
}

PGPHI_FUNCTION(pgphi_decrypt_jsonb)
{
    struct varlena* plaintext = decrypt_to_varlena(fcinfo);
    check_text_encoding(plaintext);
    char* json = text_to_cstring(reinterpret_cast<text*>(plaintext));
    wipe_and_free(plaintext);

    // jsonb_in's own errors quote the input, which here is plaintext PHI: they
    // are replaced by one that says nothing about the content.
    MemoryContext context = CurrentMemoryContext;
    Datum document = 0;
    PG_TRY();
    {
        document = DirectFunctionCall1(jsonb_in, CStringGetDatum(json));
    }
    PG_CATCH();
    {
        MemoryContextSwitchTo(context);
        explicit_bzero(json, strlen(json));
        // Cancels, out-of-memory and the like pass through unchanged.
        if (ERRCODE_TO_CATEGORY(geterrcode()) != ERRCODE_DATA_EXCEPTION)
            PG_RE_THROW();
        FlushErrorState();
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
                        errmsg("decrypted value is not valid jsonb"),
                        errhint("Use decrypt_phi() for values that were not encrypted from jsonb.")));
    }
    PG_END_TRY();
    explicit_bzero(json, strlen(json));
    pfree(json);
    return document;
}

// pgphi.reencrypt_value(value, key_name [, context]): the value under its
// key's active version, with the same context; unchanged when it already is.
// Plaintext exists only in a wiped temporary buffer inside this call.
PGPHI_FUNCTION(pgphi_reencrypt_value)
{
    bytea* value = PG_GETARG_BYTEA_PP(0);
    text* key_name = PG_GETARG_TEXT_PP(1);
    ByteView context = context_arg(fcinfo, 2);
    format::ParsedValue parsed;
    call_core([&] { parsed = format::parse(view_of(value)); });

    // Both keys must come from one state of the key cache: a lookup may clear
    // it, which would leave the other pointer dangling.
    DataKey* source = nullptr;
    DataKey* target = nullptr;
    for (int attempt = 0;; ++attempt) {
        source = key_for_decrypt(parsed.key, true);
        uint64_t clears = key_cache_clears();
        target = key_for_encrypt(key_name);
        if (key_cache_clears() == clears)
            break;
        if (attempt == 3)
            ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                            errmsg("pgphi keys keep changing; retry the re-encryption")));
    }
    // Re-encrypting opens the value and seals it again: the caller needs both
    // key grants, as decrypt_phi and encrypt_phi would check them, before
    // anything about the value is revealed (not even whose key it is). The
    // checks look up no key, so both pointers stay valid.
    check_key_use(*target, KeyUse::Encrypt);
    check_key_use(*source, KeyUse::Decrypt);
    if (source->name() != target->name())
        ereport(ERROR, (errhidestmt(true), errcode(ERRCODE_INVALID_PARAMETER_VALUE),
                        errmsg("value was encrypted with pgphi key \"%s\", not \"%s\"", source->name().c_str(),
                               target->name().c_str())));
    require_purpose(*target, KeyPurpose::Encryption);
    if (source == target)
        PG_RETURN_DATUM(PG_GETARG_DATUM(0));

    // A deterministic value stays deterministic, so that the column's
    // equality lookups and indexes keep working under the new version.
    bool deterministic = parsed.deterministic();
    if (!deterministic && target->unreported_seals() == 0)
        check_seal_budget(*target, MyDatabaseId);
    size_t plaintext_size = parsed.plaintext_size();
    uint8_t* plaintext = static_cast<uint8_t*>(palloc(parsed.ciphertext.size + 1));
    bytea* result = allocate_sealed(deterministic ? format::deterministic_sealed_size(plaintext_size)
                                                  : format::sealed_size(plaintext_size));
    CoreFailure failure;
    bool ok = run_core(failure, [&] {
        source->open(parsed, context, plaintext);
        uint8_t* out = reinterpret_cast<uint8_t*>(VARDATA(result));
        if (deterministic)
            target->seal_deterministic(ByteView(plaintext, plaintext_size), context, out);
        else
            target->seal(nonce_source(), ByteView(plaintext, plaintext_size), context, out);
    });
    explicit_bzero(plaintext, parsed.ciphertext.size);
    pfree(plaintext);
    if (!ok)
        raise_core_failure(failure);
    if (target->unreported_seals() >= kSealReportBatch)
        report_seals(*target, MyDatabaseId);
    PG_RETURN_BYTEA_P(result);
}

// pgphi._key_version_of(value, key_id): the key version a bytea value is
// encrypted under, if it is a pgphi ciphertext of that key; NULL for anything
// else (plaintext in a bytea column, another key, damaged values). For the
// re-encryption and retirement scans, which must not stop on such values.
PGPHI_FUNCTION(pgphi_key_version_of)
{
    bytea* value = PG_GETARG_BYTEA_PP(0);
    format::ParsedValue parsed;
    CoreFailure ignored;
    if (!run_core(ignored, [&] { parsed = format::parse(view_of(value)); }) ||
        parsed.key.key_id != static_cast<uint32>(PG_GETARG_INT32(1)))
        PG_RETURN_NULL();
    PG_RETURN_INT32(static_cast<int32>(parsed.key.version));
}
