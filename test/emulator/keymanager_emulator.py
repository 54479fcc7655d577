#!/usr/bin/python3
"""Test emulator of the two key managers pgphi talks to: AWS KMS and HashiCorp Vault.

Neither service can be installed where pgphi's tests run, so this one process
serves both HTTP APIs over HTTPS, on 127.0.0.1 only:

* AWS KMS, JSON 1.1 protocol: ``POST /`` with ``X-Amz-Target: TrentService.<Op>``;
  every request is verified with AWS Signature Version 4.
* Vault: the Transit secrets engine under ``/v1/<mount>/``, token auth and
  AppRole login, with ``X-Vault-Namespace`` scoping keys and tokens.
* A control API under ``/_emulator/`` that neither real service has: fault
  injection, statistics, KMS backing-key rotation, shutdown.

The cryptography is real (AES-GCM with random keys), so a ciphertext is bound to
its key, key version and context just as with the real services. All state is
in memory; the state directory only receives the port file and the log.

Only the Python standard library and ``cryptography`` are used. README.md next
to this file documents the command line and the control API.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

LOOPBACK = "127.0.0.1"          # the only address this emulator ever binds
MAX_BODY_BYTES = 1 << 20        # far above anything either API needs for our operations
HANDSHAKE_TIMEOUT = 10          # seconds a client gets to complete the TLS handshake
IDLE_TIMEOUT = 60               # seconds a keep-alive connection may sit idle
GCM_NONCE_BYTES = 12
GCM_TAG_BYTES = 16

LOG = logging.getLogger("keymanager_emulator")


# --------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------

def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text) -> bytes:
    """Strict, padded standard base64, as Go and the AWS SDKs produce it. Raises ValueError."""
    if not isinstance(text, str):
        raise ValueError("expected a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(str(exc)) from exc


def aes_gcm_seal(key: bytes, plaintext: bytes, aad: bytes | None) -> bytes:
    """Returns nonce || ciphertext || tag with a fresh random nonce."""
    nonce = os.urandom(GCM_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def aes_gcm_open(key: bytes, sealed: bytes, aad: bytes | None) -> bytes:
    """Inverse of aes_gcm_seal. Raises InvalidTag on any mismatch or truncation."""
    if len(sealed) < GCM_NONCE_BYTES + GCM_TAG_BYTES:
        raise InvalidTag()
    return AESGCM(key).decrypt(sealed[:GCM_NONCE_BYTES], sealed[GCM_NONCE_BYTES:], aad)


def iso_time(unix_time: float) -> str:
    return datetime.datetime.fromtimestamp(unix_time, datetime.timezone.utc).isoformat(
        timespec="seconds").replace("+00:00", "Z")


def go_duration(seconds: float) -> str:
    """Formats seconds the way Go prints a time.Duration ("1h0m0s"), as Vault's messages do."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def parse_duration(value) -> int:
    """Seconds from an integer or a Vault duration string such as "90", "90s", "5m", "1h"."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", str(value))
    if not match:
        raise ValueError(f"invalid duration {value!r}")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return int(match.group(1)) * unit


@dataclass
class HttpResponse:
    """What an API handler wants sent back; the HTTP layer does the sending."""
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: dict = field(default_factory=dict)
    label: str = ""                                  # what the request log line says
    after_send: Callable[[], None] | None = None     # e.g. stop the server once answered


def json_response(status: int, payload, content_type: str = "application/json",
                  label: str = "", headers: dict | None = None) -> HttpResponse:
    body = b"" if payload is None else json.dumps(payload).encode()
    return HttpResponse(status, body, content_type if payload is not None else None,
                        headers or {}, label)


class DropConnection(Exception):
    """Raised by the "drop" fault: close the TCP connection without answering."""


class MalformedAnswer(Exception):
    """Raised by the "malformed" fault: answer 200 with JSON of the wrong shape."""


# --------------------------------------------------------------------------
# Fault injection and statistics (driven by the control API)
# --------------------------------------------------------------------------

FAULT_MODES = ("none", "deny", "disable_key", "throttle", "internal_error", "slow", "drop",
               "malformed", "expire_tokens",
               # Vault only: an HA standby's redirect, a sealed node, a locked namespace,
               # a performance standby without the client's index state.
               "standby_redirect", "sealed", "namespace_locked", "missing_state")
VAULT_ONLY_FAULTS = ("standby_redirect", "sealed", "namespace_locked", "missing_state")
# "sts" and "container" (the container credentials endpoint) take deny, throttle,
# internal_error, slow, drop and malformed.
FAULT_TARGETS = ("kms", "vault", "sts", "container", "all")


@dataclass
class Fault:
    mode: str
    target: str                       # "kms", "vault" or "all"
    key: str | None                   # as the test gave it; None = every request
    key_names: frozenset              # every name under which a request may reach that key
    remaining: int | None             # requests left to affect; None = until cleared
    delay_ms: int = 0

    def applies_to(self, api: str) -> bool:
        return self.target in (api, "all")

    def describe(self) -> dict:
        return {"mode": self.mode, "target": self.target, "key": self.key,
                "remaining": self.remaining, "delay_ms": self.delay_ms}


class FaultBook:
    """The faults in force. At most one per (target, key); the first match wins.

    Faults without a key hit every request of their target as it arrives, except
    "disable_key", which by nature only hits cryptographic use of a key. Faults
    with a key hit only requests that use that key, once the key is known.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def set(self, fault: Fault) -> None:
        with self._lock:
            self._faults = [f for f in self._faults
                            if (f.target, f.key) != (fault.target, fault.key)]
            self._faults.append(fault)

    def clear(self, target: str, key: str | None = None) -> int:
        """Removes the faults of target ("all": of every target), only those of key if given."""
        with self._lock:
            kept = [f for f in self._faults
                    if not ((target == "all" or f.target == target)
                            and (key is None or f.key == key))]
            cleared = len(self._faults) - len(kept)
            self._faults = kept
            return cleared

    def describe(self) -> list:
        with self._lock:
            return [f.describe() for f in self._faults]

    def take_request_fault(self, api: str) -> Fault | None:
        return self._take(lambda f: f.applies_to(api) and f.key is None
                          and f.mode != "disable_key")

    def take_key_fault(self, api: str, key_name: str, crypto: bool) -> Fault | None:
        def matches(f: Fault) -> bool:
            if not f.applies_to(api):
                return False
            if f.mode == "disable_key":
                return crypto and (f.key is None or key_name in f.key_names)
            return f.key is not None and key_name in f.key_names
        return self._take(matches)

    def _take(self, predicate) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if predicate(fault):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
                    return fault
        return None


class Stats:
    """Per-operation request counts and rejection counters, for tests to assert on."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._operations = {"kms": {}, "vault": {}, "imds": {}, "sts": {}, "container": {}}
            self._errors = {"kms": {}, "vault": {}, "imds": {}, "sts": {}, "container": {}}
            self._namespaces: dict[str, int] = {}
            self._counters = {"total": 0, "rejected_signatures": 0, "rejected_tokens": 0,
                              "faults_injected": 0, "denied_by_policy": 0, "vault_logins": 0,
                              "vault_unwraps": 0}

    def request(self, api: str, operation: str, namespace: str | None = None) -> None:
        with self._lock:
            ops = self._operations[api]
            ops[operation] = ops.get(operation, 0) + 1
            self._counters["total"] += 1
            if namespace is not None:
                self._namespaces[namespace] = self._namespaces.get(namespace, 0) + 1

    def error(self, api: str, code) -> None:
        with self._lock:
            errors = self._errors[api]
            errors[str(code)] = errors.get(str(code), 0) + 1

    def bump(self, counter: str) -> None:
        with self._lock:
            self._counters[counter] += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"kms": dict(self._operations["kms"]),
                    "vault": dict(self._operations["vault"]),
                    "imds": dict(self._operations["imds"]),
                    "sts": dict(self._operations["sts"]),
                    "container": dict(self._operations["container"]),
                    **self._counters,
                    "errors": {api: dict(codes) for api, codes in self._errors.items()},
                    "vault_namespaces": dict(self._namespaces)}


def inject_fault(fault: Fault, stats: Stats, make_error: Callable[[str], Exception]) -> None:
    """Acts out a fault: waits delay_ms, then drops, passes ("slow") or raises the API's error."""
    stats.bump("faults_injected")
    LOG.info("injecting fault %s", fault.describe())
    if fault.delay_ms:
        time.sleep(fault.delay_ms / 1000)
    if fault.mode == "slow":
        return
    if fault.mode == "drop":
        raise DropConnection()
    if fault.mode == "malformed":
        raise MalformedAnswer()
    raise make_error(fault.mode)


# --------------------------------------------------------------------------
# AWS Signature Version 4 verification
# --------------------------------------------------------------------------

SIGV4_ALGORITHM = "AWS4-HMAC-SHA256"
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


class KmsError(Exception):
    """An error in the shape KMS returns: HTTP status plus {"__type", "message"}."""

    def __init__(self, error_type: str, message: str = "", status: int = 400):
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.status = status


class SignatureRejected(KmsError):
    """A KmsError raised while authenticating the request (counted separately)."""


@dataclass(frozen=True)
class AwsCredential:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None
    expires: float | None = None       # temporary credentials (STS, container, IMDS) expire


