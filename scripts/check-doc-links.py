#!/usr/bin/python3
"""Keeps pgphi's documentation connected: README.md and the pages in docs/.

Run by `scripts/test.sh catalogue` (it needs no test run). Fails, naming the
file and line, when:

1. a relative link (inline `[text](target)`, an image, or a reference
   definition `[id]: target`) names a file or directory that does not exist;
2. its `#anchor` is not a heading of the page it points to (anchors are
   derived from headings as GitHub does: lower case, punctuation dropped,
   spaces to hyphens, "-1", "-2" for repeats) or, for a file that is not
   Markdown, has an anchor at all;
3. a page of docs/ is not linked from README.md, or does not begin and end
   with its navigation line (a link back to the README);
4. the settings index in docs/operations.md and the settings the code
   defines (every "pgphi.<name>" string literal in src/pg/**/*.cpp) differ.

Links to other sites (with a scheme such as https:) are counted, not
followed. Text in code blocks and code spans is not read for links.

Usage: scripts/check-doc-links.py [REPOSITORY]   (default: this script's repository)
"""
import glob
import os
import re
import sys

repo = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), ".."))
pages = ["README.md"] + sorted(os.path.relpath(p, repo) for p in glob.glob(os.path.join(repo, "docs", "*.md")))
errors = []


def error(path, line, message):
    errors.append(f"{path}:{line}: {message}")


def prose_lines(text):
    """(line number, line) outside fenced code blocks, with code spans blanked."""
    fence = None
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.lstrip()
        marker = re.match(r"(`{3,}|~{3,})", stripped)
        if fence:
            if marker and stripped.startswith(fence):
                fence = None
            continue
        if marker:
            fence = marker.group(1)
            continue
        yield number, re.sub(r"(`+)(.+?)\1", lambda m: " " * len(m.group(0)), line)


def slug(heading):
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link's text only
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)                       # \w keeps letters, digits, _
    return text.replace(" ", "-")


anchors_of = {}


def anchors(path):
    """The anchors GitHub gives the headings of a Markdown file."""
    if path not in anchors_of:
        seen = {}
        result = set()
        with open(path, errors="replace") as f:
            text = f.read()
        fence = None
        for line in text.split("\n"):
            stripped = line.lstrip()
            marker = re.match(r"(`{3,}|~{3,})", stripped)
            if fence:
                if marker and stripped.startswith(fence):
                    fence = None
                continue
            if marker:
                fence = marker.group(1)
                continue
            m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
            if m:
                base = slug(m.group(1))
                count = seen.get(base, 0)
                seen[base] = count + 1
                result.add(base if count == 0 else f"{base}-{count}")
        anchors_of[path] = result
    return anchors_of[path]


INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")

checked = external = 0
linked_from_readme = set()
for page in pages:
    path = os.path.join(repo, page)
    with open(path, errors="replace") as f:
        text = f.read()
    for number, line in prose_lines(text):
        targets = [m.group(1) for m in INLINE.finditer(line)]
        definition = DEFINITION.match(line)
        if definition:
            targets.append(definition.group(1))
        for target in targets:
            if not target:
                error(page, number, "a link without a target")
                continue
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
                external += 1
                continue
            checked += 1
            file_part, _, fragment = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            if not os.path.exists(resolved):
                error(page, number, f"link to {target}: no such file {os.path.relpath(resolved, repo)}")
                continue
            if page == "README.md":
                linked_from_readme.add(os.path.relpath(resolved, repo))
            if fragment:
                if not resolved.endswith(".md"):
                    error(page, number, f"link to {target}: an anchor in a file that is not Markdown")
                elif fragment not in anchors(resolved):
                    error(page, number, f"link to {target}: {os.path.relpath(resolved, repo)} has no heading "
                                        f"with the anchor #{fragment}")

# Every page is reachable from the README, and leads back to it at both ends.
for page in pages[1:]:
    if page not in linked_from_readme:
        error("README.md", 0, f"does not link to {page}")
    with open(os.path.join(repo, page), errors="replace") as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    for where, line in (("first", lines[0] if lines else ""), ("last", lines[-1] if lines else "")):
        if "](../README.md)" not in line:
            error(page, 0, f"its {where} line is not the navigation line (a link to ../README.md)")

# The settings index of docs/operations.md against the settings the code defines.
operations = os.path.join(repo, "docs", "operations.md")
settings_checked = 0
if os.path.exists(operations):
    defined = set()
    for source in glob.glob(os.path.join(repo, "src", "pg", "**", "*.cpp"), recursive=True):
        with open(source, errors="replace") as f:
            defined |= set(re.findall(r'"(pgphi\.[a-z_]+)"', f.read()))
    with open(operations, errors="replace") as f:
        section = re.search(r"^## Settings\n(.*?)(?=^## )", f.read(), re.S | re.M)
    if not section:
        error("docs/operations.md", 0, "has no section \"## Settings\"")
    else:
        indexed = set()
        for line in section.group(1).split("\n"):
            if line.startswith("|"):
                indexed |= set(re.findall(r"`(pgphi\.[a-z_]+)`", line.strip("|").split("|")[0]))
        for name in sorted(defined - indexed):
            error("docs/operations.md", 0, f"the settings index lacks {name}, which src/pg defines")
        for name in sorted(indexed - defined):
            error("docs/operations.md", 0, f"the settings index lists {name}, which src/pg does not define")
        settings_checked = len(defined)

for message in errors:
    print(f"  BROKEN   {message}")
print(f"documentation: {len(pages)} pages, {checked} relative links checked, {external} links to other sites "
      f"not followed, {settings_checked} settings indexed, {len(errors)} problems")
sys.exit(1 if errors else 0)
