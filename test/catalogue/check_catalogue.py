#!/usr/bin/python3
"""Keeps the bad-input catalogue (docs/bad-input-catalogue.md) true, in both directions.

Usage: check_catalogue.py docs/bad-input-catalogue.md EVIDENCE_DIR ERRCODES_H

The catalogue is the page's table whose header is "| input | error | SQLSTATE |".
README.md must not hold such a table any more (the catalogue moved to docs/ in
0.3.0): a row added there would be checked by nobody.

1. Every row is produced by a test. Each message of a row (the backticked
   text in its "error" column) must appear in an ERROR or FATAL line, with
   the row's SQLSTATE, in a server log that the regress or TAP suites wrote
   (scripts/test.sh keeps them in EVIDENCE_DIR; the servers log the
   SQLSTATE with %e in log_line_prefix). Rows about Citus may come from the
   citus suite's logs instead; without them they are reported, not failed.
2. Every SQLSTATE pgphi's code can raise is in some row: the core's error
   codes (through the mapping in src/pg/shared/error_bridge.cpp), the errcode()s
   and SQLSTATE overrides in src/pg, and the ERRCODEs of RAISE in the SQL
   scripts. The few that cannot be bad input are listed in EXEMPT, with why.

In the messages, a quoted single letter ("k") stands for any quoted name,
a capital N or V for any number, and "..." for any text. CATALOGUE_VERBOSE=1
lists where each message was seen."""
import glob
import os
import re
import sys

EXEMPT = {
    "XX000": "an internal error is a bug or an OpenSSL failure, not a bad input",
    "39P01": "pgphi._key_catalog_changed() called other than as a trigger: PostgreSQL "
             "refuses such a call before pgphi runs",
    "42622": "only the protect_column of the released 0.1.0 and 0.2.0 scripts refused a column name over "
             "46 characters; from 0.3.0 on it converts any column name",
}

# Rows whose test evidence differs by PostgreSQL major version, because the
# test emulates the condition: (SQLSTATE, message) -> (first major version
# that differs, the SQLSTATE the tests see there, why).
VERSION_DEPENDENT = {
    ("53100", "PostgreSQL's `could not extend file ...`"): (
        17, "XX000", "the tests fill the disk with a file-size limit; PostgreSQL 17 and later "
                     "report its EFBIG as it is, while a full disk (ENOSPC) is still 53100"),
}

catalogue_path, evidence_dir, errcodes_h = sys.argv[1:4]
# The major version of the server the tests ran against (scripts/test.sh).
pg_major = int(os.environ.get("PGPHI_PG_MAJOR", "15"))
# The repository: this file is test/catalogue/check_catalogue.py.
repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read(path):
    with open(path, errors="replace") as f:
        return f.read()


# --- the catalogue --------------------------------------------------------
HEADER = re.compile(r"^\|\s*input\s*\|\s*error\s*\|\s*SQLSTATE\s*\|\s*$", re.M)


def catalogue_table(text):
    """The lines of the first table headed | input | error | SQLSTATE |, or None."""
    header = HEADER.search(text)
    if not header:
        return None
    lines = []
    for line in text[header.start():].splitlines():
        if not line.startswith("|"):
            break
        lines.append(line)
    return lines


readme_md = os.path.join(repo, "README.md")
if os.path.exists(readme_md) and catalogue_table(read(readme_md)):
    sys.exit("README.md holds a bad-input catalogue table: its rows belong in docs/bad-input-catalogue.md "
             "(the only table this check reads)")
table = catalogue_table(read(catalogue_path))
if not table:
    sys.exit(f"{catalogue_path} has no table headed \"| input | error | SQLSTATE |\"")
rows = []
for line in table:
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) != 3:
        sys.exit(f"catalogue row needs three cells (input, error, SQLSTATE): {line}")
    if cells[0] == "input" or set("".join(cells)) <= set("-: "):
        continue
    codes = re.findall(r"\b[0-9A-Z]{5}\b", cells[2])
    messages = re.findall(r"`([^`]+)`", cells[1])
    if len(codes) != 1 or not messages:
        sys.exit(f"catalogue row needs one SQLSTATE and at least one `message`: {line}")
    rows.append((cells[0], messages, codes[0]))


def pattern_of(message):
    parts = []
    for piece in message.split("..."):
        piece = re.escape(piece)
        piece = re.sub(r'\\?"[^"\\]\\?"', '"[^"]*"', piece)      # "k" -> any quoted name
        piece = re.sub(r"\b[NV]\b", r"\\S+", piece)             # N, V -> any number
        parts.append(piece)
    return re.compile("^" + ".*".join(parts))