def parse_authorization(value: str) -> dict:
    """Splits 'AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...'."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != SIGV4_ALGORITHM:
        raise SignatureRejected("IncompleteSignatureException",
                                f"Unsupported AWS 'algorithm': '{algorithm}'")
    fields = {}
    for part in rest.split(","):
        name, sep, field_value = part.strip().partition("=")
        if sep:
            fields[name] = field_value
    for required in ("Credential", "SignedHeaders", "Signature"):
        if not fields.get(required):
            raise SignatureRejected(
                "IncompleteSignatureException",
                f"Authorization header requires '{required}' parameter.")
    return fields


def canonical_uri(raw_path: str) -> str:
    """The path as SigV4 signs it for every service but S3: dot segments and empty
    segments removed, then URI-encoded once more on top of the wire encoding."""
    segments: list[str] = []
    for segment in raw_path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    path = "/" + "/".join(segments)
    if raw_path.endswith("/") and segments:
        path += "/"
    return urllib.parse.quote(path, safe="/~")


def canonical_query(raw_query: str) -> str:
    pairs = urllib.parse.parse_qsl(raw_query, keep_blank_values=True)
    encoded = sorted((urllib.parse.quote(k, safe="-_.~"), urllib.parse.quote(v, safe="-_.~"))
                     for k, v in pairs)
    return "&".join(f"{k}={v}" for k, v in encoded)


def canonical_headers(headers, signed_names: list[str]) -> str:
    lines = []
    for name in signed_names:
        values = headers.get_all(name) or []
        # SigV4 trims each value and folds inner runs of spaces into one.
        value = ",".join(" ".join(v.split()) for v in values)
        lines.append(f"{name}:{value}\n")
    return "".join(lines)


def sigv4_signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


class SigV4Verifier:
    """Checks the SigV4 signature of a request against the configured credentials."""

    def __init__(self, credentials: dict[str, AwsCredential], region: str, service: str,
                 max_skew_seconds: int):
        self.credentials = credentials
        self.region = region
        self.service = service
        self.max_skew = max_skew_seconds

    def verify(self, method: str, raw_path: str, raw_query: str, headers, body: bytes
               ) -> AwsCredential:
        authorization = headers.get("Authorization")
        if not authorization:
            raise SignatureRejected("MissingAuthenticationTokenException",
                                    "Missing Authentication Token")
        fields = parse_authorization(authorization)
        scope = fields["Credential"].split("/")
        if len(scope) != 5:
            raise SignatureRejected("IncompleteSignatureException",
                                    "Credential should have exactly 5 slash-separated parts.")
        access_key_id, scope_date, scope_region, scope_service, terminator = scope
        credential = self._credential(access_key_id, headers.get("X-Amz-Security-Token"))
        amz_date = self._check_date(headers.get("X-Amz-Date"))
        self._check_scope(scope_date, scope_region, scope_service, terminator, amz_date)

        signed_names = fields["SignedHeaders"].split(";")
        if "host" not in signed_names:
            raise SignatureRejected("InvalidSignatureException",
                                    "'Host' must be a 'SignedHeader' in the AWS Authorization.")
        payload_hash = headers.get("X-Amz-Content-SHA256")
        if payload_hash != UNSIGNED_PAYLOAD:
            payload_hash = hashlib.sha256(body).hexdigest()
        canonical_request = "\n".join([
            method, canonical_uri(raw_path), canonical_query(raw_query),
            canonical_headers(headers, signed_names), fields["SignedHeaders"], payload_hash])
        string_to_sign = "\n".join([
            SIGV4_ALGORITHM, amz_date, "/".join(scope[1:]),
            hashlib.sha256(canonical_request.encode()).hexdigest()])
        key = sigv4_signing_key(credential.secret_access_key, scope_date, scope_region,
                                scope_service)
        expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, fields["Signature"]):
            raise SignatureRejected(
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you "
                "provided. Check your AWS Secret Access Key and signing method. Consult the "
                "service documentation for details.")
        return credential

    def _credential(self, access_key_id: str, session_token: str | None) -> AwsCredential:
        invalid = SignatureRejected("UnrecognizedClientException",
                                    "The security token included in the request is invalid.")
        credential = self.credentials.get(access_key_id)
        if credential is None:
            raise invalid
        # Temporary credentials only work with their token; long-term keys take none.
        if credential.session_token is None:
            if session_token is not None:
                raise invalid
        elif session_token is None or not hmac.compare_digest(
                session_token.encode(), credential.session_token.encode()):
            raise invalid
        if credential.expires is not None and credential.expires <= time.time():
            raise SignatureRejected("ExpiredTokenException",
                                    "The security token included in the request is expired")
        return credential

    def _check_date(self, amz_date: str | None) -> str:
        if not amz_date:
            raise SignatureRejected(
                "IncompleteSignatureException",
                "Authorization header requires existence of either a 'X-Amz-Date' or a "
                "'Date' header.")
        try:
            signed_at = datetime.datetime.strptime(amz_date, AMZ_DATE_FORMAT).replace(
                tzinfo=datetime.timezone.utc)
        except ValueError:
            raise SignatureRejected("IncompleteSignatureException",
                                    f"Date must be in ISO-8601 'basic format'. Got '{amz_date}'.")
        now = datetime.datetime.now(datetime.timezone.utc)
        if abs((now - signed_at).total_seconds()) > self.max_skew:
            raise SignatureRejected(
                "InvalidSignatureException",
                f"Signature expired: {amz_date} is now earlier or later than "
                f"{now.strftime(AMZ_DATE_FORMAT)} +/- {self.max_skew // 60} min.")
        return amz_date

    def _check_scope(self, date: str, region: str, service: str, terminator: str,
                     amz_date: str) -> None:
        if date != amz_date[:8]:
            raise SignatureRejected(
                "InvalidSignatureException",
                f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of "
                f"date from HTTP: '{date}' != '{amz_date[:8]}', from '{amz_date}'.")
        if region != self.region:
            raise SignatureRejected(
                "InvalidSignatureException",
                f"Credential should be scoped to a valid region, not '{region}'. ")
        if service != self.service:
            raise SignatureRejected(
                "InvalidSignatureException",
                f"Credential should be scoped to correct service: '{self.service}'. ")
        if terminator != "aws4_request":
            raise SignatureRejected(
                "InvalidSignatureException",
                f"Credential should be scoped with a valid terminator: 'aws4_request', "
                f"not '{terminator}'. ")


# --------------------------------------------------------------------------
# AWS KMS
# --------------------------------------------------------------------------

KMS_CONTENT_TYPE = "application/x-amz-json-1.1"
KMS_TARGET_PREFIX = "TrentService."
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
MRK_RE = re.compile(r"^mrk-[0-9a-f]{32}$")        # multi-Region key ids
ALIAS_RE = re.compile(r"^alias/[a-zA-Z0-9/_-]{1,250}$")
# Blob layout: header || nonce || ciphertext || tag. The header names the KMS key
# and its backing-key version, so Decrypt needs no KeyId; it is authenticated as
# part of the associated data, together with the encryption context.
BLOB_MAGIC = b"EKMS\x01"
BLOB_HEADER = struct.Struct(">5s16sI")
BLOB_MRK_FLAG = 0x80000000                         # version field: the id is mrk- + 16 bytes


def invalid_ciphertext() -> KmsError:
    return KmsError("InvalidCiphertextException", "")    # real KMS says nothing more


def canonical_encryption_context(context: dict) -> bytes:
    """Sorted, length-prefixed key/value pairs: independent of the order the client sent
    them in, and {"a": "bc"} can never encode like {"ab": "c"}."""
    out = bytearray()
    for name in sorted(context):
        for text in (name, context[name]):
            data = text.encode()
            out += struct.pack(">I", len(data)) + data
    return bytes(out)


@dataclass
class KmsKey:
    key_id: str
    arn: str
    description: str
    created: float
    enabled: bool = True
    versions: list = field(default_factory=list)   # backing keys; version n is versions[n-1]
    key_spec: str = "SYMMETRIC_DEFAULT"
    key_usage: str = "ENCRYPT_DECRYPT"
    pending_deletion_since: float | None = None
    deletion_date: float | None = None

    @property
    def multi_region(self) -> bool:
        return self.key_id.startswith("mrk-")


# HMAC KMS keys: key spec -> (key bytes, the one MAC algorithm it supports, hash).
KMS_HMAC_SPECS = {"HMAC_224": (28, "HMAC_SHA_224", hashlib.sha224),
                  "HMAC_256": (32, "HMAC_SHA_256", hashlib.sha256),
                  "HMAC_384": (48, "HMAC_SHA_384", hashlib.sha384),
                  "HMAC_512": (64, "HMAC_SHA_512", hashlib.sha512)}
KMS_MAC_ALGORITHMS = [algorithm for _, algorithm, _ in KMS_HMAC_SPECS.values()]


@dataclass
class KmsAlias:
    name: str
    arn: str
    target_key_id: str
    created: float
    updated: float


class KmsStore:
    """Keys and aliases of one emulated account and region. Thread-safe."""

    def __init__(self, region: str, account_id: str):
        self.region = region
        self.account_id = account_id
        self._lock = threading.RLock()
        self._keys: dict[str, KmsKey] = {}
        self._aliases: dict[str, KmsAlias] = {}

    def arn(self, resource: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account_id}:{resource}"

    def create_key(self, key_id: str | None = None, description: str = "",
                   key_spec: str = "SYMMETRIC_DEFAULT") -> KmsKey:
        key_id = key_id or str(uuid.uuid4())
        hmac_spec = KMS_HMAC_SPECS.get(key_spec)
        with self._lock:
            if key_id in self._keys:
                raise KmsError("AlreadyExistsException", f"Key {key_id} already exists")
            key = KmsKey(key_id, self.arn(f"key/{key_id}"), description, time.time(),
                         versions=[os.urandom(hmac_spec[0] if hmac_spec else 32)],
                         key_spec=key_spec,
                         key_usage="GENERATE_VERIFY_MAC" if hmac_spec else "ENCRYPT_DECRYPT")
            self._keys[key_id] = key
            return key

    def resolve(self, key_ref) -> KmsKey:
        """The key named by a key id, key ARN, alias name or alias ARN (what KMS accepts)."""
        if not isinstance(key_ref, str) or not key_ref:
            raise KmsError("ValidationException", "KeyId must be a non-empty string")
        resource = self._resource_of(key_ref)
        with self._lock:
            if resource.startswith("alias/"):
                alias = self._aliases.get(resource)
                if alias is None:
                    raise KmsError("NotFoundException", f"Alias {self.arn(resource)} is not found.")
                return self._keys[alias.target_key_id]
            if not UUID_RE.match(resource) and not MRK_RE.match(resource):
                raise KmsError("NotFoundException", f"Invalid keyId {key_ref}")
            key = self._keys.get(resource)
            if key is None:
                raise KmsError("NotFoundException",
                               f"Key '{self.arn('key/' + resource)}' does not exist")
            return key

    def _resource_of(self, key_ref: str) -> str:
        """Strips an ARN down to the key id or "alias/name" it names, checking that it
        names this account and region."""
        if not key_ref.startswith("arn:"):
            return key_ref
        parts = key_ref.split(":", 5)
        if len(parts) != 6 or parts[:3] != ["arn", "aws", "kms"]:
            raise KmsError("NotFoundException", f"Invalid arn {key_ref}")
        resource = parts[5]
        if (parts[3], parts[4]) != (self.region, self.account_id):
            raise KmsError("NotFoundException", f"Key '{key_ref}' does not exist")
        if resource.startswith("key/"):
            return resource[len("key/"):]
        if resource.startswith("alias/"):
            return resource
        raise KmsError("NotFoundException", f"Invalid arn {key_ref}")

    def list_keys(self) -> list[KmsKey]:
        with self._lock:
            return sorted(self._keys.values(), key=lambda k: (k.created, k.key_id))

    def set_enabled(self, key: KmsKey, enabled: bool) -> None:
        with self._lock:
            key.enabled = enabled

    def rotate(self, key: KmsKey) -> int:
        """Adds a backing-key version (what KMS automatic rotation does behind the scenes)."""
        with self._lock:
            key.versions.append(os.urandom(32))
            return len(key.versions)

    def create_alias(self, name: str, key: KmsKey) -> None:
        with self._lock:
            if name in self._aliases:
                raise KmsError("AlreadyExistsException",
                               f"An alias with the name {self.arn(name)} already exists")
            now = time.time()
            self._aliases[name] = KmsAlias(name, self.arn(name), key.key_id, now, now)

    def update_alias(self, name: str, key: KmsKey) -> None:
        with self._lock:
            alias = self._existing_alias(name)
            alias.target_key_id = key.key_id
            alias.updated = time.time()

    def delete_alias(self, name: str) -> None:
        with self._lock:
            self._existing_alias(name)
            del self._aliases[name]

    def _existing_alias(self, name: str) -> KmsAlias:
        alias = self._aliases.get(name)
        if alias is None:
            raise KmsError("NotFoundException", f"Alias {self.arn(name)} is not found.")
        return alias

    def list_aliases(self) -> list[KmsAlias]:
        with self._lock:
            return sorted(self._aliases.values(), key=lambda a: a.name)

    @staticmethod
    def material_id(key: KmsKey, version: int) -> str:
        """The KeyMaterialId KMS reports for a backing-key version: 64 hex digits."""
        return hashlib.sha256(f"{key.arn}#{version}".encode()).hexdigest()

    def current_material_id(self, key: KmsKey) -> str:
        with self._lock:
            return self.material_id(key, len(key.versions))

    def seal(self, key: KmsKey, plaintext: bytes, context: dict) -> tuple[bytes, int]:
        """Encrypts under the newest backing key, as KMS does after a rotation;
        returns the blob and that backing-key version."""
        with self._lock:
            version = len(key.versions)
            material = key.versions[-1]
        if key.multi_region:
            header = BLOB_HEADER.pack(BLOB_MAGIC, bytes.fromhex(key.key_id[4:]),
                                      version | BLOB_MRK_FLAG)
        else:
            header = BLOB_HEADER.pack(BLOB_MAGIC, uuid.UUID(key.key_id).bytes, version)
        return header + aes_gcm_seal(material, plaintext,
                                     header + canonical_encryption_context(context)), version

    def blob_key(self, blob: bytes) -> tuple[KmsKey, int]:
        """The key and backing-key version a ciphertext blob was made with."""
        if len(blob) < BLOB_HEADER.size + GCM_NONCE_BYTES + GCM_TAG_BYTES:
            raise invalid_ciphertext()
        magic, key_bytes, version = BLOB_HEADER.unpack_from(blob)
        if magic != BLOB_MAGIC:
            raise invalid_ciphertext()
        if version & BLOB_MRK_FLAG:
            key_id, version = "mrk-" + key_bytes.hex(), version & ~BLOB_MRK_FLAG
        else:
            key_id = str(uuid.UUID(bytes=key_bytes))
        with self._lock:
            key = self._keys.get(key_id)
        if key is None:
            raise KmsError("NotFoundException", f"Key '{self.arn('key/' + key_id)}' does not exist")
        return key, version

    def open(self, key: KmsKey, version: int, blob: bytes, context: dict) -> bytes:
        with self._lock:
            material = key.versions[version - 1] if 1 <= version <= len(key.versions) else None
        if material is None:
            raise invalid_ciphertext()
        header = blob[:BLOB_HEADER.size]
        try:
            return aes_gcm_open(material, blob[BLOB_HEADER.size:],
                                header + canonical_encryption_context(context))
        except InvalidTag:
            raise invalid_ciphertext() from None


# Request validation, with the messages KMS's own validation layer uses.

def _field_label(name: str) -> str:
    return name[0].lower() + name[1:]


def kms_required(params: dict, name: str):
    value = params.get(name)
    if value is None:
        raise KmsError("ValidationException",
                       f"1 validation error detected: Value null at '{_field_label(name)}' "
                       f"failed to satisfy constraint: Member must not be null")
    return value


def kms_string(params: dict, name: str, required: bool = False) -> str | None:
    value = kms_required(params, name) if required else params.get(name)
    if value is not None and not isinstance(value, str):
        raise KmsError("SerializationException", f"'{name}' must be a string")
    return value


def kms_binary(params: dict, name: str, max_length: int) -> bytes:
    try:
        data = b64decode(kms_required(params, name))
    except ValueError:
        raise KmsError("SerializationException", f"'{name}' is not valid base64") from None
    if not data:
        raise KmsError("ValidationException",
                       f"1 validation error detected: Value at '{_field_label(name)}' failed to "
                       f"satisfy constraint: Member must have length greater than or equal to 1")
    if len(data) > max_length:
        raise KmsError("ValidationException",
                       f"1 validation error detected: Value at '{_field_label(name)}' failed to "
                       f"satisfy constraint: Member must have length less than or equal to "
                       f"{max_length}")
    return data


def kms_context(params: dict, name: str) -> dict:
    context = params.get(name) or {}
    if not isinstance(context, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in context.items()):
        raise KmsError("SerializationException", f"'{name}' must map strings to strings")
    return context


def kms_check_algorithm(params: dict, name: str) -> None:
    algorithm = params.get(name)
    if algorithm not in (None, "SYMMETRIC_DEFAULT"):
        raise KmsError("InvalidKeyUsageException",
                       f"Algorithm {algorithm} is incompatible with key spec SYMMETRIC_DEFAULT.")


def kms_limit(params: dict) -> int:
    limit = params.get("Limit", 100)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
        raise KmsError("ValidationException",
                       "1 validation error detected: Value at 'limit' failed to satisfy "
                       "constraint: Member must have value between 1 and 1000")
    return limit


def kms_page(params: dict, items: list, marker_of: Callable) -> tuple[list, str | None]:
    """One page of items after params["Marker"]; returns it and the next marker, if any."""
    limit = kms_limit(params)
    marker = params.get("Marker")
    start = 0
    if marker is not None:
        markers = [marker_of(item) for item in items]
        if marker not in markers:
            raise KmsError("InvalidMarkerException",
                           "The request was rejected because the marker that specifies where "
                           "pagination should next begin is not valid.")
        start = markers.index(marker) + 1
    page = items[start:start + limit]
    truncated = start + limit < len(items)
    return page, (marker_of(page[-1]) if truncated else None)


def kms_data_key_length(params: dict) -> int:
    spec, count = params.get("KeySpec"), params.get("NumberOfBytes")
    if (spec is None) == (count is None):
        raise KmsError("ValidationException", "Please specify either number of bytes or key spec.")
    if spec is not None:
        lengths = {"AES_256": 32, "AES_128": 16}
        if spec not in lengths:
            raise KmsError("ValidationException",
                           f"1 validation error detected: Value '{spec}' at 'keySpec' failed to "
                           f"satisfy constraint: Member must satisfy enum value set: "
                           f"[AES_256, AES_128]")
        return lengths[spec]
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 1024:
        raise KmsError("ValidationException",
                       "1 validation error detected: Value at 'numberOfBytes' failed to satisfy "
                       "constraint: Member must have value between 1 and 1024")
    return count


@dataclass
class KmsCall:
    operation: str
    params: dict
    principal: str = ""                 # access key id of the caller


class IamPolicy:
    """An IAM identity-based policy: statements with Effect, Action and Resource (strings
    or lists, "*" and "?" wildcards). As IAM evaluates it: an explicit Deny wins, else an
    Allow is needed. Conditions, NotAction and NotResource are refused when the policy is
    loaded, so that a test never passes on a statement the emulator would misread."""

    def __init__(self, document: dict, source: str = "policy"):
        statements = document.get("Statement") if isinstance(document, dict) else None
        if isinstance(statements, dict):
            statements = [statements]
        if not isinstance(statements, list) or not statements:
            raise ValueError(f"{source}: an IAM policy needs a Statement list")
        self.statements = []
        for statement in statements:
            unknown = set(statement) - {"Sid", "Effect", "Action", "Resource"}
            if unknown:
                raise ValueError(f"{source}: the emulator does not evaluate {sorted(unknown)}")
            if statement.get("Effect") not in ("Allow", "Deny"):
                raise ValueError(f"{source}: Effect must be Allow or Deny")
            actions, resources = statement.get("Action"), statement.get("Resource")
            actions = [actions] if isinstance(actions, str) else actions
            resources = [resources] if isinstance(resources, str) else resources
            if not actions or not resources:
                raise ValueError(f"{source}: each statement needs Action and Resource")
            self.statements.append((statement["Effect"], [a.lower() for a in actions], resources))

    @staticmethod
    def _matches(pattern: str, value: str, case_sensitive: bool) -> bool:
        regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
        return re.fullmatch(regex, value, 0 if case_sensitive else re.IGNORECASE) is not None

    def allows(self, action: str, resource: str) -> bool:
        allowed = False
        for effect, actions, resources in self.statements:
            if any(self._matches(a, action.lower(), False) for a in actions) and \
                    any(self._matches(r, resource, True) for r in resources):
                if effect == "Deny":
                    return False
                allowed = True
        return allowed


class KmsApi:
    """The TrentService operations pgphi and its tests use."""

    def __init__(self, store: KmsStore, verifier: SigV4Verifier, faults: FaultBook,
                 stats: Stats, policies: dict | None = None):
        self.store = store
        self.verifier = verifier
        self.faults = faults
        self.stats = stats
        # access key id -> IamPolicy; a credential without one may do everything
        # (the tests' administrator), one with one only what its policy allows.
        self.policies = policies if policies is not None else {}
        self._operations = {
            "Encrypt": self._encrypt,
            "Decrypt": self._decrypt,
            "ReEncrypt": self._re_encrypt,
            "GenerateDataKey": lambda call: self._generate_data_key(call, True),
            "GenerateDataKeyWithoutPlaintext": lambda call: self._generate_data_key(call, False),
            "GenerateMac": self._generate_mac,
            "VerifyMac": self._verify_mac,
            "DescribeKey": self._describe_key,
            "CreateKey": self._create_key,
            "EnableKey": lambda call: self._set_enabled(call, True),
            "DisableKey": lambda call: self._set_enabled(call, False),
            "ListKeys": self._list_keys,
            "CreateAlias": self._create_alias,
            "UpdateAlias": self._update_alias,
            "DeleteAlias": self._delete_alias,
            "ListAliases": self._list_aliases,
            "RotateKeyOnDemand": self._rotate_key_on_demand,
            "ScheduleKeyDeletion": self._schedule_key_deletion,
            "CancelKeyDeletion": self._cancel_key_deletion,
        }

    def handle(self, target: str, method: str, raw_path: str, raw_query: str, headers,
               body: bytes) -> HttpResponse:
        operation = target[len(KMS_TARGET_PREFIX):] if target.startswith(KMS_TARGET_PREFIX) \
            else target
        self.stats.request("kms", operation)
        label = f"kms {operation}"
        try:
            credential = self.verifier.verify(method, raw_path, raw_query, headers, body)
            params = self._parse_body(body)
            fault = self.faults.take_request_fault("kms")
            if fault:
                inject_fault(fault, self.stats,
                             lambda mode: self._fault_error(mode, operation, "*"))
            handler = self._operations.get(operation) if target.startswith(KMS_TARGET_PREFIX) \
                else None
            if handler is None:
                raise KmsError("UnknownOperationException", "")
            call = KmsCall(operation, params, credential.access_key_id)
            if operation in ("CreateKey", "ListKeys", "ListAliases"):
                self._authorize(call, f"kms:{operation}", "*")
            result = handler(call)
            return self._response(200, result, label)
        except SignatureRejected as exc:
            self.stats.bump("rejected_signatures")
            return self._error_response(exc, label)
        except KmsError as exc:
            return self._error_response(exc, label)

    @staticmethod
    def _parse_body(body: bytes) -> dict:
        if not body.strip():
            return {}
        try:
            params = json.loads(body)
        except ValueError:
            raise KmsError("SerializationException", "Malformed JSON request body") from None
        if not isinstance(params, dict):
            raise KmsError("SerializationException", "Request body must be a JSON object")
        return params

    @staticmethod
    def _response(status: int, payload, label: str) -> HttpResponse:
        response = json_response(status, payload, KMS_CONTENT_TYPE, label,
                                 {"x-amzn-RequestId": str(uuid.uuid4())})
        if payload is None:
            # Operations without output still answer with the JSON content type.
            response.content_type = KMS_CONTENT_TYPE
        return response

    def _error_response(self, exc: KmsError, label: str) -> HttpResponse:
        self.stats.error("kms", exc.error_type)
        LOG.info("%s failed: %s %s", label, exc.error_type, exc.message)
        return self._response(exc.status, {"__type": exc.error_type, "message": exc.message},
                              f"{label} {exc.error_type}")

    def _fault_error(self, mode: str, operation: str, resource: str) -> KmsError:
        if mode == "deny":
            return KmsError(
                "AccessDeniedException",
                f"User: arn:aws:iam::{self.store.account_id}:user/emulator is not authorized "
                f"to perform: kms:{operation} on resource: {resource} because no "
                f"identity-based policy allows the kms:{operation} action")
        if mode == "disable_key":
            return KmsError("DisabledException", f"{resource} is disabled.")
        if mode == "throttle":
            return KmsError("ThrottlingException",
                            "You have exceeded the rate at which you may call KMS. "
                            "Reduce the frequency of your calls.")
        return KmsError("KMSInternalException",
                        "The request was rejected because an internal exception occurred. "
                        "Please retry the request.", status=500)

    # Key access: permissions, resolution, key-scoped faults and the key's own state.

    def _authorize(self, call: KmsCall, action: str, resource: str) -> None:
        """IAM: the caller's policy must allow `action` on the key's ARN (an alias is
        resolved first: IAM authorizes the key, not the alias)."""
        policy = self.policies.get(call.principal)
        if policy is None or policy.allows(action, resource):
            return
        self.stats.bump("denied_by_policy")
        raise KmsError(
            "AccessDeniedException",
            f"User: arn:aws:iam::{self.store.account_id}:user/{call.principal} is not "
            f"authorized to perform: {action} on resource: {resource} because no "
            f"identity-based policy allows the {action} action")

    def _usable_key(self, call: KmsCall, key_ref, crypto: bool = True,
                    usage: str = "ENCRYPT_DECRYPT", action: str | None = None) -> KmsKey:
        key = self.store.resolve(key_ref)
        self._authorize(call, action or f"kms:{call.operation}", key.arn)
        self._check_usable(call, key, crypto)
        if crypto and key.key_usage != usage:
            raise KmsError("InvalidKeyUsageException",
                           f"{key.arn} key usage is {key.key_usage} which is not valid for "
                           f"{call.operation}.")
        return key

    def _check_usable(self, call: KmsCall, key: KmsKey, crypto: bool) -> None:
        fault = self.faults.take_key_fault("kms", key.key_id, crypto)
        if fault:
            inject_fault(fault, self.stats,
                         lambda mode: self._fault_error(mode, call.operation, key.arn))
        if key.pending_deletion_since is not None and (crypto or call.operation in (
                "EnableKey", "DisableKey", "RotateKeyOnDemand", "ScheduleKeyDeletion")):
            raise KmsError("KMSInvalidStateException", f"{key.arn} is pending deletion.")
        if crypto and not key.enabled:
            raise KmsError("DisabledException", f"{key.arn} is disabled.")

    def _open_blob(self, call: KmsCall, blob: bytes, context: dict, expected_ref,
                   action: str | None = None) -> tuple[KmsKey, int, bytes]:
        """The key, backing-key version and plaintext of a blob."""
        key, version = self.store.blob_key(blob)
        if expected_ref is not None and self.store.resolve(expected_ref).key_id != key.key_id:
            raise KmsError("IncorrectKeyException",
                           "The key ID in the request does not identify a CMK that can perform "
                           "this operation.")
        self._authorize(call, action or f"kms:{call.operation}", key.arn)
        self._check_usable(call, key, crypto=True)
        if key.key_usage != "ENCRYPT_DECRYPT":
            raise KmsError("InvalidKeyUsageException",
                           f"{key.arn} key usage is {key.key_usage} which is not valid for "
                           f"{call.operation}.")
        return key, version, self.store.open(key, version, blob, context)

    def _metadata(self, key: KmsKey) -> dict:
        return {
            "AWSAccountId": self.store.account_id,
            "KeyId": key.key_id,
            "Arn": key.arn,
            "CreationDate": key.created,
            "Enabled": key.enabled,
            "Description": key.description,
            "KeyUsage": key.key_usage,
            "KeyState": "PendingDeletion" if key.pending_deletion_since is not None
                        else "Enabled" if key.enabled else "Disabled",
            **({"DeletionDate": key.deletion_date} if key.deletion_date else {}),
            "Origin": "AWS_KMS",
            "KeyManager": "CUSTOMER",
            "CustomerMasterKeySpec": key.key_spec,
            "KeySpec": key.key_spec,
            "MultiRegion": key.multi_region,
            **({"MultiRegionConfiguration": {
                "MultiRegionKeyType": "PRIMARY",
                "PrimaryKey": {"Arn": key.arn, "Region": self.store.region},
                "ReplicaKeys": []}} if key.multi_region else {}),
            **({"MacAlgorithms": [KMS_HMAC_SPECS[key.key_spec][1]]} if key.key_spec in KMS_HMAC_SPECS
               else {"EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
                     "CurrentKeyMaterialId": self.store.current_material_id(key)}),
        }

    # Operations.

    def _encrypt(self, call: KmsCall) -> dict:
        params = call.params
        key_ref = kms_required(params, "KeyId")
        plaintext = kms_binary(params, "Plaintext", 4096)
        context = kms_context(params, "EncryptionContext")
        kms_check_algorithm(params, "EncryptionAlgorithm")
        key = self._usable_key(call, key_ref)
        blob, _ = self.store.seal(key, plaintext, context)
        # (Encrypt's answer names no key material, unlike the data-key and decrypt ones.)
        return {"CiphertextBlob": b64encode(blob), "KeyId": key.arn, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}

    def _decrypt(self, call: KmsCall) -> dict:
        params = call.params
        blob = kms_binary(params, "CiphertextBlob", 6144)
        context = kms_context(params, "EncryptionContext")
        kms_check_algorithm(params, "EncryptionAlgorithm")
        key, version, plaintext = self._open_blob(call, blob, context, params.get("KeyId"))
        return {"KeyId": key.arn, "Plaintext": b64encode(plaintext),
                "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                "KeyMaterialId": self.store.material_id(key, version)}

    def _re_encrypt(self, call: KmsCall) -> dict:
        params = call.params
        blob = kms_binary(params, "CiphertextBlob", 6144)
        source_context = kms_context(params, "SourceEncryptionContext")
        destination_context = kms_context(params, "DestinationEncryptionContext")
        destination_ref = kms_required(params, "DestinationKeyId")
        kms_check_algorithm(params, "SourceEncryptionAlgorithm")
        kms_check_algorithm(params, "DestinationEncryptionAlgorithm")
        source, source_version, plaintext = self._open_blob(call, blob, source_context,
                                                            params.get("SourceKeyId"), "kms:ReEncryptFrom")
        destination = self._usable_key(call, destination_ref, action="kms:ReEncryptTo")
        new_blob, version = self.store.seal(destination, plaintext, destination_context)
        return {"CiphertextBlob": b64encode(new_blob), "SourceKeyId": source.arn,
                "KeyId": destination.arn, "SourceEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                "DestinationEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                "SourceKeyMaterialId": self.store.material_id(source, source_version),
                "DestinationKeyMaterialId": self.store.material_id(destination, version)}

    def _generate_data_key(self, call: KmsCall, with_plaintext: bool) -> dict:
        params = call.params
        key_ref = kms_required(params, "KeyId")
        length = kms_data_key_length(params)
        context = kms_context(params, "EncryptionContext")
        key = self._usable_key(call, key_ref)
        data_key = os.urandom(length)
        blob, version = self.store.seal(key, data_key, context)
        result = {"CiphertextBlob": b64encode(blob), "KeyId": key.arn,
                  "KeyMaterialId": self.store.material_id(key, version)}
        if with_plaintext:
            result["Plaintext"] = b64encode(data_key)
        return result

    def _describe_key(self, call: KmsCall) -> dict:
        key = self._usable_key(call, kms_required(call.params, "KeyId"), crypto=False)
        return {"KeyMetadata": self._metadata(key)}

    def _create_key(self, call: KmsCall) -> dict:
        params = call.params
        usage = params.get("KeyUsage", "ENCRYPT_DECRYPT")
        spec = params.get("KeySpec") or params.get("CustomerMasterKeySpec") or "SYMMETRIC_DEFAULT"
        origin = params.get("Origin", "AWS_KMS")
        if spec in KMS_HMAC_SPECS and "KeyUsage" in params and usage != "GENERATE_VERIFY_MAC":
            raise KmsError("ValidationException",
                           f"KeyUsage {usage} is not compatible with KeySpec {spec}")
        if spec in KMS_HMAC_SPECS:
            usage = "GENERATE_VERIFY_MAC"
        if (usage, origin) not in (("ENCRYPT_DECRYPT", "AWS_KMS"), ("GENERATE_VERIFY_MAC", "AWS_KMS")) or \
                (usage == "ENCRYPT_DECRYPT") != (spec == "SYMMETRIC_DEFAULT"):
            raise KmsError("UnsupportedOperationException",
                           "This emulator only creates SYMMETRIC_DEFAULT ENCRYPT_DECRYPT keys and "
                           "HMAC GENERATE_VERIFY_MAC keys, with origin AWS_KMS.")
        description = kms_string(params, "Description") or ""
        if len(description) > 8192:
            raise KmsError("ValidationException",
                           "1 validation error detected: Value at 'description' failed to "
                           "satisfy constraint: Member must have length less than or equal to "
                           "8192")
        key_id = None
        if params.get("MultiRegion") is True:
            key_id = "mrk-" + os.urandom(16).hex()
        return {"KeyMetadata": self._metadata(self.store.create_key(key_id, description=description,
                                                                    key_spec=spec))}

    def _mac_request(self, call: KmsCall) -> tuple[KmsKey, bytes, str]:
        params = call.params
        key_ref = kms_required(params, "KeyId")
        message = kms_binary(params, "Message", 4096)
        algorithm = kms_required(params, "MacAlgorithm")
        if algorithm not in KMS_MAC_ALGORITHMS:
            raise KmsError("ValidationException",
                           f"1 validation error detected: Value '{algorithm}' at 'macAlgorithm' "
                           f"failed to satisfy constraint: Member must satisfy enum value set: "
                           f"[{', '.join(KMS_MAC_ALGORITHMS)}]")
        key = self._usable_key(call, key_ref, usage="GENERATE_VERIFY_MAC")
        if KMS_HMAC_SPECS[key.key_spec][1] != algorithm:
            raise KmsError("InvalidKeyUsageException",
                           f"{algorithm} is not supported by {key.arn}, whose key spec is "
                           f"{key.key_spec}.")
        return key, message, algorithm

    def _mac(self, key: KmsKey, message: bytes) -> bytes:
        return hmac.new(key.versions[0], message, KMS_HMAC_SPECS[key.key_spec][2]).digest()

    def _generate_mac(self, call: KmsCall) -> dict:
        key, message, algorithm = self._mac_request(call)
        return {"Mac": b64encode(self._mac(key, message)), "MacAlgorithm": algorithm, "KeyId": key.arn}

    def _verify_mac(self, call: KmsCall) -> dict:
        key, message, algorithm = self._mac_request(call)
        given = kms_binary(call.params, "Mac", 6144)
        if not hmac.compare_digest(self._mac(key, message), given):
            raise KmsError("KMSInvalidMacException", "")
        return {"KeyId": key.arn, "MacValid": True, "MacAlgorithm": algorithm}

    def _set_enabled(self, call: KmsCall, enabled: bool) -> None:
        key = self._usable_key(call, kms_required(call.params, "KeyId"), crypto=False)
        self.store.set_enabled(key, enabled)

    def _list_keys(self, call: KmsCall) -> dict:
        page, next_marker = kms_page(call.params, self.store.list_keys(), lambda k: k.key_id)
        result = {"Keys": [{"KeyId": k.key_id, "KeyArn": k.arn} for k in page],
                  "Truncated": next_marker is not None}
        if next_marker:
            result["NextMarker"] = next_marker
        return result

    def _alias_target(self, call: KmsCall) -> tuple[str, KmsKey]:
        name = kms_string(call.params, "AliasName", required=True)
        target_ref = kms_string(call.params, "TargetKeyId", required=True)
        if not ALIAS_RE.match(name) or name.startswith("alias/aws/"):
            raise KmsError("ValidationException",
                           f"Alias name {name} must begin with 'alias/', use only "
                           f"[a-zA-Z0-9/_-] and not begin with 'alias/aws/'.")
        if "alias/" in target_ref:
            raise KmsError("ValidationException", "TargetKeyId must be a key ID or key ARN.")
        return name, self._usable_key(call, target_ref, crypto=False)

    def _create_alias(self, call: KmsCall) -> None:
        self.store.create_alias(*self._alias_target(call))

    def _update_alias(self, call: KmsCall) -> None:
        self.store.update_alias(*self._alias_target(call))

    def _delete_alias(self, call: KmsCall) -> None:
        self.store.delete_alias(kms_string(call.params, "AliasName", required=True))

    def _list_aliases(self, call: KmsCall) -> dict:
        aliases = self.store.list_aliases()
        key_ref = call.params.get("KeyId")
        if key_ref is not None:
            key_id = self.store.resolve(key_ref).key_id
            aliases = [a for a in aliases if a.target_key_id == key_id]
        page, next_marker = kms_page(call.params, aliases, lambda a: a.name)
        result = {"Aliases": [{"AliasName": a.name, "AliasArn": a.arn,
                               "TargetKeyId": a.target_key_id, "CreationDate": a.created,
                               "LastUpdatedDate": a.updated} for a in page],
                  "Truncated": next_marker is not None}
        if next_marker:
            result["NextMarker"] = next_marker
        return result

    def _schedule_key_deletion(self, call: KmsCall) -> dict:
        key = self._usable_key(call, kms_required(call.params, "KeyId"), crypto=False)
        days = call.params.get("PendingWindowInDays", 30)
        if not isinstance(days, int) or not 7 <= days <= 30:
            raise KmsError("ValidationException",
                           "1 validation error detected: Value at 'pendingWindowInDays' failed "
                           "to satisfy constraint: Member must have value between 7 and 30")
        now = time.time()
        key.pending_deletion_since, key.deletion_date = now, now + days * 86400
        return {"KeyId": key.arn, "DeletionDate": key.deletion_date,
                "KeyState": "PendingDeletion", "PendingWindowInDays": days}

    def _cancel_key_deletion(self, call: KmsCall) -> dict:
        key = self.store.resolve(kms_required(call.params, "KeyId"))
        self._authorize(call, "kms:CancelKeyDeletion", key.arn)
        if key.pending_deletion_since is None:
            raise KmsError("KMSInvalidStateException", f"{key.arn} is not pending deletion.")
        key.pending_deletion_since = key.deletion_date = None
        key.enabled = False          # KMS leaves a key whose deletion was cancelled disabled
        return {"KeyId": key.arn}

    def _rotate_key_on_demand(self, call: KmsCall) -> dict:
        key = self._usable_key(call, kms_required(call.params, "KeyId"), crypto=False)
        if key.key_spec != "SYMMETRIC_DEFAULT":
            raise KmsError("UnsupportedOperationException",
                           f"{key.arn} key spec {key.key_spec} does not support rotation.")
        self.store.rotate(key)
        return {"KeyId": key.key_id}


# --------------------------------------------------------------------------
# HashiCorp Vault: tokens, AppRole and the Transit engine
# --------------------------------------------------------------------------

VAULT_VERSION = "1.15.6+emulator"
VAULT_KEY_TYPES = {"aes256-gcm96": 32, "aes128-gcm96": 16}
VAULT_NAME_RE = re.compile(r"^\w(?:[\w.-]*\w)?$")   # Vault's GenericNameRegex
VAULT_TOO_OLD = "ciphertext or signature version is disallowed by policy (too old)"
PERMISSION_DENIED = "permission denied"


class VaultError(Exception):
    """An error in Vault's shape: HTTP status plus {"errors": [...]}."""

    def __init__(self, status: int, *errors: str, headers: dict | None = None):
        super().__init__(f"{status}: {'; '.join(errors)}")
        self.status = status
        self.errors = list(errors)
        self.headers = headers or {}


