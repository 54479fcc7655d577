#!/usr/bin/python3
"""Independent verification of keymanager_emulator.py.

The emulator is driven only by real, independent clients: the AWS CLI
(/usr/bin/aws), boto3/botocore and hvac, plus botocore's own SigV4 signer and
urllib where a test needs to see the raw HTTP status and body. Each test
asserts what the real AWS KMS or Vault would answer.

Run with Debian's Python (it has boto3, hvac and cryptography):
    /usr/bin/python3 -m unittest -v test/emulator/check_emulator.py
    /usr/bin/python3 test/emulator/check_emulator.py

Every emulator runs on 127.0.0.1 with a random port and is killed at the end;
every wait is bounded.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import types
import unittest
import urllib.error
import urllib.request
import uuid
import warnings
from pathlib import Path
from unittest import mock

# The user's AWS settings (profiles, CA bundle overrides, credentials) must not leak
# into the clients under test: each test states its own.
for _name in [n for n in os.environ if n.startswith("AWS_")]:
    del os.environ[_name]
os.environ.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                  AWS_EC2_METADATA_DISABLED="true", NO_PROXY="127.0.0.1,localhost")

import boto3                                          # noqa: E402
import botocore.auth                                  # noqa: E402
import botocore.credentials                           # noqa: E402
import botocore.exceptions                            # noqa: E402
import botocore.httpsession                           # noqa: E402
import botocore.session                               # noqa: E402
import botocore.utils                                 # noqa: E402
import hvac                                           # noqa: E402
import hvac.exceptions                                # noqa: E402
import requests                                       # noqa: E402
from botocore.auth import SigV4Auth                   # noqa: E402
from botocore.awsrequest import AWSRequest            # noqa: E402
from botocore.config import Config                    # noqa: E402
from botocore.credentials import Credentials          # noqa: E402

HERE = Path(__file__).resolve().parent
# The policies docs/providers-vault-and-kms.md prints, which pgphi's tests load.
KMS_POLICY = HERE.parent.parent / "docs" / "policies" / "pgphi-kms-iam-policy.json"
VAULT_POLICY = HERE.parent.parent / "docs" / "policies" / "pgphi-vault-policy.hcl"
DOCS_PAGE = HERE.parent.parent / "docs" / "providers-vault-and-kms.md"
EMULATOR = HERE / "keymanager_emulator.py"
PKI_SCRIPT = HERE / "make_test_pki.sh"
PYTHON = "/usr/bin/python3"
AWS_CLI = "/usr/bin/aws"
CURL = "/usr/bin/curl"
START_TIMEOUT = 20          # seconds for an emulator to write its port file
STOP_TIMEOUT = 5
CLI_TIMEOUT = 60

REGION = "us-east-1"
ACCOUNT = "111122223333"
KMS_KEY = "6a1f0c2e-8f6d-4f7e-9a53-0c1d2e3f4a5b"
KMS_KEY_2 = "0b7e9d41-2c3a-4e5f-8a6b-7c8d9e0f1a2b"
# Access key ids shaped like real ones, made up at run time (never committed).
AKID, SECRET = "AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
SESSION_AKID, SESSION_SECRET = "ASIAEMULATORTEST0002", secrets.token_urlsafe(30)
SESSION_TOKEN = "FwoGZXIvYXdzE" + secrets.token_urlsafe(60)
POLICY_AKID, POLICY_SECRET = "AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
POLICY_TOKEN = "hvs.policy-" + secrets.token_hex(12)
ROLE_ID, SECRET_ID = str(uuid.uuid4()), str(uuid.uuid4())
APPROLE_TTL, APPROLE_MAX_TTL = 4, 10     # short, so expiry is testable in seconds

WORK: Path          # temporary directory of this run (PKI, state dirs, CLI home)
PKI: Path
EMU: "Emulator"     # the shared emulator most tests use


def pki(name: str) -> str:
    return str(PKI / name)


def arn(key_id: str) -> str:
    return f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key_id}"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Emulator:
    """One emulator process on a random port. stop() terminates it (kills if need be)."""

    def __init__(self, cert: str = "server", client_ca: str | None = None,
                 imds_role: str | None = None, extra: tuple = ()):
        self.state_dir = WORK / unique("state")
        self.state_dir.mkdir()
        self.admin_token = secrets.token_hex(16)
        self.root_token = "hvs.root-" + secrets.token_hex(12)
        args = [PYTHON, str(EMULATOR), "--port", "0",
                "--cert", pki(f"{cert}.pem"), "--key", pki(f"{cert}.key"),
                "--state-dir", str(self.state_dir), "--admin-token", self.admin_token,
                "--vault-root-token", self.root_token, "--approle", f"{ROLE_ID}:{SECRET_ID}",
                "--approle-token-ttl", str(APPROLE_TTL),
                "--approle-token-max-ttl", str(APPROLE_MAX_TTL),
                "--aws-credential", f"{AKID}:{SECRET}",
                "--aws-credential", f"{SESSION_AKID}:{SESSION_SECRET}:{SESSION_TOKEN}",
                "--region", REGION, "--kms-key", KMS_KEY, "--kms-key", KMS_KEY_2,
                "--vault-key", "precreated", "--vault-key", "ns1/in-ns1"]
        if client_ca:
            args += ["--client-ca", pki(client_ca)]
        if imds_role:
            args += ["--imds-role", imds_role]
        args += list(extra)
        self._stdout = open(self.state_dir / "stdout.txt", "w")
        self._stderr = open(self.state_dir / "stderr.txt", "w")
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._stdout,
                                        stderr=self._stderr)
        try:
            self.port = self._wait_for_port()
        except BaseException:
            self.stop()
            raise
        self.url = f"https://127.0.0.1:{self.port}"
        self.imds_url = None
        if imds_role:
            self.imds_url = f"http://127.0.0.1:{int((self.state_dir / 'imds_port').read_text())}"

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT
        port_file = self.state_dir / "port"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("emulator exited at start-up:\n" + self.stderr())
            try:
                return int(port_file.read_text())
            except (FileNotFoundError, ValueError):
                time.sleep(0.05)
        raise RuntimeError(f"emulator wrote no port file within {START_TIMEOUT}s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        self._stdout.close()
        self._stderr.close()

    def stderr(self) -> str:
        self._stderr.flush()
        return (self.state_dir / "stderr.txt").read_text()

    def admin(self, method: str, path: str, body: dict | None = None,
              token: str | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method,
            headers={"X-Emulator-Admin": token or self.admin_token,
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(request, context=ca_context(), timeout=10) as response:
            return json.loads(response.read())

    def fault(self, **spec) -> dict:
        return self.admin("POST", "/_emulator/fault", spec)

    def clear_faults(self) -> None:
        self.fault(mode="none", target="all")

    def stats(self) -> dict:
        return self.admin("GET", "/_emulator/stats")


def ca_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=pki("ca.pem"))


_OPEN_CLIENTS: list = []     # closed after each test, so no connection outlives it


def close_clients() -> None:
    while _OPEN_CLIENTS:
        _OPEN_CLIENTS.pop()()


def kms_client(emulator: Emulator, akid: str = AKID, secret: str = SECRET,
               token: str | None = None, retries: int = 0, region: str = REGION,
               ca: str = "ca.pem", **config):
    session = boto3.session.Session(aws_access_key_id=akid, aws_secret_access_key=secret,
                                    aws_session_token=token, region_name=region)
    client = session.client(
        "kms", endpoint_url=emulator.url, verify=pki(ca),
        config=Config(retries={"max_attempts": retries, "mode": "standard"},
                      connect_timeout=5, read_timeout=config.pop("read_timeout", 10), **config))
    _OPEN_CLIENTS.append(client.close)
    return client


def vault_client(emulator: Emulator, token: str | None = None, namespace: str | None = None,
                 **kwargs) -> hvac.Client:
    kwargs.setdefault("verify", pki("ca.pem"))
    client = hvac.Client(url=emulator.url, token=token, namespace=namespace, timeout=10,
                         **kwargs)
    _OPEN_CLIENTS.append(client.adapter.close)
    return client


def error_code(exc: botocore.exceptions.ClientError) -> str:
    return exc.response["Error"]["Code"]


def signed_kms_call(emulator: Emulator, operation: str, params: dict,
                    clock: type | None = None) -> tuple[int, dict, dict]:
    """Signs a KMS request with botocore's SigV4 signer and sends it with urllib, so the
    raw status, headers and body can be checked. Returns (status, headers, body)."""
    body = json.dumps(params).encode()
    request = AWSRequest(method="POST", url=emulator.url + "/", data=body,
                         headers={"Content-Type": "application/x-amz-json-1.1",
                                  "X-Amz-Target": f"TrentService.{operation}"})
    signer = SigV4Auth(Credentials(AKID, SECRET), "kms", REGION)
    if clock is None:
        signer.add_auth(request)
    else:
        with mock.patch.object(botocore.auth, "datetime", types.SimpleNamespace(datetime=clock)):
            signer.add_auth(request)
    raw = urllib.request.Request(emulator.url + "/", data=body, method="POST",
                                 headers=dict(request.headers.items()))
    try:
        with urllib.request.urlopen(raw, context=ca_context(), timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"{}")


def raw_vault_call(emulator: Emulator, method: str, path: str, token: str | None = None,
                   body: dict | None = None) -> tuple[int, dict, dict]:
    headers = {"X-Vault-Token": token} if token else {}
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(emulator.url + path, data=data, method=method,
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, context=ca_context(), timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"{}")


def run_aws_cli(emulator: Emulator, *args: str, akid: str = AKID, secret: str = SECRET,
                token: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(WORK / "home"), "LANG": "C.UTF-8",
           "AWS_ACCESS_KEY_ID": akid, "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_DEFAULT_REGION": REGION, "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_PAGER": "",
           "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard",
           "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1,localhost"}
    if token:
        env["AWS_SESSION_TOKEN"] = token
    command = [AWS_CLI, "kms", *args, "--endpoint-url", emulator.url,
               "--ca-bundle", pki("ca.pem"), "--output", "json",
               "--cli-connect-timeout", "5", "--cli-read-timeout", "10"]
    return subprocess.run(command, env=env, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL)


def setUpModule():
    global WORK, PKI, EMU
    WORK = Path(tempfile.mkdtemp(prefix="keymanager-emulator-check-"))
    unittest.addModuleCleanup(shutil.rmtree, WORK, ignore_errors=True)
    PKI = WORK / "pki"
    (WORK / "home").mkdir()
    subprocess.run(["bash", str(PKI_SCRIPT), str(PKI)], check=True, timeout=60,
                   capture_output=True)
    # AppRole tokens of the shared emulator may use every Transit path (a
    # policy of their own, as a real Vault would need; the default policy
    # grants no Transit path). RealServiceRulesTests checks pgphi's policy.
    wide = WORK / "wide-policy.hcl"
    wide.write_text('path "*" { capabilities = ["create", "read", "update", "delete", "list"] }\n')
    EMU = Emulator(extra=("--vault-policy", f"wide={wide}", "--approle-policies", "wide"))
    unittest.addModuleCleanup(EMU.stop)


class EmulatorTestCase(unittest.TestCase):
    def setUp(self):
        self.addCleanup(close_clients)
        self.addCleanup(EMU.clear_faults)


# --------------------------------------------------------------------------
# AWS KMS through boto3/botocore
# --------------------------------------------------------------------------

class KmsTests(EmulatorTestCase):
    def setUp(self):
        super().setUp()
        self.kms = kms_client(EMU)

    def test_hmac_key_generate_and_verify_mac(self):
        # What pgphi's audit anchors use: an HMAC_256 key, GenerateMac, VerifyMac.
        key = self.kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]
        self.assertEqual((key["KeySpec"], key["KeyUsage"], key["MacAlgorithms"]),
                         ("HMAC_256", "GENERATE_VERIFY_MAC", ["HMAC_SHA_256"]))
        self.assertNotIn("EncryptionAlgorithms", key)
        message = b"pgphi audit anchor v1\n1\n2\n3\nabcd\n"
        made = self.kms.generate_mac(KeyId=key["Arn"], Message=message, MacAlgorithm="HMAC_SHA_256")
        self.assertEqual((made["KeyId"], made["MacAlgorithm"], len(made["Mac"])),
                         (key["Arn"], "HMAC_SHA_256", 32))
        again = self.kms.generate_mac(KeyId=key["KeyId"], Message=message, MacAlgorithm="HMAC_SHA_256")
        self.assertEqual(again["Mac"], made["Mac"], "a MAC is deterministic")
        verified = self.kms.verify_mac(KeyId=key["KeyId"], Message=message, Mac=made["Mac"],
                                       MacAlgorithm="HMAC_SHA_256")
        self.assertTrue(verified["MacValid"])
        with self.assertRaises(botocore.exceptions.ClientError) as caught:
            self.kms.verify_mac(KeyId=key["KeyId"], Message=b"other", Mac=made["Mac"],
                                MacAlgorithm="HMAC_SHA_256")
        self.assertEqual(caught.exception.response["Error"]["Code"], "KMSInvalidMacException")
        for kwargs, code in (
                (dict(KeyId=key["KeyId"], Message=message, MacAlgorithm="HMAC_SHA_512"),
                 "InvalidKeyUsageException"),
                (dict(KeyId=KMS_KEY, Message=message, MacAlgorithm="HMAC_SHA_256"),
                 "InvalidKeyUsageException")):
            with self.assertRaises(botocore.exceptions.ClientError) as caught:
                self.kms.generate_mac(**kwargs)
            self.assertEqual(caught.exception.response["Error"]["Code"], code)
        with self.assertRaises(botocore.exceptions.ClientError) as caught:
            self.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"x")
        self.assertEqual(caught.exception.response["Error"]["Code"], "InvalidKeyUsageException")

    def test_encrypt_decrypt_round_trip(self):
        context = {"table": "patients", "column": "ssn"}
        encrypted = self.kms.encrypt(KeyId=KMS_KEY, Plaintext=b"123-45-6789",
                                     EncryptionContext=context)
        self.assertEqual(encrypted["KeyId"], arn(KMS_KEY))
        self.assertEqual(encrypted["EncryptionAlgorithm"], "SYMMETRIC_DEFAULT")
        self.assertNotIn(b"123-45-6789", encrypted["CiphertextBlob"])
        # Decrypt needs no KeyId: the blob names its key. Context order does not matter.
        decrypted = self.kms.decrypt(CiphertextBlob=encrypted["CiphertextBlob"],
                                     EncryptionContext=dict(reversed(list(context.items()))))
        self.assertEqual(decrypted["Plaintext"], b"123-45-6789")
        self.assertEqual(decrypted["KeyId"], arn(KMS_KEY))
        by_arn = self.kms.decrypt(CiphertextBlob=encrypted["CiphertextBlob"],
                                  EncryptionContext=context, KeyId=arn(KMS_KEY))
        self.assertEqual(by_arn["Plaintext"], b"123-45-6789")

    def test_wrong_encryption_context_is_invalid_ciphertext(self):
        blob = self.kms.encrypt(KeyId=KMS_KEY, Plaintext=b"secret",
                                EncryptionContext={"row": "1"})["CiphertextBlob"]
        for context in ({"row": "2"}, {}, {"row": "1", "extra": "x"}):
            with self.subTest(context=context):
                with self.assertRaises(botocore.exceptions.ClientError) as caught:
                    self.kms.decrypt(CiphertextBlob=blob, EncryptionContext=context)
                self.assertEqual(error_code(caught.exception), "InvalidCiphertextException")
        tampered = blob[:-1] + bytes([blob[-1] ^ 1])
        with self.assertRaises(self.kms.exceptions.InvalidCiphertextException):
            self.kms.decrypt(CiphertextBlob=tampered, EncryptionContext={"row": "1"})
        with self.assertRaises(self.kms.exceptions.InvalidCiphertextException):
            self.kms.decrypt(CiphertextBlob=b"not a kms blob at all, just some bytes" * 2)

    def test_generate_data_key(self):
        context = {"purpose": "dek"}
        generated = self.kms.generate_data_key(KeyId=KMS_KEY, KeySpec="AES_256",
                                               EncryptionContext=context)
        self.assertEqual(len(generated["Plaintext"]), 32)
        self.assertEqual(generated["KeyId"], arn(KMS_KEY))
        unwrapped = self.kms.decrypt(CiphertextBlob=generated["CiphertextBlob"],
                                     EncryptionContext=context)
        self.assertEqual(unwrapped["Plaintext"], generated["Plaintext"])

        sized = self.kms.generate_data_key(KeyId=KMS_KEY, NumberOfBytes=64)
        self.assertEqual(len(sized["Plaintext"]), 64)

        without = self.kms.generate_data_key_without_plaintext(KeyId=KMS_KEY, KeySpec="AES_128")
        self.assertNotIn("Plaintext", without)
        self.assertEqual(len(self.kms.decrypt(CiphertextBlob=without["CiphertextBlob"])
                             ["Plaintext"]), 16)
        with self.assertRaises(botocore.exceptions.ClientError) as caught:
            self.kms.generate_data_key(KeyId=KMS_KEY, KeySpec="AES_256", NumberOfBytes=32)
        self.assertEqual(error_code(caught.exception), "ValidationException")

    def test_re_encrypt_to_other_key_and_context(self):
        blob = self.kms.encrypt(KeyId=KMS_KEY, Plaintext=b"dek bytes",
                                EncryptionContext={"v": "1"})["CiphertextBlob"]
        moved = self.kms.re_encrypt(CiphertextBlob=blob, SourceEncryptionContext={"v": "1"},
                                    DestinationKeyId=KMS_KEY_2,
                                    DestinationEncryptionContext={"v": "2"})
        self.assertEqual(moved["SourceKeyId"], arn(KMS_KEY))
        self.assertEqual(moved["KeyId"], arn(KMS_KEY_2))
        plain = self.kms.decrypt(CiphertextBlob=moved["CiphertextBlob"],
                                 EncryptionContext={"v": "2"})
        self.assertEqual(plain["Plaintext"], b"dek bytes")
        self.assertEqual(plain["KeyId"], arn(KMS_KEY_2))
        with self.assertRaises(self.kms.exceptions.InvalidCiphertextException):
            self.kms.re_encrypt(CiphertextBlob=blob, SourceEncryptionContext={"v": "x"},
                                DestinationKeyId=KMS_KEY_2)

    def test_describe_key_by_id_arn_and_alias(self):
        alias = "alias/" + unique("pgphi")
        self.kms.create_alias(AliasName=alias, TargetKeyId=KMS_KEY)
        for key_ref in (KMS_KEY, arn(KMS_KEY), alias, f"arn:aws:kms:{REGION}:{ACCOUNT}:{alias}"):
            with self.subTest(key_ref=key_ref):
                metadata = self.kms.describe_key(KeyId=key_ref)["KeyMetadata"]
                self.assertEqual(metadata["KeyId"], KMS_KEY)
                self.assertEqual(metadata["Arn"], arn(KMS_KEY))
                self.assertTrue(metadata["Enabled"])
                self.assertEqual(metadata["KeyState"], "Enabled")
                self.assertEqual(metadata["KeyUsage"], "ENCRYPT_DECRYPT")
                self.assertEqual(metadata["KeySpec"], "SYMMETRIC_DEFAULT")
                self.assertIsInstance(metadata["CreationDate"], datetime.datetime)
                self.assertIn("Description", metadata)
        blob = self.kms.encrypt(KeyId=alias, Plaintext=b"via alias")["CiphertextBlob"]
        self.assertEqual(self.kms.decrypt(CiphertextBlob=blob)["KeyId"], arn(KMS_KEY))
        aliases = self.kms.list_aliases(KeyId=KMS_KEY)["Aliases"]
        self.assertIn(alias, [a["AliasName"] for a in aliases])
        with self.assertRaises(self.kms.exceptions.AlreadyExistsException):
            self.kms.create_alias(AliasName=alias, TargetKeyId=KMS_KEY_2)

    def test_create_list_and_use_new_key(self):
        created = self.kms.create_key(Description="made by the check")["KeyMetadata"]
        self.assertEqual(created["Description"], "made by the check")
        listed = [k["KeyId"] for k in self.kms.list_keys()["Keys"]]
        self.assertIn(created["KeyId"], listed)
        self.assertIn(KMS_KEY, listed)
        # Pagination, as the paginator drives it.
        paged = [k["KeyId"] for page in self.kms.get_paginator("list_keys").paginate(
            PaginationConfig={"PageSize": 1}) for k in page["Keys"]]
        self.assertEqual(paged, listed)
        blob = self.kms.encrypt(KeyId=created["Arn"], Plaintext=b"x")["CiphertextBlob"]
        self.assertEqual(self.kms.decrypt(CiphertextBlob=blob)["Plaintext"], b"x")

    def test_disabled_key(self):
        key_id = self.kms.create_key()["KeyMetadata"]["KeyId"]
        blob = self.kms.encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]
        self.kms.disable_key(KeyId=key_id)
        metadata = self.kms.describe_key(KeyId=key_id)["KeyMetadata"]
        self.assertFalse(metadata["Enabled"])
        self.assertEqual(metadata["KeyState"], "Disabled")
        for call in (lambda: self.kms.encrypt(KeyId=key_id, Plaintext=b"x"),
                     lambda: self.kms.decrypt(CiphertextBlob=blob),
                     lambda: self.kms.generate_data_key(KeyId=key_id, KeySpec="AES_256")):
            with self.assertRaises(self.kms.exceptions.DisabledException):
                call()
        self.kms.enable_key(KeyId=key_id)
        self.assertEqual(self.kms.decrypt(CiphertextBlob=blob)["Plaintext"], b"x")

    def test_incorrect_and_unknown_keys(self):
        blob = self.kms.encrypt(KeyId=KMS_KEY, Plaintext=b"x")["CiphertextBlob"]
        with self.assertRaises(self.kms.exceptions.IncorrectKeyException):
            self.kms.decrypt(CiphertextBlob=blob, KeyId=KMS_KEY_2)
        for key_ref in (str(uuid.uuid4()), "alias/does-not-exist", "not-a-key-id",
                        f"arn:aws:kms:eu-west-1:{ACCOUNT}:key/{KMS_KEY}"):
            with self.subTest(key_ref=key_ref):
                with self.assertRaises(self.kms.exceptions.NotFoundException):
                    self.kms.describe_key(KeyId=key_ref)

    def test_rotation_keeps_old_ciphertexts_readable(self):
        key_id = self.kms.create_key()["KeyMetadata"]["KeyId"]
        old = self.kms.encrypt(KeyId=key_id, Plaintext=b"before")["CiphertextBlob"]
        rotated = EMU.admin("POST", "/_emulator/kms/rotate", {"key": key_id})
        self.assertEqual(rotated["version"], 2)
        new = self.kms.encrypt(KeyId=key_id, Plaintext=b"after")["CiphertextBlob"]
        self.assertEqual(self.kms.decrypt(CiphertextBlob=old)["Plaintext"], b"before")
        self.assertEqual(self.kms.decrypt(CiphertextBlob=new)["Plaintext"], b"after")
        moved = self.kms.re_encrypt(CiphertextBlob=old, DestinationKeyId=key_id)
        self.assertEqual(moved["SourceKeyId"], moved["KeyId"])
        self.assertNotEqual(moved["CiphertextBlob"], old)
        self.assertEqual(self.kms.decrypt(CiphertextBlob=moved["CiphertextBlob"])["Plaintext"],
                         b"before")

    def test_rotate_on_demand_and_alias_changes(self):
        key_id = self.kms.create_key()["KeyMetadata"]["KeyId"]
        old = self.kms.encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]
        # RotateKeyOnDemand is newer than this botocore, so it is signed and sent raw.
        status, _, body = signed_kms_call(EMU, "RotateKeyOnDemand", {"KeyId": key_id})
        self.assertEqual((status, body["KeyId"]), (200, key_id))
        self.assertEqual(self.kms.decrypt(CiphertextBlob=old)["Plaintext"], b"x")

        alias = "alias/" + unique("moving")
        self.kms.create_alias(AliasName=alias, TargetKeyId=KMS_KEY)
        self.kms.update_alias(AliasName=alias, TargetKeyId=key_id)
        self.assertEqual(self.kms.describe_key(KeyId=alias)["KeyMetadata"]["KeyId"], key_id)
        self.kms.delete_alias(AliasName=alias)
        with self.assertRaises(self.kms.exceptions.NotFoundException):
            self.kms.describe_key(KeyId=alias)

    def test_bad_credentials_are_rejected(self):
        before = EMU.stats()["rejected_signatures"]
        cases = [(dict(secret="wrong-secret"), "InvalidSignatureException"),
                 (dict(akid="AKIA" + secrets.token_hex(8).upper()), "UnrecognizedClientException"),
                 (dict(region="eu-west-1"), "InvalidSignatureException")]
        for kwargs, expected in cases:
            with self.subTest(**kwargs):
                with self.assertRaises(botocore.exceptions.ClientError) as caught:
                    kms_client(EMU, **kwargs).describe_key(KeyId=KMS_KEY)
                self.assertEqual(error_code(caught.exception), expected)
                self.assertEqual(caught.exception.response["ResponseMetadata"]["HTTPStatusCode"],
                                 400)
        self.assertEqual(EMU.stats()["rejected_signatures"], before + len(cases))

    def test_session_token_is_required_and_checked(self):
        with_token = kms_client(EMU, SESSION_AKID, SESSION_SECRET, SESSION_TOKEN)
        self.assertEqual(with_token.describe_key(KeyId=KMS_KEY)["KeyMetadata"]["KeyId"], KMS_KEY)
        for token in (None, SESSION_TOKEN + "x"):
            with self.subTest(token=token and "wrong"):
                with self.assertRaises(botocore.exceptions.ClientError) as caught:
                    kms_client(EMU, SESSION_AKID, SESSION_SECRET, token).describe_key(
                        KeyId=KMS_KEY)
                self.assertEqual(error_code(caught.exception), "UnrecognizedClientException")
        # A long-term key presenting a session token is refused too.
        with self.assertRaises(botocore.exceptions.ClientError) as caught:
            kms_client(EMU, token=SESSION_TOKEN).describe_key(KeyId=KMS_KEY)
        self.assertEqual(error_code(caught.exception), "UnrecognizedClientException")

    def test_stale_signature_is_rejected(self):
        real_datetime = datetime.datetime

        class TwentyMinutesAgo(real_datetime):
            @classmethod
            def utcnow(cls):
                return real_datetime.utcnow() - datetime.timedelta(minutes=20)

        status, _, body = signed_kms_call(EMU, "DescribeKey", {"KeyId": KMS_KEY},
                                          clock=TwentyMinutesAgo)
        self.assertEqual(status, 400)
        self.assertEqual(body["__type"], "InvalidSignatureException")
        self.assertIn("Signature expired", body["message"])
        status, _, body = signed_kms_call(EMU, "DescribeKey", {"KeyId": KMS_KEY})
        self.assertEqual(status, 200)

    def test_error_wire_format(self):
        # Status codes, content type and body shape as real KMS sends them.
        EMU.fault(mode="throttle", target="kms", count=1)
        status, headers, body = signed_kms_call(EMU, "DescribeKey", {"KeyId": KMS_KEY})
        self.assertEqual(status, 400)
        self.assertEqual(headers["Content-Type"], "application/x-amz-json-1.1")
        self.assertEqual(body["__type"], "ThrottlingException")
        self.assertIsInstance(body["message"], str)
        self.assertTrue(headers.get("x-amzn-RequestId"))

        EMU.fault(mode="internal_error", target="kms", count=1)
        status, headers, body = signed_kms_call(EMU, "DescribeKey", {"KeyId": KMS_KEY})
        self.assertEqual((status, body["__type"]), (500, "KMSInternalException"))

        status, _, body = signed_kms_call(EMU, "NoSuchOperation", {})
        self.assertEqual((status, body["__type"]), (400, "UnknownOperationException"))

    def test_throttle_fault_and_client_retry(self):
        EMU.fault(mode="throttle", target="kms", count=1)
        with self.assertRaises(botocore.exceptions.ClientError) as caught:
            self.kms.encrypt(KeyId=KMS_KEY, Plaintext=b"x")
        self.assertEqual(error_code(caught.exception), "ThrottlingException")
        self.kms.encrypt(KeyId=KMS_KEY, Plaintext=b"x")        # count=1: cleared again

        # botocore retries throttling: two throttled attempts, then success.
        EMU.admin("POST", "/_emulator/stats/reset")
        EMU.fault(mode="throttle", target="kms", count=2)
        kms_client(EMU, retries=3).encrypt(KeyId=KMS_KEY, Plaintext=b"x")
        stats = EMU.stats()
        self.assertEqual(stats["kms"]["Encrypt"], 3)
        self.assertEqual(stats["errors"]["kms"]["ThrottlingException"], 2)

    def test_deny_internal_error_and_key_scoped_faults(self):
        EMU.fault(mode="deny", target="kms")
        with self.assertRaises(botocore.exceptions.ClientError) as caught:
            self.kms.describe_key(KeyId=KMS_KEY)
        self.assertEqual(error_code(caught.exception), "AccessDeniedException")
        EMU.fault(mode="internal_error", target="kms")
        with self.assertRaises(botocore.exceptions.ClientError) as caught:
            self.kms.encrypt(KeyId=KMS_KEY, Plaintext=b"x")
        self.assertEqual(error_code(caught.exception), "KMSInternalException")
        self.assertEqual(caught.exception.response["ResponseMetadata"]["HTTPStatusCode"], 500)
        EMU.clear_faults()

        # A fault given by alias hits that key only, however the request names it.
        alias = "alias/" + unique("faulty")
        self.kms.create_alias(AliasName=alias, TargetKeyId=KMS_KEY_2)
        blob = self.kms.encrypt(KeyId=KMS_KEY_2, Plaintext=b"x")["CiphertextBlob"]
        EMU.fault(mode="disable_key", target="kms", key=alias)
        with self.assertRaises(self.kms.exceptions.DisabledException):
            self.kms.encrypt(KeyId=arn(KMS_KEY_2), Plaintext=b"x")
        with self.assertRaises(self.kms.exceptions.DisabledException):
            self.kms.decrypt(CiphertextBlob=blob)
        self.kms.encrypt(KeyId=KMS_KEY, Plaintext=b"other key unaffected")
        self.kms.describe_key(KeyId=KMS_KEY_2)                 # not a cryptographic use

    def test_drop_and_slow_faults(self):
        EMU.fault(mode="drop", target="kms", count=1)
        with self.assertRaises(botocore.exceptions.BotoCoreError):
            self.kms.encrypt(KeyId=KMS_KEY, Plaintext=b"x")
        self.kms.encrypt(KeyId=KMS_KEY, Plaintext=b"x")

        EMU.fault(mode="slow", target="kms", delay_ms=400, count=1)
        started = time.monotonic()
        self.kms.encrypt(KeyId=KMS_KEY, Plaintext=b"x")
        self.assertGreaterEqual(time.monotonic() - started, 0.4)

        EMU.fault(mode="slow", target="kms", delay_ms=2000, count=1)
        impatient = kms_client(EMU, read_timeout=0.5)
        with self.assertRaises(botocore.exceptions.ReadTimeoutError):
            impatient.encrypt(KeyId=KMS_KEY, Plaintext=b"x")

    def test_concurrent_clients(self):
        clients = [kms_client(EMU) for _ in range(6)]
        failures: list[BaseException] = []

        def work(client, worker):
            try:
                for i in range(10):
                    plaintext = f"worker {worker} item {i}".encode()
                    context = {"worker": str(worker)}
                    blob = client.encrypt(KeyId=KMS_KEY, Plaintext=plaintext,
                                          EncryptionContext=context)["CiphertextBlob"]
                    got = client.decrypt(CiphertextBlob=blob, EncryptionContext=context)
                    if got["Plaintext"] != plaintext:
                        raise AssertionError(f"worker {worker}: wrong plaintext")
            except BaseException as exc:       # reported by the main thread
                failures.append(exc)

        threads = [threading.Thread(target=work, args=(c, n)) for n, c in enumerate(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertFalse(any(t.is_alive() for t in threads), "workers did not finish in 60s")
        self.assertEqual(failures, [])


# --------------------------------------------------------------------------
# AWS KMS through the AWS CLI
# --------------------------------------------------------------------------

class AwsCliTests(EmulatorTestCase):
    def cli_json(self, *args: str, **kwargs) -> dict:
        result = run_aws_cli(EMU, *args, **kwargs)
        self.assertEqual(result.returncode, 0, result.stderr)
        return json.loads(result.stdout) if result.stdout.strip() else {}

    def test_cli_encrypt_decrypt_round_trip(self):
        plaintext_file = WORK / unique("plain")
        plaintext_file.write_bytes(b"clinical note")
        encrypted = self.cli_json("encrypt", "--key-id", KMS_KEY,
                                  "--plaintext", f"fileb://{plaintext_file}",
                                  "--encryption-context", "patient=42")
        self.assertEqual(encrypted["KeyId"], arn(KMS_KEY))
        blob_file = WORK / unique("blob")
        blob_file.write_bytes(base64.b64decode(encrypted["CiphertextBlob"]))
        decrypted = self.cli_json("decrypt", "--ciphertext-blob", f"fileb://{blob_file}",
                                  "--encryption-context", "patient=42")
        self.assertEqual(base64.b64decode(decrypted["Plaintext"]), b"clinical note")

        wrong = run_aws_cli(EMU, "decrypt", "--ciphertext-blob", f"fileb://{blob_file}",
                            "--encryption-context", "patient=43")
        self.assertNotEqual(wrong.returncode, 0)
        self.assertIn("InvalidCiphertextException", wrong.stderr)

    def test_cli_generate_data_key_and_describe_key(self):
        generated = self.cli_json("generate-data-key", "--key-id", KMS_KEY,
                                  "--key-spec", "AES_256")
        data_key = base64.b64decode(generated["Plaintext"])
        self.assertEqual(len(data_key), 32)
        unwrapped = kms_client(EMU).decrypt(
            CiphertextBlob=base64.b64decode(generated["CiphertextBlob"]))
        self.assertEqual(unwrapped["Plaintext"], data_key)
        described = self.cli_json("describe-key", "--key-id", arn(KMS_KEY_2),
                                  akid=SESSION_AKID, secret=SESSION_SECRET, token=SESSION_TOKEN)
        self.assertEqual(described["KeyMetadata"]["KeyId"], KMS_KEY_2)
        self.assertEqual(described["KeyMetadata"]["KeyState"], "Enabled")

    def test_cli_rejected_credentials(self):
        wrong_secret = run_aws_cli(EMU, "describe-key", "--key-id", KMS_KEY, secret="nope")
        self.assertNotEqual(wrong_secret.returncode, 0)
        self.assertIn("InvalidSignatureException", wrong_secret.stderr)
        no_token = run_aws_cli(EMU, "describe-key", "--key-id", KMS_KEY,
                               akid=SESSION_AKID, secret=SESSION_SECRET)
        self.assertNotEqual(no_token.returncode, 0)
        self.assertIn("UnrecognizedClientException", no_token.stderr)


@unittest.skipUnless(os.access(CURL, os.X_OK), "curl is not installed")
class CurlSigV4Tests(EmulatorTestCase):
    """libcurl's own SigV4 signer (curl --aws-sigv4), as a C or C++ client may use it."""

    def curl_kms(self, operation: str, params: dict, user: str = f"{AKID}:{SECRET}",
                 *headers: str) -> tuple[int, dict]:
        command = [CURL, "-sS", "--max-time", "10", "--noproxy", "*",
                   "--cacert", pki("ca.pem"), "--aws-sigv4", f"aws:amz:{REGION}:kms",
                   "--user", user, "-H", "Content-Type: application/x-amz-json-1.1",
                   "-H", f"X-Amz-Target: TrentService.{operation}"]
        for header in headers:
            command += ["-H", header]
        command += ["--data-binary", json.dumps(params), "-w", "\n%{http_code}",
                    EMU.url + "/"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=30,
                                stdin=subprocess.DEVNULL)
        self.assertEqual(result.returncode, 0, result.stderr)
        body, _, status = result.stdout.rpartition("\n")
        return int(status), json.loads(body)

    def test_curl_signed_requests(self):
        status, generated = self.curl_kms("GenerateDataKey",
                                          {"KeyId": KMS_KEY, "KeySpec": "AES_256",
                                           "EncryptionContext": {"via": "curl"}})
        self.assertEqual(status, 200, generated)
        unwrapped = kms_client(EMU).decrypt(
            CiphertextBlob=base64.b64decode(generated["CiphertextBlob"]),
            EncryptionContext={"via": "curl"})
        self.assertEqual(unwrapped["Plaintext"], base64.b64decode(generated["Plaintext"]))

        status, body = self.curl_kms("DescribeKey", {"KeyId": KMS_KEY},
                                     f"{SESSION_AKID}:{SESSION_SECRET}",
                                     f"X-Amz-Security-Token: {SESSION_TOKEN}")
        self.assertEqual((status, body["KeyMetadata"]["KeyId"]), (200, KMS_KEY))

        status, body = self.curl_kms("DescribeKey", {"KeyId": KMS_KEY}, f"{AKID}:wrong")
        self.assertEqual((status, body["__type"]), (400, "InvalidSignatureException"))


