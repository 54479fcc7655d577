// PostgreSQL's headers, included with C linkage, plus the macro that declares
// an fmgr entry point. Only entry points and _PG_init need extern "C".
#pragma once

extern "C" {
#include "postgres.h"

#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
}

#include "core/bytes.hpp"

// The bytes of a (possibly short-header) varlena, for the core.
inline pgphi::ByteView view_of(const struct varlena* v)
{
    return pgphi::ByteView(reinterpret_cast<const uint8_t*>(VARDATA_ANY(v)), VARSIZE_ANY_EXHDR(v));
}

// Declares a SQL-callable function: PG_FUNCTION_INFO_V1 plus an unmangled
// definition. Use as `PGPHI_FUNCTION(name) { ... }`.
#define PGPHI_FUNCTION(name)                                                                       \
    extern "C" {                                                                                   \
    PG_FUNCTION_INFO_V1(name);                                                                     \
    }                                                                                              \
    extern "C" Datum name(PG_FUNCTION_ARGS)