# Vault ACL policies (HCL): only `path "..." { capabilities = [...] }` blocks; anything
# else in a policy file (allowed_parameters, min_wrapping_ttl, ...) is refused at load,
# so that no test passes on a rule the emulator would misread.
VAULT_POLICY_RULE = re.compile(r'path\s+"([^"]+)"\s*\{\s*capabilities\s*=\s*\[([^\]]*)\]\s*\}')
VAULT_CAPABILITIES = {"create", "read", "update", "patch", "delete", "list", "sudo", "deny"}
# What every non-root token has (Vault's built-in "default" policy, the part pgphi uses).
VAULT_DEFAULT_POLICY = [("auth/token/lookup-self", {"read"}),
                        ("auth/token/renew-self", {"update"}),
                        ("auth/token/revoke-self", {"update"}),
                        ("sys/wrapping/wrap", {"update"}),
                        ("sys/wrapping/unwrap", {"update"})]


def parse_vault_policy(text: str, source: str = "policy") -> list:
    rules = []
    stripped = re.sub(r"#[^\n]*", "", text)
    for match in VAULT_POLICY_RULE.finditer(stripped):
        capabilities = {c.strip().strip('"') for c in match.group(2).split(",") if c.strip()}
        unknown = capabilities - VAULT_CAPABILITIES
        if unknown:
            raise ValueError(f"{source}: unknown capabilities {sorted(unknown)}")
        rules.append((match.group(1), capabilities))
    if VAULT_POLICY_RULE.sub("", stripped).strip():
        raise ValueError(f"{source}: the emulator reads only path blocks with capabilities")
    if not rules:
        raise ValueError(f"{source}: no path rules")
    return rules