# --------------------------------------------------------------------------
# Vault through hvac
# --------------------------------------------------------------------------

class VaultTests(EmulatorTestCase):
    def setUp(self):
        super().setUp()
        self.vault = vault_client(EMU, token=EMU.root_token)
        self.transit = self.vault.secrets.transit

    def approle_login(self, namespace: str | None = None) -> hvac.Client:
        client = vault_client(EMU, namespace=namespace)
        client.auth.approle.login(role_id=ROLE_ID, secret_id=SECRET_ID)
        return client

    def test_transit_hmac_and_verify(self):
        # What pgphi's audit anchors use: hmac/<key>/sha2-256, verify/<key>/sha2-256.
        name = unique("anchor")
        self.transit.create_key(name)
        message = base64.b64encode(b"pgphi audit anchor v1\n1\n2\n3\nabcd\n").decode()
        made = self.transit.generate_hmac(name, message, algorithm="sha2-256")["data"]["hmac"]
        self.assertRegex(made, r"^vault:v1:[A-Za-z0-9+/]+={0,2}$")
        self.assertEqual(self.transit.generate_hmac(name, message, algorithm="sha2-256")["data"]["hmac"],
                         made, "an HMAC is deterministic")
        self.assertTrue(self.transit.verify_signed_data(name, message, hmac=made,
                                                        hash_algorithm="sha2-256")["data"]["valid"])
        other = base64.b64encode(b"another message").decode()
        self.assertFalse(self.transit.verify_signed_data(name, other, hmac=made,
                                                         hash_algorithm="sha2-256")["data"]["valid"])
        self.transit.rotate_key(name)
        self.assertTrue(self.transit.verify_signed_data(name, message, hmac=made,
                                                        hash_algorithm="sha2-256")["data"]["valid"],
                        "an HMAC of an older version still verifies")
        self.assertTrue(self.transit.generate_hmac(name, message)["data"]["hmac"].startswith("vault:v2:"))
        for bad in ("local:v1:abcd", "vault:vX:abcd", "vault:v9:abcd"):
            with self.assertRaises(hvac.exceptions.InvalidRequest):
                self.transit.verify_signed_data(name, message, hmac=bad)
        with self.assertRaises(hvac.exceptions.InvalidRequest):
            self.vault.adapter.post(f"/v1/transit/hmac/{name}", json={"input": "not base64!"})

    def test_transit_round_trip(self):
        name = unique("kek")
        self.transit.create_key(name)
        plaintext = base64.b64encode(b"data key bytes").decode()
        encrypted = self.transit.encrypt_data(name, plaintext)
        for field in ("request_id", "lease_id", "renewable", "lease_duration", "data",
                      "wrap_info", "warnings", "auth"):
            self.assertIn(field, encrypted)
        self.assertTrue(encrypted["data"]["ciphertext"].startswith("vault:v1:"))
        self.assertEqual(encrypted["data"]["key_version"], 1)
        decrypted = self.transit.decrypt_data(name, encrypted["data"]["ciphertext"])
        self.assertEqual(decrypted["data"]["plaintext"], plaintext)

        key = self.transit.read_key(name)["data"]
        self.assertEqual(key["name"], name)
        self.assertEqual(key["type"], "aes256-gcm96")
        self.assertEqual(key["latest_version"], 1)
        self.assertEqual(key["min_decryption_version"], 1)
        self.assertEqual(list(key["keys"]), ["1"])
        self.assertFalse(key["derived"])
        self.assertFalse(key["exportable"])
        self.assertTrue(key["supports_encryption"])
        self.assertIn(name, self.transit.list_keys()["data"]["keys"])
        self.assertEqual(self.transit.read_key("precreated")["data"]["latest_version"], 1)

    def test_associated_data_and_ciphertexts_are_bound(self):
        name = unique("aad")
        self.transit.create_key(name)
        path = f"/v1/transit/encrypt/{name}"
        aad = base64.b64encode(b"row 7").decode()
        ciphertext = self.vault.adapter.post(path, json={
            "plaintext": base64.b64encode(b"x").decode(), "associated_data": aad,
        })["data"]["ciphertext"]
        decrypted = self.vault.adapter.post(f"/v1/transit/decrypt/{name}", json={
            "ciphertext": ciphertext, "associated_data": aad})
        self.assertEqual(decrypted["data"]["plaintext"], base64.b64encode(b"x").decode())
        with self.assertRaises(hvac.exceptions.InvalidRequest) as caught:
            self.vault.adapter.post(f"/v1/transit/decrypt/{name}", json={
                "ciphertext": ciphertext,
                "associated_data": base64.b64encode(b"row 8").decode()})
        self.assertIn("message authentication failed", str(caught.exception))
        # Vault's rewrap takes no associated data, so it cannot rewrap this
        # ciphertext: pgphi decrypts and encrypts instead.
        with self.assertRaises(hvac.exceptions.InvalidRequest) as caught:
            self.vault.adapter.post(f"/v1/transit/rewrap/{name}", json={
                "ciphertext": ciphertext, "associated_data": aad})
        self.assertIn("message authentication failed", str(caught.exception))
        # A ciphertext of one key does not decrypt under another.
        other = unique("other")
        self.transit.create_key(other)
        with self.assertRaises(hvac.exceptions.InvalidRequest):
            self.transit.decrypt_data(other, self.transit.encrypt_data(
                name, "eA==")["data"]["ciphertext"])

    def test_rotate_rewrap_and_min_decryption_version(self):
        name = unique("rot")
        self.transit.create_key(name)
        v1 = self.transit.encrypt_data(name, "djE=")["data"]["ciphertext"]
        rotated = self.transit.rotate_key(name)
        self.assertEqual(rotated["data"]["latest_version"], 2)
        key = self.transit.read_key(name)["data"]
        self.assertEqual(key["latest_version"], 2)
        self.assertEqual(sorted(key["keys"]), ["1", "2"])

        v2 = self.transit.encrypt_data(name, "djI=")["data"]["ciphertext"]
        self.assertTrue(v2.startswith("vault:v2:"))
        rewrapped = self.transit.rewrap_data(name, v1)["data"]
        self.assertTrue(rewrapped["ciphertext"].startswith("vault:v2:"))
        self.assertEqual(rewrapped["key_version"], 2)
        self.assertEqual(self.transit.decrypt_data(name, rewrapped["ciphertext"])
                         ["data"]["plaintext"], "djE=")
        self.assertEqual(self.transit.decrypt_data(name, v1)["data"]["plaintext"], "djE=")

        self.transit.update_key_configuration(name, min_decryption_version=2)
        self.assertEqual(self.transit.read_key(name)["data"]["min_decryption_version"], 2)
        with self.assertRaises(hvac.exceptions.InvalidRequest) as caught:
            self.transit.decrypt_data(name, v1)
        self.assertIn("too old", str(caught.exception))
        self.assertEqual(self.transit.decrypt_data(name, v2)["data"]["plaintext"], "djI=")

    def test_datakey_wrapped_and_plaintext(self):
        name = unique("dk")
        self.transit.create_key(name)
        wrapped = self.transit.generate_data_key(name, key_type="wrapped")["data"]
        self.assertNotIn("plaintext", wrapped)
        self.assertTrue(wrapped["ciphertext"].startswith("vault:v1:"))
        self.assertEqual(wrapped["key_version"], 1)
        unwrapped = self.transit.decrypt_data(name, wrapped["ciphertext"])["data"]["plaintext"]
        self.assertEqual(len(base64.b64decode(unwrapped)), 32)

        plain = self.transit.generate_data_key(name, key_type="plaintext", bits=512)["data"]
        self.assertEqual(len(base64.b64decode(plain["plaintext"])), 64)
        self.assertEqual(self.transit.decrypt_data(name, plain["ciphertext"])
                         ["data"]["plaintext"], plain["plaintext"])
        with self.assertRaises(hvac.exceptions.InvalidRequest):      # hvac checks bits itself
            self.vault.adapter.post(f"/v1/transit/datakey/wrapped/{name}", json={"bits": 100})

    def test_derived_keys_and_deletion(self):
        name = unique("derived")
        self.transit.create_key(name, derived=True)
        self.assertTrue(self.transit.read_key(name)["data"]["derived"])
        with self.assertRaises(hvac.exceptions.InvalidRequest):
            self.transit.encrypt_data(name, "eA==")                  # context is required
        context = base64.b64encode(b"tenant 1").decode()
        ciphertext = self.transit.encrypt_data(name, "eA==", context=context)["data"]["ciphertext"]
        self.assertEqual(self.transit.decrypt_data(name, ciphertext, context=context)
                         ["data"]["plaintext"], "eA==")
        with self.assertRaises(hvac.exceptions.InvalidRequest):
            self.transit.decrypt_data(name, ciphertext,
                                      context=base64.b64encode(b"tenant 2").decode())

        with self.assertRaises(hvac.exceptions.InvalidRequest):
            self.transit.delete_key(name)                            # deletion_allowed unset
        self.transit.update_key_configuration(name, deletion_allowed=True)
        self.transit.delete_key(name)
        with self.assertRaises(hvac.exceptions.InvalidPath):
            self.transit.read_key(name)

    def test_errors(self):
        with self.assertRaises(hvac.exceptions.InvalidRequest) as caught:
            self.transit.decrypt_data("precreated", "not-a-vault-ciphertext")
        self.assertIn("invalid ciphertext", str(caught.exception))
        with self.assertRaises(hvac.exceptions.InvalidRequest):
            self.transit.decrypt_data("precreated", "vault:v9:AAAA")   # version too new
        with self.assertRaises(hvac.exceptions.InvalidRequest) as caught:
            self.transit.decrypt_data(unique("missing"), "vault:v1:AAAA")
        self.assertIn("encryption key not found", str(caught.exception))
        with self.assertRaises(hvac.exceptions.InvalidPath):
            self.transit.read_key(unique("missing"))
        with self.assertRaises(hvac.exceptions.InvalidPath):
            self.vault.adapter.get("/v1/no-such-engine/whatever")
        with self.assertRaises(hvac.exceptions.InvalidRequest):
            self.transit.delete_key("precreated")                   # deletion not allowed

    def test_error_wire_format(self):
        status, headers, body = raw_vault_call(EMU, "GET", "/v1/auth/token/lookup-self",
                                               token="hvs.unknown")
        self.assertEqual(status, 403)
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertEqual(body, {"errors": ["permission denied"]})
        status, _, body = raw_vault_call(EMU, "GET", "/v1/sys/health")
        self.assertEqual(status, 200)
        self.assertEqual((body["initialized"], body["sealed"]), (True, False))
        health = vault_client(EMU).sys.read_health_status()          # hvac uses HEAD
        self.assertEqual(health.status_code, 200)

    def test_approle_login_renew_and_lookup(self):
        client = vault_client(EMU)
        login = client.auth.approle.login(role_id=ROLE_ID, secret_id=SECRET_ID)
        auth = login["auth"]
        self.assertTrue(auth["client_token"])
        self.assertTrue(auth["accessor"])
        self.assertTrue(auth["renewable"])
        self.assertEqual(auth["lease_duration"], APPROLE_TTL)
        self.assertIn("default", auth["policies"])
        self.assertTrue(client.is_authenticated())
        self.assertTrue(client.secrets.transit.encrypt_data("precreated", "eA==")["data"]
                        ["ciphertext"].startswith("vault:v"))

        looked_up = client.auth.token.lookup_self()["data"]
        self.assertEqual(looked_up["creation_ttl"], APPROLE_TTL)
        self.assertTrue(0 < looked_up["ttl"] <= APPROLE_TTL)
        self.assertTrue(looked_up["renewable"])

        renewed = client.auth.token.renew_self(increment=2)
        self.assertEqual(renewed["auth"]["client_token"], auth["client_token"])
        self.assertTrue(0 < renewed["auth"]["lease_duration"] <= 2)
        capped = client.auth.token.renew_self(increment="1h")
        self.assertLessEqual(capped["auth"]["lease_duration"], APPROLE_MAX_TTL)
        self.assertTrue(capped["warnings"])

        with self.assertRaises(hvac.exceptions.InvalidRequest):
            vault_client(EMU).auth.approle.login(role_id=ROLE_ID, secret_id="wrong")

    def test_token_expiry_and_unknown_tokens(self):
        client = self.approle_login()
        client.secrets.transit.read_key("precreated")
        time.sleep(APPROLE_TTL + 0.5)
        with self.assertRaises(hvac.exceptions.Forbidden):
            client.secrets.transit.read_key("precreated")
        self.assertFalse(client.is_authenticated())
        with self.assertRaises(hvac.exceptions.Forbidden):
            vault_client(EMU, token="hvs.made-up").secrets.transit.read_key("precreated")
        with self.assertRaises(hvac.exceptions.Forbidden):
            vault_client(EMU).secrets.transit.read_key("precreated")   # no token at all
        # "Authorization: Bearer" is accepted like X-Vault-Token.
        with requests.Session() as session:
            bearer = session.get(f"{EMU.url}/v1/transit/keys/precreated", timeout=10,
                                 verify=pki("ca.pem"),
                                 headers={"Authorization": f"Bearer {EMU.root_token}"})
        self.assertEqual(bearer.status_code, 200)

    def test_expire_tokens_fault(self):
        client = self.approle_login()
        client.secrets.transit.read_key("precreated")
        EMU.fault(mode="expire_tokens", target="vault")
        with self.assertRaises(hvac.exceptions.Forbidden):
            client.secrets.transit.read_key("precreated")
        self.transit.read_key("precreated")            # the root token survives
        self.approle_login().secrets.transit.read_key("precreated")   # and new logins work

    def test_namespaces(self):
        ns1 = vault_client(EMU, token=EMU.root_token, namespace="ns1")
        name = unique("nskey")
        ns1.secrets.transit.create_key(name)
        self.assertEqual(ns1.secrets.transit.read_key(name)["data"]["name"], name)
        with self.assertRaises(hvac.exceptions.InvalidPath):
            self.transit.read_key(name)                 # root namespace does not see it
        with self.assertRaises(hvac.exceptions.InvalidPath):
            vault_client(EMU, token=EMU.root_token, namespace="ns2").secrets.transit.read_key(
                name)
        self.assertEqual(ns1.secrets.transit.read_key("in-ns1")["data"]["name"], "in-ns1")
        with self.assertRaises(hvac.exceptions.InvalidPath):
            self.transit.read_key("in-ns1")
        # The namespace may also lead the path, as Vault Enterprise allows.
        self.assertEqual(self.vault.adapter.get(f"/v1/ns1/transit/keys/{name}")
                         ["data"]["name"], name)
        # Same key name, different namespace: a different key.
        ciphertext = ns1.secrets.transit.encrypt_data(name, "eA==")["data"]["ciphertext"]
        self.transit.create_key(name)
        with self.assertRaises(hvac.exceptions.InvalidRequest):
            self.transit.decrypt_data(name, ciphertext)

        # A token from a login in ns1 works there and below, nowhere else.
        token = self.approle_login(namespace="ns1").token
        vault_client(EMU, token=token, namespace="ns1").secrets.transit.read_key(name)
        with self.assertRaises(hvac.exceptions.InvalidPath):       # authorised, key absent
            vault_client(EMU, token=token, namespace="ns1/child").secrets.transit.read_key(name)
        for namespace in (None, "ns2"):
            with self.subTest(namespace=namespace):
                with self.assertRaises(hvac.exceptions.Forbidden):
                    vault_client(EMU, token=token, namespace=namespace).secrets.transit \
                        .read_key("precreated")
        self.assertGreater(EMU.stats()["vault_namespaces"].get("ns1", 0), 0)

    def test_faults(self):
        name, other = unique("f"), unique("g")
        self.transit.create_key(name)
        self.transit.create_key(other)
        expectations = [("throttle", hvac.exceptions.RateLimitExceeded),
                        ("internal_error", hvac.exceptions.InternalServerError),
                        ("deny", hvac.exceptions.Forbidden)]
        for mode, exception in expectations:
            with self.subTest(mode=mode):
                EMU.fault(mode=mode, target="vault", count=1)
                with self.assertRaises(exception):
                    self.transit.encrypt_data(name, "eA==")
                self.transit.encrypt_data(name, "eA==")   # count=1: cleared again

        EMU.fault(mode="deny", target="vault", key=name)
        with self.assertRaises(hvac.exceptions.Forbidden):
            self.transit.encrypt_data(name, "eA==")
        self.transit.encrypt_data(other, "eA==")

        EMU.fault(mode="drop", target="vault", count=1)
        with self.assertRaises(requests.exceptions.ConnectionError):
            self.transit.encrypt_data(name + "x", "eA==")
        # KMS faults do not touch Vault.
        EMU.fault(mode="deny", target="kms")
        self.transit.encrypt_data(other, "eA==")