# --- what the tests produced ----------------------------------------------
LOG_ERROR = re.compile(r"\[\d+\] ([0-9A-Z]{5}) .*?\b(?:ERROR|FATAL):  (.*)$")
produced = {}   # (sqlstate, message) -> log file
logs = sorted(glob.glob(os.path.join(evidence_dir, "**", "*.log"), recursive=True))
for path in logs:
    for line in read(path).splitlines():
        m = LOG_ERROR.search(line)
        if m:
            produced.setdefault((m.group(1), m.group(2)), os.path.relpath(path, evidence_dir))
for suite in ("regress", "tap"):
    if not any(os.path.relpath(p, evidence_dir).startswith(suite + os.sep) for p in logs):
        sys.exit(f"no server logs of the {suite} suite in {evidence_dir}: run scripts/test.sh regress tap first")

# Rows about Citus are produced by the citus suite (test/t/citus), which needs
# Citus built: without its logs they are reported, not failed.
citus_logs = any(os.path.relpath(p, evidence_dir).startswith("citus" + os.sep) for p in logs)

verbose = os.environ.get("CATALOGUE_VERBOSE") == "1"   # also list where each row was seen
failures = 0
checked = 0
unchecked = 0
for what, messages, row_code in rows:
    for message in messages:
        checked += 1
        code = row_code
        for (dep_code, dep_message), (since, seen_as, _why) in VERSION_DEPENDENT.items():
            if dep_code == row_code and message in dep_message and pg_major >= since:
                code = seen_as
        pattern = pattern_of(message)
        found = next((src for (c, text), src in produced.items() if c == code and pattern.search(text)), None)
        if found and verbose:
            print(f"  ok       {code} {message}  ({found})")
        elif not found and "Citus" in what and not citus_logs:
            unchecked += 1
            print(f"  UNCHECKED {code} {message}  (a Citus row, and no logs of the citus suite)")
        elif not found:
            failures += 1
            print(f"  MISSING  {code} {message}  (no test produced it; row: {what})")
print(f"catalogue: {len(rows)} rows, {checked} messages, {checked - failures - unchecked} produced by the tests "
      f"(in {len(logs)} server logs)" + (f", {unchecked} Citus messages unchecked" if unchecked else ""))

# --- what the code can raise ------------------------------------------------
errcode_values = {}   # ERRCODE_NAME -> SQLSTATE, from PostgreSQL's errcodes.h
for name, *chars in re.findall(r"#define (ERRCODE_\w+)\s+MAKE_SQLSTATE\('(.)',\s*'(.)',\s*'(.)',\s*'(.)',\s*'(.)'\)",
                               read(errcodes_h)):
    errcode_values[name] = "".join(chars)

raised = {}     # SQLSTATE -> where
bridge = read(os.path.join(repo, "src/pg/shared/error_bridge.cpp"))
mapping = {}
for cases, target in re.findall(r"((?:case ErrorCode::\w+:\s*)+)(?:\s*//[^\n]*\n)*\s*return (ERRCODE_\w+);", bridge):
    for code in re.findall(r"ErrorCode::(\w+)", cases):
        mapping[code] = target
mapping.setdefault("Internal", "ERRCODE_INTERNAL_ERROR")
for path in glob.glob(os.path.join(repo, "src/core/*.[ch]pp")) + glob.glob(os.path.join(repo, "src/pg/**/*.cpp"), recursive=True):
    if path.endswith(("error.hpp", "error_bridge.cpp")):
        continue
    text = read(path)
    for code in set(re.findall(r"ErrorCode::(\w+)", text)):
        raised.setdefault(errcode_values[mapping[code]], f"ErrorCode::{code} ({os.path.basename(path)})")
    if path.endswith(".cpp") and "/src/pg/" in path:
        for name in set(re.findall(r"errcode\((ERRCODE_\w+)\)", text)) | \
                set(re.findall(r"(?:check_well_formed|call_core|raise_core_failure)\([^;]*?,\s*(ERRCODE_\w+)\)", text)):
            raised.setdefault(errcode_values[name], f"{name} ({os.path.basename(path)})")
for path in glob.glob(os.path.join(repo, "src/*.sql")):
    for name in re.findall(r"ERRCODE\s*=\s*'(\w+)'", read(path)):
        code = name if re.fullmatch(r"[0-9A-Z]{5}", name) else errcode_values["ERRCODE_" + name.upper()]
        raised.setdefault(code, f"RAISE ... ERRCODE = '{name}' ({os.path.basename(path)})")

documented = {code for _, _, code in rows}
undocumented = 0
for code, where in sorted(raised.items()):
    if code in documented:
        continue
    if code in EXEMPT:
        if verbose:
            print(f"  exempt   {code} {where}: {EXEMPT[code]}")
    else:
        undocumented += 1
        print(f"  MISSING  {code} {where}: not in the catalogue")
failures += undocumented
print(f"code: {len(raised)} SQLSTATEs pgphi can raise, {len(raised) - undocumented} in the catalogue or exempt "
      f"({', '.join(sorted(c for c in raised if c in EXEMPT))})")
sys.exit(1 if failures else 0)
