#!/usr/bin/python3
"""Writes the fuzzers' seed corpora, one folder per target under corpus/
(or under the folder given as the first argument):

  ciphertext      real pgphi v1 ciphertexts of both algorithms under the fuzz
                  target's fixed DEK (bytes 0..31), plus damaged ones
  vault_response  bodies shaped like Vault Transit's and Vault auth's answers
  kms_response    bodies shaped like AWS KMS's answers and error answers
  aws_credentials the metadata service's role listing and credentials
                  document, and shared-credentials files
  kmip_ttlv       KMIP Response Messages (TTLV) to each operation pgphi sends,
                  items of every type, and a KMIP-wrapped DEK

The output is deterministic, so rerunning the script changes nothing unless
the script changed. Identifiers and secrets are made up and shaped so that no
secret scanner mistakes them for real ones."""
import base64
import json
import os
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def write(target, name, data):
    folder = os.path.join(root, target)
    os.makedirs(folder, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    elif not isinstance(data, bytes):
        data = json.dumps(data, indent=None, separators=(",", ":")).encode()
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def b64(data):
    return base64.b64encode(data).decode()


# ciphertext
key = bytes(range(32))
prefix = bytes([0xA7, 1, 1]) + (1).to_bytes(4, "big") + (1).to_bytes(4, "big")
for i, plaintext in enumerate([b"", b"123-45-6789", b"John Smith", b'{"dx": "E11.9"}', bytes(range(256))]):
    nonce = bytes([i]) * 12
    value = prefix + nonce + AESGCM(key).encrypt(nonce, plaintext, prefix)
    write("ciphertext", f"valid-{i}", value)
    write("ciphertext", f"truncated-{i}", value[: len(value) // 2])
    flipped = bytearray(value)
    flipped[-1] ^= 1
    write("ciphertext", f"flipped-{i}", bytes(flipped))

# Deterministic values: AES-256-SIV under the key HKDF derives from the DEK,
# over a zero byte and the plaintext, with the prefix as associated data.
siv_key = HKDF(hashes.SHA256(), 64, None, b"pgphi v1 AES-256-SIV key").derive(key)
siv_prefix = bytes([0xA7, 1, 2]) + (1).to_bytes(4, "big") + (1).to_bytes(4, "big")
for i, plaintext in enumerate([b"", b"123-45-6789", b"MRN-0042", bytes(range(256))]):
    value = siv_prefix + AESSIV(siv_key).encrypt(b"\x00" + plaintext, [siv_prefix])
    write("ciphertext", f"siv-valid-{i}", value)
    write("ciphertext", f"siv-truncated-{i}", value[: len(value) // 2])
    flipped = bytearray(value)
    flipped[-1] ^= 1
    write("ciphertext", f"siv-flipped-{i}", bytes(flipped))
write("ciphertext", "not-ciphertext", b"123-45-6789")

# vault_response: what Vault answers to each call pgphi makes.
dek = bytes(range(32))
wrapped = "vault:v1:" + b64(bytes(range(60)))
write("vault_response", "unwrap-secret-id", {"request_id": "r9", "data": {"secret_id": "fuzz-secret-id-0001"},
                                            "wrap_info": None})
write("vault_response", "datakey-wrapped", {"request_id": "r1", "data": {"ciphertext": wrapped, "key_version": 1}})
write("vault_response", "rewrap", {"data": {"ciphertext": "vault:v12:" + b64(bytes(range(1, 61))), "key_version": 12}})
write("vault_response", "decrypt", {"data": {"plaintext": b64(dek)}})
write("vault_response", "decrypt-short-dek", {"data": {"plaintext": b64(dek[:16])}})
write("vault_response", "decrypt-bad-base64", {"data": {"plaintext": "not base64!"}})
write("vault_response", "keys", {"data": {"name": "pgphi-kek", "type": "aes256-gcm96", "latest_version": 3,
                                          "min_decryption_version": 1, "keys": {"1": 1700000000, "2": 1700000100}}})
write("vault_response", "login", {"auth": {"client_token": "fuzz-token-0001", "accessor": "fuzz-accessor",
                                           "policies": ["pgphi"], "lease_duration": 2764800, "renewable": True}})
write("vault_response", "login-no-token", {"auth": {"lease_duration": 60, "renewable": False}})
write("vault_response", "renew", {"auth": {"client_token": "fuzz-token-0001", "lease_duration": 3600,
                                           "renewable": True}})
write("vault_response", "errors", {"errors": ["permission denied"]})
write("vault_response", "errors-disabled", {"errors": ["key is disabled"]})
write("vault_response", "empty", "")
write("vault_response", "not-json", "<html>502 Bad Gateway</html>")
write("vault_response", "wrong-types", {"data": {"ciphertext": 7, "plaintext": [], "latest_version": "3"},
                                        "auth": {"client_token": 1, "lease_duration": "1h", "renewable": "yes"}})
write("vault_response", "big-numbers", {"data": {"latest_version": 1e300}, "auth": {"client_token": "t",
                                                                                   "lease_duration": 18446744073709551615}})

# kms_response: successful answers of each operation, and error answers.
arn = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
blob = b64(bytes(range(100, 200)))
write("kms_response", "generate-data-key-without-plaintext", {"CiphertextBlob": blob, "KeyId": arn})
write("kms_response", "encrypt", {"CiphertextBlob": blob, "KeyId": arn, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"})
write("kms_response", "re-encrypt", {"CiphertextBlob": blob, "KeyId": arn, "SourceKeyId": arn,
                                     "SourceEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                                     "DestinationEncryptionAlgorithm": "SYMMETRIC_DEFAULT"})
write("kms_response", "decrypt", {"KeyId": arn, "Plaintext": b64(dek), "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"})
write("kms_response", "decrypt-short-dek", {"KeyId": arn, "Plaintext": b64(dek[:31])})
write("kms_response", "describe-key", {"KeyMetadata": {"AWSAccountId": "111122223333", "Arn": arn,
                                                       "KeyId": "1234abcd-12ab-34cd-56ef-1234567890ab",
                                                       "KeyState": "Enabled", "Enabled": True,
                                                       "KeyUsage": "ENCRYPT_DECRYPT",
                                                       "CreationDate": 1.7e9}})
write("kms_response", "describe-key-disabled", {"KeyMetadata": {"Arn": arn, "KeyState": "PendingDeletion"}})
for error_type in ["ThrottlingException", "AccessDeniedException", "DisabledException",
                   "InvalidCiphertextException", "NotFoundException", "ExpiredTokenException",
                   "KMSInvalidStateException", "ValidationException"]:
    write("kms_response", f"error-{error_type}", {"__type": f"com.amazonaws.kms#{error_type}",
                                                  "message": f"{error_type} from the fuzz seed"})
write("kms_response", "error-capital-message", {"__type": "IncorrectKeyException", "Message": "wrong key"})
write("kms_response", "not-json", "<html>503</html>")
write("kms_response", "wrong-types", {"CiphertextBlob": 1, "KeyId": 2, "Plaintext": None,
                                      "KeyMetadata": {"KeyState": 3, "Arn": []}, "__type": 4, "message": {}})

# aws_credentials: the instance metadata service, and credentials files.
write("aws_credentials", "imds-role-listing", "pgphi-db-role\n")
write("aws_credentials", "imds-credentials", {"Code": "Success", "LastUpdated": "2026-11-01T00:00:00Z",
                                              "Type": "AWS-HMAC", "AccessKeyId": "FUZZKEYID0001",
                                              "SecretAccessKey": "fuzz-secret-0001", "Token": "fuzz-session-0001",
                                              "Expiration": "2026-11-01T06:00:00Z"})
write("aws_credentials", "imds-credentials-bad-expiration", {"AccessKeyId": "FUZZKEYID0002",
                                                             "SecretAccessKey": "fuzz-secret-0002",
                                                             "Expiration": "soon"})
write("aws_credentials", "credentials-file", "[default]\naws_access_key_id = FUZZKEYID0003\n"
                                             "aws_secret_access_key = fuzz-secret-0003\n\n"
                                             "# the database's role\n[pgphi]\naws_access_key_id=FUZZKEYID0004\n"
                                             "aws_secret_access_key=fuzz-secret-0004\naws_session_token = fuzz-0004\n")
write("aws_credentials", "credentials-file-incomplete", "[default]\naws_access_key_id = FUZZKEYID0005\n")
write("aws_credentials", "sts-assume-role",
      '<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><AssumeRoleResult>'
      "<AssumedRoleUser><Arn>arn:aws:sts::111122223333:assumed-role/r/s</Arn></AssumedRoleUser>"
      "<Credentials><AccessKeyId>FUZZKEYID0006</AccessKeyId><SecretAccessKey>fuzz-secret-0006</SecretAccessKey>"
      "<SessionToken>fuzz-session&amp;0006</SessionToken><Expiration>2026-11-01T06:00:00Z</Expiration>"
      "</Credentials></AssumeRoleResult><ResponseMetadata><RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7"
      "</RequestId></ResponseMetadata></AssumeRoleResponse>")
write("aws_credentials", "sts-error",
      '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
      "<Code>InvalidIdentityToken</Code><Message>could not be validated</Message></Error>"
      "<RequestId>4f6b6c4e-0d2a-11e9-a0a5-0d6bf2f0ae8d</RequestId></ErrorResponse>")
write("aws_credentials", "config-profile-chain",
      "[profile pgphi]\nrole_arn = arn:aws:iam::111122223333:role/db\nsource_profile = base\n"
      "[profile base]\naws_access_key_id = FUZZKEYID0007\naws_secret_access_key = fuzz-secret-0007\n"
      "[profile default]\nrole_arn = arn:aws:iam::111122223333:role/db\nsource_profile = pgphi\n"
      "[profile loop]\nrole_arn = arn:aws:iam::1:role/a\nsource_profile = loop\n")

# kmip_ttlv: KMIP Response Messages as pykmip-server answers pgphi's
# requests (protocol 1.4), TTLV items of every type, and wrapped DEKs.
def ttlv(tag, typ, value):
    if typ == 0x01:
        body = b"".join(value)
    elif typ in (0x02, 0x05, 0x0A):
        body = value.to_bytes(4, "big", signed=typ == 0x02)
    elif typ in (0x03, 0x06, 0x09):
        body = value.to_bytes(8, "big", signed=True)
    else:
        body = value
    pad = (8 - len(body) % 8) % 8
    return tag.to_bytes(3, "big") + bytes([typ]) + len(body).to_bytes(4, "big") + body + b"\0" * pad


def response(operation, status, payload=None, reason=None, message=None):
    header = ttlv(0x42007A, 1, [ttlv(0x420069, 1, [ttlv(0x42006A, 2, 1), ttlv(0x42006B, 2, 4)]),
                                ttlv(0x420092, 9, 0x4F9A54E5), ttlv(0x42000D, 2, 1)])
    items = [ttlv(0x42005C, 5, operation), ttlv(0x42007F, 5, status)]
    if reason is not None:
        items.append(ttlv(0x42007E, 5, reason))
    if message is not None:
        items.append(ttlv(0x42007D, 7, message.encode()))
    if payload is not None:
        items.append(ttlv(0x42007C, 1, payload))
    return ttlv(0x42007B, 1, [header, ttlv(0x42000F, 1, items)])


uid = ttlv(0x420094, 7, b"1")
write("kmip_ttlv", "locate", response(0x08, 0, [uid, ttlv(0x420094, 7, b"2")]))
write("kmip_ttlv", "get-attributes-state", response(0x0B, 0, [uid, ttlv(0x420008, 1, [
    ttlv(0x42000A, 7, b"State"), ttlv(0x42000B, 5, 3)])]))
write("kmip_ttlv", "create", response(0x01, 0, [ttlv(0x420057, 5, 2), uid]))
write("kmip_ttlv", "encrypt", response(0x1F, 0, [uid, ttlv(0x4200C2, 8, bytes(32)), ttlv(0x4200FF, 8, bytes(16))]))
write("kmip_ttlv", "decrypt", response(0x20, 0, [uid, ttlv(0x4200C2, 8, bytes(range(32)))]))
write("kmip_ttlv", "denied", response(0x20, 1, reason=0x0C, message="The decryption key must be in the Active state"))
write("kmip_ttlv", "scalars", ttlv(0x420020, 1, [ttlv(0x420020, 3, 123456789000000000),
                                                 ttlv(0x420020, 4, bytes(8)), ttlv(0x420020, 10, 864000),
                                                 ttlv(0x420020, 6, 1)]))
write("kmip_ttlv", "wrapped-dek", bytes([1, 0, 1]) + b"1" + bytes(12) + bytes(16) + bytes(32))
