"""The lm-eval model ``vrpo`` end to end with the shipped tiny model: both shipped task types, the
per-sample statistics, rolling likelihoods, generation's stop sequences, bad arguments."""

from __future__ import annotations

import glob
import json
import math
import os
import textwrap

import lm_eval
import pytest
from lm_eval.api.instance import Instance

from vrpo.eval import LikelihoodRequest, VRPOEvalLM, task_manager
from vrpo.eval.__main__ import main
from vrpo.tasks.sort.task import sft_path


@pytest.fixture(scope="module")
def lm():
    return VRPOEvalLM(sft_path(), mc_num=16)


def test_mc_task_through_the_command_logs_se_and_sample_count(tmp_path, capsys):
    rc = main(
        [
            "--model_name_or_path",
            sft_path(),
            "--tasks",
            "vrpo_sort_mc",
            "--apply_chat_template",
            "--limit",
            "16",
            "--output_path",
            str(tmp_path),
            "--log_samples",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "|vrpo_sort_mc|" in out and "acc" in out  # lm-eval's own table
    results = json.load(open(glob.glob(str(tmp_path / "*" / "results_*.json"))[0]))
    # 4 candidates, chance 0.25; the demo model picks the right sort ~80% of the time (Evaluate docs).
    assert results["results"]["vrpo_sort_mc"]["acc,none"] >= 0.5
    samples = [json.loads(line) for line in open(glob.glob(str(tmp_path / "*" / "samples_vrpo_sort_mc_*.jsonl"))[0])]
    assert len(samples) == 16
    for s in samples:
        assert len(s["vrpo"]) == 4
        for stat, resp in zip(s["vrpo"], s["resps"]):
            assert stat["elbo"] == pytest.approx(float(resp[0][0]))  # the logged value is the estimate
            assert stat["elbo_se"] > 0 and 8 <= stat["mc_samples"] <= 128


def test_gen_task_through_simple_evaluate():
    res = lm_eval.simple_evaluate(
        model="vrpo",
        model_args={"pretrained": sft_path()},
        tasks=["vrpo_sort_gen"],
        limit=4,
        apply_chat_template=True,
        task_manager=task_manager(),
    )
    group = res["groups"]["vrpo_sort_gen"] if "groups" in res else res["results"]["vrpo_sort_gen"]
    # 16 prompts (4 per length); the demo model sorts about half of the held-out prompts exactly.
    assert 0.25 <= group["exact_match,none"] <= 1.0
    assert group["credit,none"] >= group["exact_match,none"]


def gen_request(lm, prompt, until):
    ctx = lm.apply_chat_template([{"role": "user", "content": prompt}])
    return Instance("generate_until", {}, (ctx, {"until": until, "max_gen_toks": 9}), 0)


def test_generate_until_honours_stop_sequences(lm):
    full, cut = lm.generate_until([gen_request(lm, "sort 8 6 6 9", []), gen_request(lm, "sort 8 6 6 9", [" 8"])])
    assert full == "6 6 8 9"  # special tokens (<|eot_id|>, EOS) end the answer
    assert cut == "6 6"


def test_rolling_likelihood_is_the_elbo_of_the_whole_text(lm):
    text = "sort 3 1 2"
    req = Instance("loglikelihood_rolling", {}, (text,), 0, ("t", 0, 1))
    (value,) = lm.loglikelihood_rolling([req])
    ids = tuple(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    (direct,) = lm.estimator.estimate([LikelihoodRequest((lm.tokenizer.bos_token_id,), ids, f"0/0/{text}")])
    assert value == direct.mean
    stats = lm.sample_stats[("t", 0, 0)]
    assert stats["elbo_se"] == pytest.approx(direct.se) and stats["mc_samples"] == 16


def test_rolling_likelihood_adds_windows_when_the_text_is_long():
    short = VRPOEvalLM(sft_path(), mc_num=8, max_length=5)  # windows of 4 tokens after BOS
    text = "sort 3 1 2"  # 10 characters: windows of 4, 4, 2
    (value,) = short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0, ("t", 0, 1))])
    ids = short.tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = (short.tokenizer.bos_token_id,)
    parts = short.estimator.estimate(
        [LikelihoodRequest(bos, tuple(ids[s : s + 4]), f"0/{w}/{text}") for w, s in enumerate(range(0, 10, 4))]
    )
    assert value == pytest.approx(sum(p.mean for p in parts), rel=1e-12)
    stats = short.sample_stats[("t", 0, 0)]
    assert stats["mc_samples"] == 24
    assert stats["elbo_se"] == pytest.approx(sum(p.se**2 for p in parts) ** 0.5)


