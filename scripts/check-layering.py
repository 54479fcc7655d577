#!/usr/bin/env python3
"""Checks that the source tree keeps its layers (docs/development.md#layout).

  src/core            pure C++: includes only src/core, never a PostgreSQL header
  src/pg/shared       beneath every other folder of src/pg: core and shared only
  src/pg/policy       core, shared and policy
  src/pg/functions    core, shared, policy and functions
  src/pg/workers      core, shared and workers
  src/pg/module.cpp   _PG_init, which wires everything: anything

Two levels are checked:
  - includes: every quoted #include names its folder ("shared/audit.hpp",
    "core/data_key.hpp"; no "../"), and the folder is one the file may use;
  - symbols, when the objects are built: every pgphi function or variable an
    object uses must be defined in a folder it may use (nm). This catches a
    header of a lower layer declaring what a higher layer defines.

Exits non-zero, with one line per problem, when a rule is broken.
"""
import os
import re
import subprocess
import sys

repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PG_FOLDERS = ["shared", "policy", "functions", "workers"]
MAY_USE = {
    "core": {"core"},
    "shared": {"core", "shared"},
    "policy": {"core", "shared", "policy"},
    "functions": {"core", "shared", "policy", "functions"},
    "workers": {"core", "shared", "workers"},
    "module": {"core", "shared", "policy", "functions", "workers", "module"},
}
# Headers that only PostgreSQL provides: src/core must not include them.
POSTGRES_HEADER = re.compile(r'^(postgres|fmgr|funcapi|miscadmin|pgstat|c)\.h$|^(access|catalog|commands|executor|'
                             r'lib|libpq|mb|nodes|optimizer|parser|port|postmaster|replication|storage|tcop|utils)/')

problems = []


def layer_of(path):
    rel = os.path.relpath(path, repo)
    parts = rel.split(os.sep)
    if parts[:2] == ["src", "core"]:
        return "core"
    if parts[:2] == ["src", "pg"]:
        if len(parts) == 3:
            if parts[2] != "module.cpp":
                problems.append(f"{rel}: files of src/pg belong in one of its folders ({', '.join(PG_FOLDERS)})")
            return "module"
        if parts[2] in PG_FOLDERS and len(parts) == 4:
            return parts[2]
        problems.append(f"{rel}: not in a known folder of src/pg")
    return None


def sources():
    for root in ("src/core", "src/pg"):
        for dirpath, _, names in os.walk(os.path.join(repo, root)):
            for name in sorted(names):
                if name.endswith((".cpp", ".hpp")):
                    yield os.path.join(dirpath, name)


include_re = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)
files = 0
for path in sources():
    layer = layer_of(path)
    if layer is None:
        continue
    files += 1
    rel = os.path.relpath(path, repo)
    for name in include_re.findall(open(path, encoding="utf-8").read()):
        if layer == "core":
            if POSTGRES_HEADER.search(name) or "/" in name:
                problems.append(f"{rel}: includes \"{name}\"; src/core includes only its own headers")
            elif not os.path.exists(os.path.join(repo, "src/core", name)):
                problems.append(f"{rel}: includes \"{name}\", which src/core does not have")
            continue
        folder = name.split("/")[0]
        if ".." in name.split("/"):
            problems.append(f"{rel}: includes \"{name}\"; name the folder instead of a relative path")
        elif folder in PG_FOLDERS or folder == "core":
            base = "src/core" if folder == "core" else "src/pg"
            target = name[len("core/"):] if folder == "core" else name
            if not os.path.exists(os.path.join(repo, base, target)):
                problems.append(f"{rel}: includes \"{name}\", which does not exist")
            elif folder not in MAY_USE[layer]:
                problems.append(f"{rel}: includes \"{name}\", but {layer} may use only "
                                f"{', '.join(sorted(MAY_USE[layer]))}")
        elif not name.endswith(".h"):
            problems.append(f"{rel}: includes \"{name}\" without its folder")

# Symbols: what each built object of src/pg uses from pgphi, and where it is defined.
objects = {}
for path in sources():
    if path.endswith(".cpp"):
        obj = path[:-4] + ".o"
        layer = layer_of(path)
        if os.path.exists(obj) and layer:
            objects[obj] = layer
symbols_checked = 0
if objects and len(objects) == sum(1 for p in sources() if p.endswith(".cpp")):
    defined_in = {}
    used = {}
    for obj, layer in objects.items():
        out = subprocess.run(["nm", "-C", obj], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            fields = line.split(None, 2)
            if len(fields) == 2 and fields[0] == "U" and "pgphi::" in fields[1]:
                used.setdefault(obj, set()).add(fields[1])
            elif len(fields) == 3 and fields[1] in "TDBRVW" and "pgphi::" in fields[2]:
                defined_in.setdefault(fields[2], set()).add(layer)
    for obj, names in sorted(used.items()):
        layer = objects[obj]
        for name in sorted(names):
            layers = defined_in.get(name)
            symbols_checked += 1
            if layers and not layers & MAY_USE[layer]:
                problems.append(f"{os.path.relpath(obj, repo)[:-2]}.cpp: uses {name}, defined in "
                                f"{', '.join(sorted(layers))}, which {layer} may not use")
else:
    print("layering: objects not (all) built, symbols not checked")

for problem in problems:
    print(f"layering: {problem}", file=sys.stderr)
print(f"layering: {files} files, {symbols_checked} symbol uses checked, {len(problems)} problems")
sys.exit(1 if problems else 0)
