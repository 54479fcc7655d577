# pgphi build. The extension is built with PGXS; the core library, unit tests
# and benchmarks with CMake (CMakeLists.txt). Both take the core's sources from
# src/core/*.cpp, so there is one list of sources.
#
#   make            build the extension
#   make install    install it into the PostgreSQL found by PG_CONFIG
#   make demo       set up everything and run the clinical demo (scripts/demo.sh)
#   make test       set up everything and run every test suite (scripts/test.sh)
#   make test-valgrind  the regression suite with the server under valgrind
#   make benchmark  the SQL benchmark against pgcrypto (benchmark/sql_benchmark.sh),
#                   on each version in PG_VERSIONS (default: PG_CONFIG's)
#   make deb        Debian packages postgresql-NN-pgphi with pg_buildext, in build/deb
#   make loadtest   pgbench load with rotation and re-encryption, 5 minutes (scripts/loadtest.sh)

PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config

EXTENSION = pgphi
MODULE_big = pgphi
# Released install scripts never change; each release adds an update script
# (pgphi--A--B.sql) and new installations run the chain.
DATA = $(wildcard src/pgphi--*.sql)
OBJS = $(patsubst %.cpp,%.o,$(wildcard src/core/*.cpp src/pg/*.cpp))

# -MMD -MP: the compiler records which headers each object includes, so a
# changed header rebuilds every object that uses it (PGXS alone does not).
PG_CXXFLAGS = -MMD -MP -std=c++17 -fPIC -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers \
              -Wno-register -Werror
SHLIB_LINK = -lcrypto -lcurl -lstdc++

# No LLVM bitcode: JIT inlining of this module is not worth a clang dependency.
override with_llvm = no

.DEFAULT_GOAL := all
.PHONY: demo demo-stop test test-valgrind deps benchmark loadtest deb

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