# --------------------------------------------------------------------------
# What the real services refuse: IAM and Vault policies, aliases, key states,
# multi-Region keys, batch_input, and a Vault cluster's HA and degraded answers
# --------------------------------------------------------------------------

class RealServiceRulesTests(unittest.TestCase):
    """An emulator where one AWS credential carries the documented IAM policy and one
    Vault token the documented Vault policy, and X-Vault-Request is required (as behind
    a Vault Agent or Proxy listener)."""

    @classmethod
    def setUpClass(cls):
        cls.emu = Emulator(extra=(
            "--aws-credential", f"{POLICY_AKID}:{POLICY_SECRET}",
            "--aws-policy", f"{POLICY_AKID}={KMS_POLICY}",
            "--vault-policy", f"pgphi={VAULT_POLICY}", "--vault-key", "pgphi-kek",
            "--vault-token", f"{POLICY_TOKEN}=pgphi", "--approle-policies", "pgphi",
            "--require-request-header"))
        cls.addClassCleanup(cls.emu.stop)

    def setUp(self):
        self.addCleanup(close_clients)
        self.addCleanup(self.emu.clear_faults)
        self.admin_kms = kms_client(self.emu)
        self.pgphi_kms = kms_client(self.emu, POLICY_AKID, POLICY_SECRET)

    def test_docs_page_prints_the_policies_verbatim(self):
        page = DOCS_PAGE.read_text()
        for policy in (KMS_POLICY, VAULT_POLICY):
            self.assertIn(policy.read_text().strip(), page, policy.name)

    def test_iam_policy_allows_what_pgphi_calls_and_nothing_else(self):
        context = {"pgphi:key": "k"}
        generated = self.pgphi_kms.generate_data_key_without_plaintext(
            KeyId=KMS_KEY, KeySpec="AES_256", EncryptionContext=context)
        blob = generated["CiphertextBlob"]
        self.pgphi_kms.decrypt(CiphertextBlob=blob, KeyId=arn(KMS_KEY), EncryptionContext=context)
        self.pgphi_kms.re_encrypt(CiphertextBlob=blob, SourceKeyId=arn(KMS_KEY),
                                  SourceEncryptionContext=context,
                                  DestinationKeyId=KMS_KEY_2, DestinationEncryptionContext=context)
        self.pgphi_kms.describe_key(KeyId=KMS_KEY)
        # pgphi.rekey into KMS from another key manager.
        self.pgphi_kms.encrypt(KeyId=KMS_KEY, Plaintext=b"x" * 32, EncryptionContext=context)
        # A dedicated KEK: created, then scheduled for deletion.
        dedicated = self.pgphi_kms.create_key(Description="pgphi: the dedicated KEK of pgphi key k")
        self.pgphi_kms.schedule_key_deletion(KeyId=dedicated["KeyMetadata"]["Arn"], PendingWindowInDays=7)
        # kms:GenerateDataKey is another permission than kms:GenerateDataKeyWithoutPlaintext.
        for call in (lambda: self.pgphi_kms.generate_data_key(KeyId=KMS_KEY, KeySpec="AES_256"),
                     lambda: self.pgphi_kms.cancel_key_deletion(KeyId=dedicated["KeyMetadata"]["Arn"]),
                     lambda: self.pgphi_kms.create_alias(AliasName="alias/pgphi-x", TargetKeyId=KMS_KEY),
                     lambda: self.pgphi_kms.disable_key(KeyId=KMS_KEY)):
            with self.assertRaises(botocore.exceptions.ClientError) as caught:
                call()
            self.assertEqual(error_code(caught.exception), "AccessDeniedException")
            self.assertIn("is not authorized to perform: kms:", str(caught.exception))
        # The AWS CLI and curl --aws-sigv4 meet the same policy.
        cli = run_aws_cli(self.emu, "generate-data-key", "--key-id", KMS_KEY, "--key-spec", "AES_256",
                          akid=POLICY_AKID, secret=POLICY_SECRET)
        self.assertNotEqual(cli.returncode, 0)
        self.assertIn("AccessDeniedException", cli.stderr)
        cli = run_aws_cli(self.emu, "describe-key", "--key-id", KMS_KEY,
                          akid=POLICY_AKID, secret=POLICY_SECRET)
        self.assertEqual(cli.returncode, 0, cli.stderr)
        for operation, expected in (("DescribeKey", 200), ("GenerateDataKey", 400)):
            result = subprocess.run(
                [CURL, "-sS", "--max-time", "10", "--noproxy", "*", "--cacert", pki("ca.pem"),
                 "--aws-sigv4", f"aws:amz:{REGION}:kms", "--user", f"{POLICY_AKID}:{POLICY_SECRET}",
                 "-H", "Content-Type: application/x-amz-json-1.1",
                 "-H", f"X-Amz-Target: TrentService.{operation}",
                 "--data-binary", json.dumps({"KeyId": KMS_KEY, "KeySpec": "AES_256"}),
                 "-w", "\n%{http_code}", self.emu.url + "/"],
                capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
            self.assertEqual(int(result.stdout.rpartition("\n")[2]), expected, result.stdout)

    def test_re_encrypt_needs_from_on_the_source_and_to_on_the_destination(self):
        policy = WORK / unique("policy")
        policy.write_text(json.dumps({"Statement": [
            {"Effect": "Allow", "Action": ["kms:ReEncryptFrom"], "Resource": arn(KMS_KEY)},
            {"Effect": "Allow", "Action": ["kms:ReEncrypt*", "kms:Encrypt"], "Resource": arn(KMS_KEY_2)},
            {"Effect": "Deny", "Action": "kms:Encrypt", "Resource": "*"}]}))
        akid, secret = "AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
        emu = Emulator(extra=("--aws-credential", f"{akid}:{secret}", "--aws-policy", f"{akid}={policy}"))
        self.addCleanup(emu.stop)
        blob = kms_client(emu).encrypt(KeyId=KMS_KEY, Plaintext=b"x")["CiphertextBlob"]
        limited = kms_client(emu, akid, secret)
        limited.re_encrypt(CiphertextBlob=blob, DestinationKeyId=KMS_KEY_2)
        with self.assertRaises(botocore.exceptions.ClientError) as caught:
            limited.re_encrypt(CiphertextBlob=blob, DestinationKeyId=KMS_KEY)   # no ReEncryptTo
        self.assertIn("kms:ReEncryptTo", str(caught.exception))
        with self.assertRaises(botocore.exceptions.ClientError) as caught:
            limited.encrypt(KeyId=KMS_KEY_2, Plaintext=b"x")                  # Deny wins
        self.assertEqual(error_code(caught.exception), "AccessDeniedException")

    def test_policy_the_emulator_cannot_evaluate_is_refused(self):
        policy = WORK / unique("policy")
        policy.write_text(json.dumps({"Statement": [{"Effect": "Allow", "Action": "kms:*",
                                                     "Resource": "*", "Condition": {}}]}))
        with self.assertRaises(RuntimeError):
            Emulator(extra=("--aws-credential", "AKIAX:y", "--aws-policy", f"AKIAX={policy}"))

    def test_alias_retargeting(self):
        key_1 = self.admin_kms.create_key()["KeyMetadata"]["Arn"]
        key_2 = self.admin_kms.create_key()["KeyMetadata"]["Arn"]
        alias = "alias/" + unique("retarget")
        self.admin_kms.create_alias(AliasName=alias, TargetKeyId=key_1)
        wrapped = self.pgphi_kms.generate_data_key_without_plaintext(KeyId=alias, KeySpec="AES_256")
        self.assertEqual(wrapped["KeyId"], key_1)
        self.admin_kms.update_alias(AliasName=alias, TargetKeyId=key_2)
        with self.assertRaises(botocore.exceptions.ClientError) as caught:
            self.pgphi_kms.decrypt(CiphertextBlob=wrapped["CiphertextBlob"], KeyId=alias)
        self.assertEqual(error_code(caught.exception), "IncorrectKeyException")
        self.pgphi_kms.decrypt(CiphertextBlob=wrapped["CiphertextBlob"], KeyId=key_1)
        moved = self.pgphi_kms.re_encrypt(CiphertextBlob=wrapped["CiphertextBlob"],
                                          SourceKeyId=key_1, DestinationKeyId=alias)
        self.assertEqual((moved["SourceKeyId"], moved["KeyId"]), (key_1, key_2))

    def test_multi_region_keys(self):
        key = self.admin_kms.create_key(MultiRegion=True)["KeyMetadata"]
        self.assertRegex(key["KeyId"], r"^mrk-[0-9a-f]{32}$")
        self.assertTrue(key["MultiRegion"])
        blob = self.admin_kms.encrypt(KeyId=key["Arn"], Plaintext=b"mrk")["CiphertextBlob"]
        self.assertEqual(self.admin_kms.decrypt(CiphertextBlob=blob, KeyId=key["KeyId"])["Plaintext"], b"mrk")

    def test_pending_deletion(self):
        key = self.admin_kms.create_key()["KeyMetadata"]["Arn"]
        blob = self.admin_kms.encrypt(KeyId=key, Plaintext=b"x")["CiphertextBlob"]
        self.admin_kms.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
        self.assertEqual(self.admin_kms.describe_key(KeyId=key)["KeyMetadata"]["KeyState"], "PendingDeletion")
        with self.assertRaises(botocore.exceptions.ClientError) as caught:
            self.admin_kms.decrypt(CiphertextBlob=blob)
        self.assertEqual(error_code(caught.exception), "KMSInvalidStateException")
        self.assertIn("pending deletion", str(caught.exception))
        self.admin_kms.cancel_key_deletion(KeyId=key)
        self.assertEqual(self.admin_kms.describe_key(KeyId=key)["KeyMetadata"]["KeyState"], "Disabled")

    def vault(self, token: str = POLICY_TOKEN, **kwargs) -> hvac.Client:
        return vault_client(self.emu, token=token, **kwargs)

    def test_vault_policy_allows_what_pgphi_calls_and_nothing_else(self):
        vault = self.vault()
        transit = vault.secrets.transit
        # (hvac 1.0 has no associated_data argument: the raw API, as pgphi sends it)
        binding = base64.b64encode(b"pgphi DEK key_id=1 version=1").decode()
        wrapped = vault.adapter.post("/v1/transit/encrypt/pgphi-kek", json={
            "plaintext": "eA==", "associated_data": binding})["data"]["ciphertext"]
        vault.adapter.post("/v1/transit/decrypt/pgphi-kek", json={
            "ciphertext": wrapped, "associated_data": binding})
        transit.read_key("pgphi-kek")
        vault.auth.token.lookup_self()                 # the default policy
        # pgphi uses neither datakey nor rewrap: they take no associated data.
        for call in (lambda: transit.generate_data_key("pgphi-kek", "wrapped"),
                     lambda: transit.generate_data_key("pgphi-kek", "plaintext"),
                     lambda: transit.rewrap_data("pgphi-kek", wrapped),
                     lambda: transit.rotate_key("pgphi-kek"),
                     lambda: transit.decrypt_data("precreated", wrapped)):
            with self.assertRaises(hvac.exceptions.Forbidden):
                call()
        client = vault_client(self.emu)
        client.auth.approle.login(role_id=ROLE_ID, secret_id=SECRET_ID)
        client.adapter.post("/v1/transit/decrypt/pgphi-kek", json={   # AppRole tokens: the same policy
            "ciphertext": wrapped, "associated_data": binding})

    def test_request_header_is_required(self):
        with self.assertRaises(hvac.exceptions.VaultError) as caught:
            self.vault(request_header=False).secrets.transit.read_key("pgphi-kek")
        self.assertIsInstance(caught.exception, hvac.exceptions.UnexpectedError)   # 412
        self.assertIn("X-Vault-Request", str(caught.exception))

    def test_batch_input(self):
        transit = vault_client(self.emu, token=self.emu.root_token).secrets.transit
        encrypted = transit.encrypt_data("pgphi-kek", None, batch_input=[
            {"plaintext": "YQ==", "reference": "a"}, {"plaintext": "Yg==", "reference": "b"}])
        results = encrypted["data"]["batch_results"]
        self.assertEqual([r["reference"] for r in results], ["a", "b"])
        decrypted = transit.decrypt_data("pgphi-kek", None, batch_input=[
            {"ciphertext": r["ciphertext"]} for r in results])
        self.assertEqual([r["plaintext"] for r in decrypted["data"]["batch_results"]], ["YQ==", "Yg=="])

    def test_ha_and_degraded_answers(self):
        transit = self.vault().secrets.transit
        # A standby redirects (307) to the active node; hvac follows it.
        self.emu.fault(mode="standby_redirect", target="vault", count=1)
        transit.read_key("pgphi-kek")
        status, headers, _ = raw_vault_call_with(self.emu, "GET", "/v1/transit/keys/pgphi-kek",
                                                 POLICY_TOKEN, fault=("standby_redirect", self.emu))
        self.assertEqual(status, 307)
        self.assertTrue(headers["Location"].startswith(self.emu.url + "/v1/transit/keys/"))
        for mode, status_code, exception in (("sealed", 503, hvac.exceptions.VaultDown),
                                             ("namespace_locked", 423, hvac.exceptions.VaultError),
                                             ("missing_state", 412, hvac.exceptions.VaultError),
                                             ("throttle", 429, hvac.exceptions.RateLimitExceeded)):
            with self.subTest(mode=mode):
                self.emu.fault(mode=mode, target="vault", count=1)
                with self.assertRaises(exception):
                    transit.read_key("pgphi-kek")
                status, headers, body = raw_vault_call_with(
                    self.emu, "GET", "/v1/transit/keys/pgphi-kek", POLICY_TOKEN, fault=(mode, self.emu))
                self.assertEqual(status, status_code, body)
                if mode == "throttle":
                    self.assertEqual(headers.get("Retry-After"), "1")
        with self.assertRaises(urllib.error.HTTPError):
            self.emu.admin("POST", "/_emulator/fault", {"mode": "disable_key", "target": "vault"})


def raw_vault_call_with(emulator, method, path, token, fault):
    """One raw request (no redirect following) with the fault armed for it alone."""
    mode, emu = fault
    emu.fault(mode=mode, target="vault", count=1)
    request = urllib.request.Request(emulator.url + path, method=method,
                                     headers={"X-Vault-Token": token, "X-Vault-Request": "true"})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ca_context()), NoRedirect)
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"{}")


