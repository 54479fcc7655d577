#!/usr/bin/env bash
# make deb: Debian packages postgresql-NN-pgphi, built with Debian's own
# multi-version tooling (pg_buildext, postgresql-server-dev-all) for every
# PostgreSQL version that debian/pgversions allows and /usr/lib/postgresql
# holds with its server development files. On Debian 12 that is 15 alone:
# pg_buildext only knows Debian's installations (/usr/lib/postgresql/NN), so
# the 17 and 18 that scripts/build-postgres.sh builds from source cannot be
# packaged (see docs/versions-and-packages.md).
# The packages land in build/deb/; the build runs in a copy of the checkout
# there (dpkg-buildpackage writes next to the source tree).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

scripts/install-deps.sh deb

version=$(sed -n "s/^default_version = '\(.*\)'/\1/p" pgphi.control)
changelog_version=$(dpkg-parsechangelog -S Version)
if [ "${changelog_version%-*}" != "$version" ]; then
    echo "build-deb: debian/changelog says $changelog_version, pgphi.control $version" >&2
    exit 1
fi

out=$REPO_ROOT/build/deb
tree=$out/pgphi-$version
rm -rf "$out"
mkdir -p "$tree"
# The checkout's files (tracked and new ones, with uncommitted edits), not
# what builds left behind.
git ls-files -z --cached --others --exclude-standard -- Makefile pgphi.control META.json README.md src docs debian |
    while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
    tar --null -T - -cf - | tar -C "$tree" -xf -

(
    cd "$tree"
    # debian/control from control.in, one package per version found.
    pg_buildext updatecontrol
    echo "build-deb: packaging for PostgreSQL $(pg_buildext supported-versions | tr '\n' ' ')" >&2
    dpkg-buildpackage -us -uc -b >"$out/build.log" 2>&1 || { tail -n 40 "$out/build.log" >&2; exit 1; }
)
ls "$out"/*.deb
