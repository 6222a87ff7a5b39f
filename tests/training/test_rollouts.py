"""The rollout path of online RL: prompts are never changed, responses end at the first EOS, padding is
never scored, rewards are checked."""

import pytest
import torch

from vrpo.estimator import SamplingPlan, elbo_terms, noisy_draw
from vrpo.models import encode_example, load_mdm
from vrpo.models import samplers as samplers_module
from vrpo.tasks.sort import SORT_TASK
from vrpo.tasks.sort.task import answer_tokens, sft_path, task_tokenizer
from vrpo.training import rollouts
from vrpo.training.rollouts import (
    RolloutBuffer,
    RolloutSettings,
    checked_rewards,
    completion_batch,
    cut_completion,
    decode_answer,
    load_reward_fn,
    sample_groups,
    stop_token_ids,
)

EOS = 9


def test_a_response_ends_at_the_first_eos_and_keeps_it():
    assert cut_completion([5, 6, EOS, 7, EOS], EOS) == [5, 6, EOS]
    assert cut_completion([EOS, 7], EOS) == [EOS]
    assert cut_completion([5, 6, 7], EOS) == [5, 6, 7]  # no EOS: the whole completion


def test_the_answer_text_stops_at_end_of_turn_and_eos():
    tok = task_tokenizer()
    eos, ends = stop_token_ids(tok)
    assert eos == tok.eos_token_id and len(ends) == 2  # EOS and <|eot_id|>
    ids = tok("2 5 8", add_special_tokens=False)["input_ids"]
    tail = tok("9 9", add_special_tokens=False)["input_ids"]
    assert decode_answer(tok, ids + [ends[1]] + tail + [eos], ends) == "2 5 8"
    assert decode_answer(tok, ids + [eos], ends) == "2 5 8"


def test_completion_rows_keep_the_prompt_and_mark_only_the_response():
    batch = completion_batch([[1, 2, 3], [1, 2]], [[4, EOS], [5, 6, 7, EOS]], pad_id=0, device="cpu")
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, EOS, 0], [1, 2, 5, 6, 7, EOS]]
    assert batch["response_mask"].tolist() == [
        [False, False, False, True, True, False],
        [False, False, True, True, True, True],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6]


def test_padding_is_never_scored():
    # A short completion padded next to a long one has the ELBO terms it has alone, on the same keyed masks.
    model = load_mdm(sft_path()).eval()
    tok = task_tokenizer()
    plan = SamplingPlan(n_t=4, stratified=True)
    batch = completion_batch([[1, 2, 3], [1, 2]], [[40, 41, EOS], [42, 43, 44, 45, EOS]], tok.eos_token_id, "cpu")
    keys = [11, 12]
    mask_id = tok.convert_tokens_to_ids("<|mdm_mask|>")
    with torch.no_grad():
        both = elbo_terms(
            model,
            batch["input_ids"],
            batch["response_mask"],
            noisy_draw(batch["input_ids"], batch["response_mask"], plan, keys, mask_id),
            mask_id,
            model_kwargs={"attention_mask": batch["attention_mask"]},
        )
        alone = completion_batch([[1, 2, 3]], [[40, 41, EOS]], tok.eos_token_id, "cpu")
        first = elbo_terms(
            model,
            alone["input_ids"],
            alone["response_mask"],
            noisy_draw(alone["input_ids"], alone["response_mask"], plan, keys[:1], mask_id),
            mask_id,
        )
    # float32 sums of a few log-probabilities over a 136-token softmax: well inside 1e-5 relative.
    torch.testing.assert_close(both[0], first[0], rtol=1e-5, atol=1e-5)


def test_sampled_groups_are_the_prompts_completions_and_a_changed_prompt_is_refused(monkeypatch):
    model = load_mdm(sft_path()).eval()
    tok = task_tokenizer()
    prompts = ["sort 5 2 8", "sort 1 9 3"]
    ids = [encode_example(tok, p, "")["input_ids"][:-2] for p in prompts]  # drop <|eot_id|> EOS
    settings = RolloutSettings(num_generations=3, temperature=1.0, steps=None, block_length=None)
    length = answer_tokens(tok, prompts[0])
    mask_id = tok.convert_tokens_to_ids("<|mdm_mask|>")
    out = sample_groups(model, "llada", ids, length, mask_id, settings, key=5)
    assert out.shape == (6, length) and not (out == mask_id).any()
    again = sample_groups(model, "llada", ids, length, mask_id, settings, key=5)
    assert torch.equal(out, again)  # same key, same completions

    real = samplers_module.SAMPLERS["llada"]

    def rewriting(model, prompt_ids, *args, **kwargs):
        x = real(model, prompt_ids, *args, **kwargs)
        x[:, 0] = 0  # a sampler bug that writes into the prompt
        return x

    monkeypatch.setitem(rollouts.SAMPLERS, "llada", rewriting)
    with pytest.raises(RuntimeError, match="changed the prompt"):
        sample_groups(model, "llada", ids, length, mask_id, settings, key=5)


def test_the_sort_tasks_reward_is_its_partial_credit():
    assert SORT_TASK.reward("sort 5 2 8", "2 5 8") == 1.0
    assert SORT_TASK.reward("sort 5 2 8", "2 8 5") == pytest.approx(1 / 3)
    assert SORT_TASK.reward("sort 5 2 8", "") == 0.0


def test_rewards_are_checked_and_reward_functions_named():
    assert checked_rewards([1, 0.5], 2, "f") == [1.0, 0.5]
    with pytest.raises(ValueError, match="f returned 1 rewards for 2 completions"):
        checked_rewards([1.0], 2, "f")
    with pytest.raises(ValueError, match="f returned nan"):
        checked_rewards([1.0, float("nan")], 2, "f")
    assert load_reward_fn("math:fsum")([1.0, 2.0]) == 3.0
    with pytest.raises(ValueError, match="--reward_fn nosuchmodule_x:f: cannot import"):
        load_reward_fn("nosuchmodule_x:f")
    with pytest.raises(ValueError, match="--reward_fn math:nosuch: math has no function nosuch"):
        load_reward_fn("math:nosuch")


def test_the_rollout_buffer_samples_each_micro_batch_once_per_cycle():
    """Rollouts are made once per batch of prompts and reused for its num_iterations steps, whatever asked first
    (catches rollouts sampled again inside a cycle, whose stored terms would be another policy's, or kept past
    it, which would train on stale completions)."""
    made = []
    buffer = RolloutBuffer(2, lambda items: made.append(tuple(items)) or len(made))
    a, b = [(0, 1), (0, 2)], [(0, 3)]
    assert [buffer.get(1, a), buffer.get(0, b), buffer.get(0, a), buffer.get(1, b)] == [1, 2, 1, 2]
    assert [buffer.get(2, a), buffer.get(3, a), buffer.get(3, b)] == [3, 3, 4]
    assert made == [tuple(a), tuple(b), tuple(a), tuple(b)]
