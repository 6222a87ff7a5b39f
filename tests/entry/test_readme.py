"""The README's and the docs' promises that code can check: their Python blocks run as written, and CI runs
the README's test command.

Every ```python block of README.md and docs/*.md is extracted and executed, so an edited page is what gets
tested. A block that cannot run here (it needs a real checkpoint or a GPU) is marked on the line
before its fence with ``<!-- not-run: <reason> -->`` and is skipped on purpose, reason and all.
(Links, paths and ``python -m`` modules of the pages: tests/entry/test_docs.py.)
"""

from __future__ import annotations

import math
import pathlib
import re
from dataclasses import dataclass

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_NOT_RUN = re.compile(r"^<!-- not-run: (\S.*?) -->$")


@dataclass(frozen=True)
class Block:
    line: int  # the page's line of the block's first code line
    code: str
    not_run: str | None  # the reason given by a not-run marker, if any
    page: pathlib.Path = README


def readme_python_blocks(text: str, page: pathlib.Path = README) -> list[Block]:
    blocks = []
    for match in _PYTHON_BLOCK.finditer(text):
        line_before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        marker = _NOT_RUN.match(line_before)
        first_line = text.count("\n", 0, match.start(1)) + 1
        blocks.append(Block(first_line, match.group(1), marker.group(1) if marker else None, page))
    return blocks


PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [b for page in PAGES for b in readme_python_blocks(page.read_text(), page)]
RUNNABLE = [b for b in BLOCKS if b.not_run is None]


def test_readme_has_python_blocks_to_run():
    in_readme = [b for b in RUNNABLE if b.page == README]
    assert in_readme, "README.md has no Python block without a not-run marker: nothing of it is tested"
    assert any("vrpo_loss" in b.code for b in in_readme), "the API example must be among the blocks that run"
    pages = {b.page.name for b in BLOCKS}
    assert pages >= {"README.md", "models.md", "evaluation.md"}, f"a page's blocks are lost: {pages}"


def test_extractor_sees_markers_and_line_numbers():
    text = "intro\n```python\nx = 1\n```\n<!-- not-run: needs a GPU -->\n```python\ny = 2\ny += 1\n```\n"
    want = [Block(3, "x = 1\n", None), Block(7, "y = 2\ny += 1\n", "needs a GPU")]
    assert readme_python_blocks(text) == want


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: f"{b.page.relative_to(ROOT)}:{b.line}")
def test_readme_python_block_runs(block, capsys):
    # Padding with blank lines makes tracebacks point at the page's own line numbers.
    where = f"{block.page.relative_to(ROOT)}:{block.line}"
    code = compile("\n" * (block.line - 1) + block.code, str(block.page), "exec")
    namespace = {"__name__": "__readme__"}
    exec(code, namespace)
    printed = capsys.readouterr().out
    assert "nan" not in printed.lower(), f"{where} prints a NaN: {printed}"
    for name, value in (namespace.get("metrics") or {}).items():
        assert math.isfinite(float(value)), f"{where}: metrics[{name!r}] = {float(value)}"
    if "loss" in namespace and torch.is_tensor(namespace["loss"]):
        assert torch.isfinite(namespace["loss"]).all(), f"{where}: the loss is not finite"


def test_ci_runs_the_readme_test_command():
    readme = README.read_text()
    match = re.search(r"<!-- test-command -->\n```bash\n(.+)\n```", readme)
    assert match, "README.md lost its test-command block"
    assert "awk '/<!-- test-command -->/" in (ROOT / ".ci" / "run").read_text()
    assert "pytest" in match.group(1)