def vault_rule_matches(pattern: str, path: str) -> bool:
    """Vault's path patterns: "+" is one whole segment, a trailing "*" any suffix."""
    glob = pattern.endswith("*")
    body = pattern[:-1] if glob else pattern
    regex = "/".join("[^/]+" if part == "+" else re.escape(part) for part in body.split("/"))
    return re.fullmatch(regex + (".*" if glob else ""), path) is not None


def vault_rule_priority(pattern: str) -> tuple:
    """Higher wins, as Vault ranks matching rules: an exact path first, then the one
    whose first wildcard comes latest, then one not ending in "*", then fewer "+"
    segments, then the longer one."""
    first_wildcard = min([i for i in (pattern.find("+"), pattern.find("*")) if i >= 0],
                         default=len(pattern) + 1)
    exact = "+" not in pattern and not pattern.endswith("*")
    return (exact, first_wildcard, not pattern.endswith("*"), -pattern.count("+"), len(pattern))


def vault_capabilities(rules: list, path: str) -> set:
    matching = [(vault_rule_priority(p), caps) for p, caps in rules if vault_rule_matches(p, path)]
    if not matching:
        return set()
    best = max(priority for priority, _ in matching)
    return set().union(*(caps for priority, caps in matching if priority == best))


def normalize_namespace(value: str | None) -> str:
    return "/".join(part for part in (value or "").strip().split("/") if part)


def namespace_covers(token_namespace: str, request_namespace: str) -> bool:
    """A token works in the namespace it was issued in and in that namespace's children."""
    return (not token_namespace or request_namespace == token_namespace
            or request_namespace.startswith(token_namespace + "/"))


@dataclass
class VaultToken:
    token_id: str
    accessor: str
    policies: list
    display_name: str
    path: str
    namespace: str
    issued: float
    ttl: int                    # TTL granted on creation and on each plain renewal; 0 = none
    max_ttl: int                # renewals never extend past issued + max_ttl
    renewable: bool
    expires: float | None       # None: never expires (the root token)
    meta: dict | None = None
    entity_id: str = ""

    def remaining(self, now: float) -> int:
        # Rounded, not truncated: a token issued with TTL 60 reports 60, as in Vault.
        return 0 if self.expires is None else max(0, round(self.expires - now))


@dataclass
class AppRole:
    name: str
    role_id: str
    secret_id: str


class TokenStore:
    """Issued tokens, the configured root token and AppRole credentials. Thread-safe."""

    def __init__(self, root_token: str | None, approles: list[AppRole], token_ttl: int,
                 token_max_ttl: int, approle_policies: list | None = None,
                 static_tokens: list | None = None):
        self._lock = threading.Lock()
        self._tokens: dict[str, VaultToken] = {}
        self._approles = {role.role_id: role for role in approles}
        self._wrapped: dict[str, tuple] = {}
        self.approle_policies = ["default", *(approle_policies or [])]
        self.logins = 0
        for token_id, policies in static_tokens or []:
            self._tokens[token_id] = VaultToken(
                token_id, secrets.token_urlsafe(18), ["default", *policies], "token",
                "auth/token/create", "", time.time(), 0, 0, False, None)
        self.token_ttl = token_ttl
        self.token_max_ttl = max(token_max_ttl, token_ttl)
        if root_token:
            self._tokens[root_token] = VaultToken(
                root_token, secrets.token_urlsafe(18), ["root"], "root", "auth/token/root", "",
                time.time(), 0, 0, False, None)

    def login_approle(self, role_id: str, secret_id: str, namespace: str) -> VaultToken:
        role = self._approles.get(role_id)
        if role is None or not hmac.compare_digest(role.secret_id.encode(), secret_id.encode()):
            raise VaultError(400, "invalid role or secret ID")
        now = time.time()
        self.logins += 1
        token = VaultToken(
            "hvs." + secrets.token_urlsafe(24), secrets.token_urlsafe(18),
            list(self.approle_policies),
            "approle", "auth/approle/login", namespace, now, self.token_ttl,
            self.token_max_ttl, True, now + self.token_ttl, {"role_name": role.name},
            str(uuid.uuid4()))
        with self._lock:
            self._tokens[token.token_id] = token
        return token

    def login_as(self, method: str, role: str, namespace: str, meta: dict) -> VaultToken:
        """A token from the Kubernetes, JWT or cert auth method (the AppRole policies)."""
        now = time.time()
        self.logins += 1
        token = VaultToken(
            "hvs." + secrets.token_urlsafe(24), secrets.token_urlsafe(18),
            list(self.approle_policies), f"{method}-{role}", f"auth/{method}/login", namespace,
            now, self.token_ttl, self.token_max_ttl, True, now + self.token_ttl,
            {"role": role, **meta}, str(uuid.uuid4()))
        with self._lock:
            self._tokens[token.token_id] = token
        return token

    def wrap(self, data: dict, ttl: int, namespace: str) -> dict:
        """Response wrapping: a single-use token whose secret is `data`."""
        token, now = "hvs.wrap-" + secrets.token_urlsafe(24), time.time()
        with self._lock:
            self._wrapped[token] = (data, now + ttl, namespace)
        return {"token": token, "accessor": secrets.token_urlsafe(18), "ttl": ttl,
                "creation_time": iso_time(now), "creation_path": "sys/wrapping/wrap",
                "wrapped_accessor": ""}

    def unwrap(self, token: str | None, namespace: str) -> dict:
        """The wrapped data, once: the wrapping token is spent by its first unwrap."""
        with self._lock:
            entry = self._wrapped.pop(token or "", None)
        if entry is None or entry[1] <= time.time() or not namespace_covers(entry[2], namespace):
            raise VaultError(400, "wrapping token is not valid or does not exist")
        return entry[0]

    def lookup(self, token_id: str, namespace: str) -> VaultToken | None:
        """The live token with that id if it may be used in namespace, else None."""
        with self._lock:
            token = self._tokens.get(token_id)
            if token is None:
                return None
            if token.expires is not None and token.expires <= time.time():
                del self._tokens[token_id]     # Vault revokes tokens when they expire
                return None
        return token if namespace_covers(token.namespace, namespace) else None

    def renew(self, token: VaultToken, increment: int | None) -> list[str] | None:
        """Extends the token's TTL (by increment, else its own TTL) up to its max TTL.
        Returns Vault's warning when the max TTL capped the request."""
        if not token.renewable:
            raise VaultError(400, "lease is not renewable")
        with self._lock:
            now = time.time()
            requested = increment if increment else token.ttl
            limit = token.issued + token.max_ttl
            token.expires = min(now + requested, limit)
            if now + requested > limit:
                return [f'TTL of "{go_duration(requested)}" exceeded the effective max_ttl of '
                        f'"{go_duration(limit - now)}"; TTL value is capped accordingly']
        return None

    def revoke(self, token: VaultToken) -> None:
        with self._lock:
            self._tokens.pop(token.token_id, None)

    def expire_all(self, include_root: bool) -> int:
        """The "expire_tokens" fault: every issued token (and the root token if asked)
        stops working at once; new logins still succeed."""
        with self._lock:
            doomed = [token_id for token_id, token in self._tokens.items()
                      if include_root or token.expires is not None]
            for token_id in doomed:
                del self._tokens[token_id]
            return len(doomed)


@dataclass
class TransitKey:
    name: str
    key_type: str
    derived: bool
    exportable: bool
    versions: list = field(default_factory=list)   # (material, unix time); version n is [n-1]
    min_decryption_version: int = 1
    min_encryption_version: int = 0
    deletion_allowed: bool = False

    @property
    def latest_version(self) -> int:
        return len(self.versions)

    def add_version(self) -> None:
        self.versions.append((os.urandom(VAULT_KEY_TYPES[self.key_type]), int(time.time())))


def parse_vault_ciphertext(text) -> tuple[int, str]:
    """Splits "vault:v<N>:<base64>" into N and the base64 part, with Vault's messages."""
    prefix = "vault:v"
    if not isinstance(text, str) or not text.startswith(prefix):
        raise VaultError(400, "invalid ciphertext: no prefix")
    version_text, sep, payload = text[len(prefix):].partition(":")
    if not sep:
        raise VaultError(400, "invalid ciphertext: wrong number of fields")
    try:
        version = int(version_text)
    except ValueError:
        raise VaultError(400, "invalid ciphertext: version number could not be decoded") from None
    return (1 if version == 0 else version), payload   # v0 means v1 in Vault


class TransitStore:
    """Transit keys of every namespace and mount. Thread-safe."""

    def __init__(self):
        self._lock = threading.RLock()
        self._keys: dict[tuple[str, str, str], TransitKey] = {}

    def get(self, namespace: str, mount: str, name: str) -> TransitKey | None:
        with self._lock:
            return self._keys.get((namespace, mount, name))

    def create(self, namespace: str, mount: str, name: str, key_type: str = "aes256-gcm96",
               derived: bool = False, exportable: bool = False) -> tuple[TransitKey, bool]:
        """Returns the key and whether it was created (False: it already existed)."""
        with self._lock:
            existing = self._keys.get((namespace, mount, name))
            if existing is not None:
                return existing, False
            key = TransitKey(name, key_type, derived, exportable)
            key.add_version()
            self._keys[(namespace, mount, name)] = key
            return key, True

    def delete(self, namespace: str, mount: str, name: str) -> None:
        with self._lock:
            key = self._keys.get((namespace, mount, name))
            if key is None:
                raise VaultError(400, f"error deleting policy {name}: could not delete key; "
                                      f"not found")
            if not key.deletion_allowed:
                raise VaultError(400, f"error deleting policy {name}: deletion is not allowed "
                                      f"for this policy")
            del self._keys[(namespace, mount, name)]

    def names(self, namespace: str, mount: str) -> list[str]:
        with self._lock:
            return sorted(name for (ns, mnt, name) in self._keys if (ns, mnt) == (namespace, mount))

    def rotate(self, key: TransitKey) -> None:
        with self._lock:
            key.add_version()

    def configure(self, key: TransitKey, min_decryption: int | None, min_encryption: int | None,
                  deletion_allowed: bool | None) -> None:
        with self._lock:
            decryption = key.min_decryption_version if min_decryption is None else min_decryption
            encryption = key.min_encryption_version if min_encryption is None else min_encryption
            decryption = decryption or 1
            if decryption < 0 or encryption < 0:
                raise VaultError(400, "key versions cannot be negative")
            if decryption > key.latest_version:
                raise VaultError(400, "cannot set min_decryption_version above the latest "
                                      "version")
            if encryption > key.latest_version:
                raise VaultError(400, "cannot set min_encryption_version above the latest "
                                      "version")
            if encryption and encryption < decryption:
                raise VaultError(400, "min encryption version should not be less than min "
                                      "decryption version")
            key.min_decryption_version = decryption
            key.min_encryption_version = encryption
            if deletion_allowed is not None:
                key.deletion_allowed = deletion_allowed

    def describe(self, key: TransitKey) -> dict:
        with self._lock:
            info = {
                "name": key.name,
                "type": key.key_type,
                "derived": key.derived,
                "deletion_allowed": key.deletion_allowed,
                "exportable": key.exportable,
                "allow_plaintext_backup": False,
                "latest_version": key.latest_version,
                "min_available_version": 0,
                "min_decryption_version": key.min_decryption_version,
                "min_encryption_version": key.min_encryption_version,
                "keys": {str(n): created for n, (_, created) in enumerate(key.versions, 1)},
                "supports_encryption": True,
                "supports_decryption": True,
                "supports_derivation": True,
                "supports_signing": False,
                "auto_rotate_period": 0,
                "imported_key": False,
                "soft_deleted": False,
            }
            if key.derived:
                info.update(kdf="hkdf_sha256", convergent_encryption=False)
            return info

    def encrypt(self, key: TransitKey, plaintext: bytes, context: bytes | None,
                aad: bytes | None, version: int = 0) -> tuple[str, int]:
        with self._lock:
            version = self._encryption_version(key, version)
            material = self._material(key, version, context)
        sealed = aes_gcm_seal(material, plaintext, aad)
        return f"vault:v{version}:{b64encode(sealed)}", version

    def decrypt(self, key: TransitKey, ciphertext, context: bytes | None, aad: bytes | None
                ) -> bytes:
        version, payload = parse_vault_ciphertext(ciphertext)
        with self._lock:
            if version > key.latest_version:
                raise VaultError(400, "invalid ciphertext: version is too new")
            if version < key.min_decryption_version:
                raise VaultError(400, VAULT_TOO_OLD)
            material = self._material(key, version, context)
        try:
            sealed = b64decode(payload)
        except ValueError:
            raise VaultError(400, "invalid ciphertext: could not decode base64") from None
        if len(sealed) < GCM_NONCE_BYTES:
            raise VaultError(400, "invalid ciphertext length")
        try:
            return aes_gcm_open(material, sealed, aad)
        except InvalidTag:
            raise VaultError(400, "cipher: message authentication failed") from None

    @staticmethod
    def _encryption_version(key: TransitKey, requested: int) -> int:
        if requested == 0:
            return key.latest_version
        if requested > key.latest_version:
            raise VaultError(400, "requested version for encryption is higher than the latest "
                                  "key version")
        if requested < max(key.min_encryption_version, 1):
            raise VaultError(400, "requested version for encryption is less than the minimum "
                                  "encryption key version")
        return requested

    @staticmethod
    def _material(key: TransitKey, version: int, context: bytes | None) -> bytes:
        material = key.versions[version - 1][0]
        if not key.derived:
            return material            # Vault ignores a context for non-derived keys
        if not context:
            raise VaultError(400, "missing 'context' for key derivation; the key was created "
                                  "using a derived key, which means additional, per-request "
                                  "information must be included in order to perform operations "
                                  "with the key")
        return HKDF(algorithm=hashes.SHA256(), length=len(material), salt=None,
                    info=context).derive(material)


# Request parameters, read leniently the way Vault's field parser does.

def vault_bool(body: dict, name: str, default: bool | None = False) -> bool | None:
    value = body.get(name)
    if value is None:                # absent or JSON null (clients send nulls for unset fields)
        return default
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "t"):
        return True
    if str(value).lower() in ("false", "0", "f", ""):
        return False
    raise VaultError(400, f"error converting input {value} for field \"{name}\"")


