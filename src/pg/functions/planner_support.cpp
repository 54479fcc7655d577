// Planner support for pgphi.encrypt_phi(value, key_name, deterministic,
// context). Its randomized form returns a new value at every call, so the
// function is VOLATILE: planning never runs it (a STABLE function is run by
// the planner for its estimates, and each run would spend a seal and count
// against the key's nonce budget). Its deterministic form, though, must stay
// an index condition ("col = encrypt_phi(..., deterministic => true)"). So
// when `deterministic` is the constant true, this support function replaces
// the call by pgphi._encrypt_phi_deterministic, a STABLE twin with the same
// arguments and C entry point. Any other call (false, NULL, a parameter or a
// column) stays VOLATILE.
#include "shared/postgres.hpp"

extern "C" {
#include "nodes/makefuncs.h"
#include "nodes/pg_list.h"
#include "nodes/supportnodes.h"
#include "parser/parse_func.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/lsyscache.h"
}

#include "shared/compat.hpp"

PGPHI_FUNCTION(pgphi_encrypt_mode_support)
{
    Node* raw = reinterpret_cast<Node*>(PG_GETARG_POINTER(0));
    if (!IsA(raw, SupportRequestSimplify))
        PG_RETURN_POINTER(nullptr);
    FuncExpr* call = reinterpret_cast<SupportRequestSimplify*>(raw)->fcall;
    if (list_length(call->args) != 4)
        PG_RETURN_POINTER(nullptr);
    Node* mode = static_cast<Node*>(list_nth(call->args, 2));
    if (!IsA(mode, Const) || reinterpret_cast<Const*>(mode)->constisnull ||
        !DatumGetBool(reinterpret_cast<Const*>(mode)->constvalue))
        PG_RETURN_POINTER(nullptr);

    // A caller without EXECUTE on encrypt_phi is told so by name, rather than
    // about the twin (whose grants are the same).
    if (!pgphi::compat::may_execute(call->funcid, GetUserId()))
        PG_RETURN_POINTER(nullptr);
    Oid* argtypes = nullptr;
    int nargs = 0;
    get_func_signature(call->funcid, &argtypes, &nargs);
    List* name = list_make2(makeString(pstrdup("pgphi")), makeString(pstrdup("_encrypt_phi_deterministic")));
    Oid twin = LookupFuncName(name, nargs, argtypes, true);
    if (!OidIsValid(twin))
        PG_RETURN_POINTER(nullptr); // the twin is missing: leave the call as it is
    FuncExpr* stable = static_cast<FuncExpr*>(copyObjectImpl(call));
    stable->funcid = twin;
    PG_RETURN_POINTER(stable);
}
