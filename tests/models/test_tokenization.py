"""Tokenization: LLaDA's chat template, response masks, EOS and truncation policies, padding, mask token."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from transformers import AutoTokenizer

from vrpo.estimator.elbo import elbo_terms
from vrpo.estimator.sampling import SamplingPlan, draw_masks
from vrpo.models import LLADA_CHAT_TEMPLATE, build_tiny_tokenizer, load_llada
from vrpo.models.tokenization import (
    collate,
    encode,
    encode_example,
    encode_preference,
    format_prompt,
    get_mask_token_id,
    load_tokenizer,
)

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
META = FIXTURES / "llada-8b-instruct-meta"
BOS, EOS, MASK, EOT = 252, 251, 250, 255
HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def test_tiny_tokenizer_carries_llada_special_tokens(tok, tmp_path):
    assert (tok.mask_token, tok.mask_token_id) == ("<|mdm_mask|>", MASK)
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (
        "<|endoftext|>",
        EOS,
        EOS,
        BOS,
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}
    assert ids == {"<|start_header_id|>": 253, "<|end_header_id|>": 254, "<|eot_id|>": EOT}
    assert len(tok) == 256
    text = "x = 3.5, y: [a-z]!\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.mask_token_id == MASK and again.chat_template == tok.chat_template
    assert (
        again("Hi<|eot_id|>", add_special_tokens=False)["input_ids"]
        == tok("Hi<|eot_id|>", add_special_tokens=False)["input_ids"]
    )


def test_chat_template_is_llada_s(tok):
    config = json.loads((META / "tokenizer_config.json").read_text())
    assert LLADA_CHAT_TEMPLATE == config["chat_template"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  What is 2+2? \n"}]
    assert format_prompt(tok, messages) == (
        "<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>" + HEADER
    )
    assert format_prompt(tok, "What is 2+2?") == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>" + HEADER
    )


def test_response_mask_covers_answer_eot_and_one_eos(tok):
    enc = encode_example(tok, [{"role": "user", "content": "2+2?"}], " It is 4. ")
    ids, resp = enc["input_ids"], enc["response_mask"]
    assert len(ids) == len(resp)
    n_prompt = resp.index(True)
    assert not any(resp[:n_prompt]) and all(resp[n_prompt:])
    assert tok.decode(ids[:n_prompt]).endswith(HEADER) and ids[0] == BOS
    assert tok.decode(ids[n_prompt:]) == "It is 4.<|eot_id|><|endoftext|>"
    assert ids[-2:] == [EOT, EOS] and ids.count(EOS) == 1


def test_string_and_message_inputs_agree(tok):
    as_string = encode_example(tok, "Name a color.", "Blue")
    as_messages = encode_example(
        tok, [{"role": "user", "content": "Name a color."}], [{"role": "assistant", "content": "Blue"}]
    )
    as_message = encode_example(
        tok, [{"role": "user", "content": "Name a color."}], {"role": "assistant", "content": "Blue"}
    )
    assert as_string == as_messages == as_message
    sft = encode(
        tok,
        {
            "messages": [
                {"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "Blue"},
            ]
        },
    )
    assert sft == as_string == encode(tok, {"prompt": "Name a color.", "completion": "Blue"})
    with pytest.raises(ValueError, match="assistant"):
        encode_example(tok, "Hi", [{"role": "user", "content": "Blue"}])
    with pytest.raises(ValueError, match="messages|completion"):
        encode(tok, {"text": "Blue"})


def test_preference_examples(tok):
    prompt = [{"role": "user", "content": "1+1?"}]
    explicit = encode_preference(
        tok,
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": "2"}],
            "rejected": [{"role": "assistant", "content": "3"}],
        },
    )
    implicit = encode_preference(
        tok,
        {
            "chosen": prompt + [{"role": "assistant", "content": "2"}],
            "rejected": prompt + [{"role": "assistant", "content": "3"}],
        },
    )
    standard = encode_preference(tok, {"prompt": "1+1?", "chosen": "2", "rejected": "3"})
    assert explicit == implicit == standard
    assert tok.decode(
        [t for t, m in zip(explicit["chosen_input_ids"], explicit["chosen_response_mask"], strict=True) if m]
    ) == ("2<|eot_id|><|endoftext|>")
    with pytest.raises(ValueError, match="prompt"):
        encode_preference(tok, {"chosen": "2", "rejected": "3"})


def test_raw_prompts_without_chat_template(tok):
    enc = encode_example(tok, "Q: 1+1\nA:", " 2", chat_template=False)
    n_prompt = enc["response_mask"].index(True)
    assert enc["input_ids"][0] == BOS and tok.decode(enc["input_ids"][1:n_prompt]) == "Q: 1+1\nA:"
    assert tok.decode(enc["input_ids"][n_prompt:]) == " 2<|endoftext|>"
    no_template = build_tiny_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="chat_template"):
        encode_example(no_template, "Hi", "Yo")


def test_truncation_policy(tok):
    prompt, answer = "Tell me a long story about a cat.", "Once upon a time."
    full = encode_example(tok, prompt, answer)
    n = len(full["input_ids"])
    assert encode_example(tok, prompt, answer, max_length=n) == full
    with pytest.raises(ValueError, match=f"{n} tokens.*max_length={n - 1}"):
        encode_example(tok, prompt, answer, max_length=n - 1)

    cut = encode_example(tok, prompt, answer, max_length=n - 5, truncation="truncate")
    n_prompt = full["response_mask"].index(True)
    assert len(cut["input_ids"]) == n - 5
    assert cut["input_ids"][0] == BOS, "the BOS survives"
    assert cut["input_ids"][1:] == full["input_ids"][6:], "the prompt loses its first tokens after BOS"
    assert sum(cut["response_mask"]) == sum(full["response_mask"]), "the response is untouched"

    n_resp = n - n_prompt
    tiny = encode_example(tok, prompt, answer, max_length=1 + n_resp - 3, truncation="truncate")
    assert tiny["input_ids"][0] == BOS and tiny["response_mask"] == [False] + [True] * (n_resp - 3)
    assert tiny["input_ids"][1:] == full["input_ids"][n_prompt:-3], "the response is cut from the right"
    assert EOS not in tiny["input_ids"] and EOT not in tiny["input_ids"], "a cut response is not marked finished"
    with pytest.raises(ValueError, match="no room"):
        encode_example(tok, prompt, answer, max_length=1, truncation="truncate")
    with pytest.raises(ValueError, match="truncation"):
        encode_example(tok, prompt, answer, max_length=10, truncation="left")


def test_collate_pads_with_eos_outside_response_and_attention(tok):
    a = encode_example(tok, "Hi", "Hello there")
    b = encode_example(tok, "A much longer question here?", "Ok")
    batch = collate([a, b], tok.pad_token_id, pad_to_multiple_of=8)
    L = batch["input_ids"].shape[1]
    assert L % 8 == 0 and L >= max(len(a["input_ids"]), len(b["input_ids"]))
    assert batch["input_ids"].dtype == torch.long and batch["response_mask"].dtype == torch.bool
    for row, enc in enumerate((a, b)):
        n = len(enc["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == enc["input_ids"]
        assert (batch["input_ids"][row, n:] == EOS).all()
        assert batch["response_mask"][row].tolist() == enc["response_mask"] + [False] * (L - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (L - n)
    with pytest.raises(ValueError, match="example 0"):
        collate([{"input_ids": [1, 2], "response_mask": [True]}], EOS)


def test_elbo_of_a_collated_batch_matches_each_example_alone(tok):
    """Padding EOS is neither scored nor attended to: a row's ELBO equals the example's ELBO alone."""
    model = load_llada(FIXTURES / "llada-tiny")
    examples = [encode_example(tok, "2+2?", "4"), encode_example(tok, "Say hi to the cat.", "Hi, cat!")]
    batch = collate(examples, tok.pad_token_id)
    plan = SamplingPlan(n_t=4, n_yt=1)
    draw = draw_masks(batch["response_mask"], plan, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        batched = elbo_terms(model, batch["input_ids"], batch["response_mask"], draw, MASK,
                             model_kwargs={"attention_mask": batch["attention_mask"]})  # fmt: skip
        for row, enc in enumerate(examples):
            n = len(enc["input_ids"])
            one = collate([enc], tok.pad_token_id)
            sub = type(draw)(
                draw.masked[row : row + 1, :, :n],
                draw.weight[row : row + 1],
                draw.levels[row : row + 1],
                plan,
            )
            alone = elbo_terms(model, one["input_ids"], one["response_mask"], sub, MASK)
            torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-4, rtol=1e-5)


def _saved(tok, path, drop_mask_token=False, rename_mask=False):
    tok.save_pretrained(path)
    if drop_mask_token:
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg.pop("mask_token", None)
        cfg_file.write_text(json.dumps(cfg))
    if rename_mask:
        tj = path / "tokenizer.json"
        tj.write_text(tj.read_text().replace("<|mdm_mask|>", "<|other|>"))
    return path


def test_load_tokenizer_registers_llada_mask_token(tok, tmp_path):
    """LLaDA's release has <|mdm_mask|> in its vocabulary but no mask_token entry."""
    path = _saved(tok, tmp_path, drop_mask_token=True)
    plain = AutoTokenizer.from_pretrained(path)
    assert plain.mask_token_id is None and get_mask_token_id(plain) == MASK
    loaded = load_tokenizer(path)
    assert loaded.mask_token == "<|mdm_mask|>" and loaded.mask_token_id == MASK and len(loaded) == len(tok)


