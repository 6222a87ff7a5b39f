"""``python -m vrpo.plan``: exact static bytes (checked against meta-device models, torch's own FSDP2 sharding,
peft and the checkpoints' index files), the activation formula against the tensors autograd saves, and the CLI."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest
import torch

from vrpo.plan import (
    Setup,
    layer_activation_bytes,
    main,
    meta_model,
    model_facts,
    peak_memory_bytes,
    static_memory,
)
from vrpo.training.config import VRPOConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
LLADA_8B, DREAM_7B, TINY = FIX / "llada-8b-instruct-meta", FIX / "dream-7b-instruct-meta", FIX / "llada-tiny"
PAPER = ["--config", str(ROOT / "examples" / "llada_8b_vrpo.yaml")]


def config(path, **kw) -> VRPOConfig:
    return VRPOConfig(model_name_or_path=str(path), **kw).resolved()


def static(cfg, setup) -> dict[str, int]:
    return {i.name: i.value for i in static_memory(cfg, model_facts(cfg), setup)}


@pytest.mark.parametrize("path", [LLADA_8B, DREAM_7B])
def test_weight_bytes_equal_the_checkpoint_index(path):
    total = json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert static(config(path), Setup(distributed="ddp"))["policy weights"] == total


@pytest.mark.parametrize("path", [TINY, LLADA_8B / "config.json", DREAM_7B])
def test_static_bytes_equal_a_meta_model_after_one_adamw_step(path):
    cfg = config(path)
    model, _ = meta_model(cfg)
    model(input_ids=torch.zeros(1, 8, dtype=torch.long, device="meta")).logits.float().sum().backward()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    states = [v for s in opt.state.values() for v in s.values() if v.device.type == "meta"]
    got = static(cfg, Setup(distributed="ddp"))
    assert got["policy weights"] == sum(p.numel() * p.element_size() for p in model.parameters())
    assert got["gradients"] == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    assert got["optimizer (AdamW moments)"] == sum(v.numel() * v.element_size() for v in states)
    assert got["reference (frozen)"] == got["policy weights"]


@pytest.mark.parametrize("path, ranks", [(TINY, 3), (LLADA_8B, 8)])
def test_fsdp_shards_equal_fully_shard_on_the_meta_device(path, ranks):
    """accelerate's FSDP2 under bf16 mixed precision: fp32 master shards, one unit per decoder layer + the root."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    cfg = config(path, mixed_precision="bf16")
    model, _ = meta_model(cfg)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)  # rank 0 holds the largest shards
    try:
        model = model.float()  # accelerate upcasts trainable parameters to fp32 under mixed precision
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        local = sum(p.to_local().numel() * p.to_local().element_size() for p in model.parameters())
    finally:
        dist.destroy_process_group()
    got = static(cfg, Setup(num_gpus=ranks, distributed="fsdp"))
    assert got["policy weights"] == got["gradients"] == local
    assert got["optimizer (AdamW moments)"] == 2 * local
    if path == TINY:  # 136-row embedding over 3 ranks: padded to 46 rows each, not 136 / 3
        assert local > sum(p.numel() for p in meta_model(cfg)[0].parameters()) * 4 / ranks


@pytest.mark.parametrize("path", [TINY, LLADA_8B])
def test_lora_bytes_equal_peft_on_the_meta_device(path):
    from peft import LoraConfig, get_peft_model

    cfg = config(path, use_lora=True, lora_r=8)
    model, _ = meta_model(cfg)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(cfg.lora_target_modules)))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    got = static(cfg, Setup(distributed="ddp"))
    assert got["LoRA adapters"] == got["gradients"] == sum(p.numel() * p.element_size() for p in trainable)
    assert got["optimizer (AdamW moments)"] == 2 * got["gradients"]
    assert got["reference"] == 0


