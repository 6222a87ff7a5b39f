"""The documentation points at things that exist: README.md, CHANGELOG.md, docs/*.md and benchmarks/README.md.

Checked in every page:

- **relative links** ``[text](path#anchor)`` and images: the file exists (relative to the page), and the
  anchor is a heading of the target page (GitHub's slugs);
- **repository paths** in code (inline or fenced) whose first part is a folder of the repository, or of the
  page's own folder (``results/`` in benchmarks/README.md): the path exists (``{a,b}`` is expanded; paths with
  a placeholder such as ``<op>`` or ``*`` are skipped);
- **modules run with** ``-m`` (``python -m M``, ``accelerate launch ... -m M``): ``M`` is found from the
  checkout, its source (and each package's on the way) compiles, and a package has a ``__main__``; nothing is
  imported, so the check costs milliseconds, not an import of every benchmark.

A page that moves or renames a file, a section or a module without updating its links fails here.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import pathlib
import re

import pytest

from ..helpers import ROOT

PAGES = sorted(
    p
    for p in [
        ROOT / "README.md",
        ROOT / "CHANGELOG.md",
        ROOT / "benchmarks" / "README.md",
        *(ROOT / "docs").glob("*.md"),
    ]
    if p.is_file()
)

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
_INLINE = re.compile(r"(?<!`)`([^`]+?)`(?!`)")  # a span may wrap onto the next line
_MODULE = re.compile(r"(?<![\w-])-m\s+([A-Za-z_][\w.]*\w)")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def _prose(text: str) -> str:
    """The page without its fenced code blocks."""
    return _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def anchors(text: str) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, spaces to hyphens,
    a repeated heading numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for _, title in _HEADING.findall(_prose(text)):
        title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link in a heading keeps its text
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _expand(token: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", token)
    if not match:
        return [token]
    head, tail = token[: match.start()], token[match.end() :]
    return [x for alt in match.group(1).split(",") for x in _expand(head + alt + tail)]


def code_paths(text: str) -> list[str]:
    """Path-like words in the page's code (fenced blocks and inline spans)."""
    code = [m.group(1) for m in _FENCE.finditer(text)] + _INLINE.findall(_prose(text))
    words = []
    for chunk in code:
        chunk = re.sub(r"\{[^{}\s]*\}", lambda m: m.group(0).replace(",", "\0"), chunk)  # {a,b} is one word
        for word in re.split(r"[\s,;()\[\]\"'=`|]+", chunk):
            word = word.replace("\0", ",")
            word = word.split("::")[0].split("#")[0].rstrip(".:")
            if "/" in word and not re.search(r"[<>*$~]", word) and not word.startswith(("/", "http")):
                words += _expand(word)
    return words


def module_problem(name: str) -> str | None:
    """Why ``python -m name`` would fail from the checkout, or None: the module and each package on its way
    must be found on ``sys.path`` and compile (a package runs its ``__main__``). Nothing is imported or run:
    each part is found in its parent's folder (``PathFinder``), so the check costs milliseconds."""
    parts = name.split(".")
    locations = None
    for i in range(len(parts)):
        full = ".".join(parts[: i + 1])
        spec = importlib.machinery.PathFinder.find_spec(full, locations)
        if spec is None and i == 0:
            spec = importlib.util.find_spec(full)  # a built-in or frozen top-level module
        if spec is None:
            return f"python -m {name}: no such module ({full} not found)"
        if spec.origin and spec.origin.endswith(".py"):
            try:
                compile(pathlib.Path(spec.origin).read_text(encoding="utf-8"), spec.origin, "exec")
            except SyntaxError as e:
                return f"python -m {name}: {spec.origin} does not compile: {e}"
        locations = spec.submodule_search_locations
        if locations is None and i < len(parts) - 1:
            return f"python -m {name}: {full} is a module, not a package"
    if locations is not None and parts[-1] != "__main__":  # a package runs its __main__
        return module_problem(f"{name}.__main__")
    return None


