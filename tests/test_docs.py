"""The docs cannot drift: every README / CONTRIBUTING / docs/ code block that is Python or a shell command
runs (tests/docblocks.py says how blocks are marked), every link and anchor resolves, the site builds
with ``mkdocs build --strict``, and the README stays a front page (<= 200 lines)."""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import subprocess
import sys
import unicodedata

import pytest

from docblocks import parse, runnable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "CONTRIBUTING.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))
PAGES = [p for p in PAGES if os.path.exists(os.path.join(ROOT, p))]
# A page's own blocks together: the docs' budget is 60 s a page on one thread; this is the hard stop.
PAGE_TIMEOUT_S = 600
# The slow tier runs the pages' real benchmark commands (full SD-1.5-shaped steps, the AOT compile, `make
# bench`): hours on 2 cores, so only a runaway is stopped.
SLOW_PAGE_TIMEOUT_S = 6 * 3600


def _read(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def _env(tmp_path):
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")] +
                                          ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
               OMP_NUM_THREADS="1", MPLBACKEND="Agg", REPO=ROOT, HOME=env.get("HOME", str(tmp_path)),
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    env.pop("SPARE_KERNELS_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)   # conftest sets it for this process's tests; a reader's shell has none
    return env


def _run(page, tmp_path, slow):
    cmd = [sys.executable, os.path.join(ROOT, "tests", "docblocks.py"), os.path.join(ROOT, page)]
    r = subprocess.run(cmd + (["--slow"] if slow else []), cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                       text=True, timeout=SLOW_PAGE_TIMEOUT_S if slow else PAGE_TIMEOUT_S)
    assert r.returncode == 0, f"{page}: a code block failed\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"


@pytest.mark.parametrize("page", PAGES)
def test_page_code_blocks_run(page, tmp_path):
    if not runnable(parse(_read(page)), slow=False):
        pytest.skip(f"{page}: no block runs outside the slow tier")
    _run(page, tmp_path, slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_page_code_blocks_run_slow(page, tmp_path):
    if not any(b.marker == "slow" for b in parse(_read(page))):
        pytest.skip(f"{page}: no slow blocks")
    # The benchmark commands rewrite benchmarks/results/*.json, the committed figures: put them back.
    results = os.path.join(ROOT, "benchmarks", "results")
    kept = {}
    for f in glob.glob(os.path.join(results, "*")):
        with open(f, "rb") as fh:
            kept[f] = fh.read()
    try:
        _run(page, tmp_path, slow=True)
    finally:
        for f in set(glob.glob(os.path.join(results, "*"))) - set(kept):
            os.remove(f)
        for f, data in kept.items():
            with open(f, "wb") as fh:
                fh.write(data)


@pytest.mark.parametrize("page", PAGES)
def test_every_block_is_run_or_says_why_not(page):
    """A skip names a reason the page states (a GPU, a download), and no runnable language hides in an
    unmarked, unknown fence."""
    text = _read(page)
    for b in parse(text):
        if b.marker == "skip gpu":
            assert "GPU" in text, f"{page}:{b.line}: skipped as needing a GPU, but the page never says GPU"
        if (b.marker or "").startswith("covered-by "):
            path = b.marker.split(None, 1)[1]
            assert os.path.exists(os.path.join(ROOT, path)), f"{page}:{b.line}: covered by {path}, which does not exist"
        if b.marker == "skip download":
            assert "download" in text.lower(), f"{page}:{b.line}: skipped as needing a download; say so"
        assert b.lang.lower() not in ("console", "shell-session", "python3", "pycon", "ipython"), \
            f"{page}:{b.line}: fence {b.lang!r}: use python / bash (they run) or text (it does not)"


# ------------------------------------------------------------------------------------------- links
def _strip_code(text):
    """The page with fenced blocks and inline code blanked (links and headings inside them are not)."""
    out, fence = [], None
    for ln in text.splitlines():
        m = re.match(r"^\s*(`{3,}|~{3,})", ln)
        if fence is None and m:
            fence = m.group(1)
            out.append("")
            continue
        if fence is not None:
            if ln.strip().startswith(fence):
                fence = None
            out.append("")
            continue
        out.append(re.sub(r"`[^`]*`", "``", ln))
    return "\n".join(out)


def slug_github(h):
    h = re.sub(r"[^\w\- ]", "", h.strip().lower())
    return h.replace(" ", "-")


def slug_mkdocs(h):
    h = unicodedata.normalize("NFKD", h).encode("ascii", "ignore").decode()
    h = re.sub(r"[^\w\s-]", "", h).strip().lower()
    return re.sub(r"[-\s]+", "-", h)


def anchors(page):
    """The heading anchors of a page as its renderer makes them: GitHub's for files outside docs/,
    mkdocs' for the site's pages (repeats get -1 / _1)."""
    site = page.startswith("docs" + os.sep) or page.startswith("docs/")
    seen, out = {}, set()
    for ln in _strip_code(_read(page)).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", ln)
        if not m:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1)).replace("`", "")
        s = (slug_mkdocs if site else slug_github)(title)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}{'_' if site else '-'}{n}")
    for m in re.finditer(r'id="([^"]+)"|\{#([\w-]+)\}', _read(page)):
        out.add(m.group(1) or m.group(2))
    return out


@pytest.mark.parametrize("page", PAGES)
def test_links_and_anchors_resolve(page):
    text = _strip_code(_read(page))
    bad = []
    for m in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):      # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if page.startswith("docs/") and path and not dest.startswith("docs"):
            bad.append(f"{target}: links out of docs/ (the site cannot serve it): name the file as code")
            continue
        if not os.path.exists(os.path.join(ROOT, dest)):
            bad.append(f"{target}: no such file {dest}")
            continue
        if anchor and dest.endswith(".md") and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with the anchor #{anchor} in {dest}")
    assert not bad, f"{page}: broken links:\n  " + "\n  ".join(bad)


def test_readme_is_a_front_page():
    n = len(_read("README.md").splitlines())
    assert n <= 200, f"README.md has {n} lines: the front page holds at most 200 (the rest goes into docs/)"


def test_site_builds_strict(tmp_path):
    """``make docs``: mkdocs (material) builds the site offline with warnings as errors (links, anchors,
    pages missing from the nav)."""
    if importlib.util.find_spec("mkdocs") is None:   # a failure, not a skip: CI must build the site
        pytest.fail("mkdocs is missing: it is in the test extra (`pip install -e .[test]`, or `make docs`)")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").exists()