def vault_int(body: dict, name: str, default: int | None = 0) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value))
    except ValueError:
        raise VaultError(400, f"error converting input {value} for field \"{name}\"") from None


def vault_b64(body: dict, name: str) -> bytes | None:
    value = body.get(name)
    if value in (None, ""):
        return None
    try:
        return b64decode(value)
    except ValueError:
        raise VaultError(400, f"failed to base64-decode {name}") from None


@dataclass
class VaultCall:
    operation: str
    namespace: str
    captures: dict
    body: dict
    token: VaultToken | None = None
    headers: object = None
    peer_cert: dict | None = None

    @property
    def mount(self) -> str:
        return self.captures.get("mount", "")

    @property
    def name(self) -> str | None:
        return self.captures.get("name")


# (path pattern, {HTTP method: operation}). "{mount}" matches a configured mount,
# "{name}" a valid key name, "{kind}" anything. GET ...?list=true counts as LIST.
VAULT_ROUTES = [
    (("sys", "health"), {"GET": "health", "HEAD": "health"}),
    (("auth", "approle", "login"), {"POST": "login", "PUT": "login"}),
    (("auth", "kubernetes", "login"), {"POST": "login_kubernetes", "PUT": "login_kubernetes"}),
    (("auth", "jwt", "login"), {"POST": "login_jwt", "PUT": "login_jwt"}),
    (("auth", "cert", "login"), {"POST": "login_cert", "PUT": "login_cert"}),
    (("sys", "wrapping", "wrap"), {"POST": "wrap", "PUT": "wrap"}),
    (("sys", "wrapping", "unwrap"), {"POST": "unwrap", "PUT": "unwrap"}),
    (("auth", "token", "lookup-self"), {"GET": "lookup_self", "POST": "lookup_self"}),
    (("auth", "token", "renew-self"), {"POST": "renew_self", "PUT": "renew_self"}),
    (("auth", "token", "revoke-self"), {"POST": "revoke_self", "PUT": "revoke_self"}),
    (("{mount}", "keys"), {"LIST": "list_keys"}),
    (("{mount}", "keys", "{name}"),
     {"POST": "create_key", "PUT": "create_key", "GET": "read_key", "DELETE": "delete_key"}),
    (("{mount}", "keys", "{name}", "rotate"), {"POST": "rotate", "PUT": "rotate"}),
    (("{mount}", "keys", "{name}", "config"), {"POST": "config", "PUT": "config"}),
    (("{mount}", "encrypt", "{name}"), {"POST": "encrypt", "PUT": "encrypt"}),
    (("{mount}", "decrypt", "{name}"), {"POST": "decrypt", "PUT": "decrypt"}),
    (("{mount}", "rewrap", "{name}"), {"POST": "rewrap", "PUT": "rewrap"}),
    (("{mount}", "datakey", "{kind}", "{name}"), {"POST": "datakey", "PUT": "datakey"}),
    (("{mount}", "hmac", "{name}"), {"POST": "hmac", "PUT": "hmac"}),
    (("{mount}", "hmac", "{name}", "{kind}"), {"POST": "hmac", "PUT": "hmac"}),
    (("{mount}", "verify", "{name}"), {"POST": "verify", "PUT": "verify"}),
    (("{mount}", "verify", "{name}", "{kind}"), {"POST": "verify", "PUT": "verify"}),
]
# Logins authenticate with what they carry; unwrap with the wrapping token itself.
VAULT_UNAUTHENTICATED = {"health", "login", "login_kubernetes", "login_jwt", "login_cert", "unwrap"}
VAULT_CRYPTO_OPERATIONS = {"encrypt", "decrypt", "rewrap", "datakey", "hmac", "verify"}
# Transit's HMAC algorithms (path suffix or "algorithm"), and their hashes.
VAULT_HMAC_ALGORITHMS = {"sha2-224": hashlib.sha224, "sha2-256": hashlib.sha256,
                         "sha2-384": hashlib.sha384, "sha2-512": hashlib.sha512}


class VaultApi:
    def __init__(self, transit: TransitStore, tokens: TokenStore, mounts: list[str],
                 faults: FaultBook, stats: Stats, policies: dict | None = None,
                 require_request_header: bool = False):
        self.policies = policies or {}           # name -> rules (parse_vault_policy)
        self.require_request_header = require_request_header
        self.transit = transit
        self.tokens = tokens
        self.mounts = set(mounts)
        self.faults = faults
        self.stats = stats
        self.cluster_id = str(uuid.uuid4())

    kubernetes_roles: dict = {}            # role -> (service account subject, audience or None)
    jwt_roles: dict = {}                   # role -> (bound subject, bound audience or None)
    cert_roles: dict = {}                  # role -> allowed common name ("*": any)
    jwt = None                             # the JwtIssuer that signs the tests' tokens

    def handle(self, method: str, path: str, raw_query: str, headers, body: bytes,
               peer_cert: dict | None = None) -> HttpResponse:
        if method == "GET" and urllib.parse.parse_qs(raw_query).get("list") == ["true"]:
            method = "LIST"
        segments = [urllib.parse.unquote(s) for s in path[len("/v1/"):].split("/") if s]
        namespace = normalize_namespace(headers.get("X-Vault-Namespace"))
        label = f"vault {method} /v1/{'/'.join(segments)}"
        try:
            operation, captures, path_namespace = self._route(method, segments)
        except VaultError as exc:
            self.stats.request("vault", "unsupported_path")
            return self._error_response(exc, label)
        namespace = "/".join(part for part in (namespace, path_namespace) if part)
        relative_path = "/".join(segments[len(path_namespace.split("/")) if path_namespace else 0:])
        label = f"vault {operation} ns={namespace or '-'} key={captures.get('name', '-')}"
        self.stats.request("vault", operation, namespace)
        try:
            if self.require_request_header and headers.get("X-Vault-Request") != "true":
                # What a Vault Agent or Proxy listener with require_request_header says.
                raise VaultError(412, "missing 'X-Vault-Request' header")
            fault = self.faults.take_request_fault("vault")
            if fault:
                inject_fault(fault, self.stats,
                             lambda mode: self._fault_error(mode, None, path, raw_query))
            call = VaultCall(operation, namespace, captures, self._parse_body(body),
                             headers=headers, peer_cert=peer_cert)
            if operation not in VAULT_UNAUTHENTICATED:
                call.token = self._authenticate(headers, namespace)
                self._authorize(call, method, relative_path)
            if call.name:
                self._check_key_fault(call, path, raw_query)
            status, payload = getattr(self, f"_op_{operation}")(call)
            return json_response(status, payload, label=label,
                                 headers={"Cache-Control": "no-store"})
        except VaultError as exc:
            return self._error_response(exc, label)

    def _authorize(self, call: VaultCall, method: str, path: str) -> None:
        """Vault's ACL: the token's policies must grant the capability the request needs
        on its path (relative to the namespace). The root policy may do everything."""
        policies = call.token.policies
        if "root" in policies:
            return
        rules = list(VAULT_DEFAULT_POLICY) if "default" in policies else []
        for name in policies:
            rules += self.policies.get(name, [])
        # A policy's paths are relative to the namespace of the token that carries it.
        below = call.namespace[len(call.token.namespace):].strip("/")
        capabilities = vault_capabilities(rules, f"{below}/{path}" if below else path)
        needed = {"GET": "read", "HEAD": "read", "LIST": "list", "DELETE": "delete"}.get(method)
        if needed is None:
            # POST/PUT: create when the target does not exist yet, else update (Vault's
            # existence check, which Transit has for keys/:name and encrypt/:name only).
            creates = call.operation in ("create_key", "encrypt") and call.name and \
                self.transit.get(call.namespace, call.mount, call.name) is None
            needed = "create" if creates else "update"
        if "deny" in capabilities or needed not in capabilities:
            self.stats.bump("denied_by_policy")
            raise VaultError(403, "1 error occurred:\n\t* permission denied\n\n")

    def _route(self, method: str, segments: list[str]) -> tuple[str, dict, str]:
        """Finds the route; segments before it name a namespace (Vault accepts the
        namespace in the path as well as in X-Vault-Namespace)."""
        for start in range(len(segments)):
            for pattern, methods in VAULT_ROUTES:
                captures = self._match(pattern, segments[start:])
                if captures is None:
                    continue
                if method not in methods:
                    raise VaultError(405, "unsupported operation")
                return methods[method], captures, "/".join(segments[:start])
        raise VaultError(404, "unsupported path")

    def _match(self, pattern: tuple, segments: list[str]) -> dict | None:
        if len(pattern) != len(segments):
            return None
        captures = {}
        for want, got in zip(pattern, segments):
            if want == "{mount}":
                if got not in self.mounts:
                    return None
                captures["mount"] = got
            elif want == "{name}":
                if not VAULT_NAME_RE.match(got):
                    return None
                captures["name"] = got
            elif want == "{kind}":
                captures["kind"] = got
            elif want != got:
                return None
        return captures

    @staticmethod
    def _parse_body(body: bytes) -> dict:
        if not body.strip():
            return {}
        try:
            parsed = json.loads(body)
        except ValueError as exc:
            raise VaultError(400, f"failed to parse JSON input: {exc}") from None
        if not isinstance(parsed, dict):
            raise VaultError(400, "failed to parse JSON input: expected an object")
        return parsed

    def _authenticate(self, headers, namespace: str) -> VaultToken:
        token_id = headers.get("X-Vault-Token")
        bearer = headers.get("Authorization", "")
        if not token_id and bearer.lower().startswith("bearer "):
            token_id = bearer[len("bearer "):].strip()
        token = self.tokens.lookup(token_id, namespace) if token_id else None
        if token is None:
            self.stats.bump("rejected_tokens")
            raise VaultError(403, PERMISSION_DENIED)
        return token

    def _check_key_fault(self, call: VaultCall, path: str, raw_query: str) -> None:
        fault = self.faults.take_key_fault("vault", call.name,
                                           call.operation in VAULT_CRYPTO_OPERATIONS)
        if fault:
            inject_fault(fault, self.stats,
                         lambda mode: self._fault_error(mode, call.name, path, raw_query))

    def _fault_error(self, mode: str, key_name: str | None, path: str = "",
                     raw_query: str = "") -> VaultError:
        if mode == "deny":
            return VaultError(403, PERMISSION_DENIED)
        if mode == "throttle":
            # Vault's rate-limit quotas answer 429 with Retry-After.
            return VaultError(429, "request path \"" + path.lstrip("/") + "\": rate limit quota exceeded",
                              headers={"Retry-After": "1"})
        if mode == "standby_redirect":
            # A standby forwards clients to the active node with 307 (to the active node's
            # api_addr; here the same emulator, so one redirect is followed and answered).
            location = f"https://{LOOPBACK}:{self.port}{path}" + (f"?{raw_query}" if raw_query else "")
            return VaultError(307, headers={"Location": location})
        if mode == "sealed":
            return VaultError(503, "Vault is sealed")
        if mode == "namespace_locked":
            return VaultError(423, "API access to this namespace has been locked by an administrator")
        if mode == "missing_state":
            return VaultError(412, "required index state not present")
        return VaultError(500, "internal error")

    port = 0                               # set once the server listens (for redirects)

    def _error_response(self, exc: VaultError, label: str) -> HttpResponse:
        self.stats.error("vault", exc.status)
        LOG.info("%s failed: %d %s", label, exc.status, "; ".join(exc.errors))
        if exc.status == 307:
            response = json_response(307, None, label=f"{label} 307", headers=exc.headers)
            return response
        return json_response(exc.status, {"errors": exc.errors}, label=f"{label} {exc.status}",
                             headers=exc.headers)

    @staticmethod
    def _envelope(data=None, auth=None, warnings=None, mount_type: str = "") -> dict:
        return {"request_id": str(uuid.uuid4()), "lease_id": "", "renewable": False,
                "lease_duration": 0, "data": data, "wrap_info": None, "warnings": warnings,
                "auth": auth, "mount_type": mount_type}

    def _existing_key(self, call: VaultCall) -> TransitKey:
        key = self.transit.get(call.namespace, call.mount, call.name)
        if key is None:
            raise VaultError(400, "encryption key not found")
        return key

    def _transit_result(self, data=None, warnings=None) -> tuple[int, dict]:
        return 200, self._envelope(data=data, warnings=warnings, mount_type="transit")

    # System and auth endpoints.

    def _op_health(self, call: VaultCall):
        return 200, {"initialized": True, "sealed": False, "standby": False,
                     "performance_standby": False, "replication_performance_mode": "disabled",
                     "replication_dr_mode": "disabled", "server_time_utc": int(time.time()),
                     "version": VAULT_VERSION, "cluster_name": "vault-cluster-emulator",
                     "cluster_id": self.cluster_id}

    def _op_login(self, call: VaultCall):
        role_id, secret_id = call.body.get("role_id"), call.body.get("secret_id")
        if not isinstance(role_id, str) or not role_id:
            raise VaultError(400, "missing role_id")
        if not isinstance(secret_id, str):
            raise VaultError(400, "missing secret_id")
        token = self.tokens.login_approle(role_id, secret_id, call.namespace)
        self.stats.bump("vault_logins")
        return 200, self._envelope(auth=self._auth_block(token), mount_type="approle")

    def _login_token(self, call: VaultCall, claims_of: Callable, roles: dict, method: str):
        role = call.body.get("role")
        if not isinstance(role, str) or not role:
            raise VaultError(400, "missing role")
        if role not in roles:
            raise VaultError(400, f'invalid role name "{role}"' if method == "kubernetes"
                             else f'role "{role}" could not be found')
        jwt = call.body.get("jwt")
        if not isinstance(jwt, str) or not jwt:
            raise VaultError(400, "missing jwt")
        claims = claims_of(jwt)
        subject, audience = roles[role]
        if claims.get("sub") != subject:
            raise VaultError(403 if method == "kubernetes" else 400,
                             "service account name not authorized" if method == "kubernetes"
                             else "error validating claims: sub claim does not match bound subject")
        if audience and claims.get("aud") != audience:
            raise VaultError(403 if method == "kubernetes" else 400,
                             "invalid audience (aud) claim: audience claim does not match any "
                             "expected audience")
        token = self.tokens.login_as(method, role, call.namespace, {"sub": subject})
        self.stats.bump("vault_logins")
        return 200, self._envelope(auth=self._auth_block(token), mount_type=method)

    def _op_login_kubernetes(self, call: VaultCall):
        def claims_of(jwt: str) -> dict:
            # Vault asks the cluster's TokenReview API, which refuses an invalid or
            # expired service account token; Vault answers 403 permission denied.
            try:
                return self.jwt.verify(jwt)
            except ValueError:
                raise VaultError(403, "permission denied") from None
        return self._login_token(call, claims_of, self.kubernetes_roles, "kubernetes")

    def _op_login_jwt(self, call: VaultCall):
        def claims_of(jwt: str) -> dict:
            try:
                return self.jwt.verify(jwt)
            except ValueError as exc:
                if str(exc).startswith("expired"):
                    raise VaultError(400, "error validating token: token is expired") from None
                raise VaultError(400, "error validating token: invalid signature") from None
        return self._login_token(call, claims_of, self.jwt_roles, "jwt")

    def _op_login_cert(self, call: VaultCall):
        name = call.body.get("name") or None
        invalid = VaultError(400, "invalid certificate or no client certificate supplied")
        if not call.peer_cert:
            raise invalid
        subject = dict(part for rdn in call.peer_cert.get("subject", ()) for part in rdn)
        common_name = subject.get("commonName", "")
        candidates = [name] if name else sorted(self.cert_roles)
        for role in candidates:
            if role in self.cert_roles and self.cert_roles[role] in ("*", common_name):
                token = self.tokens.login_as("cert", role, call.namespace, {"common_name": common_name})
                self.stats.bump("vault_logins")
                return 200, self._envelope(auth=self._auth_block(token), mount_type="cert")
        raise invalid

    def _op_wrap(self, call: VaultCall):
        ttl_header = call.headers.get("X-Vault-Wrap-TTL") if call.headers else None
        try:
            ttl = parse_duration(ttl_header) if ttl_header else 300
        except ValueError as exc:
            raise VaultError(400, str(exc)) from None
        if not call.body:
            raise VaultError(400, "empty wrap request")
        envelope = self._envelope()
        envelope["wrap_info"] = self.tokens.wrap(call.body, ttl, call.namespace)
        return 200, envelope

    def _op_unwrap(self, call: VaultCall):
        token = call.body.get("token") or (call.headers.get("X-Vault-Token") if call.headers else None)
        data = self.tokens.unwrap(token, call.namespace)
        self.stats.bump("vault_unwraps")
        return 200, self._envelope(data=data)

    @staticmethod
    def _auth_block(token: VaultToken) -> dict:
        return {"client_token": token.token_id, "accessor": token.accessor,
                "policies": token.policies, "token_policies": token.policies,
                "metadata": token.meta, "lease_duration": token.remaining(time.time()),
                "renewable": token.renewable, "entity_id": token.entity_id,
                "token_type": "service", "orphan": True, "mfa_requirement": None,
                "num_uses": 0}

    def _op_lookup_self(self, call: VaultCall):
        token, now = call.token, time.time()
        data = {"accessor": token.accessor, "creation_time": int(token.issued),
                "creation_ttl": token.ttl, "display_name": token.display_name,
                "entity_id": token.entity_id,
                "expire_time": None if token.expires is None else iso_time(token.expires),
                "explicit_max_ttl": 0, "id": token.token_id, "issue_time": iso_time(token.issued),
                "meta": token.meta, "num_uses": 0, "orphan": True, "path": token.path,
                "policies": token.policies, "renewable": token.renewable,
                "ttl": token.remaining(now), "type": "service",
                "namespace_path": token.namespace + "/" if token.namespace else ""}
        return 200, self._envelope(data=data, mount_type="token")

    def _op_renew_self(self, call: VaultCall):
        increment = call.body.get("increment")
        try:
            increment = parse_duration(increment) if increment not in (None, "") else None
        except ValueError as exc:
            raise VaultError(400, str(exc)) from None
        warnings = self.tokens.renew(call.token, increment)
        return 200, self._envelope(auth=self._auth_block(call.token), warnings=warnings,
                                   mount_type="token")

    def _op_revoke_self(self, call: VaultCall):
        self.tokens.revoke(call.token)
        return 204, None

    # Transit key management.

    def _op_list_keys(self, call: VaultCall):
        names = self.transit.names(call.namespace, call.mount)
        if not names:
            return 404, {"errors": []}
        return self._transit_result({"keys": names})

    def _op_create_key(self, call: VaultCall):
        body = call.body
        key_type = body.get("type") or "aes256-gcm96"
        if key_type not in VAULT_KEY_TYPES:
            raise VaultError(400, f"unknown key type {key_type} (the emulator supports "
                                  f"{', '.join(VAULT_KEY_TYPES)})")
        derived = vault_bool(body, "derived")
        if vault_bool(body, "convergent_encryption"):
            raise VaultError(400, "convergent encryption is not supported by the emulator")
        key, created = self.transit.create(call.namespace, call.mount, call.name, key_type,
                                           derived, vault_bool(body, "exportable"))
        warnings = None if created else [f"key {call.name} already existed"]
        return self._transit_result(self.transit.describe(key), warnings)

    def _op_read_key(self, call: VaultCall):
        key = self.transit.get(call.namespace, call.mount, call.name)
        if key is None:
            return 404, {"errors": []}
        return self._transit_result(self.transit.describe(key))

    def _op_delete_key(self, call: VaultCall):
        self.transit.delete(call.namespace, call.mount, call.name)
        return 204, None

    def _op_rotate(self, call: VaultCall):
        key = self._existing_key(call)
        self.transit.rotate(key)
        return self._transit_result(self.transit.describe(key))

    def _op_config(self, call: VaultCall):
        key = self.transit.get(call.namespace, call.mount, call.name)
        if key is None:
            raise VaultError(400, f"no existing key named {call.name} could be found")
        self.transit.configure(key, vault_int(call.body, "min_decryption_version", None),
                               vault_int(call.body, "min_encryption_version", None),
                               vault_bool(call.body, "deletion_allowed", None))
        return self._transit_result(self.transit.describe(key))

    # Transit cryptography.

    def _batch(self, call: VaultCall, one: Callable[[dict], dict]):
        """batch_input: each item is answered on its own (with the request's other
        parameters as defaults); an item that fails carries its error, and the answer is
        400 if any did (Vault's default partial_failure_response_code)."""
        body = call.body
        if "batch_input" not in body:
            return self._transit_result(one(body))
        items = body["batch_input"]
        if not isinstance(items, list) or not items:
            raise VaultError(400, "missing batch input to process")
        results, failed = [], False
        for item in items:
            if not isinstance(item, dict):
                raise VaultError(400, "failed to parse batch input")
            merged = {k: v for k, v in body.items() if k != "batch_input"} | item
            try:
                result = one(merged)
            except VaultError as exc:
                result, failed = {"error": "; ".join(exc.errors)}, True
            if "reference" in item:
                result["reference"] = item["reference"]
            results.append(result)
        status, payload = self._transit_result({"batch_results": results})
        return (400 if failed else status), payload

    def _op_encrypt(self, call: VaultCall):
        def one(body: dict) -> dict:
            if "plaintext" not in body:
                raise VaultError(400, "missing plaintext to encrypt")
            plaintext = vault_b64(body, "plaintext") or b""
            context = vault_b64(body, "context")
            key = self.transit.get(call.namespace, call.mount, call.name)
            if key is None:
                # Vault creates the key on first encrypt ("upsert"), derived if a context came.
                key_type = body.get("type") or "aes256-gcm96"
                if key_type not in VAULT_KEY_TYPES:
                    raise VaultError(400, f"unknown key type {key_type}")
                key, _ = self.transit.create(call.namespace, call.mount, call.name, key_type,
                                             derived=context is not None)
            ciphertext, version = self.transit.encrypt(
                key, plaintext, context, vault_b64(body, "associated_data"),
                vault_int(body, "key_version"))
            return {"ciphertext": ciphertext, "key_version": version}
        return self._batch(call, one)

    def _op_decrypt(self, call: VaultCall):
        def one(body: dict) -> dict:
            if not body.get("ciphertext"):
                raise VaultError(400, "missing ciphertext to decrypt")
            key = self._existing_key(call)
            plaintext = self.transit.decrypt(key, body["ciphertext"], vault_b64(body, "context"),
                                             vault_b64(body, "associated_data"))
            return {"plaintext": b64encode(plaintext)}
        return self._batch(call, one)

    def _op_rewrap(self, call: VaultCall):
        # Vault's rewrap has no associated_data field (hashicorp/vault#31791):
        # it is ignored, so a ciphertext encrypted with associated data fails
        # its authentication, as it does in Vault.
        def one(body: dict) -> dict:
            if not body.get("ciphertext"):
                raise VaultError(400, "missing ciphertext to rewrap")
            key = self._existing_key(call)
            context = vault_b64(body, "context")
            plaintext = self.transit.decrypt(key, body["ciphertext"], context, None)
            ciphertext, version = self.transit.encrypt(key, plaintext, context, None,
                                                       vault_int(body, "key_version"))
            return {"ciphertext": ciphertext, "key_version": version}
        status, payload = self._batch(call, one)
        if "associated_data" in call.body and status == 200:
            payload["warnings"] = ["Endpoint ignored these unrecognized parameters: [associated_data]"]
        return status, payload

    def _op_datakey(self, call: VaultCall):
        kind = call.captures["kind"]
        if kind not in ("plaintext", "wrapped"):
            raise VaultError(400, "invalid type")
        bits = vault_int(call.body, "bits", 256)
        if bits not in (128, 256, 512):
            raise VaultError(400, "invalid bits length")
        key = self._existing_key(call)
        data_key = os.urandom(bits // 8)
        ciphertext, version = self.transit.encrypt(key, data_key, vault_b64(call.body, "context"),
                                                   None, vault_int(call.body, "key_version"))
        data = {"ciphertext": ciphertext, "key_version": version}
        if kind == "plaintext":
            data["plaintext"] = b64encode(data_key)
        return self._transit_result(data)


    # Transit HMAC: each key version has an HMAC key of its own (here derived
    # from the version's material), and "vault:v<N>:<base64>" names the version.

    @staticmethod
    def _hmac_algorithm(call: VaultCall) -> Callable:
        name = call.captures.get("kind") or call.body.get("algorithm") or "sha2-256"
        if name not in VAULT_HMAC_ALGORITHMS:
            raise VaultError(400, f"unsupported algorithm {name}")
        return VAULT_HMAC_ALGORITHMS[name]

    @staticmethod
    def _hmac_input(call: VaultCall) -> bytes:
        if "batch_input" in call.body:
            raise VaultError(400, "batch_input is not supported by the emulator")
        if "input" not in call.body:
            raise VaultError(400, "missing input for HMAC")
        value = call.body["input"]
        if not isinstance(value, str):
            raise VaultError(400, "unable to decode input as base64")
        try:
            return base64.b64decode(value, validate=True)
        except (ValueError, binascii.Error):
            raise VaultError(400, "unable to decode input as base64") from None

    @staticmethod
    def _hmac_key(key: TransitKey, version: int) -> bytes:
        material = key.versions[version - 1][0]
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=b"emulator transit hmac key").derive(material)

    def _op_hmac(self, call: VaultCall):
        digest = self._hmac_algorithm(call)
        message = self._hmac_input(call)
        key = self._existing_key(call)
        version = vault_int(call.body, "key_version") or key.latest_version
        if version > key.latest_version:
            raise VaultError(400, "cannot generate HMAC: version is too new")
        if version < key.min_encryption_version:
            raise VaultError(400, "cannot generate HMAC: version is too old (disallowed by policy)")
        mac = hmac.new(self._hmac_key(key, version), message, digest).digest()
        return self._transit_result({"hmac": f"vault:v{version}:{b64encode(mac)}"})

    def _op_verify(self, call: VaultCall):
        digest = self._hmac_algorithm(call)
        message = self._hmac_input(call)
        key = self._existing_key(call)
        given = call.body.get("hmac")
        if given is None:
            if "signature" in call.body:
                raise VaultError(400, "key type does not support signing")
            raise VaultError(400, "missing signature or hmac to verify")
        if not isinstance(given, str) or not given.startswith("vault:"):
            raise VaultError(400, "invalid value")
        parts = given.split(":")
        if len(parts) != 3 or not parts[1].startswith("v"):
            raise VaultError(400, "invalid value")
        try:
            version = int(parts[1][1:])
            mac = base64.b64decode(parts[2], validate=True)
        except (ValueError, binascii.Error):
            raise VaultError(400, "invalid value") from None
        if version <= 0 or version > key.latest_version:
            raise VaultError(400, "invalid value")
        if version < key.min_decryption_version:
            raise VaultError(400, "cannot verify HMAC: version is too old (disallowed by policy)")
        expected = hmac.new(self._hmac_key(key, version), message, digest).digest()
        return self._transit_result({"valid": hmac.compare_digest(expected, mac)})