def test_layer_activation_formula_matches_what_autograd_saves():
    """The bytes one bf16 decoder layer saves for backward, per token, with a flash-type attention (the
    library's attention kernel): within 5% of the formula (which leaves out the RoPE tables and parameters)."""
    from vrpo.models import attention_impl, build_tiny_llada

    model = build_tiny_llada(
        seed=0,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        n_layers=1,
        mlp_hidden_size=192,
        vocab_size=136,
        attn_implementation="vrpo_triton",
    ).to(torch.bfloat16)
    x = torch.randn(2, 256, 64, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(256)[None].expand(2, -1)
    cos, sin = model.model.rotary_emb(x, pos)
    skip = {t.untyped_storage().data_ptr() for t in (x, cos, sin, *model.parameters())}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), attention_impl("torch"):
        model.model.layers[0](x, attention_mask=None, position_embeddings=(cos, sin), position_ids=pos)
    measured = sum(saved.values()) / x.shape[0] / x.shape[1]
    formula = layer_activation_bytes(model_facts(VRPOConfig(), model=model), b=2)
    assert abs(measured - formula) / measured < 0.05, (measured, formula)


def test_cli_llada_8b_on_8_h100_full_and_lora(capsys):
    model = ["--model_name_or_path", str(LLADA_8B / "config.json")]
    assert main(PAPER + model + ["--num_gpus", "8", "--gpu", "h100"]) == 0
    full = capsys.readouterr().out
    assert "8,015,581,184" in full and "FITS" in full and "FSDP2" in full
    assert "tokens through the policy     4,194,304" in full  # 64 pairs x 2 x 8 copies x 4096
    assert main(PAPER + model + ["--num_gpus", "8", "--use_lora"]) == 0
    lora = capsys.readouterr().out
    assert "LoRA adapters" in lora and "adapters off" in lora
    # One A100 cannot hold full fine-tuning of 8B with a whole reference.
    assert main(PAPER + model + ["--num_gpus", "1", "--gpu", "a100"]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_cli_errors_name_the_flag_or_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--gpu", "tpu"])
    assert "--gpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--mfu", "2"])
    assert "--mfu must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # the training flags' own check, before planning
        main(["--model_name_or_path", str(tmp_path / "nope")])
    assert exit_info.value.code == 2
    assert "nope: no such directory" in capsys.readouterr().err
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["--model_name_or_path", str(bad)]) == 2
    assert "model_type='gpt2' is not supported" in capsys.readouterr().err


def test_peak_memory_bytes_of_a_loaded_model_grows_with_the_batch():
    from vrpo.models import build_tiny_llada

    model = build_tiny_llada(seed=0, d_model=64, n_heads=4, n_layers=2, mlp_hidden_size=192, vocab_size=136)
    base = VRPOConfig(per_device_train_batch_size=1, max_length=64)
    one = peak_memory_bytes(base, model=model)
    two = peak_memory_bytes(dataclasses.replace(base, per_device_train_batch_size=2), model=model)
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert 4 * weights < one < two  # weights, reference, gradients, moments, then activations


def test_the_training_docs_show_the_plan_as_printed(capsys):
    import re
    import shlex

    docs = (ROOT / "docs" / "training.md").read_text()
    block = re.search(r"```text\n\$ (python -m vrpo\.plan .+?)\n(LLaDA.+?)\n```", docs, re.S)
    assert block, "docs/training.md lost its plan example"
    argv = shlex.split(block.group(1).replace("\\\n", " "))[3:]
    assert main([a if not a.startswith(("examples/", "tests/")) else str(ROOT / a) for a in argv]) == 0
    assert capsys.readouterr().out.strip() == block.group(2).strip()


def test_a_qwen2_format_dream_export_plans_like_dream(tmp_path):
    """One family table: a Dream exported in transformers' Qwen2 format (model_type qwen2, as save_pretrained
    writes it) is planned through the Dream entry, with the same tensors and figures as Dream's own format.
    (The planner's former second table knew model_type 'dream' only and refused 'qwen2'.)"""
    native = json.loads((DREAM_7B / "config.json").read_text())
    model, family = meta_model(config(DREAM_7B))
    export = model.config.to_dict()
    assert export["model_type"] == "qwen2"
    (tmp_path / "config.json").write_text(json.dumps(export))
    facts, expected = model_facts(config(tmp_path)), model_facts(config(DREAM_7B))
    assert family.name == "dream" and native["model_type"] == "Dream"
    assert facts == expected and facts.family == "Dream"
    setup = Setup(num_gpus=8, distributed="fsdp")
    assert peak_memory_bytes(config(tmp_path), setup=setup) == peak_memory_bytes(config(DREAM_7B), setup=setup)