# --------------------------------------------------------------------------
# Control API
# --------------------------------------------------------------------------

class ControlApiTests(EmulatorTestCase):
    def test_stats_count_calls(self):
        EMU.admin("POST", "/_emulator/stats/reset")
        kms = kms_client(EMU)
        blob = kms.encrypt(KeyId=KMS_KEY, Plaintext=b"x")["CiphertextBlob"]
        kms.encrypt(KeyId=KMS_KEY, Plaintext=b"y")
        kms.decrypt(CiphertextBlob=blob)
        transit = vault_client(EMU, token=EMU.root_token).secrets.transit
        transit.decrypt_data("precreated",
                             transit.encrypt_data("precreated", "eA==")["data"]["ciphertext"])
        vault_client(EMU).auth.approle.login(role_id=ROLE_ID, secret_id=SECRET_ID)
        with self.assertRaises(botocore.exceptions.ClientError):
            kms_client(EMU, secret="wrong").decrypt(CiphertextBlob=blob)
        stats = EMU.stats()
        self.assertEqual(stats["kms"], {"Encrypt": 2, "Decrypt": 2})
        self.assertEqual(stats["vault"], {"encrypt": 1, "decrypt": 1, "login": 1})
        self.assertEqual(stats["total"], 7)
        self.assertEqual(stats["rejected_signatures"], 1)

    def test_control_api_needs_the_admin_token(self):
        with self.assertRaises(urllib.error.HTTPError) as caught:
            EMU.admin("GET", "/_emulator/stats", token="wrong")
        self.assertEqual(caught.exception.code, 401)
        faults = EMU.fault(mode="throttle", target="kms", count=3)
        self.assertEqual(faults["fault"]["remaining"], 3)
        self.assertEqual(len(EMU.admin("GET", "/_emulator/fault")["faults"]), 1)

    def test_fixed_id_keys_via_control_api(self):
        key_id = str(uuid.uuid4())
        self.assertEqual(EMU.admin("POST", "/_emulator/kms/keys", {"key_id": key_id})["arn"],
                         arn(key_id))
        self.assertEqual(kms_client(EMU).describe_key(KeyId=key_id)["KeyMetadata"]["KeyId"],
                         key_id)
        name = unique("admin")
        EMU.admin("POST", "/_emulator/vault/keys", {"name": name, "namespace": "ns9"})
        ns9 = vault_client(EMU, token=EMU.root_token, namespace="ns9")
        self.assertEqual(ns9.secrets.transit.read_key(name)["data"]["latest_version"], 1)

    def test_startup_output_and_shutdown(self):
        emulator = Emulator()
        try:
            stdout = (emulator.state_dir / "stdout.txt").read_text()
            self.assertIn(f"listening on 127.0.0.1:{emulator.port}", stdout)
            emulator.admin("POST", "/_emulator/shutdown")
            self.assertEqual(emulator.process.wait(10), 0)
            self.assertFalse((emulator.state_dir / "port").exists())
            log = (emulator.state_dir / "emulator.log").read_text()
            for secret in (emulator.admin_token, emulator.root_token, SECRET, SECRET_ID):
                self.assertNotIn(secret, log)
        finally:
            emulator.stop()


