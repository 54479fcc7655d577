#!/usr/bin/python3
"""The KMIP administrator's side of the TAP tests (test/t/024_kmip.pl), with
PyKMIP's own client, so that keys pgphi uses are made and changed on the
server by software pgphi did not write.

Usage: kmip_admin.py PKI_DIR PORT COMMAND [ARG...]
  create NAME            a new active AES-256 key named NAME; prints its id
  create-preactive NAME  the same, left pre-active
  state UID              prints the key's state (ACTIVE, DEACTIVATED, ...)
  revoke UID             deactivates the key (reason: cessation of operation)
  compromise UID         marks the key compromised
  destroy UID            destroys the key (after revoking it when active)
"""
import os
import sys
import tempfile
import warnings

warnings.simplefilter("ignore")

from kmip import enums  # noqa: E402
from kmip.pie.client import ProxyKmipClient  # noqa: E402


def main():
    pki, port, command, *args = sys.argv[1:]
    # PyKMIP's client insists on a configuration file: an empty one of our
    # own, so that no /etc/pykmip/pykmip.conf is read.
    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as conf:
        conf.write("[client]\n")
    try:
        run(pki, port, conf.name, command, args)
    finally:
        os.unlink(conf.name)


def run(pki, port, conf, command, args):
    client = ProxyKmipClient(
        hostname="127.0.0.1", port=int(port),
        cert=f"{pki}/client.pem", key=f"{pki}/client.key", ca=f"{pki}/ca.pem",
        config="client", config_file=conf, kmip_version=enums.KMIPVersion.KMIP_1_4)
    with client:
        if command in ("create", "create-preactive"):
            uid = client.create(
                enums.CryptographicAlgorithm.AES, 256, name=args[0],
                cryptographic_usage_mask=[enums.CryptographicUsageMask.ENCRYPT,
                                          enums.CryptographicUsageMask.DECRYPT])
            if command == "create":
                client.activate(uid)
            print(uid)
        elif command == "state":
            attrs = client.get_attributes(args[0], ["State"])[1]
            print(attrs[0].attribute_value.value.name)
        elif command == "revoke":
            client.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, args[0])
        elif command == "compromise":
            client.revoke(enums.RevocationReasonCode.KEY_COMPROMISE, args[0])
        elif command == "destroy":
            attrs = client.get_attributes(args[0], ["State"])[1]
            if attrs[0].attribute_value.value == enums.State.ACTIVE:
                client.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, args[0])
            client.destroy(args[0])
        else:
            sys.exit(f"unknown command {command}")


if __name__ == "__main__":
    main()
