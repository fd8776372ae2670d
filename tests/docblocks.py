"""Runs the code blocks of a Markdown page, as tests/test_docs.py does: ``python tests/docblocks.py PAGE
[--slow]``.

Blocks run in page order in this one process and the current directory: ```python blocks in one
namespace, ```bash / ```sh blocks with ``bash -euo pipefail``. An HTML comment on the line directly above
a fence marks it (invisible on the site):

    <!-- doctest: skip gpu -->        needs a CUDA GPU (the page says so)
    <!-- doctest: skip download -->   needs a download from a model hub (the page says so)
    <!-- doctest: skip ci -->         is `make test` / `bash .ci/run` itself
    <!-- doctest: slow -->            runs only with --slow (pytest -m slow)
    <!-- doctest: covered-by PATH --> run, in the form a user cannot paste here (an install), by that test

and ``<!-- doctest-setup python`` (or ``bash``) ... ``-->`` is a hidden block that runs in its place.
A bash block that starts with ``make`` runs in ``$REPO`` (the repository root), where a reader types it.
Other fences (text, diff, json, ...) never run. Tracebacks name the page and its line numbers.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

RUN = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
MARKERS = ("skip gpu", "skip download", "skip ci", "slow")
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_MARK = re.compile(r"^\s*<!--\s*doctest:\s*(.*?)\s*-->\s*$")
_SETUP = re.compile(r"^\s*<!--\s*doctest-setup\s+(\w+)\s*$")


@dataclass
class Block:
    lang: str          # the fence's language as written ('' when none)
    code: str
    line: int          # 1-based line of the first code line on the page
    marker: Optional[str] = None
    hidden: bool = False

    @property
    def runs_as(self) -> Optional[str]:
        return RUN.get(self.lang.lower())


def parse(text: str) -> list[Block]:
    """Every fenced block and hidden setup block of a page, in order. Raises ValueError on an unclosed
    fence or setup comment, or an unknown marker."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m_setup = _SETUP.match(lines[i])
        if m_setup:
            j = i + 1
            while j < len(lines) and lines[j].strip() != "-->":
                j += 1
            if j == len(lines):
                raise ValueError(f"line {i + 1}: doctest-setup comment is not closed by a line '-->'")
            lang = m_setup.group(1)
            if lang not in RUN:
                raise ValueError(f"line {i + 1}: doctest-setup {lang!r}: expected python or bash")
            blocks.append(Block(lang, "\n".join(lines[i + 1:j]) + "\n", i + 2, hidden=True))
            i = j + 1
            continue
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        if j == len(lines):
            raise ValueError(f"line {i + 1}: the fence {fence}{lang} is not closed")
        marker = None
        if i > 0:
            mm = _MARK.match(lines[i - 1])
            if mm:
                marker = mm.group(1)
                if marker not in MARKERS and not marker.startswith("covered-by "):
                    raise ValueError(f"line {i}: doctest marker {marker!r}: expected one of {', '.join(MARKERS)}")
        body = [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1:j]]
        blocks.append(Block(lang, "\n".join(body) + "\n", i + 2, marker))
        i = j + 1
    return blocks


def runnable(blocks: list[Block], slow: bool) -> list[Block]:
    """The blocks a run executes: every python/bash block not skipped; ``slow`` ones only with ``slow``."""
    out = []
    for b in blocks:
        if b.runs_as is None or (b.marker or "").startswith(("skip", "covered-by")):
            continue
        if b.marker == "slow" and not slow:
            continue
        out.append(b)
    return out


def run_page(path: str, slow: bool = False) -> int:
    with open(path, encoding="utf-8") as f:
        blocks = runnable(parse(f.read()), slow)
    ns = {"__name__": "__docs__"}
    for b in blocks:
        where = f"{path}:{b.line}" + (" (hidden setup)" if b.hidden else "")
        print(f"--- {where} [{b.runs_as}{', ' + b.marker if b.marker else ''}]", flush=True)
        t0 = time.perf_counter()
        if b.runs_as == "python":
            # Leading newlines put the page's line numbers into tracebacks.
            exec(compile("\n" * (b.line - 1) + b.code, path, "exec"), ns)
        else:
            cwd = os.environ.get("REPO") if b.code.lstrip().startswith("make ") else None
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", b.code], cwd=cwd)
            if r.returncode:
                print(f"FAILED: the bash block at {where} exited {r.returncode}", file=sys.stderr)
                return 1
        print(f"    {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    slow = "--slow" in args
    pages = [a for a in args if a != "--slow"]
    if len(pages) != 1:
        sys.exit("usage: python tests/docblocks.py PAGE [--slow]")
    sys.exit(run_page(os.path.abspath(pages[0]), slow))