# --------------------------------------------------------------------------
# Control API (/_emulator/...)
# --------------------------------------------------------------------------

class AdminError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class AdminApi:
    """Test-only control plane, guarded by its own token in X-Emulator-Admin."""

    def __init__(self, admin_token: str, kms_store: KmsStore, transit: TransitStore,
                 tokens: TokenStore, default_mount: str, faults: FaultBook, stats: Stats,
                 request_shutdown: Callable[[], None]):
        self.admin_token = admin_token
        self.kms_store = kms_store
        self.transit = transit
        self.tokens = tokens
        self.default_mount = default_mount
        self.faults = faults
        self.stats = stats
        self.request_shutdown = request_shutdown
        self._routes = {
            ("GET", "/_emulator/health"): lambda body: {"status": "ok"},
            ("GET", "/_emulator/fault"): lambda body: {"faults": self.faults.describe()},
            ("POST", "/_emulator/fault"): self._set_fault,
            ("GET", "/_emulator/stats"): lambda body: self.stats.snapshot(),
            ("POST", "/_emulator/stats/reset"): self._reset_stats,
            ("POST", "/_emulator/kms/rotate"): self._rotate_kms_key,
            ("POST", "/_emulator/kms/keys"): self._create_kms_key,
            ("POST", "/_emulator/vault/keys"): self._create_vault_key,
            ("POST", "/_emulator/shutdown"): lambda body: {"status": "shutting down"},
            ("POST", "/_emulator/jwt"): self._issue_jwt,
            ("POST", "/_emulator/container/token"): self._set_container_token,
        }
        self.jwt: JwtIssuer | None = None
        self.container: ContainerCredentialsApi | None = None

    def _issue_jwt(self, body: dict) -> dict:
        """A signed identity token: {"subject", "audience", "ttl" (negative: expired),
        "claims"}."""
        subject, audience = body.get("subject", "system:serviceaccount:db:pgphi"), body.get("audience")
        ttl, claims = body.get("ttl", 3600), body.get("claims") or {}
        if not isinstance(subject, str) or not isinstance(audience, str) or not audience:
            raise AdminError(400, "subject and audience must be strings")
        if not isinstance(ttl, int) or not isinstance(claims, dict):
            raise AdminError(400, "ttl must be an integer and claims an object")
        return {"token": self.jwt.issue(subject, audience, ttl, claims)}

    def _set_container_token(self, body: dict) -> dict:
        """The authorization token the container credentials endpoint accepts from now on
        (EKS Pod Identity rotates it)."""
        if self.container is None:
            raise AdminError(404, "the container credentials endpoint is not enabled")
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise AdminError(400, "token must be a non-empty string")
        self.container.token = token
        return {"status": "ok"}

    def handle(self, method: str, path: str, headers, body: bytes) -> HttpResponse:
        label = f"admin {method} {path}"
        try:
            given = headers.get("X-Emulator-Admin") or ""
            if not hmac.compare_digest(given.encode(), self.admin_token.encode()):
                raise AdminError(401, "missing or wrong X-Emulator-Admin token")
            handler = self._routes.get((method, path.rstrip("/")))
            if handler is None:
                raise AdminError(404, f"no control endpoint {method} {path}")
            response = json_response(200, handler(self._parse(body)), label=label)
            if path.rstrip("/") == "/_emulator/shutdown":
                response.after_send = self.request_shutdown
            return response
        except (AdminError, KmsError) as exc:
            status = exc.status if isinstance(exc, AdminError) else 400
            message = exc.message if isinstance(exc, AdminError) else str(exc)
            return json_response(status, {"error": message}, label=f"{label} {status}")

    @staticmethod
    def _parse(body: bytes) -> dict:
        if not body.strip():
            return {}
        try:
            parsed = json.loads(body)
        except ValueError:
            raise AdminError(400, "body must be JSON") from None
        if not isinstance(parsed, dict):
            raise AdminError(400, "body must be a JSON object")
        return parsed

    def _set_fault(self, body: dict) -> dict:
        mode, target, key = body.get("mode"), body.get("target", "all"), body.get("key")
        if mode not in FAULT_MODES:
            raise AdminError(400, f"mode must be one of {', '.join(FAULT_MODES)}")
        if target not in FAULT_TARGETS:
            raise AdminError(400, f"target must be one of {', '.join(FAULT_TARGETS)}")
        if key is not None and not isinstance(key, str):
            raise AdminError(400, "key must be a string")
        if mode == "disable_key" and target != "kms":
            # Transit keys cannot be disabled (only deleted, once deletion_allowed is set).
            raise AdminError(400, "disable_key is a KMS fault: Transit keys cannot be disabled")
        if mode in VAULT_ONLY_FAULTS and target != "vault":
            raise AdminError(400, f"{mode} is a Vault fault: use target vault")
        if mode == "none":
            return {"cleared": self.faults.clear(target, key)}
        if mode == "expire_tokens":
            # An action, not a standing fault: tokens issued later work again.
            return {"expired_tokens": self.tokens.expire_all(bool(body.get("include_root")))}
        count, delay_ms = body.get("count"), body.get("delay_ms", 0)
        if count is not None and (not isinstance(count, int) or count < 1):
            raise AdminError(400, "count must be a positive integer")
        if not isinstance(delay_ms, int) or delay_ms < 0:
            raise AdminError(400, "delay_ms must be a non-negative integer")
        if mode == "slow" and not delay_ms:
            raise AdminError(400, "mode slow needs delay_ms")
        fault = Fault(mode, target, key, self._key_names(key, target), count, delay_ms)
        self.faults.set(fault)
        return {"fault": fault.describe()}

    def _key_names(self, key: str | None, target: str) -> frozenset:
        """All names a request may use for the key: KMS requests are matched by key id, so
        an alias or ARN given here is resolved to it."""
        if key is None:
            return frozenset()
        names = {key}
        if target in ("kms", "all"):
            try:
                names.add(self.kms_store.resolve(key).key_id)
            except KmsError:
                pass
        return frozenset(names)

    def _reset_stats(self, body: dict) -> dict:
        self.stats.reset()
        return {"status": "reset"}

    def _rotate_kms_key(self, body: dict) -> dict:
        key = self.kms_store.resolve(body.get("key"))
        version = self.kms_store.rotate(key)
        return {"key_id": key.key_id, "arn": key.arn, "version": version}

    def _create_kms_key(self, body: dict) -> dict:
        key_id = body.get("key_id")
        if key_id is not None and not (isinstance(key_id, str) and UUID_RE.match(key_id)):
            raise AdminError(400, "key_id must be a lowercase UUID")
        key_spec = body.get("key_spec", "SYMMETRIC_DEFAULT")
        if key_spec != "SYMMETRIC_DEFAULT" and key_spec not in KMS_HMAC_SPECS:
            raise AdminError(400, "key_spec must be SYMMETRIC_DEFAULT or HMAC_224/256/384/512")
        key = self.kms_store.create_key(key_id, body.get("description", ""), key_spec)
        return {"key_id": key.key_id, "arn": key.arn}

    def _create_vault_key(self, body: dict) -> dict:
        name = body.get("name")
        if not isinstance(name, str) or not VAULT_NAME_RE.match(name):
            raise AdminError(400, "name must be a valid transit key name")
        namespace = normalize_namespace(body.get("namespace"))
        mount = body.get("mount") or self.default_mount
        key, created = self.transit.create(namespace, mount, name)
        return {"name": name, "namespace": namespace, "mount": mount, "created": created,
                "latest_version": key.latest_version}


