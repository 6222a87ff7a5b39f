"""The README's promises that code can check: its Python blocks run as written, and CI runs its test
command.

Every ```python block of README.md is extracted and executed, so an edited README is what gets
tested. A block that cannot run here (it needs a real checkpoint or a GPU) is marked on the line
before its fence with ``<!-- not-run: <reason> -->`` and is skipped on purpose, reason and all.
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
    line: int  # README line of the block's first code line
    code: str
    not_run: str | None  # the reason given by a not-run marker, if any


def readme_python_blocks(text: str) -> list[Block]:
    blocks = []
    for match in _PYTHON_BLOCK.finditer(text):
        line_before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        marker = _NOT_RUN.match(line_before)
        first_line = text.count("\n", 0, match.start(1)) + 1
        blocks.append(Block(first_line, match.group(1), marker.group(1) if marker else None))
    return blocks


BLOCKS = readme_python_blocks(README.read_text())
RUNNABLE = [b for b in BLOCKS if b.not_run is None]


def test_readme_has_python_blocks_to_run():
    assert RUNNABLE, "README.md has no Python block without a not-run marker: nothing of it is tested"
    assert any("vrpo_loss" in b.code for b in RUNNABLE), "the API example must be among the blocks that run"


def test_extractor_sees_markers_and_line_numbers():
    text = "intro\n```python\nx = 1\n```\n<!-- not-run: needs a GPU -->\n```python\ny = 2\ny += 1\n```\n"
    want = [Block(3, "x = 1\n", None), Block(7, "y = 2\ny += 1\n", "needs a GPU")]
    assert readme_python_blocks(text) == want


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: f"README.md:{b.line}")
def test_readme_python_block_runs(block, capsys):
    # Padding with blank lines makes tracebacks point at README.md's own line numbers.
    code = compile("\n" * (block.line - 1) + block.code, str(README), "exec")
    namespace = {"__name__": "__readme__"}
    exec(code, namespace)
    printed = capsys.readouterr().out
    assert "nan" not in printed.lower(), f"README.md:{block.line} prints a NaN: {printed}"
    for name, value in (namespace.get("metrics") or {}).items():
        assert math.isfinite(float(value)), f"README.md:{block.line}: metrics[{name!r}] = {float(value)}"
    if "loss" in namespace and torch.is_tensor(namespace["loss"]):
        assert torch.isfinite(namespace["loss"]).all(), f"README.md:{block.line}: the loss is not finite"


def test_ci_runs_the_readme_test_command():
    readme = README.read_text()
    match = re.search(r"<!-- test-command -->\n```bash\n(.+)\n```", readme)
    assert match, "README.md lost its test-command block"
    assert "awk '/<!-- test-command -->/" in (ROOT / ".ci" / "run").read_text()
    assert "pytest" in match.group(1)