# --------------------------------------------------------------------------
# TLS: server certificates, protocol versions, mutual TLS
# --------------------------------------------------------------------------

class ServerCertificateTests(unittest.TestCase):
    def setUp(self):
        self.addCleanup(close_clients)

    def assert_refused_by_clients(self, emulator: Emulator, ca: str = "ca.pem"):
        with self.assertRaises(requests.exceptions.SSLError):
            vault_client(emulator, token="x", verify=pki(ca)).sys.read_health_status(
                method="GET")
        with self.assertRaises(botocore.exceptions.SSLError):
            kms_client(emulator, ca=ca).describe_key(KeyId=KMS_KEY)

    def test_self_signed_and_expired_server_certificates_are_refused(self):
        for cert in ("selfsigned", "expired"):
            with self.subTest(cert=cert):
                emulator = Emulator(cert=cert)
                try:
                    self.assert_refused_by_clients(emulator)
                finally:
                    emulator.stop()

    def test_certificate_from_another_ca_is_refused(self):
        self.assert_refused_by_clients(EMU, ca="other-ca.pem")

    def test_only_tls_1_2_and_later(self):
        for version, accepted in ((ssl.TLSVersion.TLSv1_1, False),
                                  (ssl.TLSVersion.TLSv1_2, True),
                                  (ssl.TLSVersion.TLSv1_3, True)):
            with self.subTest(version=version.name):
                context = ca_context()
                with warnings.catch_warnings():         # TLS 1.1 is deprecated: that's the point
                    warnings.simplefilter("ignore", DeprecationWarning)
                    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
                    context.maximum_version = version
                if not accepted:
                    context.set_ciphers("DEFAULT:@SECLEVEL=0")   # let the client offer it
                negotiated = negotiated_tls_version(EMU, context)
                self.assertEqual(negotiated is not None, accepted, negotiated)