# --------------------------------------------------------------------------
# HTTPS server
# --------------------------------------------------------------------------

class EmulatorRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"      # keep-alive, as the SDKs expect
    server_version = "keymanager-emulator/1.0"
    timeout = IDLE_TIMEOUT

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_LIST = do_GET

    def _dispatch(self) -> None:
        started = time.monotonic()
        try:
            body = self._read_body()
            if body is None:
                return
            response = self._route(body)
        except DropConnection:
            LOG.info("%s dropped the connection (fault)", self.client_address[0])
            self._drop_connection()
            return
        except MalformedAnswer:
            # A key manager (or a proxy in front of it) answering nonsense.
            response = json_response(200, ["not", "an", "answer"],
                                     label=f"{self.command} {self.path} (malformed)")
        except Exception:                       # a bug here must not look like a network fault
            LOG.exception("unhandled error serving %s %s", self.command, self.path)
            response = json_response(500, {"errors": ["emulator internal error"]},
                                     label=f"{self.command} {self.path} (crashed)")
        self._send(response)
        LOG.info("%s %s -> %d in %.1f ms", self.client_address[0], response.label,
                 response.status, (time.monotonic() - started) * 1000)
        if response.after_send:
            response.after_send()

    def _route(self, body: bytes) -> HttpResponse:
        split = urllib.parse.urlsplit(self.path)
        path, query = split.path, split.query
        if path.startswith("/_emulator/"):
            return self.server.admin.handle(self.command, path, self.headers, body)
        if path.startswith("/v1/"):
            peer = self.connection.getpeercert() if hasattr(self.connection, "getpeercert") else None
            return self.server.vault.handle(self.command, path, query, self.headers, body, peer)
        if path.startswith(ContainerCredentialsApi.PATH) and self.server.container:
            return self.server.container.handle(self.command, path, self.headers)
        target = self.headers.get("X-Amz-Target")
        if target:
            return self.server.kms.handle(target, self.command, path, query, self.headers, body)
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if self.server.sts and (content_type == "application/x-www-form-urlencoded"
                                or "Action=" in query):
            return self.server.sts.handle(self.command, path, query, self.headers, body)
        return json_response(404, {"errors": ["unsupported path"]},
                             label=f"{self.command} {path} (unknown API)")

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering a request we will not read."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self._refuse(411, "chunked request bodies are not supported; send Content-Length")
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self._refuse(400, "invalid Content-Length")
            return None
        if length < 0 or length > MAX_BODY_BYTES:
            self._refuse(413, "request body too large")
            return None
        return self.rfile.read(length)

    def _refuse(self, status: int, message: str) -> None:
        self.close_connection = True       # the unread body would corrupt the next request
        self._send(json_response(status, {"errors": [message]}))

    def _send(self, response: HttpResponse) -> None:
        self.send_response(response.status)
        if response.content_type:
            self.send_header("Content-Type", response.content_type)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if response.body and self.command != "HEAD":
            self.wfile.write(response.body)

    def _drop_connection(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def log_message(self, format, *args):   # noqa: A002 - signature fixed by http.server
        LOG.debug("%s %s", self.client_address[0], format % args)


class EmulatorServer(ThreadingHTTPServer):
    """Threaded HTTPS server on 127.0.0.1. The TLS handshake runs in the connection's own
    thread, so a slow or broken client cannot stall the accept loop."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128      # listen backlog: many database backends may connect at once

    def __init__(self, port: int, tls_context: ssl.SSLContext, kms: KmsApi, vault: VaultApi,
                 admin: AdminApi):
        self.tls_context = tls_context
        self.kms = kms
        self.vault = vault
        self.admin = admin
        super().__init__((LOOPBACK, port), EmulatorRequestHandler)

    def finish_request(self, request, client_address):
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            tls_socket = self.tls_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            LOG.info("TLS handshake with %s failed: %s", client_address[0], exc)
            return
        try:
            self.RequestHandlerClass(tls_socket, client_address, self)
        finally:
            tls_socket.close()

    def handle_error(self, request, client_address):
        # Clients hanging up mid-request are routine in fault tests; keep them out of stderr.
        LOG.debug("connection from %s ended with an error", client_address[0], exc_info=True)


def make_tls_context(cert: str, key: str, client_ca: str | None,
                     optional_client_ca: str | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=client_ca)
    elif optional_client_ca:
        # As a Vault listener for cert auth: a client certificate is asked for and,
        # when sent, verified, but connections without one are served too.
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cafile=optional_client_ca)
    return context


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def parse_credential(text: str) -> AwsCredential:
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise argparse.ArgumentTypeError("expected AKID:SECRET[:SESSION_TOKEN]")
    return AwsCredential(parts[0], parts[1], parts[2] if len(parts) == 3 and parts[2] else None)


def parse_approle(text: str) -> tuple[str, str]:
    role_id, sep, secret_id = text.partition(":")
    if not sep or not role_id or not secret_id:
        raise argparse.ArgumentTypeError("expected ROLE_ID:SECRET_ID")
    return role_id, secret_id


def parse_kms_key_id(text: str) -> str:
    if not UUID_RE.match(text):
        raise argparse.ArgumentTypeError("KMS key ids are lowercase UUIDs")
    return text


# --------------------------------------------------------------------------
# Signed test identity tokens (JWT, HS256): web identity for STS, and the
# Kubernetes service account and OIDC tokens Vault's auth methods verify
# --------------------------------------------------------------------------

def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class JwtIssuer:
    """Issues and verifies the identity tokens the tests hand to pgphi. Real identity
    providers sign with RS256 and publish a JWKS; a shared HMAC key is enough to make
    a tampered, foreign or expired token fail here as it fails there."""

    ISSUER = "https://oidc.emulator.invalid"

    def __init__(self):
        self._key = secrets.token_bytes(32)

    def issue(self, subject: str, audience: str, ttl: int, claims: dict | None = None) -> str:
        now = int(time.time())
        header = {"alg": "HS256", "typ": "JWT", "kid": "emulator"}
        payload = {"iss": self.ISSUER, "sub": subject, "aud": audience, "iat": now,
                   "nbf": now - 5, "exp": now + ttl, "jti": str(uuid.uuid4()), **(claims or {})}
        signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(payload).encode())
        signature = hmac.new(self._key, signing_input.encode(), hashlib.sha256).digest()
        return signing_input + "." + b64url(signature)

    def verify(self, token) -> dict:
        """The token's claims; ValueError("invalid ...") or ValueError("expired ...")."""
        if not isinstance(token, str) or token.count(".") != 2:
            raise ValueError("invalid: not a JWT")
        head, body, signature = token.split(".")
        try:
            expected = hmac.new(self._key, f"{head}.{body}".encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(expected, b64url_decode(signature)):
                raise ValueError("invalid: signature")
            claims = json.loads(b64url_decode(body))
        except (binascii.Error, ValueError) as exc:
            if str(exc).startswith("invalid"):
                raise
            raise ValueError("invalid: undecodable") from None
        if not isinstance(claims, dict) or not isinstance(claims.get("exp"), int):
            raise ValueError("invalid: claims")
        if claims["exp"] <= time.time():
            raise ValueError(f"expired: {claims['exp']}")
        return claims


# --------------------------------------------------------------------------
# AWS STS (query protocol, XML answers) and the container credentials endpoint
# --------------------------------------------------------------------------

STS_NAMESPACE = "https://sts.amazonaws.com/doc/2011-06-15/"
STS_VERSION = "2011-06-15"
STS_AUDIENCE = "sts.amazonaws.com"
ROLE_ARN_RE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,128}$")
ROLE_SESSION_RE = re.compile(r"^[\w+=,.@-]{2,64}$")
# What STS calls the signature failures the SigV4 verifier reports in KMS's words.
STS_SIGNATURE_ERRORS = {
    "UnrecognizedClientException": ("InvalidClientTokenId", 403),
    "InvalidSignatureException": ("SignatureDoesNotMatch", 403),
    "ExpiredTokenException": ("ExpiredToken", 400),
    "IncompleteSignatureException": ("IncompleteSignature", 400),
    "MissingAuthenticationTokenException": ("MissingAuthenticationToken", 403),
}


class StsError(Exception):
    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status = code, message, status


def xml_escape(text: str) -> str:
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def issue_temporary_credential(credentials: dict, policies: dict, policy, ttl: int
                               ) -> AwsCredential:
    """New temporary keys that KMS (and STS) accept until they expire."""
    credential = AwsCredential("ASIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30),
                               secrets.token_urlsafe(48), time.time() + ttl)
    credentials[credential.access_key_id] = credential
    if policy is not None:
        policies[credential.access_key_id] = policy
    return credential


class StsApi:
    """AssumeRole (SigV4-signed with service "sts") and AssumeRoleWithWebIdentity
    (unsigned: the web identity token is the credential), as the query protocol
    sends them: POST / with an application/x-www-form-urlencoded body (or the
    parameters in the query string), answers in XML."""

    def __init__(self, verifier: SigV4Verifier, kms_policies: dict, roles: dict,
                 jwt: JwtIssuer, faults: FaultBook, stats: Stats, account_id: str):
        self.verifier = verifier            # service "sts"; shares the credentials dict
        self.kms_policies = kms_policies
        self.roles = roles                  # role ARN -> IamPolicy or None
        self.jwt = jwt
        self.faults = faults
        self.stats = stats
        self.account_id = account_id
        self.max_session_duration = 3600

    def handle(self, method: str, raw_path: str, raw_query: str, headers, body: bytes
               ) -> HttpResponse:
        text = body.decode("utf-8", "replace") if method == "POST" else raw_query
        params = dict(urllib.parse.parse_qsl(text, keep_blank_values=True))
        action = params.get("Action", "")
        self.stats.request("sts", action or "-")
        label = f"sts {action or '-'}"
        try:
            if params.get("Version") != STS_VERSION:
                raise StsError("InvalidAction", f"Could not find operation {action} for version "
                               f"{params.get('Version', 'NO_VERSION_SPECIFIED')}")
            if action == "AssumeRole":
                try:
                    caller = self.verifier.verify(method, raw_path, raw_query, headers, body)
                except SignatureRejected as exc:
                    self.stats.bump("rejected_signatures")
                    code, status = STS_SIGNATURE_ERRORS.get(exc.error_type, (exc.error_type, 403))
                    raise StsError(code, exc.message, status) from None
            elif action == "AssumeRoleWithWebIdentity":
                caller = None
            else:
                raise StsError("InvalidAction", f"Could not find operation {action} for version "
                               f"{STS_VERSION}")
            fault = self.faults.take_request_fault("sts")
            if fault:
                inject_fault(fault, self.stats, self._fault_error)
            return self._answer(action, self._assume(action, params, caller), label)
        except StsError as exc:
            return self._error(exc, label)

    def _fault_error(self, mode: str) -> StsError:
        if mode == "deny":
            return StsError("AccessDenied", "Not authorized to perform sts:AssumeRole", 403)
        if mode == "throttle":
            return StsError("Throttling", "Rate exceeded", 400)
        return StsError("InternalFailure", "An internal error occurred.", 500)

    def _assume(self, action: str, params: dict, caller: AwsCredential | None) -> dict:
        role_arn, session = params.get("RoleArn"), params.get("RoleSessionName")
        for name in ("RoleArn", "RoleSessionName"):
            if not params.get(name):
                raise StsError("MissingParameter",
                               f"The request must contain the parameter {name}")
        if not ROLE_ARN_RE.match(role_arn):
            raise StsError("ValidationError", f"{role_arn} is invalid")
        if not ROLE_SESSION_RE.match(session):
            raise StsError("ValidationError",
                           "1 validation error detected: Value at 'roleSessionName' failed to "
                           "satisfy constraint: Member must satisfy regular expression pattern: "
                           "[\\w+=,.@-]*")
        try:
            duration = int(params.get("DurationSeconds", "3600"))
        except ValueError:
            raise StsError("ValidationError", "DurationSeconds must be an integer") from None
        if duration < 900:
            raise StsError("ValidationError",
                           "1 validation error detected: Value at 'durationSeconds' failed to "
                           "satisfy constraint: Member must have value greater than or equal to 900")
        if duration > self.max_session_duration:
            raise StsError("ValidationError", "The requested DurationSeconds exceeds the "
                           "MaxSessionDuration set for this role.")
        subject = None
        if action == "AssumeRoleWithWebIdentity":
            try:
                claims = self.jwt.verify(params.get("WebIdentityToken"))
            except ValueError as exc:
                if str(exc).startswith("expired"):
                    raise StsError("ExpiredTokenException",
                                   f"Token expired: current date/time {int(time.time())} must be "
                                   f"before the expiration date/time{str(exc)[8:]}") from None
                raise StsError("InvalidIdentityToken",
                               "The web identity token that was passed could not be validated "
                               "by AWS. Get a new identity token from the identity provider and "
                               "then retry the request.") from None
            if claims.get("aud") != STS_AUDIENCE:
                raise StsError("InvalidIdentityToken", "Incorrect token audience")
            subject = str(claims.get("sub", ""))
            if role_arn not in self.roles:
                raise StsError("AccessDenied", "Not authorized to perform "
                               "sts:AssumeRoleWithWebIdentity", 403)
        elif role_arn not in self.roles:
            raise StsError("AccessDenied", f"User: arn:aws:iam::{self.account_id}:user/"
                           f"{caller.access_key_id} is not authorized to perform: sts:AssumeRole "
                           f"on resource: {role_arn}", 403)
        credential = issue_temporary_credential(self.verifier.credentials, self.kms_policies,
                                                self.roles[role_arn], duration)
        role_name = role_arn.rsplit("/", 1)[-1]
        return {"credential": credential, "subject": subject,
                "assumed_arn": f"arn:aws:sts::{self.account_id}:assumed-role/{role_name}/{session}",
                "assumed_id": f"AROA{hashlib.sha1(role_arn.encode()).hexdigest()[:17].upper()}:{session}"}

    def _answer(self, action: str, result: dict, label: str) -> HttpResponse:
        credential = result["credential"]
        expiration = datetime.datetime.fromtimestamp(credential.expires, datetime.timezone.utc)
        extra = ""
        if result["subject"] is not None:
            extra = (f"<SubjectFromWebIdentityToken>{xml_escape(result['subject'])}"
                     f"</SubjectFromWebIdentityToken><Audience>{STS_AUDIENCE}</Audience>"
                     f"<Provider>{JwtIssuer.ISSUER[len('https://'):]}</Provider>")
        request_id = str(uuid.uuid4())
        xml = (f'<{action}Response xmlns="{STS_NAMESPACE}">\n  <{action}Result>\n'
               f"    {extra}<AssumedRoleUser><AssumedRoleId>{xml_escape(result['assumed_id'])}"
               f"</AssumedRoleId><Arn>{xml_escape(result['assumed_arn'])}</Arn></AssumedRoleUser>\n"
               f"    <Credentials>\n      <AccessKeyId>{credential.access_key_id}</AccessKeyId>\n"
               f"      <SecretAccessKey>{xml_escape(credential.secret_access_key)}</SecretAccessKey>\n"
               f"      <SessionToken>{xml_escape(credential.session_token)}</SessionToken>\n"
               f"      <Expiration>{expiration.strftime('%Y-%m-%dT%H:%M:%SZ')}</Expiration>\n"
               f"    </Credentials>\n  </{action}Result>\n  <ResponseMetadata><RequestId>"
               f"{request_id}</RequestId></ResponseMetadata>\n</{action}Response>\n")
        return HttpResponse(200, xml.encode(), "text/xml", {"x-amzn-RequestId": request_id}, label)

    def _error(self, exc: StsError, label: str) -> HttpResponse:
        self.stats.error("sts", exc.code)
        LOG.info("%s failed: %s %s", label, exc.code, exc.message)
        request_id = str(uuid.uuid4())
        kind = "Receiver" if exc.status >= 500 else "Sender"
        xml = (f'<ErrorResponse xmlns="{STS_NAMESPACE}">\n  <Error>\n    <Type>{kind}</Type>\n'
               f"    <Code>{xml_escape(exc.code)}</Code>\n    <Message>{xml_escape(exc.message)}"
               f"</Message>\n  </Error>\n  <RequestId>{request_id}</RequestId>\n</ErrorResponse>\n")
        return HttpResponse(exc.status, xml.encode(), "text/xml", {"x-amzn-RequestId": request_id},
                            f"{label} {exc.code}")


class ContainerCredentialsApi:
    """The ECS / EKS Pod Identity container credentials endpoint: GET
    /v2/credentials/<id> with the authorization token in Authorization (when one is
    configured) answers temporary keys in JSON, as the ECS agent and the EKS Pod
    Identity agent do."""

    PATH = "/v2/credentials/"

    def __init__(self, token: str | None, ttl: int, verifier: SigV4Verifier, kms_policies: dict,
                 policy, faults: FaultBook, stats: Stats, account_id: str):
        self.token = token
        self.ttl = ttl
        self.verifier = verifier
        self.kms_policies = kms_policies
        self.policy = policy
        self.faults = faults
        self.stats = stats
        self.account_id = account_id

    def handle(self, method: str, path: str, headers) -> HttpResponse:
        self.stats.request("container", "GET credentials")
        label = "container credentials"
        if method != "GET":
            return json_response(405, {"code": "MethodNotAllowed", "message": "use GET"}, label=label)
        fault = self.faults.take_request_fault("container")
        if fault:
            try:
                inject_fault(fault, self.stats, lambda mode: ValueError(mode))
            except ValueError as exc:
                self.stats.error("container", str(exc))
                status = {"deny": 403, "throttle": 429}.get(str(exc), 500)
                return json_response(status, {"code": str(exc), "message": "injected fault"},
                                     label=f"{label} {status}")
        if self.token is not None:
            given = headers.get("Authorization") or ""
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                self.stats.error("container", "unauthorized")
                return json_response(401, {"code": "AccessDeniedException",
                                           "message": "invalid authorization token"},
                                     label=f"{label} 401")
        credential = issue_temporary_credential(self.verifier.credentials, self.kms_policies,
                                                self.policy, self.ttl)
        expiration = datetime.datetime.fromtimestamp(credential.expires, datetime.timezone.utc)
        return json_response(200, {
            "RoleArn": f"arn:aws:iam::{self.account_id}:role/pgphi-task-role",
            "AccessKeyId": credential.access_key_id,
            "SecretAccessKey": credential.secret_access_key,
            "Token": credential.session_token,
            "Expiration": expiration.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "AccountId": self.account_id}, label=label)


class InstanceMetadataService:
    """The EC2 instance metadata service's IMDSv2 credential flow, over plain HTTP as
    the real one (on 127.0.0.1 here): PUT /latest/api/token for a session token, then
    GET /latest/meta-data/iam/security-credentials/[ROLE] with it. Each credentials
    fetch issues temporary keys with a session token, which the KMS side accepts."""

    TOKEN_HEADER = "X-aws-ec2-metadata-token"
    TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
    CREDENTIALS_PATH = "/latest/meta-data/iam/security-credentials/"

    def __init__(self, role: str, verifier: "SigV4Verifier", stats: "Stats"):
        self.role = role
        self.verifier = verifier
        self.stats = stats
        self._tokens: dict[str, float] = {}
        self._lock = threading.Lock()

    def handle(self, method: str, path: str, headers) -> tuple[int, str, str]:
        """Returns (status, content type, body)."""
        self.stats.request("imds", method + " " + path.split("?")[0].rstrip("/").rsplit("/", 1)[-1])
        if method == "PUT" and path == "/latest/api/token":
            ttl = headers.get(self.TTL_HEADER)
            if not ttl or not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return 400, "text/plain", "Bad Request"
            token = secrets.token_urlsafe(32)
            with self._lock:
                self._tokens[token] = time.time() + int(ttl)
            return 200, "text/plain", token
        if method != "GET" or not path.startswith(self.CREDENTIALS_PATH):
            return 404, "text/plain", "Not Found"
        with self._lock:
            expiry = self._tokens.get(headers.get(self.TOKEN_HEADER, ""))
        if expiry is None or expiry < time.time():
            return 401, "text/plain", "Unauthorized"   # IMDSv2: no token, no answer
        role = path[len(self.CREDENTIALS_PATH):]
        if role == "":
            return 200, "text/plain", self.role
        if role != self.role:
            return 404, "text/plain", "Not Found"
        credential = AwsCredential("ASIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30),
                                   secrets.token_urlsafe(48))
        self.verifier.credentials[credential.access_key_id] = credential
        expiration = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
        body = json.dumps({"Code": "Success", "Type": "AWS-HMAC",
                           "LastUpdated": datetime.datetime.now(datetime.timezone.utc)
                           .strftime("%Y-%m-%dT%H:%M:%SZ"),
                           "AccessKeyId": credential.access_key_id,
                           "SecretAccessKey": credential.secret_access_key,
                           "Token": credential.session_token,
                           "Expiration": expiration.strftime("%Y-%m-%dT%H:%M:%SZ")})
        return 200, "application/json", body


def start_imds_server(imds: InstanceMetadataService) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            status, content_type, body = imds.handle(self.command, self.path, self.headers)
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = _answer

        def log_message(self, fmt, *args):   # never log tokens or keys
            LOG.info("imds %s %s", self.command, self.path.split("?")[0])

    server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    return server


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="HTTPS emulator of AWS KMS and HashiCorp Vault Transit for pgphi's tests "
                    "(binds 127.0.0.1 only).")
    parser.add_argument("--port", type=int, default=0,
                        help="TCP port; 0 picks a free one (written to STATE_DIR/port)")
    parser.add_argument("--cert", required=True, help="server certificate chain (PEM)")
    parser.add_argument("--key", required=True, help="server private key (PEM)")
    parser.add_argument("--client-ca", help="require client certificates issued by this CA")
    parser.add_argument("--state-dir", required=True, help="for the port file and the log")
    parser.add_argument("--admin-token", required=True,
                        help="token for the /_emulator/ control API (X-Emulator-Admin)")
    parser.add_argument("--vault-root-token", help="a Vault token that never expires")
    parser.add_argument("--vault-mount", action="append", default=[],
                        help="Transit mount path (repeatable; default: transit)")
    parser.add_argument("--vault-key", action="append", default=[],
                        help="[NAMESPACE/]NAME of a Transit key to pre-create in the first mount")
    parser.add_argument("--approle", action="append", default=[], type=parse_approle,
                        help="ROLE_ID:SECRET_ID accepted by auth/approle/login (repeatable)")
    parser.add_argument("--vault-policy", action="append", default=[],
                        help="NAME=FILE: a Vault ACL policy (HCL path rules) (repeatable)")
    parser.add_argument("--approle-policies", default="",
                        help="comma-separated policies of tokens from AppRole login (besides "
                             "default)")
    parser.add_argument("--vault-token", action="append", default=[],
                        help="TOKEN=POLICY[,POLICY]: a non-root token that never expires, with "
                             "the default policy and these (repeatable)")
    parser.add_argument("--require-request-header", action="store_true",
                        help="answer 412 to requests without X-Vault-Request: true, as Vault "
                             "Agent and Proxy listeners with require_request_header do")
    parser.add_argument("--aws-policy", action="append", default=[],
                        help="AKID=FILE: the IAM policy (JSON) of that credential; credentials "
                             "without one may do everything (repeatable)")
    parser.add_argument("--vault-kubernetes-role", action="append", default=[],
                        help="ROLE=SUBJECT[@AUDIENCE]: auth/kubernetes/login accepts service "
                             "account tokens (control API /_emulator/jwt) with that sub (repeatable)")
    parser.add_argument("--vault-jwt-role", action="append", default=[],
                        help="ROLE=SUBJECT[@AUDIENCE]: auth/jwt/login's bound subject and "
                             "audience (repeatable)")
    parser.add_argument("--vault-cert-role", action="append", default=[],
                        help="NAME=COMMON_NAME ('*': any): auth/cert/login accepts a client "
                             "certificate from --vault-cert-ca with that CN (repeatable)")
    parser.add_argument("--vault-cert-ca",
                        help="CA of client certificates for cert auth: asked for, not required")
    parser.add_argument("--approle-token-ttl", type=int, default=3600,
                        help="TTL in seconds of tokens issued by AppRole login")
    parser.add_argument("--approle-token-max-ttl", type=int, default=86400,
                        help="renewals never extend a token beyond this many seconds of age")
    parser.add_argument("--aws-credential", action="append", default=[], type=parse_credential,
                        help="AKID:SECRET[:SESSION_TOKEN] accepted by KMS (repeatable)")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--account-id", default="111122223333")
    parser.add_argument("--kms-key", action="append", default=[], type=parse_kms_key_id,
                        help="UUID of a KMS key to pre-create (repeatable)")
    parser.add_argument("--imds-role",
                        help="also serve the EC2 instance metadata service (IMDSv2, plain HTTP "
                             "on 127.0.0.1) with this IAM role; its port goes to STATE_DIR/imds_port")
    parser.add_argument("--sts-role", action="append", default=[],
                        help="ARN[=POLICY_FILE]: an IAM role STS AssumeRole and "
                             "AssumeRoleWithWebIdentity may issue credentials for, with that IAM "
                             "policy at KMS (repeatable; any role: STS is served)")
    parser.add_argument("--container-credentials", action="store_true",
                        help="serve the container credentials endpoint (GET /v2/credentials/ID)")
    parser.add_argument("--container-credentials-token",
                        help="the Authorization token the container endpoint requires")
    parser.add_argument("--container-credentials-ttl", type=int, default=3600,
                        help="lifetime in seconds of the container endpoint's credentials")
    parser.add_argument("--container-credentials-policy",
                        help="IAM policy (JSON) of the container endpoint's credentials at KMS")
    parser.add_argument("--max-clock-skew", type=int, default=900,
                        help="seconds a SigV4 X-Amz-Date may differ from now")
    return parser.parse_args(argv)


