"""Prints the KMS endpoint botocore's endpoint rules give for every region of every
partition botocore knows, with FIPS and dual-stack off and on:
    <region> <fips 0|1> <dualstack 0|1> <url or "-" when the rules refuse>
test/unit/kms_endpoint_test.cpp compares pgphi's derivation with these lines."""
import json
import os

import botocore
from botocore.endpoint_provider import EndpointProvider

DATA = os.path.join(os.path.dirname(botocore.__file__), "data")


def load(name):
    with open(os.path.join(DATA, name)) as source:
        return json.load(source)


partitions = load("partitions.json")
versions = sorted(os.listdir(os.path.join(DATA, "kms")))
ruleset = load(os.path.join("kms", versions[-1], "endpoint-rule-set-1.json"))
provider = EndpointProvider(ruleset, partitions)
for partition in partitions["partitions"]:
    regions = [r for r in partition["regions"] if not r.endswith("-global")]
    for region in regions:
        for fips in (False, True):
            for dualstack in (False, True):
                try:
                    url = provider.resolve_endpoint(
                        Region=region, UseFIPS=fips, UseDualStack=dualstack).url
                except Exception:          # the rules refuse the combination
                    url = "-"
                print(region, int(fips), int(dualstack), url)
