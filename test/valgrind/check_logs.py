#!/usr/bin/python3
"""Reads the valgrind memcheck logs of a server run (one file per process,
written with --error-markers=VALGRINDERROR-BEGIN,VALGRINDERROR-END and
--leak-check=full --show-leak-kinds=definite) and exits non-zero when any
process reported an error that the suppression file did not cover, or a
definite leak of memory that pgphi's code allocated.

Usage: check_logs.py LOG_DIR

Errors are printed with the process's log file; errors whose stack passes
through pgphi (pgphi.so, or a source file of this repository) are marked,
since those are ours to fix; the others are PostgreSQL's, a library's, or a
suppression this project is missing."""
import glob
import os
import re
import sys

log_dir = sys.argv[1]
logs = sorted(glob.glob(os.path.join(log_dir, "*.log")))
if not logs:
    sys.exit(f"no valgrind logs in {log_dir}: did the server run under valgrind?")

# A frame in pgphi: its library, its namespace or entry points, or a C++
# source file (PostgreSQL, OpenSSL and libcurl are C).
PGPHI_FRAME = re.compile(r"pgphi\.so|\bpgphi(::|_)\w+|\(\w+\.[ch]pp:\d+\)")
errors = []      # (log, block, ours)
leaks = []       # (log, block)
processes = 0
suppressed = 0   # errors the suppression file covered
for path in logs:
    text = open(path, errors="replace").read()
    if "Memcheck, a memory error detector" not in text and "ERROR SUMMARY" not in text:
        continue
    processes += 1
    suppressed += sum(int(n.replace(",", "")) for n in re.findall(r"ERROR SUMMARY: .*\(suppressed: ([\d,]+) from", text))
    for block in re.findall(r"VALGRINDERROR-BEGIN\n(.*?)VALGRINDERROR-END", text, re.S):
        if re.search(r"blocks are (definitely|indirectly|possibly) lost", block):
            continue  # a leak record, judged below
        errors.append((path, block, bool(PGPHI_FRAME.search(block))))
    # Leak records (not errors, so without markers): from the "lost" line to
    # the blank line after its stack. Only leaks pgphi allocated count:
    # PostgreSQL frees most memory by dropping whole memory contexts, or
    # leaves it to process exit.
    for block in re.findall(r"^(==\d+== [\d,]+ (?:\([^)]*\) )?bytes in [\d,]+ blocks are definitely lost.*?)^==\d+== $",
                            text, re.S | re.M):
        if PGPHI_FRAME.search(block):
            leaks.append((path, block))

print(f"valgrind: {processes} processes checked, {len(errors)} errors "
      f"({sum(1 for e in errors if e[2])} in pgphi), {len(leaks)} pgphi leaks, "
      f"{suppressed} known PostgreSQL reports suppressed")


def stack_of(block):
    """The block without pids and addresses, to print each kind once."""
    return re.sub(r"==\d+==|0x[0-9A-F]+:|[\d,]+ bytes|record [\d,]+ of [\d,]+", "", block)


shown = set()
for kind, path, block in [("pgphi error" if e[2] else "error", e[0], e[1]) for e in errors] + \
                         [("pgphi leak", path, block) for path, block in leaks]:
    key = stack_of(block)
    if key in shown:
        continue
    shown.add(key)
    print(f"--- {kind} in {os.path.basename(path)} (first of its kind)")
    print(block.rstrip())
sys.exit(1 if errors or leaks else 0)
