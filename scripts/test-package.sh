#!/usr/bin/env bash
# The package suite (scripts/test.sh package; as root, PostgreSQL 15 only):
# builds the Debian package (scripts/build-deb.sh), installs it with dpkg -i,
# checks that the files are where Debian's PostgreSQL 15 looks for them, runs
# the clinical demo (scripts/demo.sh) against the installed files on a fresh
# cluster, and removes the package again.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

if [ "$(id -u)" != 0 ]; then
    echo "package test: needs root (dpkg -i)" >&2
    exit 1
fi
version=$(sed -n "s/^default_version = '\(.*\)'/\1/p" pgphi.control)
meta_version=$(python3 -c 'import json; print(json.load(open("META.json"))["version"])')
[ "$meta_version" = "$version" ] || { echo "META.json says $meta_version, pgphi.control $version" >&2; exit 1; }

scripts/build-deb.sh >/dev/null
deb=$(ls build/deb/postgresql-15-pgphi_"$version"-*_*.deb)
echo "package: $(basename "$deb")"
dpkg-deb -f "$deb" Depends | grep -q 'postgresql-15' || { echo "the package does not depend on postgresql-15" >&2; exit 1; }

status=0
dpkg -i "$deb" >/dev/null
trap 'scripts/demo.sh stop >/dev/null 2>&1 || true; dpkg -r postgresql-15-pgphi >/dev/null' EXIT
for f in /usr/lib/postgresql/15/lib/pgphi.so /usr/share/postgresql/15/extension/pgphi.control \
         "/usr/share/postgresql/15/extension/pgphi--0.1.0.sql"; do
    dpkg -S "$f" >/dev/null 2>&1 || { echo "package: $f is not installed by the package" >&2; status=1; }
done

# The demo against the installed package, not a build of the checkout.
log=$(mktemp)
if PGPHI_DEMO_INSTALLED=1 PGPHI_DEMO_PORT=5497 scripts/demo.sh >"$log" 2>&1; then
    echo "package: the demo ran against the installed package ($(grep -c . "$log") lines of output)"
else
    echo "package: the demo FAILED against the installed package:" >&2
    tail -n 30 "$log" >&2
    status=1
fi
extversion=$(as_pg_user /usr/lib/postgresql/15/bin/psql -XAtq -h /tmp/pgphi-demo -p 5497 -d clinic \
    -c "SELECT extversion FROM pg_extension WHERE extname = 'pgphi'" 2>/dev/null || true)
if [ "$extversion" = "$version" ]; then
    echo "package: the demo database runs pgphi $extversion from the package"
else
    echo "package: the demo database runs pgphi '${extversion}', not $version" >&2
    status=1
fi
rm -f "$log"
exit $status
