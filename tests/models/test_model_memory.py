"""load_llada streams: peak RSS stays near one copy of the weights, and the model owns its memory.

Measured in a fresh interpreter on Linux: the peak RSS (VmHWM, reset through /proc/self/clear_refs just before
loading) minus the RSS before loading, against the model's parameter bytes.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import torch
from safetensors.torch import save_file

from vrpo.models.llada import LLADA_CONFIG_TEMPLATE

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "llada-tiny"

_PROBE = r"""
import json, sys
import psutil, torch
from vrpo.models import load_llada

def peak():  # VmHWM: the peak RSS since the last reset
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

def load(path):
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    before = psutil.Process().memory_info().rss
    model = load_llada(path)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return model, {"before": before, "peak": peak(), "size": size}

out = {}
_, out["first"] = load(sys.argv[1])  # includes transformers' lazy imports
_, out["fixture"] = load(sys.argv[1])
model, out["big"] = load(sys.argv[2])
out["big"]["mapped"] = [l.split()[-1] for l in open("/proc/self/maps") if l.rstrip().endswith(".safetensors")]
ids = torch.arange(12)[None] % 100
with torch.no_grad():
    want = model(ids).logits
    for shard in sorted(__import__("pathlib").Path(sys.argv[2]).glob("*.safetensors")):
        shard.write_bytes(b"\0" * 64)  # overwritten in place, same inode
    out["big"]["unchanged"] = bool(torch.equal(model(ids).logits, want))
print(json.dumps(out))
"""


def _random_llada(path: pathlib.Path, d=1024, n_layers=2, ff=2816, vocab=6144, n_shards=6) -> int:
    """A random fp32 LLaDA checkpoint (~150 MB) in ``n_shards`` shards with an index; returns its bytes."""
    path.mkdir()
    cfg = dict(
        LLADA_CONFIG_TEMPLATE,
        d_model=d, n_heads=8, n_kv_heads=8, n_layers=n_layers, mlp_hidden_size=ff, vocab_size=vocab,
        embedding_size=vocab, mask_token_id=vocab - 6, eos_token_id=vocab - 5, pad_token_id=vocab - 5,
        torch_dtype="float32",
    )  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg))
    shapes = {"model.transformer.wte.weight": (vocab, d), "model.transformer.ff_out.weight": (vocab, d)}
    shapes["model.transformer.ln_f.weight"] = (d,)
    for i in range(n_layers):
        b = f"model.transformer.blocks.{i}."
        shapes.update({b + n: (d,) for n in ("attn_norm.weight", "ff_norm.weight")})
        shapes.update({b + n: (d, d) for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "attn_out.weight")})
        shapes.update({b + "ff_proj.weight": (ff, d), b + "up_proj.weight": (ff, d), b + "ff_out.weight": (d, ff)})
    g = torch.Generator().manual_seed(0)
    keys, weight_map, total = sorted(shapes), {}, 0
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        group = {k: torch.randn(shapes[k], generator=g) * 0.02 for k in keys[s::n_shards]}
        total += sum(t.numel() * 4 for t in group.values())
        save_file(group, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def test_loading_streams_and_owns_its_memory(tmp_path, record_property):
    total = _random_llada(tmp_path / "big")
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(FIXTURE), str(tmp_path / "big")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    first, fix, big = out["first"], out["fixture"], out["big"]
    fixture_extra = fix["peak"] - fix["before"]
    ratio = (big["peak"] - big["before"]) / big["size"]
    record_property("fixture_first_load_peak_rss_mib", first["peak"] / 2**20)
    record_property("fixture_load_rss_increase_mib", fixture_extra / 2**20)
    record_property("streamed_load_peak_over_size", ratio)
    print(
        f"\nllada-tiny ({fix['size'] / 2**20:.2f} MiB of weights): peak RSS {first['peak'] / 2**20:.1f} "
        f"MiB on the first load (+{(first['peak'] - first['before']) / 2**20:.1f} MiB, with lazy imports), "
        f"+{fixture_extra / 2**20:.2f} MiB on a second load; {big['size'] / 2**20:.0f} MiB sharded "
        f"checkpoint: peak RSS increase {ratio:.3f}x its size"
    )
    assert big["size"] == total
    assert ratio < 1.3, f"loading held {ratio:.2f}x the weights in memory"
    assert fixture_extra < 8 * 2**20
    assert big["mapped"] == [], "the loaded model still maps the checkpoint files"
    assert big["unchanged"], "overwriting the checkpoint in place changed the loaded model"