def configure_logging(state_dir: str) -> None:
    handler = logging.FileHandler(os.path.join(state_dir, "emulator.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)


def write_port_file(state_dir: str, port: int) -> str:
    """Written atomically so a test polling for it never reads half a number."""
    path = os.path.join(state_dir, "port")
    temporary = path + ".tmp"
    with open(temporary, "w") as out:
        out.write(f"{port}\n")
    os.replace(temporary, path)
    return path


def build_server(args: argparse.Namespace) -> EmulatorServer:
    faults, stats = FaultBook(), Stats()
    mounts = args.vault_mount or ["transit"]

    kms_store = KmsStore(args.region, args.account_id)
    for key_id in args.kms_key:
        kms_store.create_key(key_id, "pre-created by --kms-key")
    verifier = SigV4Verifier({c.access_key_id: c for c in args.aws_credential}, args.region,
                             "kms", args.max_clock_skew)

    transit = TransitStore()
    for spec in args.vault_key:
        namespace, _, name = spec.rpartition("/")
        transit.create(normalize_namespace(namespace), mounts[0], name)
    approles = [AppRole(f"role{i}", role_id, secret_id)
                for i, (role_id, secret_id) in enumerate(args.approle, 1)]
    vault_policies = {}
    for spec in args.vault_policy:
        name, _, path = spec.partition("=")
        with open(path) as source:
            vault_policies[name] = parse_vault_policy(source.read(), path)
    static_tokens = []
    for spec in args.vault_token:
        token_id, _, names = spec.partition("=")
        static_tokens.append((token_id, [n for n in names.split(",") if n]))
    tokens = TokenStore(args.vault_root_token, approles, args.approle_token_ttl,
                        args.approle_token_max_ttl,
                        [n for n in args.approle_policies.split(",") if n], static_tokens)
    kms_policies = {}
    for spec in args.aws_policy:
        akid, _, path = spec.partition("=")
        with open(path) as source:
            kms_policies[akid] = IamPolicy(json.load(source), path)

    server_box: list[EmulatorServer] = []

    def request_shutdown() -> None:
        # shutdown() waits for serve_forever() to return, so it must not run on a thread
        # serve_forever() is waiting for.
        threading.Thread(target=server_box[0].shutdown, daemon=True).start()

    admin = AdminApi(args.admin_token, kms_store, transit, tokens, mounts[0], faults, stats,
                     request_shutdown)
    server = EmulatorServer(args.port, make_tls_context(args.cert, args.key, args.client_ca,
                                                        args.vault_cert_ca),
                            KmsApi(kms_store, verifier, faults, stats, kms_policies),
                            VaultApi(transit, tokens, mounts, faults, stats, vault_policies,
                                     args.require_request_header), admin)
    server.vault.port = server.server_address[1]
    server_box.append(server)
    jwt = JwtIssuer()
    admin.jwt = jwt
    server.vault.jwt = jwt

    def role_specs(specs: list, with_audience: bool) -> dict:
        roles = {}
        for spec in specs:
            role, _, bound = spec.partition("=")
            if with_audience:
                subject, _, audience = bound.partition("@")
                roles[role] = (subject, audience or None)
            else:
                roles[role] = bound or "*"
        return roles
    server.vault.kubernetes_roles = role_specs(args.vault_kubernetes_role, True)
    server.vault.jwt_roles = role_specs(args.vault_jwt_role, True)
    server.vault.cert_roles = role_specs(args.vault_cert_role, False)
    sts_roles = {}
    for spec in args.sts_role:
        arn, _, path = spec.partition("=")
        policy = None
        if path:
            with open(path) as source:
                policy = IamPolicy(json.load(source), path)
        sts_roles[arn] = policy
    server.sts = None
    if sts_roles:
        sts_verifier = SigV4Verifier(verifier.credentials, args.region, "sts", args.max_clock_skew)
        server.sts = StsApi(sts_verifier, kms_policies, sts_roles, jwt, faults, stats,
                            args.account_id)
    server.container = None
    if args.container_credentials:
        policy = None
        if args.container_credentials_policy:
            with open(args.container_credentials_policy) as source:
                policy = IamPolicy(json.load(source), args.container_credentials_policy)
        server.container = ContainerCredentialsApi(
            args.container_credentials_token, args.container_credentials_ttl, verifier,
            kms_policies, policy, faults, stats, args.account_id)
        admin.container = server.container
    server.imds = None
    if args.imds_role:
        server.imds = start_imds_server(InstanceMetadataService(args.imds_role, verifier, stats))
    return server


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.state_dir, exist_ok=True)
    port_path = os.path.join(args.state_dir, "port")
    if os.path.exists(port_path):
        os.remove(port_path)          # never let a test read a previous run's port
    configure_logging(args.state_dir)
    server = build_server(args)
    port = server.server_address[1]
    if server.imds:
        imds_port = server.imds.server_address[1]
        with open(os.path.join(args.state_dir, "imds_port.tmp"), "w") as out:
            out.write(f"{imds_port}\n")
        os.replace(os.path.join(args.state_dir, "imds_port.tmp"), os.path.join(args.state_dir, "imds_port"))
    write_port_file(args.state_dir, port)
    LOG.info("listening on %s:%d (mTLS %s)", LOOPBACK, port,
             "required" if args.client_ca else "off")
    print(f"listening on {LOOPBACK}:{port}", flush=True)

    def on_signal(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        if os.path.exists(port_path):
            os.remove(port_path)
        LOG.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
