# pgphi build. The extension is built with PGXS; the core library, unit tests
# and benchmarks with CMake (CMakeLists.txt). Both take the core's sources from
# src/core/*.cpp, so there is one list of sources.
#
#   make            build the extension
#   make sql        write the install script of the version in progress from the
#                   SQL sources (src/sql/, see its README); commit both
#   make check-sql  fail if that install script differs from what the sources give
#   make install    install it into the PostgreSQL found by PG_CONFIG
#   make demo       set up everything and run the clinical demo (scripts/demo.sh)
#   make test       set up everything and run every test suite (scripts/test.sh) on the
#                   PostgreSQL PG_CONFIG names; PG_VERSIONS="15 17 18" make test on each
#   make test-valgrind  the regression suite with the server under valgrind
#   make benchmark  the SQL benchmark against pgcrypto (benchmark/sql_benchmark.sh),
#                   on each version in PG_VERSIONS (default: PG_CONFIG's)
#   make deb        Debian packages postgresql-NN-pgphi with pg_buildext, in build/deb
#   make loadtest   pgbench load with rotation and re-encryption, 5 minutes (scripts/loadtest.sh)

PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config

EXTENSION = pgphi
MODULE_big = pgphi
# The install script of the version in progress (the control file's
# default_version) is generated from the SQL sources, one file per concern,
# and committed; released install and update scripts never change, and each
# release adds an update script (pgphi--A--B.sql), hand-written.
EXTVERSION := $(shell sed -n "s/^default_version = '\(.*\)'/\1/p" pgphi.control)
SQL_SOURCES := $(sort $(wildcard src/sql/*.sql))
GENERATED_SQL := src/pgphi--$(EXTVERSION).sql
DATA = $(sort $(wildcard src/pgphi--*.sql) $(GENERATED_SQL))
OBJS = $(patsubst %.cpp,%.o,$(wildcard src/core/*.cpp src/pg/*.cpp src/pg/*/*.cpp))

# -MMD -MP: the compiler records which headers each object includes, so a
# changed header rebuilds every object that uses it (PGXS alone does not).
PG_CXXFLAGS = -MMD -MP -std=c++17 -fPIC -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers \
              -Wno-register -Werror
# The standard PKCS#11 header, from Debian's libp11-kit-dev (the pkcs11 provider).
PG_CPPFLAGS = -I$(srcdir)/src -I$(srcdir)/src/pg -I/usr/include/p11-kit-1
# -Bsymbolic-functions: calls between pgphi's own functions go direct instead
# of through the PLT (nothing interposes them), a few ns per decrypted value.
SHLIB_LINK = -lssl -lcrypto -lcurl -lstdc++ -ldl -Wl,-Bsymbolic-functions

# No LLVM bitcode: JIT inlining of this module is not worth a clang dependency.
override with_llvm = no

.DEFAULT_GOAL := all
.PHONY: demo demo-stop test test-valgrind deps benchmark loadtest sql check-sql deb

# The install script is written only on request, so that the committed one
# is what `make install` installs and what check-sql compares, byte for byte,
# with what the sources produce (scripts/test.sh regress runs it first).
sql:
	scripts/build-sql.sh $(EXTVERSION) $(SQL_SOURCES) > $(GENERATED_SQL).tmp && mv $(GENERATED_SQL).tmp $(GENERATED_SQL)

check-sql:
	@scripts/build-sql.sh $(EXTVERSION) $(SQL_SOURCES) | cmp -s - $(GENERATED_SQL) || \
	  { echo "$(GENERATED_SQL) differs from what src/sql/ produces: run make sql, and commit both" >&2; exit 1; }
	@echo "$(GENERATED_SQL) is what src/sql/ produces"

demo:
	scripts/demo.sh

demo-stop:
	scripts/demo.sh stop

test:
	scripts/test.sh

test-valgrind:
	scripts/test.sh valgrind

deps:
	scripts/install-deps.sh

benchmark:
	benchmark/sql_benchmark.sh

loadtest:
	scripts/loadtest.sh

deb:
	scripts/build-deb.sh

# PGXS exists only once postgresql-server-dev-15 is installed; demo, test and
# deps install it first, so they must work without it.
PGXS := $(shell $(PG_CONFIG) --pgxs 2>/dev/null)
ifneq ($(wildcard $(PGXS)),)
include $(PGXS)
endif

-include $(OBJS:.o=.d)
EXTRA_CLEAN = $(OBJS:.o=.d) .pg-build-stamp

# Objects built against another PostgreSQL (PG_CONFIG) are rebuilt: they
# depend on a stamp that is rewritten whenever the pg_config in use changes.
PG_BUILD_ID := $(PG_CONFIG) $(shell $(PG_CONFIG) --version 2>/dev/null)
ifneq ($(PG_BUILD_ID),$(shell cat .pg-build-stamp 2>/dev/null))
$(shell echo '$(PG_BUILD_ID)' > .pg-build-stamp)
endif
$(OBJS): .pg-build-stamp
