"""What several test modules share: paths, tiny deterministic stand-ins for a masked diffusion LM (cheap
enough for thousands of draws), the unbiasedness check, and running the CLI in a subprocess."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import subprocess
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Checkpoints and metadata the tests read; tests/fixtures/README.md says what each one is.
FIXTURES = ROOT / "tests" / "fixtures"


def assert_unbiased(samples, exact, z=4.5):
    """|mean - exact| within z standard errors, per row (plus float32 rounding of the terms)."""
    mean = samples.mean(-1)
    se = samples.std(-1) / math.sqrt(samples.shape[-1])
    slack = z * se + 1e-5 * (1 + exact.abs())
    assert ((mean - exact).abs() <= slack).all(), f"mean {mean}, exact {exact}, se {se}"


def on_the_demo(args) -> list[str]:
    """``vrpo.train`` flags ``args`` on the sorting demo unless they name a ``--task`` (the demo's short answers
    keep the tests fast; the default task is sort_long)."""
    return list(args) if "--task" in args else ["--task", "sort", *args]


def run_cli(args, env=None, launcher=None):
    """Run ``python -m vrpo.train`` (or a launcher) in a subprocess from the checkout, on :func:`on_the_demo`."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0", **(env or {})}
    cmd = (launcher or [sys.executable]) + ["-m", "vrpo.train", *on_the_demo(args)]
    return subprocess.run(cmd, env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def losses(output_dir) -> list[tuple[int, float]]:
    """``(step, loss/vrpo)`` of a run's metrics log."""
    path = pathlib.Path(output_dir) / "logs" / "metrics.jsonl"
    return [(r["step"], r["loss/vrpo"]) for r in map(json.loads, path.read_text().splitlines()) if "loss/vrpo" in r]


def digest(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


class ToyMDM:
    """A float64 "model": logits at each position depend on the whole (masked) sequence.

    ``logits = (E[ids] + P + tanh(mean_i(E[ids] + P) @ A)) @ W``. The mean over positions makes every
    position see every other one, so the order of masking matters as it does bidirectionally.
    The mask token is the last id, ``vocab - 1``.
    """

    def __init__(self, vocab: int = 7, max_len: int = 16, dim: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.mask_token_id = vocab - 1
        self.E = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
        self.P = torch.randn(max_len, dim, generator=g, dtype=torch.float64) * 0.5
        self.A = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        self.W = torch.randn(dim, vocab, generator=g, dtype=torch.float64)

    def perturbed(self, scale: float, seed: int = 1) -> ToyMDM:
        """A copy with its output matrix nudged: a "policy" close to this "reference"."""
        other = ToyMDM.__new__(ToyMDM)
        other.__dict__.update(self.__dict__)
        g = torch.Generator().manual_seed(seed)
        other.W = self.W + scale * torch.randn(self.W.shape, generator=g, dtype=torch.float64)
        return other

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.E[ids] + self.P[: ids.shape[1]]
        return (h + torch.tanh(h.mean(1, keepdim=True) @ self.A)) @ self.W

    def logp(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self(ids), -1)


def toy_batch(prompt_lens, response_lens, vocab: int = 7, seed: int = 0, pad_to: int | None = None):
    """Random ``input_ids`` [B, L] (ids below the mask id) and the matching ``response_mask``.

    Row ``b`` is ``prompt_lens[b]`` prompt tokens, ``response_lens[b]`` response tokens, then padding.
    """
    g = torch.Generator().manual_seed(seed)
    L = pad_to or max(p + r for p, r in zip(prompt_lens, response_lens))
    ids = torch.randint(0, vocab - 1, (len(prompt_lens), L), generator=g)
    resp = torch.zeros(len(prompt_lens), L, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        resp[b, p : p + r] = True
    return ids, resp
