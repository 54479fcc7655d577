/*
 * The floors pgphi's SQL benchmark measures against: the cheapest SQL
 * function call (copy the bytes), and raw AES-256-GCM in C with one reused
 * cipher context and a fixed key (what an extension that did nothing but
 * AES-GCM would cost). Benchmark use only: the key is a constant.
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/builtins.h"

#include <openssl/evp.h>

PG_MODULE_MAGIC;

#define NONCE_SIZE 12
#define TAG_SIZE 16

static const unsigned char floor_key[32] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
											17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32};
static EVP_CIPHER_CTX *encrypt_ctx;
static EVP_CIPHER_CTX *decrypt_ctx;
static uint64 nonce_counter;

static void
ensure_contexts(void)
{
	if (encrypt_ctx)
		return;
	encrypt_ctx = EVP_CIPHER_CTX_new();
	decrypt_ctx = EVP_CIPHER_CTX_new();
	if (!encrypt_ctx || !decrypt_ctx ||
		EVP_EncryptInit_ex(encrypt_ctx, EVP_aes_256_gcm(), NULL, floor_key, NULL) != 1 ||
		EVP_DecryptInit_ex(decrypt_ctx, EVP_aes_256_gcm(), NULL, floor_key, NULL) != 1)
		elog(ERROR, "could not set up AES-256-GCM");
}

PG_FUNCTION_INFO_V1(floor_copy);
Datum
floor_copy(PG_FUNCTION_ARGS)
{
	bytea	   *in = PG_GETARG_BYTEA_PP(0);
	bytea	   *out = palloc(VARSIZE_ANY_EXHDR(in) + VARHDRSZ);

	SET_VARSIZE(out, VARSIZE_ANY_EXHDR(in) + VARHDRSZ);
	memcpy(VARDATA(out), VARDATA_ANY(in), VARSIZE_ANY_EXHDR(in));
	PG_RETURN_BYTEA_P(out);
}

/* text -> nonce || ciphertext || tag */
PG_FUNCTION_INFO_V1(floor_gcm_encrypt);
Datum
floor_gcm_encrypt(PG_FUNCTION_ARGS)
{
	text	   *in = PG_GETARG_TEXT_PP(0);
	int			len = VARSIZE_ANY_EXHDR(in);
	bytea	   *out = palloc(VARHDRSZ + NONCE_SIZE + len + TAG_SIZE);
	unsigned char *nonce = (unsigned char *) VARDATA(out);
	int			n;

	ensure_contexts();
	SET_VARSIZE(out, VARHDRSZ + NONCE_SIZE + len + TAG_SIZE);
	memset(nonce, 0, NONCE_SIZE);
	nonce_counter++;
	memcpy(nonce, &nonce_counter, sizeof(nonce_counter));
	if (EVP_EncryptInit_ex(encrypt_ctx, NULL, NULL, NULL, nonce) != 1 ||
		EVP_EncryptUpdate(encrypt_ctx, nonce + NONCE_SIZE, &n, (unsigned char *) VARDATA_ANY(in), len) != 1 ||
		EVP_EncryptFinal_ex(encrypt_ctx, nonce + NONCE_SIZE + n, &n) != 1 ||
		EVP_CIPHER_CTX_ctrl(encrypt_ctx, EVP_CTRL_GCM_GET_TAG, TAG_SIZE, nonce + NONCE_SIZE + len) != 1)
		elog(ERROR, "AES-256-GCM encryption failed");
	PG_RETURN_BYTEA_P(out);
}

PG_FUNCTION_INFO_V1(floor_gcm_decrypt);
Datum
floor_gcm_decrypt(PG_FUNCTION_ARGS)
{
	bytea	   *in = PG_GETARG_BYTEA_PP(0);
	int			len = VARSIZE_ANY_EXHDR(in) - NONCE_SIZE - TAG_SIZE;
	unsigned char *nonce = (unsigned char *) VARDATA_ANY(in);
	text	   *out;
	int			n;

	if (len < 0)
		elog(ERROR, "value too short");
	ensure_contexts();
	out = palloc(VARHDRSZ + len);
	SET_VARSIZE(out, VARHDRSZ + len);
	if (EVP_DecryptInit_ex(decrypt_ctx, NULL, NULL, NULL, nonce) != 1 ||
		EVP_DecryptUpdate(decrypt_ctx, (unsigned char *) VARDATA(out), &n, nonce + NONCE_SIZE, len) != 1 ||
		EVP_CIPHER_CTX_ctrl(decrypt_ctx, EVP_CTRL_GCM_SET_TAG, TAG_SIZE, nonce + NONCE_SIZE + len) != 1 ||
		EVP_DecryptFinal_ex(decrypt_ctx, (unsigned char *) VARDATA(out) + n, &n) != 1)
		elog(ERROR, "AES-256-GCM authentication failed");
	PG_RETURN_TEXT_P(out);
}