def negotiated_tls_version(emulator: Emulator, context: ssl.SSLContext) -> str | None:
    """The protocol version a bare TLS handshake settles on, None if it fails."""
    with socket.create_connection(("127.0.0.1", emulator.port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return tls.version()
        except ssl.SSLError:
            return None


class InstanceMetadataTests(unittest.TestCase):
    """The IMDSv2 credential flow, checked with botocore's own instance-metadata
    credential provider: no keys anywhere but the metadata service."""

    @classmethod
    def setUpClass(cls):
        cls.emulator = Emulator(imds_role="pgphi-db-role")

    @classmethod
    def tearDownClass(cls):
        cls.emulator.stop()

    def test_botocore_fetches_role_credentials_and_kms_accepts_them(self):
        environment = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": self.emulator.imds_url + "/",
                       "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                       "AWS_EC2_METADATA_DISABLED": "false"}
        with mock.patch.dict(os.environ, environment):
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                         "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
                os.environ.pop(name, None)
            session = boto3.session.Session(region_name=REGION)
            credentials = session.get_credentials()
            self.assertIsNotNone(credentials, "botocore found no credentials in the emulated IMDS")
            self.assertEqual(credentials.method, "iam-role")
            frozen = credentials.get_frozen_credentials()
            self.assertTrue(frozen.access_key.startswith("ASIA"))
            self.assertTrue(frozen.token)
            client = session.client("kms", endpoint_url=self.emulator.url, verify=pki("ca.pem"))
            _OPEN_CLIENTS.append(client.close)
            blob = client.encrypt(KeyId=KMS_KEY, Plaintext=b"via role")["CiphertextBlob"]
            self.assertEqual(client.decrypt(CiphertextBlob=blob)["Plaintext"], b"via role")
        imds = self.emulator.stats()["imds"]
        self.assertGreaterEqual(imds.get("PUT token", 0), 1, imds)   # IMDSv2: a session token first

    def test_imdsv2_refuses_requests_without_a_token(self):
        request = urllib.request.Request(
            self.emulator.imds_url + "/latest/meta-data/iam/security-credentials/")
        with self.assertRaises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=5)
        self.assertEqual(caught.exception.code, 401)

    def tearDown(self):
        close_clients()

STS_ROLE = f"arn:aws:iam::{ACCOUNT}:role/pgphi-db"
CONTAINER_TOKEN = "pod-identity-" + secrets.token_hex(8)


class StsAndContainerTests(unittest.TestCase):
    """STS AssumeRole / AssumeRoleWithWebIdentity and the container credentials
    endpoint, checked with boto3 (STS client, botocore's container provider) and the
    AWS CLI (a profile chaining role_arn + source_profile, web identity from the
    environment): the credentials they get work at KMS, and what real STS refuses is
    refused with real STS's error codes."""

    @classmethod
    def setUpClass(cls):
        cls.emulator = Emulator(extra=(
            "--sts-role", f"{STS_ROLE}={KMS_POLICY}", "--container-credentials",
            "--container-credentials-token", CONTAINER_TOKEN, "--container-credentials-ttl", "2",
            "--container-credentials-policy", str(KMS_POLICY)))
        cls.addClassCleanup(cls.emulator.stop)

    def setUp(self):
        self.addCleanup(close_clients)
        self.addCleanup(self.emulator.clear_faults)

    def sts(self, akid: str | None = AKID, secret: str | None = SECRET):
        session = boto3.session.Session(aws_access_key_id=akid, aws_secret_access_key=secret,
                                        region_name=REGION)
        client = session.client("sts", endpoint_url=self.emulator.url, verify=pki("ca.pem"),
                                config=Config(retries={"max_attempts": 0, "mode": "standard"}))
        _OPEN_CLIENTS.append(client.close)
        return client

    def jwt(self, **claims) -> str:
        claims.setdefault("audience", "sts.amazonaws.com")
        return self.emulator.admin("POST", "/_emulator/jwt", claims)["token"]

    def assert_sts_error(self, code: str, call, *args, **kwargs):
        with self.assertRaises(botocore.exceptions.ClientError) as caught:
            call(*args, **kwargs)
        self.assertEqual(error_code(caught.exception), code, caught.exception.response)
        return caught.exception

    def assert_works_at_kms(self, credentials: dict) -> None:
        kms = kms_client(self.emulator, credentials["AccessKeyId"], credentials["SecretAccessKey"],
                         credentials["SessionToken"])
        # The role's policy is pgphi's: GenerateDataKeyWithoutPlaintext yes, GenerateDataKey no.
        blob = kms.generate_data_key_without_plaintext(KeyId=KMS_KEY, KeySpec="AES_256")
        self.assertTrue(blob["CiphertextBlob"])
        with self.assertRaises(botocore.exceptions.ClientError) as caught:
            kms.generate_data_key(KeyId=KMS_KEY, KeySpec="AES_256")
        self.assertEqual(error_code(caught.exception), "AccessDeniedException")

    def test_assume_role(self):
        answer = self.sts().assume_role(RoleArn=STS_ROLE, RoleSessionName="pgphi-check")
        credentials = answer["Credentials"]
        self.assertTrue(credentials["AccessKeyId"].startswith("ASIA"))
        self.assertGreater(credentials["Expiration"].timestamp(), time.time() + 3000)
        self.assertTrue(answer["AssumedRoleUser"]["Arn"].endswith(":assumed-role/pgphi-db/pgphi-check"))
        self.assert_works_at_kms(credentials)
        # A role chain: the assumed role's credentials sign the next AssumeRole.
        chained = boto3.session.Session(
            aws_access_key_id=credentials["AccessKeyId"],
            aws_secret_access_key=credentials["SecretAccessKey"],
            aws_session_token=credentials["SessionToken"], region_name=REGION).client(
            "sts", endpoint_url=self.emulator.url, verify=pki("ca.pem"))
        _OPEN_CLIENTS.append(chained.close)
        self.assertIn("Credentials", chained.assume_role(RoleArn=STS_ROLE, RoleSessionName="second"))

    def test_assume_role_refusals(self):
        self.assert_sts_error("AccessDenied", self.sts().assume_role,
                              RoleArn=f"arn:aws:iam::{ACCOUNT}:role/unknown", RoleSessionName="s1")
        self.assert_sts_error("SignatureDoesNotMatch", self.sts(AKID, "wrong").assume_role,
                              RoleArn=STS_ROLE, RoleSessionName="s1")
        self.assert_sts_error("InvalidClientTokenId", self.sts("AKIAUNKNOWN0000000000", SECRET).assume_role,
                              RoleArn=STS_ROLE, RoleSessionName="s1")
        self.assert_sts_error("ValidationError", self.sts().assume_role,
                              RoleArn=STS_ROLE, RoleSessionName="s1", DurationSeconds=7200)
        self.assertGreaterEqual(self.emulator.stats()["rejected_signatures"], 2)

    def test_assume_role_with_web_identity(self):
        # Unsigned, as botocore sends it: no credentials at all.
        sts = self.sts(None, None)
        answer = sts.assume_role_with_web_identity(
            RoleArn=STS_ROLE, RoleSessionName="irsa", WebIdentityToken=self.jwt(subject="system:serviceaccount:db:pgphi"))
        self.assertEqual(answer["SubjectFromWebIdentityToken"], "system:serviceaccount:db:pgphi")
        self.assert_works_at_kms(answer["Credentials"])
        for token, code in ((self.jwt() + "x", "InvalidIdentityToken"),
                            (self.jwt(ttl=-60), "ExpiredTokenException"),
                            (self.jwt(audience="vault"), "InvalidIdentityToken"),
                            ("not-a-jwt", "InvalidIdentityToken")):
            self.assert_sts_error(code, sts.assume_role_with_web_identity, RoleArn=STS_ROLE,
                                  RoleSessionName="irsa", WebIdentityToken=token)
        self.assert_sts_error("AccessDenied", sts.assume_role_with_web_identity,
                              RoleArn=f"arn:aws:iam::{ACCOUNT}:role/other", RoleSessionName="irsa",
                              WebIdentityToken=self.jwt())

    def test_sts_faults(self):
        self.emulator.fault(mode="throttle", target="sts", count=1)
        self.assert_sts_error("Throttling", self.sts().assume_role, RoleArn=STS_ROLE, RoleSessionName="s1")
        self.emulator.fault(mode="internal_error", target="sts", count=1)
        self.assert_sts_error("InternalFailure", self.sts().assume_role, RoleArn=STS_ROLE,
                              RoleSessionName="s1")
        self.assertIn("Credentials", self.sts().assume_role(RoleArn=STS_ROLE, RoleSessionName="s1"))

    def client_creator(self, session):
        """What botocore's credential providers call to make their STS client, aimed at
        the emulator (Debian's botocore has no AWS_ENDPOINT_URL_STS; the default would
        be the real STS, which these tests never contact)."""
        def create(service_name, **kwargs):
            kwargs.setdefault("region_name", REGION)
            client = session.create_client(service_name, endpoint_url=self.emulator.url,
                                           verify=pki("ca.pem"), **kwargs)
            _OPEN_CLIENTS.append(client.close)
            return client
        return create

    def test_botocore_profile_chain_with_source_profile(self):
        config = WORK / unique("config")
        config.write_text(f"[profile pgphi]\nrole_arn = {STS_ROLE}\nsource_profile = middle\n"
                          f"role_session_name = chain-outer\n"
                          f"[profile middle]\nrole_arn = {STS_ROLE}\nsource_profile = base\n"
                          f"[profile a]\nrole_arn = {STS_ROLE}\nsource_profile = b\n"
                          f"[profile b]\nrole_arn = {STS_ROLE}\nsource_profile = a\n")
        credentials = WORK / unique("credentials")
        credentials.write_text(f"[base]\naws_access_key_id = {AKID}\naws_secret_access_key = {SECRET}\n")
        environment = {"AWS_CONFIG_FILE": str(config), "AWS_SHARED_CREDENTIALS_FILE": str(credentials)}
        with mock.patch.dict(os.environ, environment):
            session = botocore.session.Session()
            before = self.emulator.stats()["sts"].get("AssumeRole", 0)
            provider = botocore.credentials.AssumeRoleProvider(
                load_config=lambda: session.full_config, client_creator=self.client_creator(session),
                cache={}, profile_name="pgphi")
            frozen = provider.load().get_frozen_credentials()
            self.assert_works_at_kms({"AccessKeyId": frozen.access_key, "SecretAccessKey": frozen.secret_key,
                                      "SessionToken": frozen.token})
            # Two roles: two AssumeRole calls, the second signed with the first's keys.
            self.assertEqual(self.emulator.stats()["sts"].get("AssumeRole", 0) - before, 2)
            cycle = botocore.credentials.AssumeRoleProvider(
                load_config=lambda: session.full_config, client_creator=self.client_creator(session),
                cache={}, profile_name="a")
            with self.assertRaises(botocore.exceptions.InfiniteLoopConfigError):
                cycle.load()

    def test_botocore_web_identity_from_the_environment(self):
        token = WORK / unique("web-token")
        token.write_text(self.jwt())
        environment = {"AWS_WEB_IDENTITY_TOKEN_FILE": str(token), "AWS_ROLE_ARN": STS_ROLE,
                       "AWS_ROLE_SESSION_NAME": "botocore-irsa", "AWS_CONFIG_FILE": os.devnull}
        with mock.patch.dict(os.environ, environment):
            session = botocore.session.Session()

            def provider():
                return botocore.credentials.AssumeRoleWithWebIdentityProvider(
                    load_config=lambda: session.full_config, client_creator=self.client_creator(session),
                    profile_name="default", cache={})
            frozen = provider().load().get_frozen_credentials()
            self.assert_works_at_kms({"AccessKeyId": frozen.access_key, "SecretAccessKey": frozen.secret_key,
                                      "SessionToken": frozen.token})
            token.write_text(self.jwt(ttl=-60))
            with self.assertRaises(botocore.exceptions.ClientError) as caught:
                provider().load().get_frozen_credentials()
            self.assertEqual(error_code(caught.exception), "ExpiredTokenException")

    def test_cli_sts(self):
        env = {"PATH": "/usr/bin:/bin", "HOME": str(WORK / "home"), "LANG": "C.UTF-8",
               "AWS_ACCESS_KEY_ID": AKID, "AWS_SECRET_ACCESS_KEY": SECRET,
               "AWS_DEFAULT_REGION": REGION, "AWS_PAGER": "", "AWS_MAX_ATTEMPTS": "1",
               "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
               "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "NO_PROXY": "127.0.0.1,localhost"}

        def cli(*args):
            return subprocess.run([AWS_CLI, "sts", *args, "--endpoint-url", self.emulator.url,
                                   "--ca-bundle", pki("ca.pem"), "--output", "json"],
                                  env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT,
                                  stdin=subprocess.DEVNULL)
        result = cli("assume-role", "--role-arn", STS_ROLE, "--role-session-name", "cli")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assert_works_at_kms(json.loads(result.stdout)["Credentials"])
        result = cli("assume-role-with-web-identity", "--role-arn", STS_ROLE, "--role-session-name", "cli",
                     "--web-identity-token", self.jwt())
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("SessionToken", json.loads(result.stdout)["Credentials"])
        result = cli("assume-role-with-web-identity", "--role-arn", STS_ROLE, "--role-session-name", "cli",
                     "--web-identity-token", self.jwt(ttl=-5))
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("ExpiredTokenException", result.stderr)
        result = cli("assume-role", "--role-arn", f"arn:aws:iam::{ACCOUNT}:role/unknown", "--role-session-name", "cli")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("AccessDenied", result.stderr)

    def container_provider(self, token_file: Path):
        # Debian's botocore takes the token itself (AWS_CONTAINER_AUTHORIZATION_TOKEN),
        # not the _FILE variant pgphi reads, so the file is read here at each fetch.
        environment = {"AWS_CONTAINER_CREDENTIALS_FULL_URI": self.emulator.url + "/v2/credentials/pod",
                       "AWS_CONTAINER_AUTHORIZATION_TOKEN": token_file.read_text()}
        with mock.patch.dict(os.environ, environment):
            os.environ.pop("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", None)
            fetcher = botocore.utils.ContainerMetadataFetcher(
                session=botocore.httpsession.URLLib3Session(verify=pki("ca.pem")))
            return botocore.credentials.ContainerProvider(fetcher=fetcher).load()

    def test_container_credentials_with_botocore(self):
        token_file = WORK / unique("pod-token")
        token_file.write_text(CONTAINER_TOKEN)
        credentials = self.container_provider(token_file)
        self.assertIsNotNone(credentials)
        frozen = credentials.get_frozen_credentials()
        self.assertTrue(frozen.access_key.startswith("ASIA"))
        self.assert_works_at_kms({"AccessKeyId": frozen.access_key, "SecretAccessKey": frozen.secret_key,
                                  "SessionToken": frozen.token})
        # The credentials expire (2 s here): KMS then refuses them, as real KMS does.
        time.sleep(3)
        kms = kms_client(self.emulator, frozen.access_key, frozen.secret_key, frozen.token)
        with self.assertRaises(botocore.exceptions.ClientError) as caught:
            kms.describe_key(KeyId=KMS_KEY)
        self.assertEqual(error_code(caught.exception), "ExpiredTokenException")
        # A wrong authorization token is refused.
        token_file.write_text("wrong")
        with self.assertRaises(botocore.exceptions.CredentialRetrievalError):
            self.container_provider(token_file).get_frozen_credentials()
        # The agent rotates its token (control API); the new one works.
        self.emulator.admin("POST", "/_emulator/container/token", {"token": "rotated"})
        token_file.write_text("rotated")
        self.assertTrue(self.container_provider(token_file).get_frozen_credentials().token)


class VaultAuthMethodTests(unittest.TestCase):
    """Kubernetes, JWT and TLS certificate auth and response wrapping, checked with
    hvac's own auth-method and unwrap calls; a token from each works on Transit."""

    @classmethod
    def setUpClass(cls):
        wide = WORK / "auth-wide-policy.hcl"
        wide.write_text('path "*" { capabilities = ["create", "read", "update", "delete", "list"] }\n')
        cls.emulator = Emulator(extra=(
            "--vault-policy", f"wide={wide}", "--approle-policies", "wide",
            "--vault-kubernetes-role", "pgphi=system:serviceaccount:db:pgphi",
            "--vault-jwt-role", "pgphi=pgphi-db@vault",
            "--vault-cert-role", "pgphi=pgphi test client", "--vault-cert-ca", pki("ca.pem")))
        cls.addClassCleanup(cls.emulator.stop)

    def setUp(self):
        self.addCleanup(close_clients)

    def jwt(self, **claims) -> str:
        return self.emulator.admin("POST", "/_emulator/jwt", claims)["token"]

    def assert_token_works(self, token: str) -> None:
        vault = vault_client(self.emulator, token=token)
        self.assertEqual(vault.secrets.transit.read_key("precreated")["data"]["name"], "precreated")

    def test_kubernetes_login(self):
        vault = vault_client(self.emulator)
        sa = "system:serviceaccount:db:pgphi"
        answer = vault.auth.kubernetes.login("pgphi", self.jwt(subject=sa, audience="vault"))
        self.assertIn("wide", answer["auth"]["policies"])
        self.assert_token_works(answer["auth"]["client_token"])
        for jwt, error in ((self.jwt(subject="system:serviceaccount:db:other", audience="vault"),
                            hvac.exceptions.Forbidden),
                           (self.jwt(subject=sa, audience="vault", ttl=-5), hvac.exceptions.Forbidden),
                           (self.jwt(subject=sa, audience="vault") + "x", hvac.exceptions.Forbidden)):
            with self.assertRaises(error):
                vault.auth.kubernetes.login("pgphi", jwt)
        with self.assertRaises(hvac.exceptions.InvalidRequest):
            vault.auth.kubernetes.login("nobody", self.jwt(subject=sa, audience="vault"))

    def test_jwt_login(self):
        vault = vault_client(self.emulator)
        answer = vault.auth.jwt.jwt_login("pgphi", self.jwt(subject="pgphi-db", audience="vault"))
        self.assert_token_works(answer["auth"]["client_token"])
        for claims in ({"subject": "pgphi-db", "audience": "sts.amazonaws.com"},
                       {"subject": "someone", "audience": "vault"},
                       {"subject": "pgphi-db", "audience": "vault", "ttl": -5}):
            with self.assertRaises(hvac.exceptions.InvalidRequest):
                vault.auth.jwt.jwt_login("pgphi", self.jwt(**claims))

    def test_cert_login(self):
        vault = vault_client(self.emulator)
        answer = vault.auth.cert.login(name="pgphi", cert_pem=pki("client.pem"), key_pem=pki("client.key"))
        self.assertEqual(answer["auth"]["metadata"]["common_name"], "pgphi test client")
        self.assert_token_works(answer["auth"]["client_token"])
        # No certificate: asked for, not required by the listener, so refused by the method.
        status, _, body = raw_vault_call(self.emulator, "POST", "/v1/auth/cert/login", body={})
        self.assertEqual((status, body["errors"]),
                         (400, ["invalid certificate or no client certificate supplied"]))
        # A certificate from another CA fails the handshake.
        with self.assertRaises(requests.exceptions.ConnectionError):
            vault_client(self.emulator).auth.cert.login(cert_pem=pki("other-client.pem"),
                                                        key_pem=pki("other-client.key"))

    def test_wrapped_secret_id_unwraps_once(self):
        root = vault_client(self.emulator, token=self.emulator.root_token)
        wrapped = root.adapter.post("/v1/sys/wrapping/wrap", json={"secret_id": SECRET_ID},
                                    headers={"X-Vault-Wrap-TTL": "60s"})
        self.assertIsNone(wrapped["data"])
        info = wrapped["wrap_info"]
        self.assertEqual((info["ttl"], info["creation_path"]), (60, "sys/wrapping/wrap"))
        unwrapped = vault_client(self.emulator, token=info["token"]).sys.unwrap()
        self.assertEqual(unwrapped["data"], {"secret_id": SECRET_ID})
        login = vault_client(self.emulator).auth.approle.login(ROLE_ID, unwrapped["data"]["secret_id"])
        self.assertTrue(login["auth"]["client_token"])
        # Single use: the second unwrap is refused, as is a made-up token.
        for token in (info["token"], "hvs.wrap-made-up"):
            with self.assertRaises(hvac.exceptions.InvalidRequest):
                vault_client(self.emulator, token=token).sys.unwrap()
        # An expired wrapping token.
        short = root.adapter.post("/v1/sys/wrapping/wrap", json={"secret_id": SECRET_ID},
                                  headers={"X-Vault-Wrap-TTL": "1s"})["wrap_info"]["token"]
        time.sleep(1.5)
        with self.assertRaises(hvac.exceptions.InvalidRequest):
            vault_client(self.emulator, token=short).sys.unwrap()


class MutualTlsTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.emulator = Emulator(client_ca="ca.pem")
        cls.addClassCleanup(cls.emulator.stop)

    def setUp(self):
        self.addCleanup(close_clients)

    def test_client_without_certificate_is_refused(self):
        with self.assertRaises(requests.exceptions.ConnectionError):
            vault_client(self.emulator, token=self.emulator.root_token).secrets.transit \
                .read_key("precreated")
        with self.assertRaises(botocore.exceptions.BotoCoreError):
            kms_client(self.emulator).describe_key(KeyId=KMS_KEY)

    def test_client_certificate_from_another_ca_is_refused(self):
        with self.assertRaises(requests.exceptions.ConnectionError):
            vault_client(self.emulator, token=self.emulator.root_token,
                         cert=(pki("other-client.pem"), pki("other-client.key"))) \
                .secrets.transit.read_key("precreated")

    def test_client_with_certificate_is_served(self):
        vault = vault_client(self.emulator, token=self.emulator.root_token,
                             cert=(pki("client.pem"), pki("client.key")))
        self.assertEqual(vault.secrets.transit.read_key("precreated")["data"]["name"],
                         "precreated")
        kms = kms_client(self.emulator, client_cert=(pki("client.pem"), pki("client.key")))
        self.assertEqual(kms.describe_key(KeyId=KMS_KEY)["KeyMetadata"]["KeyId"], KMS_KEY)


if __name__ == "__main__":
    unittest.main(verbosity=2)