def test_tokenizer_without_mask_token_errors(tok, tmp_path):
    path = _saved(tok, tmp_path, drop_mask_token=True, rename_mask=True)
    with pytest.raises(ValueError, match=r"no mask token.*<\|mdm_mask\|>"):
        load_tokenizer(path)
    with pytest.raises(ValueError, match="no mask token"):
        get_mask_token_id(AutoTokenizer.from_pretrained(path))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_loading_a_saved_model_folder_logs_no_model_type_warning(family, tmp_path):
    """Loading a checkpoint in its family's own format (the demo's model, a run's ``model/``) logged
    transformers' "You are using a model of type `llada` to instantiate a model of type ``" every time: AutoTokenizer
    read
    config.json, whose model_type transformers does not know, as a bare config. The tokenizer loaded is
    still the class AutoTokenizer picks, with the same ids."""
    import logging

    from vrpo.models import load_mdm, save_mdm
    from vrpo.tasks.sort.task import sft_path

    if family == "llada":  # the shipped demo model, as a run's model/ folder holds it
        folder, text = pathlib.Path(sft_path()), "sort 3 1 2"
    else:  # a Dream saved by vrpo: its own config.json format, the tokenizer without remote code
        folder, text = tmp_path / "dream", "Sort these: 3, 1, 2."
        save_mdm(load_mdm(FIXTURES / "dream-tiny"), folder)
        load_tokenizer(FIXTURES / "dream-7b-instruct-meta").save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] in ("llada", "Dream")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        loaded = load_tokenizer(folder)
        load_mdm(folder)
    finally:
        logger.removeHandler(handler)
    assert not [m for m in seen if "You are using a model of type" in m], seen
    auto = AutoTokenizer.from_pretrained(folder)  # the former path (it still logs the warning)
    assert type(loaded) is type(auto)
    assert loaded(text)["input_ids"] == auto(text)["input_ids"]