def problems(text: str, page: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    """Every broken link, missing repository path and unknown ``-m`` module of the page's text."""
    out = []
    here = page.parent
    for target in _LINK.findall(_prose(text)):
        if _EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        file = (here / path).resolve() if path else page
        if path and not file.exists():
            out.append(f"link {target}: {path} does not exist")
        elif (
            anchor
            and file.suffix == ".md"
            and anchor not in anchors(file.read_text(encoding="utf-8") if path else text)
        ):
            out.append(f"link {target}: {file.name} has no heading with the anchor #{anchor}")
    top = {p.name for p in root.iterdir() if p.is_dir()}
    for word in sorted(set(code_paths(text))):
        first = word.split("/")[0]
        base = here if (here / first).is_dir() and here != root else root if first in top else None
        if base is not None and not (base / word).exists():
            out.append(f"path {word}: not in the repository")
    for name in sorted(set(_MODULE.findall(text))):
        if (problem := module_problem(name)) is not None:
            out.append(problem)
    return out


def test_the_pages_are_found():
    names = {str(p.relative_to(ROOT)) for p in PAGES}
    assert {"README.md", "benchmarks/README.md", "docs/training.md", "docs/architecture.md"} <= names, names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_paths_and_modules_exist(page):
    found = problems(page.read_text(encoding="utf-8"), page)
    assert not found, f"{page.relative_to(ROOT)}:\n  " + "\n  ".join(found)


def test_the_check_fails_on_planted_breakage(tmp_path):
    """Each kind of breakage, planted in a page beside real links, is reported (and the real ones are not)."""
    page = ROOT / "docs" / "planted.md"  # never written: the text is checked as if it lived in docs/
    good = (
        "# Here\n[training](training.md#scaling-out) [readme](../README.md) [here](#here) "
        "`vrpo/estimator/elbo.py` `a wrapped\nspan` "
        "`tests/entry/test_layers.py::test_no_circle` `results/x.md` `outputs/run/model` "
        "`benchmarks/results/budget.{md,csv}` `vrpo/tasks/<name>/` and `python -m vrpo.train`\n"
    )
    assert problems(good, page) == []
    planted = {
        "[x](missing.md)": "link missing.md: missing.md does not exist",
        "[x](training.md#no-such-section)": "no heading with the anchor #no-such-section",
        "[x](#nowhere)": "planted.md has no heading with the anchor #nowhere",
        "![x](../benchmarks/results/nope.png)": "does not exist",
        "`tests/test_train.py`": "path tests/test_train.py: not in the repository",
        "`accelerate\nlaunch` (`tests/test_deepspeed_config.py`)": "path tests/test_deepspeed_config.py",
        "```bash\naccelerate launch -m vrpo.train --x tests/fsdp_cpu.py\n```": "path tests/fsdp_cpu.py",
        "`benchmarks/results/budget.{md,nope}`": "path benchmarks/results/budget.nope",
        "`python -m vrpo.no_such_module`": "python -m vrpo.no_such_module: no such module",
        "`python -m vrpo.training`": "python -m vrpo.training.__main__: no such module",
        "`python -m vrpo.train.sub`": "vrpo.train is a module, not a package",
    }
    for text, message in planted.items():
        found = problems(good + text + "\n", page)
        assert len(found) == 1 and message in found[0], (text, found)


def test_a_module_that_does_not_compile_is_reported(tmp_path, monkeypatch):
    (tmp_path / "broken_mod.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "does not compile" in module_problem("broken_mod")


def test_anchors_follow_githubs_slugs():
    text = (
        "# A title\n## VRPO against naive DPO (`benchmarks/toy_compare.py`)\n## The demo's data\n"
        "## Masks or pairs: the budget advisor\n## A title\n```\n# not a heading\n```\n"
    )
    assert anchors(text) == {
        "a-title",
        "vrpo-against-naive-dpo-benchmarkstoy_comparepy",
        "the-demos-data",
        "masks-or-pairs-the-budget-advisor",
        "a-title-1",
    }
