"""Dream (the second model family): loading, saving, the shifted ELBO, the tokenizer and the sampler.

The checkpoint is ``tests/fixtures/dream-tiny`` (Dream's on-disk format, logits from Dream's reference code);
the tokenizer is Dream-v0-Instruct-7B's (``tests/fixtures/dream-7b-instruct-meta``).
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from vrpo import SamplingPlan, draw_masks, elbo_terms, exact_elbo
from vrpo.errors import CheckpointError
from vrpo.estimator import HeadOptions
from vrpo.estimator.elbo import noisy_inputs, packed_elbo_terms
from vrpo.models import (
    DREAM,
    LLADA,
    attention_impl,
    family_of,
    load_dream,
    load_llada,
    load_mdm,
    save_dream,
    save_llada,
    save_mdm,
)
from vrpo.models.samplers import DREAM_ALGORITHMS, SAMPLERS, generate_dream, sample
from vrpo.models.tiny import build_tiny_tokenizer
from vrpo.models.tokenization import (
    collate,
    encode_example,
    encode_preference,
    format_prompt,
    load_tokenizer,
)

from ..helpers import FIXTURES, assert_unbiased

TINY = FIXTURES / "dream-tiny"
META = FIXTURES / "dream-7b-instruct-meta"
MASK = 299  # dream-tiny's mask id
EXPECTED_TOKENS = json.loads((META / "expected_tokenization.json").read_text())


@pytest.fixture(scope="module")
def expected():
    return load_file(str(TINY / "expected.safetensors"))


@pytest.fixture(scope="module")
def model():
    return load_mdm(TINY)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(META)


# ------------------------------------------------------------------------------------ loading / saving


@pytest.mark.parametrize(
    "backend,impl", [("sdpa", None), ("eager", None), ("vrpo_triton", "torch"), ("vrpo_triton", "triton")]
)
def test_logits_match_dreams_reference_code(backend, impl, expected, record_property):
    model = load_mdm(TINY, attn_implementation=backend)
    assert type(model) is DREAM.model_class and family_of(model) is DREAM
    with torch.no_grad(), attention_impl(impl or "auto"):
        logits = model(expected["input_ids"]).logits
    err = (logits - expected["logits"]).abs().max().item()
    record_property("max_abs_err", err)
    assert err < 1e-4, f"{backend}/{impl}: max abs error {err}"


def test_config_is_mapped_onto_bidirectional_qwen2(model):
    ref = json.loads((TINY / "config.json").read_text())
    c = model.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.vocab_size) == (
        64,
        4,
        2,
        160,
        300,
    )
    assert c.is_causal is False and c.mask_token_id == MASK and c.mdm_family == "dream"
    assert c.rope_parameters["rope_theta"] == ref["rope_theta"] and c.rms_norm_eps == ref["rms_norm_eps"]
    assert model.model.layers[0].self_attn.q_proj.bias is not None, "Dream's q/k/v projections have biases"


def test_real_dream_7b_config_maps_onto_qwen2():
    """The real release's config and every key of its shard index fit the bidirectional Qwen2 model."""
    from accelerate import init_empty_weights

    from vrpo.models.dream import dream_to_qwen2_config

    config = dream_to_qwen2_config(json.loads((META / "config.json").read_text()))
    with init_empty_weights():
        model = DREAM.model_class(config)
    index = json.loads((META / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == {n for n, _ in model.named_parameters()}
    assert config.mask_token_id == 151666 and config.vocab_size == 152064


def test_family_specific_loaders_refuse_the_other_family(tmp_path):
    with pytest.raises(ValueError, match="Dream checkpoint, not LLaDA"):
        load_llada(TINY)
    with pytest.raises(ValueError, match="LLaDA checkpoint, not Dream"):
        load_dream(FIXTURES / "llada-tiny")
    with pytest.raises(ValueError, match="model is Dream, not LLaDA"):
        save_llada(load_dream(TINY), tmp_path / "x")


def test_save_round_trips_weights_and_dream_config(model, expected, tmp_path):
    out = save_dream(model, tmp_path / "saved")
    original, saved = load_file(str(TINY / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in original)
    cfg, ref = json.loads((out / "config.json").read_text()), json.loads((TINY / "config.json").read_text())
    assert cfg["model_type"] == "Dream" and cfg["architectures"] == ["DreamModel"]
    # auto_map names Dream's remote code, which is not in the folder: dropped (AutoTokenizer would ask for it).
    assert "auto_map" not in cfg
    same = [k for k in ref if k not in ("auto_map", "_name_or_path", "transformers_version")]
    assert {k: cfg[k] for k in same} == {k: ref[k] for k in same}
    again = load_mdm(out)
    with torch.no_grad():
        torch.testing.assert_close(again(expected["input_ids"]).logits, expected["logits"], atol=1e-4, rtol=0)


def test_save_mdm_shards_and_round_trips(model, expected, tmp_path):
    out = save_mdm(model, tmp_path / "sharded", max_shard_size=100_000)
    assert (out / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(load_mdm(out)(expected["input_ids"]).logits, expected["logits"], atol=1e-4, rtol=0)


def test_transformers_qwen2_export_loads_as_dream(model, expected, tmp_path):
    model.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "qwen2"
    for keep_family in (True, False):
        if not keep_family:  # a plain Qwen2 export: model_type alone says Dream
            cfg.pop("mdm_family", None)
            (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
        loaded = load_mdm(tmp_path / "hf")
        assert family_of(loaded) is DREAM
        with torch.no_grad():
            torch.testing.assert_close(loaded(expected["input_ids"]).logits, expected["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family_dir", ["dream", "llada"])
def test_saved_folder_loads_with_autotokenizer_without_remote_code(family_dir, tmp_path):
    """config.json and tokenizer_config.json of a saved model carry no auto_map to absent files."""
    if family_dir == "dream":
        save_mdm(load_mdm(TINY), tmp_path / "model")
        tok = load_tokenizer(META)
    else:
        save_mdm(load_mdm(FIXTURES / "llada-tiny"), tmp_path / "model")
        tok = build_tiny_tokenizer()
    tok.save_pretrained(tmp_path / "model")
    for name in ("config.json", "tokenizer_config.json"):
        assert "auto_map" not in json.loads((tmp_path / "model" / name).read_text()), name
    again = AutoTokenizer.from_pretrained(tmp_path / "model")
    text = EXPECTED_TOKENS["texts"][1]["text"]
    assert again(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


def test_lora_adapters_are_merged_into_dreams_format(expected, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(load_dream(TINY), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    assert family_of(peft) is DREAM
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        want = peft(expected["input_ids"]).logits
    out = save_mdm(peft, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["model_type"] == "Dream"
    with torch.no_grad():
        got = load_dream(out)(expected["input_ids"]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - expected["logits"]).abs().max() > 1e-3, "the adapters changed the model"


# ---------------------------------------------------------------------------------------- bad input


def _copy(tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(TINY, out)
    return out


def test_error_missing_shard(tmp_path):
    out = _copy(tmp_path)
    tensors = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    keys = sorted(tensors)
    save_file({k: tensors[k] for k in keys[:10]}, str(out / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {k: f"model-0000{1 + (i >= 10)}-of-00002.safetensors" for i, k in enumerate(keys)}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"lists shard 'model-00002-of-00002.safetensors'.*does not exist"):
        load_mdm(out)


def test_error_wrong_shape(tmp_path):
    out = _copy(tmp_path)
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.layers.1.self_attn.k_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor 'model.layers.1.self_attn.k_proj.bias' "
        r"has shape \(64,\), but config.json implies \(32,\)",
    ):
        load_mdm(out)


def test_error_no_mask_token_unless_given(tmp_path, expected):
    out = _copy(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    del cfg["mask_token_id"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json has no mask_token_id.*Dream: 151666.*<\|mask\|>"):
        load_mdm(out)
    assert load_dream(out, mask_token_id=MASK).config.mask_token_id == MASK


def test_error_unsupported_dream_option(tmp_path):
    out = _copy(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["use_sliding_window"] = True
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_sliding_window=True is not supported"):
        load_mdm(out)


def test_error_unknown_model_type(tmp_path):
    out = _copy(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model_type='mistral' is not supported.*'Dream'.*'qwen2'"):
        load_mdm(out)


# ---------------------------------------------------------------------------------------- shifted ELBO


def _batch(lengths, prompt_len=3, seed=0):
    """Right-padded random rows: ids int64 [B, L], response_mask bool [B, L], attention_mask [B, L]."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.full((len(lengths), L), 298)
    resp = torch.zeros(len(lengths), L, dtype=torch.bool)
    attn = torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(0, 297, (n,), generator=g)
        resp[b, prompt_len:n] = True
        attn[b, :n] = 1
    return ids, resp, attn


def direct_terms(model, ids, lengths, draw, shift):
    """float64 [B, n] ELBO terms straight from the model's logits: row b alone (no padding), token i scored
    with the log-softmax of the output at i - shift."""
    B, n, _ = draw.masked.shape
    out = torch.zeros(B, n, dtype=torch.float64)
    for b, size in enumerate(lengths):
        noisy = noisy_inputs(ids[b : b + 1, :size], draw.masked[b : b + 1, :, :size], MASK)[0]
        with torch.no_grad():
            logp = torch.log_softmax(model(noisy).logits.double(), -1)
        pos = torch.arange(shift, size)
        lp = logp[:, pos - shift].gather(-1, ids[b, pos][None, :, None].expand(n, -1, 1))[..., 0]
        out[b] = (lp * draw.masked[b, :, pos]).sum(-1) * draw.weight[b].double()
    return out


@pytest.mark.parametrize("path", ["generic", "fused", "packed"])
def test_shifted_elbo_equals_direct_computation(model, path):
    lengths = [9, 12, 7]
    ids, resp, attn = _batch(lengths)
    draw = draw_masks(resp, SamplingPlan(n_t=4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if path == "packed":
            terms = packed_elbo_terms(model, ids, resp, draw, MASK, lengths=torch.tensor(lengths), row_length=16)
        else:
            terms = elbo_terms(
                model,
                ids,
                resp,
                draw,
                MASK,
                model_kwargs={"attention_mask": attn},
                head=HeadOptions(fused=path == "fused"),
            )
    want = direct_terms(model, ids, lengths, draw, shift=1)
    torch.testing.assert_close(terms.double(), want, rtol=1e-5, atol=1e-4)
    # The check has power: the unshifted terms (scoring token i with the output at i) are far off.
    wrong = direct_terms(model, ids, lengths, draw, shift=0)
    assert (terms.double() - wrong).abs().max() > 100 * 1e-4


def test_shift_is_read_from_the_model_and_can_be_overridden(model):
    ids, resp, _ = _batch([8])
    draw = draw_masks(resp, SamplingPlan(n_t=2), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        auto = elbo_terms(model, ids, resp, draw, MASK, head=HeadOptions(fused=False))
        one = elbo_terms(model, ids, resp, draw, MASK, head=HeadOptions(fused=False), logit_shift=1)
        zero = elbo_terms(model, ids, resp, draw, MASK, head=HeadOptions(fused=False), logit_shift=0)
    assert torch.equal(auto, one) and not torch.allclose(auto, zero)


def test_shifted_elbo_refuses_a_token_with_nothing_before_it(model):
    ids, resp, _ = _batch([6], prompt_len=0)  # a response from position 0: no output scores it
    draw = draw_masks(resp, SamplingPlan(n_t=2), generator=torch.Generator().manual_seed(0))
    draw.masked[:, :, 0] = True
    with pytest.raises(ValueError, match="first position of row 0.*non-empty prompt"):
        elbo_terms(model, ids, resp, draw, MASK)
    with pytest.raises(ValueError, match="first position of packed row"):
        packed_elbo_terms(model, ids, resp, draw, MASK, lengths=torch.tensor([6]), row_length=12)


@pytest.mark.parametrize("backend", ["sdpa", "eager", "vrpo_triton"])
def test_packed_shifted_rows_never_score_across_segments(backend):
    """Two segments per packed row: each equals its row run alone (a score across the boundary would not)."""
    model = load_mdm(TINY, attn_implementation=backend)
    lengths = [6, 6, 6, 6]
    ids, resp, _ = _batch(lengths, prompt_len=1, seed=5)
    draw = draw_masks(resp, SamplingPlan(n_t=1), generator=torch.Generator().manual_seed(5))
    draw.masked[:, :, 1] = True  # the token right after each segment's first one
    with torch.no_grad():
        packed = packed_elbo_terms(model, ids, resp, draw, MASK, lengths=torch.tensor(lengths), row_length=12)
    torch.testing.assert_close(packed.double(), direct_terms(model, ids, lengths, draw, shift=1), rtol=1e-5, atol=1e-4)


def test_shifted_estimate_is_unbiased_against_exact_enumeration(model):
    ids, resp, _ = _batch([7, 8], prompt_len=3, seed=3)
    ids, resp = ids[:, :7], resp[:, :7]  # equal lengths: 4 response tokens per row

    def shifted_logp(x):
        with torch.no_grad():
            logits = model(x).logits.double()
        return torch.log_softmax(torch.cat([logits[:, :1], logits[:, :-1]], 1), -1)

    exact = exact_elbo(shifted_logp, ids, resp, MASK)
    K = 3000
    ids_k, resp_k = ids.repeat_interleave(K, 0), resp.repeat_interleave(K, 0)
    draw = draw_masks(resp_k, SamplingPlan(n_t=1), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        est = elbo_terms(model, ids_k, resp_k, draw, MASK).double().view(2, K)
        unshifted = elbo_terms(model, ids_k, resp_k, draw, MASK, logit_shift=0).double().view(2, K)
    assert_unbiased(est, exact)
    with pytest.raises(AssertionError):  # the check has the power to see a missing shift
        assert_unbiased(unshifted, exact)


# ------------------------------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize("case", EXPECTED_TOKENS["texts"], ids=lambda c: c["text"][:20])
def test_tokenizer_reproduces_dreams_ids_on_text(tokenizer, case):
    assert tokenizer(case["text"], add_special_tokens=False)["input_ids"] == case["ids"]
    assert tokenizer.decode(case["ids"]) == case["text"]


@pytest.mark.parametrize("case", EXPECTED_TOKENS["chats"], ids=lambda c: c["messages"][-2]["content"][:20])
def test_tokenizer_reproduces_dreams_ids_on_chats(tokenizer, case):
    prompt = format_prompt(tokenizer, case["messages"][:-1])
    assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == case["prompt_ids"]
    full = tokenizer.apply_chat_template(case["messages"], tokenize=False)
    assert tokenizer(full, add_special_tokens=False)["input_ids"] == case["full_ids"]


def test_tokenizer_is_standard_qwen2_with_dreams_special_tokens(tokenizer):
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert (tokenizer.mask_token, tokenizer.mask_token_id) == ("<|mask|>", 151666)
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 151643
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645


@pytest.mark.parametrize("case", EXPECTED_TOKENS["chats"], ids=lambda c: c["messages"][-2]["content"][:20])
def test_response_mask_and_eos_policy_under_dreams_template(tokenizer, case):
    """Prompt = Dream's templated prompt; response = the answer, <|im_end|> and one EOS, nothing else."""
    enc = encode_example(tokenizer, case["messages"][:-1], case["messages"][-1])
    P = len(case["prompt_ids"])
    answer = tokenizer(case["messages"][-1]["content"], add_special_tokens=False)["input_ids"]
    assert enc["input_ids"] == case["prompt_ids"] + answer + [151645, 151643]
    assert enc["response_mask"] == [False] * P + [True] * (len(answer) + 2)
    # The same tokens as Dream's template renders the full conversation, up to its closing newline.
    assert enc["input_ids"][:-1] == case["full_ids"][:-1]


def test_batch_padding_is_neither_scored_nor_attended(tokenizer):
    example = {
        "prompt": "Name a color.",
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "A colour that is blue."}],
    }
    enc = encode_preference(tokenizer, example)
    batch = collate(
        [
            {"input_ids": enc["chosen_input_ids"], "response_mask": enc["chosen_response_mask"]},
            {"input_ids": enc["rejected_input_ids"], "response_mask": enc["rejected_response_mask"]},
        ],
        tokenizer.pad_token_id,
    )
    short = len(enc["chosen_input_ids"])
    assert (batch["input_ids"][0, short:] == 151643).all()
    assert not batch["response_mask"][0, short:].any() and not batch["attention_mask"][0, short:].any()
    # Each response ends with exactly one scored EOS, right after <|im_end|>.
    for b in range(2):
        scored = batch["input_ids"][b][batch["response_mask"][b]].tolist()
        assert scored[-2:] == [151645, 151643] and scored.count(151643) == 1


def test_raw_text_prompt_has_no_bos_for_dream(tokenizer):
    enc = encode_example(tokenizer, "Hello world!", "Hi", chat_template=False)
    assert enc["input_ids"][:3] == EXPECTED_TOKENS["texts"][0]["ids"] and enc["input_ids"][-1] == 151643


# -------------------------------------------------------------------------------------------- sampler


class Oracle(torch.nn.Module):
    """Logits that make ``target`` certain, shifted by ``shift`` like a Dream model's."""

    def __init__(self, target, vocab=50, shift=1):
        super().__init__()
        self.target, self.vocab, self.shift = target, vocab, shift

    def forward(self, x, **kwargs):
        B, L = x.shape
        logits = torch.full((B, L, self.vocab), -5.0)
        logits[:, torch.arange(L - self.shift), self.target[self.shift :]] = 5.0
        return logits


@pytest.mark.parametrize("alg", DREAM_ALGORITHMS)
@pytest.mark.parametrize("block_length", [None, 3])
def test_dream_sampler_reads_shifted_logits(alg, block_length):
    target = torch.tensor([3, 4, 5, 10, 11, 12, 13, 14, 15])
    prompt = target[None, :3]
    out = generate_dream(
        Oracle(target),
        prompt,
        mask_token_id=49,
        gen_length=6,
        steps=6,
        block_length=block_length,
        alg=alg,
        generator=torch.Generator().manual_seed(0),
    )
    assert out[0].tolist() == target.tolist()
    # Unshifted logits would put every token one place early: the sampler would not recover the target.
    early = generate_dream(Oracle(target, shift=0), prompt, mask_token_id=49, gen_length=6, steps=6, alg=alg)
    assert early[0].tolist() != target.tolist()


def test_dream_sampler_on_the_tiny_model(model):
    prompt = torch.tensor([[5, 6, 7, 8]])
    g = torch.Generator().manual_seed(0)
    out = generate_dream(model, prompt, MASK, gen_length=8, steps=4, temperature=1.0, generator=g)
    again = generate_dream(
        model, prompt, MASK, gen_length=8, steps=4, temperature=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert out.shape == (1, 12) and torch.equal(out[:, :4], prompt) and not (out == MASK).any()
    assert torch.equal(out, again), "seeded sampling is deterministic"


def test_sample_uses_the_family_sampler(model):
    assert SAMPLERS[family_of(model).sampler] is generate_dream and SAMPLERS[LLADA.sampler] is not generate_dream
    prompt = torch.tensor([[5, 6, 7]])
    out = sample(
        model, prompt, MASK, gen_length=4, steps=2, temperature=1.0, generator=torch.Generator().manual_seed(3)
    )
    want = generate_dream(
        model, prompt, MASK, gen_length=4, steps=2, temperature=1.0, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(out, want)


def test_last_user_message_follows_the_family_template(tokenizer):
    case = EXPECTED_TOKENS["chats"][1]
    prompt = tokenizer.decode(case["prompt_ids"])
    assert DREAM.last_user_message(prompt) == "Name a color."
    llada_prompt = format_prompt(build_tiny_tokenizer(), case["messages"][:-1])
    assert LLADA.last_user_message(llada_prompt) == "Name a color."
    assert LLADA.last_user_message(prompt) == prompt.strip(), "no LLaDA user header in a Dream prompt"


def test_unfused_head_is_logged_once_at_warning(model, caplog):
    """A model whose head cannot be fused materialises full logits: said once per model class, at WARNING."""
    import vrpo.estimator.elbo as elbo

    class LogitsOnly(torch.nn.Module):  # no get_output_embeddings: the generic path
        def forward(self, x, **kwargs):
            return model(x).logits

    ids, resp, _ = _batch([8])
    draw = draw_masks(resp, SamplingPlan(n_t=2), generator=torch.Generator().manual_seed(0))
    elbo._warned_unfused.discard("LogitsOnly")
    with caplog.at_level("WARNING", logger="vrpo.estimator.elbo"), torch.no_grad():
        for _ in range(2):
            elbo_terms(LogitsOnly(), ids, resp, draw, MASK, logit_shift=1)
        elbo_terms(
            LogitsOnly(), ids, resp, draw, MASK, logit_shift=1, head=HeadOptions(fused=False)
        )  # asked for: no warning
    warnings = [r for r in caplog.records if "cannot be fused" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
