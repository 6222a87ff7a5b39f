"""LLaDA on transformers: exact loading, backends, bidirectionality, packing, padding, save/load."""

from __future__ import annotations

import copy
import json
import pathlib
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vrpo.models.attention as attention_mod
from vrpo.errors import CheckpointError
from vrpo.estimator import HeadOptions
from vrpo.estimator.elbo import elbo_terms
from vrpo.estimator.packing import flash_varlen_kwargs
from vrpo.estimator.sampling import MaskDraw, SamplingPlan, draw_masks
from vrpo.models import (
    BidirectionalLlamaForCausalLM,
    attention_impl,
    build_tiny_llada,
    current_attention_impl,
    load_llada,
    pack_rows,
    packing_kwargs,
    save_llada,
    segment_positions,
    tiny_llada_config,
)
from vrpo.models.attention import check_backend
from vrpo.models.llada import hf_to_llada_key, llada_to_hf_key, llada_to_llama_config
from vrpo_kernels import bidirectional_attention

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
CPU_BACKENDS = ("sdpa", "eager", "vrpo_triton")
MASK, EOS = 250, 251


@pytest.fixture(scope="module")
def tiny_dir():
    path = FIXTURES / "llada-tiny"
    if not path.is_dir():
        pytest.fail(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def expected(tiny_dir):
    return load_file(str(tiny_dir / "expected.safetensors"))


@pytest.fixture(scope="module", params=CPU_BACKENDS)
def model(request, tiny_dir):
    return load_llada(tiny_dir, attn_implementation=request.param)


def _tensors(path):
    out = {}
    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    for name in files:
        with safe_open(str(path / name), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


# ------------------------------------------------------------------------------------ exact logits


def test_fixture_logits_match_reference(model, expected, record_property):
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    assert logits.dtype == torch.float32 and logits.shape == expected["logits"].shape
    err = (logits - expected["logits"]).abs().max().item()
    record_property(f"max_abs_diff_{model.config._attn_implementation}", err)
    print(f"\nllada-tiny logits max abs diff [{model.config._attn_implementation}]: {err:.3e}")
    assert err < 1e-4


def test_default_backend_is_sdpa_and_config_is_mapped(tiny_dir):
    model = load_llada(tiny_dir)
    c = model.config
    assert isinstance(model, BidirectionalLlamaForCausalLM)
    assert c._attn_implementation == "sdpa" and c.is_causal is False
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers) == (64, 4, 4, 2)
    assert (c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (96, 256, 64)
    assert (c.mask_token_id, c.eos_token_id, c.pad_token_id) == (MASK, EOS, EOS)
    assert c.rope_parameters["rope_theta"] == 500000.0 and c.rms_norm_eps == 1e-5
    assert not model.training
    assert all(layer.self_attn.is_causal is False for layer in model.model.layers)


def test_real_llada_8b_config_and_keys_map_onto_llama(fixtures_dir):
    from accelerate import init_empty_weights

    meta = fixtures_dir / "llada-8b-instruct-meta"
    config = llada_to_llama_config(json.loads((meta / "config.json").read_text()))
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (4096, 32, 12288)
    assert (config.vocab_size, config.mask_token_id, config.eos_token_id) == (126464, 126336, 126081)
    assert config.dtype == torch.bfloat16 and config.tie_word_embeddings is False
    with init_empty_weights():
        model = BidirectionalLlamaForCausalLM(config)
    params = dict(model.named_parameters())
    weight_map = json.loads((meta / "model.safetensors.index.json").read_text())["weight_map"]
    mapped = {llada_to_hf_key(k): k for k in weight_map}
    assert set(mapped) == set(params), "every LLaDA key maps to exactly the Llama parameters"
    assert all(hf_to_llada_key(hf) == k for hf, k in mapped.items())
    assert params["lm_head.weight"].shape == (126464, 4096)
    assert (
        sum(p.numel() for p in params.values()) * 2
        == json.loads((meta / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    )


def test_dtype_and_config_overrides(tiny_dir):
    model = load_llada(tiny_dir, dtype=torch.bfloat16, attention_dropout=0.1)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.config.attention_dropout == 0.1
    assert load_llada(tiny_dir, dtype="float64").lm_head.weight.dtype == torch.float64
    with pytest.raises(TypeError, match="not_a_field"):
        load_llada(tiny_dir, not_a_field=1)
    with pytest.raises(ValueError, match="attn_implementation"):
        load_llada(tiny_dir, attn_implementation="flex_attention")


def test_flash_attention_2_needs_flash_attn_and_cuda(tiny_dir):
    import importlib.util

    have = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    if have:  # pragma: no cover - GPU machines only
        assert check_backend("flash_attention_2", "cuda") == "flash_attention_2"
        return
    with pytest.raises(RuntimeError, match="flash_attention_2.*(flash-attn|CUDA)"):
        load_llada(tiny_dir, attn_implementation="flash_attention_2")


# ---------------------------------------------------------------------------------- bidirectional


@pytest.mark.parametrize("training", [False, True])
def test_last_token_changes_first_position(model, expected, training):
    ids = expected["input_ids"][:1].clone()
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % MASK
    model.train(training)
    try:
        with torch.no_grad():
            a = model(ids).logits[0, 0]
            b = model(changed).logits[0, 0]
    finally:
        model.eval()
    assert (a - b).abs().max() > 1e-3


def test_with_padding_mask_attention_stays_bidirectional(model, expected):
    ids = expected["input_ids"][:2, :16].clone()
    am = torch.ones_like(ids)
    am[0, -3:] = 0
    changed = ids.clone()
    changed[:, 12] = (changed[:, 12] + 1) % MASK
    with torch.no_grad():
        a = model(ids, attention_mask=am).logits[:, 0]
        b = model(changed, attention_mask=am).logits[:, 0]
    assert (a - b).abs().amax(-1).min() > 1e-3


# ----------------------------------------------------------------------------------------- padding


def test_real_token_logits_do_not_depend_on_padding(model, expected):
    ids = expected["input_ids"][:, :14]
    with torch.no_grad():
        alone = model(ids).logits
        for n_pad in (1, 5, 10):
            padded = torch.cat([ids, torch.full((3, n_pad), EOS)], 1)
            am = torch.cat([torch.ones_like(ids), torch.zeros(3, n_pad, dtype=torch.long)], 1)
            am[1] = 1  # a row without padding next to padded rows
            padded[1, 14:] = expected["input_ids"][1, 14 : 14 + n_pad]
            logits = model(padded, attention_mask=am).logits
            assert torch.allclose(logits[[0, 2], :14], alone[[0, 2]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("fused", [False, True])
def test_elbo_does_not_depend_on_padding(model, expected, fused):
    ids = expected["input_ids"][:2, :12].clone()
    ids[ids == MASK] = 7
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, 6:] = True
    draw0 = draw_masks(response, SamplingPlan(n_t=3, n_yt=1), generator=torch.Generator().manual_seed(0))
    values = []
    for n_pad in (0, 6):
        padded = torch.cat([ids, torch.full((2, n_pad), EOS)], 1)
        resp = torch.cat([response, torch.zeros(2, n_pad, dtype=torch.bool)], 1)
        am = torch.cat([torch.ones_like(ids), torch.zeros(2, n_pad, dtype=torch.long)], 1)
        # The same masks, padded: only the padding differs between the two runs.
        masked = torch.cat([draw0.masked, torch.zeros(2, draw0.n, n_pad, dtype=torch.bool)], -1)
        draw = MaskDraw(masked, draw0.weight, draw0.levels, draw0.plan)
        with torch.no_grad():
            values.append(
                elbo_terms(
                    model, padded, resp, draw, MASK, model_kwargs={"attention_mask": am}, head=HeadOptions(fused=fused)
                )
            )
    torch.testing.assert_close(values[0], values[1], atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------------------- packing


def _packed_batch(expected):
    src = expected["input_ids"]
    samples = [src[0, :7], src[1, :5], src[2, :9], src[0, 10:16], src[1, 3:7]]
    ids, seg = pack_rows(samples, row_length=16, pad_id=EOS)
    return samples, ids, seg


def test_pack_rows_and_positions(expected):
    samples, ids, seg = _packed_batch(expected)
    assert ids.shape == (2, 16)
    assert seg.tolist()[0] == [0] * 7 + [1] * 5 + [4] * 4  # first fit: sample 2 (9 tokens) goes to row 1
    assert seg.tolist()[1] == [2] * 9 + [3] * 6 + [-1]
    assert segment_positions(seg)[1].tolist()[:15] == list(range(9)) + list(range(6))
    with pytest.raises(ValueError, match="segment_ids"):
        packing_kwargs(seg.float())


@pytest.mark.parametrize("explicit", [False, True])
def test_packed_rows_match_samples_run_alone(model, expected, explicit):
    samples, ids, seg = _packed_batch(expected)
    backend = model.config._attn_implementation
    kwargs = packing_kwargs(seg, backend if explicit else None)
    with torch.no_grad():
        packed = model(ids, **kwargs).logits
        assert torch.isfinite(packed).all()
        for i, sample in enumerate(samples):
            alone = model(sample[None]).logits[0]
            rows, cols = (seg == i).nonzero(as_tuple=True)
            torch.testing.assert_close(packed[rows, cols], alone, atol=2e-5, rtol=1e-5)


def test_packing_kwargs_repeat_like_the_elbo(model, expected):
    """vrpo.estimator.elbo repeats per-row kwargs n times along dim 0 and calls both model() and get_decoder()."""
    _, ids, seg = _packed_batch(expected)
    kwargs = packing_kwargs(seg)
    n = 3
    rep = {k: v.repeat_interleave(n, 0) for k, v in kwargs.items()}
    with torch.no_grad():
        ref = model(ids, **kwargs).logits
        logits = model(ids.repeat_interleave(n, 0), **rep).logits
        hidden = model.get_decoder()(input_ids=ids.repeat_interleave(n, 0), **rep).last_hidden_state
    real = (seg >= 0).repeat_interleave(n, 0)
    torch.testing.assert_close(logits[real], ref.repeat_interleave(n, 0)[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.lm_head(hidden)[real], logits[real], atol=1e-5, rtol=1e-5)


def test_segment_ids_combine_with_padding_mask(model, expected):
    samples, ids, seg = _packed_batch(expected)
    one_segment = torch.where(seg >= 0, 0, 0)  # everything one sample ...
    am = (seg >= 0).long()  # ... but padding masked out by the 2D mask
    with torch.no_grad():
        a = model(ids, segment_ids=one_segment, attention_mask=am).logits
        b = model(ids, attention_mask=am, position_ids=torch.arange(16).expand(2, 16)).logits
    torch.testing.assert_close(a[am.bool()], b[am.bool()], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="segment_ids"):
        model(ids, segment_ids=seg[:, :5])


def test_gradient_checkpointing_with_packing(tiny_dir, expected):
    model = load_llada(tiny_dir, attn_implementation="vrpo_triton")
    model.activation_checkpointing_enable()
    model.train()
    _, ids, seg = _packed_batch(expected)
    loss = model(ids, **packing_kwargs(seg)).logits[seg >= 0].logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_flash_varlen_kwargs_split_the_flattened_batch():
    """The cu_seq_lens handed to flash-attn delimit exactly the packed samples (checked on the CPU)."""
    torch.manual_seed(0)
    seg = torch.tensor([[0, 0, 0, 1, 1, -1, -1], [4, 4, 4, 4, 4, 4, 2]])
    kw = flash_varlen_kwargs(seg)
    assert kw["cu_seq_lens_q"].dtype == torch.int32
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 13, 14] and kw["max_length_q"] == 6
    q, k, v = (torch.randn(2, 2, 7, 8, dtype=torch.float64) for _ in range(3))
    flat = [t.transpose(1, 2).reshape(14, 2, 8) for t in (q, k, v)]
    cu = kw["cu_seq_lens_q"].tolist()
    pieces = [
        torch.nn.functional.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in flat)).transpose(0, 1)
        for s, e in zip(cu[:-1], cu[1:], strict=True)
    ]
    varlen = torch.cat(pieces).view(2, 7, 2, 8).transpose(1, 2)
    ref = bidirectional_attention(q, k, v, segment_ids=seg, impl="torch")
    real = (seg >= 0)[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(varlen[real], ref[real])


# ------------------------------------------------------------------------------- vrpo_triton impl


def test_vrpo_triton_impl_can_be_forced(tiny_dir, expected, monkeypatch):
    seen = []

    def spy(q, k, v, segment_ids=None, scale=None, impl="auto"):
        seen.append(impl)
        return bidirectional_attention(q, k, v, segment_ids=segment_ids, scale=scale, impl="torch")

    monkeypatch.setattr(attention_mod, "bidirectional_attention", spy)
    model = load_llada(tiny_dir, attn_implementation="vrpo_triton")
    ids = expected["input_ids"][:1]
    monkeypatch.delenv("VRPO_ATTENTION_IMPL", raising=False)
    with torch.no_grad():
        model(ids)
        assert seen == ["auto", "auto"] and current_attention_impl() == "auto"
        monkeypatch.setenv("VRPO_ATTENTION_IMPL", "torch")
        model(ids)
        with attention_impl("triton"):
            assert current_attention_impl() == "triton"
            model(ids)
        assert current_attention_impl() == "torch"
    assert seen[2:] == ["torch", "torch", "triton", "triton"]
    monkeypatch.setenv("VRPO_ATTENTION_IMPL", "fast")
    with pytest.raises(ValueError, match="VRPO_ATTENTION_IMPL"):
        current_attention_impl()
    with pytest.raises(ValueError, match="impl"):
        with attention_impl("cuda"):
            pass


def test_vrpo_triton_refuses_4d_masks_and_causal(tiny_dir, expected):
    model = load_llada(tiny_dir, attn_implementation="vrpo_triton")
    ids = expected["input_ids"][:1, :8]
    with pytest.raises(ValueError, match="segment_ids"):
        model(ids, attention_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="bidirectional"):
        model(ids, is_causal=True)


# ------------------------------------------------------------------------------------- save / load


def test_save_round_trips_to_identical_tensors(tiny_dir, expected, tmp_path):
    model = load_llada(tiny_dir)
    out = save_llada(model, tmp_path / "saved")
    original, saved = _tensors(tiny_dir), _tensors(out)
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) and saved[k].dtype == original[k].dtype for k in original)
    cfg, ref = (
        json.loads((out / "config.json").read_text()),
        json.loads((tiny_dir / "config.json").read_text()),
    )
    # auto_map names remote code that is not in the folder, so it is dropped (AutoTokenizer would ask for it).
    assert cfg["model_type"] == "llada" and "auto_map" not in cfg
    same = [k for k in ref if k not in ("transformers_version", "auto_map")]
    assert {k: cfg[k] for k in same} == {k: ref[k] for k in same}
    again = load_llada(out)
    with torch.no_grad():
        torch.testing.assert_close(again(expected["input_ids"]).logits, expected["logits"], atol=1e-4, rtol=0)
    assert not list(tmp_path.glob(".saved*")), "no temporary directories are left behind"


def test_save_sharded_with_index(tiny_dir, expected, tmp_path):
    model = load_llada(tiny_dir)
    out = save_llada(model, tmp_path / "sharded", max_shard_size=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    assert _tensors(out).keys() == _tensors(tiny_dir).keys()
    with torch.no_grad():
        torch.testing.assert_close(load_llada(out)(expected["input_ids"]).logits, expected["logits"], atol=1e-4, rtol=0)


def test_load_handwritten_sharded_copy(tiny_dir, expected, tmp_path):
    tensors = _tensors(tiny_dir)
    keys = sorted(tensors)
    groups = [keys[0::3], keys[1::3], keys[2::3]]
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: tensors[k] for k in group}, str(tmp_path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(tiny_dir / "config.json", tmp_path)
    with torch.no_grad():
        logits = load_llada(tmp_path)(expected["input_ids"]).logits
    assert (logits - expected["logits"]).abs().max() < 1e-4


def test_hf_format_round_trip(tiny_dir, expected, tmp_path):
    model = load_llada(tiny_dir)
    model.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
    again = load_llada(tmp_path / "hf", attn_implementation="eager")
    assert again.config.mask_token_id == MASK and again.config.is_causal is False
    with torch.no_grad():
        assert (again(expected["input_ids"]).logits - expected["logits"]).abs().max() < 1e-4
    # ... and from the HF copy back to LLaDA's format, unchanged.
    out = save_llada(again, tmp_path / "llada")
    original, saved = _tensors(tiny_dir), _tensors(out)
    assert all(torch.equal(saved[k], original[k]) for k in original) and saved.keys() == original.keys()


def test_save_any_dtype_and_existing_directory(tiny_dir, tmp_path):
    model = load_llada(tiny_dir).to(torch.bfloat16)
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    (out / "model-00001-of-00009.safetensors").write_text("stale")
    save_llada(model, out)
    assert (out / "tokenizer.json").read_text() == "{}", "non-checkpoint files are kept"
    assert not (out / "model-00001-of-00009.safetensors").exists(), "stale shards are dropped"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = load_llada(out)
    assert again.lm_head.weight.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


def test_failed_save_leaves_the_old_checkpoint(tiny_dir, tmp_path, monkeypatch):
    import vrpo.models.io as ckpt

    out = save_llada(load_llada(tiny_dir), tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_llada(build_tiny_llada(), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_save_copies_llada_remote_code(tiny_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    (src / "configuration_llada.py").write_text("# LLaDA config code\n")
    (src / "modeling_llada.py").write_text("# LLaDA modeling code\n")
    out = save_llada(load_llada(src), tmp_path / "out")
    assert (out / "modeling_llada.py").read_text() == "# LLaDA modeling code\n"
    assert (out / "configuration_llada.py").is_file()
    # With the files alongside, the auto_map that names them is kept for LLaDA's official code.
    ref = json.loads((tiny_dir / "config.json").read_text())
    assert json.loads((out / "config.json").read_text())["auto_map"] == ref["auto_map"]


def test_peft_lora_is_merged_on_save(tmp_path):
    from peft import IA3Config, LoraConfig, get_peft_model

    base = build_tiny_llada(seed=1)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], lora_alpha=8))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = peft_model(ids).logits
    out = save_llada(peft_model, tmp_path / "merged")
    assert any(n for n, _ in peft_model.named_parameters() if "lora_A" in n), "the PEFT model keeps its adapters"
    merged = copy.deepcopy(peft_model).merge_and_unload()
    saved = load_llada(out)
    for name, p in merged.named_parameters():
        assert torch.equal(saved.get_parameter(name), p), name
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, want, atol=1e-5, rtol=1e-5)

    ia3 = get_peft_model(
        build_tiny_llada(),
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    with pytest.raises(ValueError, match="merge_and_unload"):
        save_llada(ia3, tmp_path / "ia3")
    assert not (tmp_path / "ia3").exists()


# ----------------------------------------------------------------------------------------- tiny


def test_tiny_model_is_seeded_and_round_trips(tmp_path):
    a, b, c = build_tiny_llada(seed=3), build_tiny_llada(seed=3), build_tiny_llada(seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert a.config.mask_token_id == MASK and a.config.eos_token_id == EOS
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    again = load_llada(save_llada(a, tmp_path / "tiny"))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, a(ids).logits, atol=0, rtol=0)


def test_tied_embeddings_round_trip(tmp_path):
    model = build_tiny_llada(weight_tying=True, n_layers=1)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = save_llada(model, tmp_path / "tied")
    assert "model.transformer.ff_out.weight" not in _tensors(out)
    assert json.loads((out / "config.json").read_text())["weight_tying"] is True
    again = load_llada(out)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_tiny_config_shapes():
    c = tiny_llada_config(d_model=32, n_heads=2, n_kv_heads=1, n_layers=1, mlp_hidden_size=48, vocab_size=200)
    assert (c.hidden_size, c.num_key_value_heads, c.vocab_size, c.mask_token_id) == (32, 1, 200, 194)
    model = build_tiny_llada(c, attn_implementation="vrpo_triton")
    with torch.no_grad():
        assert model(torch.zeros(1, 5, dtype=torch.long)).logits.shape == (1, 5, 200)


# ------------------------------------------------------------------------------------- bad input


def _copy(tiny_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, dst)
    return dst


def _rewrite(path, fn):
    tensors = _tensors(path)
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_error_missing_shard(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    tensors = _tensors(d)
    (d / "model.safetensors").unlink()
    save_file({k: v for k, v in tensors.items() if "blocks.1" not in k}, str(d / "model-00001-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 + ('blocks.1' in k)}-of-00002.safetensors" for k in tensors}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors"):
        load_llada(d)


def test_error_missing_key(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    _rewrite(d, lambda t: t.pop("model.transformer.blocks.1.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*blocks\.1\.up_proj\.weight"):
        load_llada(d)


def test_error_unexpected_key(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    _rewrite(d, lambda t: t.update({"model.transformer.blocks.7.q_proj.weight": torch.zeros(64, 64)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.transformer\.blocks\.7\.q_proj\.weight'"):
        load_llada(d)


def test_error_shape_mismatch(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    _rewrite(d, lambda t: t.update({"model.transformer.blocks.0.ff_proj.weight": torch.zeros(95, 64)}))
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors.*blocks\.0\.ff_proj\.weight.*\(95, 64\).*\(96, 64\)"
    ):
        load_llada(d)


def test_error_unknown_model_type(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, model_type="mistral")))
    with pytest.raises(ValueError, match=r"config\.json.*model_type='mistral'"):
        load_llada(d)


def test_error_unsupported_llada_option(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, alibi=True)))
    with pytest.raises(ValueError, match=r"config\.json.*alibi"):
        load_llada(d)


def test_error_missing_mask_token_id_unless_given(tiny_dir, expected, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["mask_token_id"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json has no mask_token_id.*mask_token_id="):
        load_llada(d)
    model = load_llada(d, mask_token_id=MASK)
    assert model.config.mask_token_id == MASK
    with pytest.raises(ValueError, match="mask_token_id=999"):
        load_llada(d, mask_token_id=999)


def test_error_no_config_or_weights(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_llada(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_llada(tmp_path / "nope")
    d = _copy(tiny_dir, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_llada(d)
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_llada(d)


def test_flash_attention_2_inputs_are_per_row_and_flattened_inside(expected):
    """For flash-attn the model turns per-row segment_ids into varlen kwargs itself, after any repeat."""
    from vrpo.estimator.packing import backend_inputs

    _, ids, seg = _packed_batch(expected)
    kwargs = packing_kwargs(seg, "flash_attention_2")
    assert set(kwargs) == {"segment_ids", "position_ids"}
    inputs = backend_inputs("flash_attention_2", kwargs["segment_ids"].repeat_interleave(2, 0))
    assert inputs["attention_mask"] is None and inputs["cu_seq_lens_q"] is inputs["cu_seq_lens_k"]
    # rows [7, 5, 4], [9, 6, pad 1], each twice
    assert inputs["cu_seq_lens_q"].tolist() == [0, 7, 12, 16, 23, 28, 32, 41, 47, 48, 57, 63, 64]
    assert inputs["max_length_q"] == 9
    assert inputs["position_ids"][2].tolist() == list(range(9)) + list(range(6)) + [0]