def test_rolling_task_through_lm_eval(tmp_path):
    (tmp_path / "texts.py").write_text(
        textwrap.dedent("""
        from datasets import Dataset, DatasetDict

        def load(**_):
            return DatasetDict({"test": Dataset.from_list([{"text": "sort 3 1 2"}, {"text": "1 2 3"}])})
    """)
    )
    (tmp_path / "texts.yaml").write_text(
        textwrap.dedent("""
        task: vrpo_test_rolling
        custom_dataset: !function texts.load
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list:
          - metric: word_perplexity
          - metric: bits_per_byte
    """)
    )
    res = lm_eval.simple_evaluate(
        model="vrpo",
        model_args={"pretrained": sft_path(), "mc_num": 8},
        tasks=["vrpo_test_rolling"],
        task_manager=task_manager([str(tmp_path)]),
    )
    bpb = res["results"]["vrpo_test_rolling"]["bits_per_byte,none"]
    # lm-eval's bits per byte is -sum(log-likelihood) / bytes / ln 2 of the rolling ELBOs (the demo model
    # knows chat-formatted text only, so raw text scores poorly; what matters is that these are the values).
    own = VRPOEvalLM(sft_path(), mc_num=8)
    texts = ["sort 3 1 2", "1 2 3"]
    ll = own.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (t,), 0, ("t", i, 1)) for i, t in enumerate(texts)]
    )
    assert bpb == pytest.approx(-sum(ll) / sum(len(t.encode()) for t in texts) / math.log(2), rel=1e-9)


def test_context_and_continuation_split_at_the_context_tokens(lm):
    ctx = lm.apply_chat_template([{"role": "user", "content": "sort 2 1"}])  # ends with the template's "\n\n"
    c, cont = lm._encode_pair(ctx, "1 2")
    assert lm.tokenizer.decode(cont) == "1 2" and c[0] == lm.tokenizer.bos_token_id
    c, cont = lm._encode_pair("", "1 2")  # an empty context is BOS
    assert c == [lm.tokenizer.bos_token_id]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(mc_nmu=8), "unknown model arguments.*mc_nmu"),
        (dict(batch_size="auto"), "--batch_size auto"),
        (dict(mc_num="many"), "mc_num"),
        (dict(crn="maybe"), "boolean"),
        (dict(mc_scheme="x"), "mc_scheme"),
    ],
)
def test_bad_model_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        VRPOEvalLM(sft_path(), **kw)


def test_missing_tokenizer_is_named(tmp_path):
    import shutil

    shutil.copytree(sft_path(), tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # the shipped tokenizer
        (tmp_path / "m" / name).unlink()
    with pytest.raises(ValueError, match="tokenizer"):
        VRPOEvalLM(str(tmp_path / "m"))


def test_shipped_task_data_are_the_rebuilt_ones(tmp_path, monkeypatch):
    from vrpo.tasks.sort import lm_eval as sort_tasks

    shipped = {
        n: open(os.path.join(sort_tasks.data_dir(), n)).read() for n in (sort_tasks.GEN_FILE, sort_tasks.MC_FILE)
    }
    monkeypatch.setattr(sort_tasks, "data_dir", lambda: str(tmp_path))
    sort_tasks.write()
    for name, text in shipped.items():
        assert (tmp_path / name).read_text() == text
    rows = [json.loads(line) for line in text.splitlines()]
    for r in rows:
        assert (
            len(set(r["choices"])) == 4 and sorted(r["choices"][r["label"]].split()) == r["choices"][r["label"]].split()
        )


def test_raw_prompts_to_a_chat_trained_model_are_warned_about(capsys, monkeypatch):
    """Without --apply_chat_template a model trained on chat-formatted prompts (every vrpo run's) sees raw
    text and answers at chance or worse, silently; the command now says so when the tokenizer has a chat
    template, and stays quiet when the flag is given either way or the tokenizer has none."""
    import types

    from vrpo.eval import __main__ as cli
    from vrpo.eval.__main__ import chat_template_warning, parse_args

    asked = {}
    monkeypatch.setattr(cli, "simple_evaluate", lambda **kw: asked.update(kw))  # the model loads; no eval
    rc = main(["--model_name_or_path", sft_path(), "--tasks", "vrpo_sort_mc", "--limit", "1"])
    assert rc == 0 and asked["apply_chat_template"] is False
    err = capsys.readouterr().err
    assert "has a chat template, but --apply_chat_template is off" in err and sft_path() in err
    templated = types.SimpleNamespace(chat_template="{{ x }}")
    plain = types.SimpleNamespace(chat_template=None)
    base = ["--model_name_or_path", "m", "--tasks", "t"]
    assert chat_template_warning(parse_args(base), templated)
    assert chat_template_warning(parse_args(base + ["--apply_chat_template"]), templated) is None
    assert chat_template_warning(parse_args(base + ["--no-apply_chat_template"]), templated) is None
    assert chat_template_warning(parse_args(base), plain) is None
    assert parse_args(base + ["--no-apply_chat_template"]).apply_chat_template is False
