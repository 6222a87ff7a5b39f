"""The sorting demo as lm-eval tasks: the data files and the tasks' functions.

Both tasks read the demo's fixed held-out prompts (:func:`vrpo.tasks.sort.test_prompts`, none seen in SFT or
preference training), written once to JSON Lines in ``vrpo/tasks/sort/lm_eval_tasks/`` and read from there (never
the hub). Rebuild them bit for bit with::

    python -m vrpo.tasks.sort.lm_eval --overwrite

* ``vrpo_sort_gen`` (a group of generate_until tasks, one per prompt length): the answer is graded by
  the demo's verifier (:func:`vrpo.tasks.sort.grade`):
  ``exact_match`` (exact sort) and ``credit`` (fraction of positions right).
* ``vrpo_sort_mc`` (multiple_choice): the right sort among four candidates, the three others near misses
  (:func:`near_misses`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from importlib import resources

from datasets import Dataset, DatasetDict

from .task import LENGTHS, grade, reference_answer, test_prompts

GEN_FILE = "sort_gen.jsonl"
MC_FILE = "sort_mc.jsonl"
CHOICES = 4


TASKS_DIR = str(resources.files("vrpo.tasks.sort") / "lm_eval_tasks")  # the YAMLs and their data


def data_dir() -> str:
    return TASKS_DIR


def near_misses(answer: list[str], rng: random.Random, k: int = CHOICES - 1) -> list[list[str]]:
    """``k`` distinct wrong answers close to the sorted ``answer``: adjacent swaps of unequal digits first
    (the demo model's likeliest mistakes), then one digit moved up or down by one (kept in order)."""
    wrong = []
    swaps = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
    rng.shuffle(swaps)
    for i in swaps:
        cand = list(answer)
        cand[i], cand[i + 1] = cand[i + 1], cand[i]
        wrong.append(cand)
    edits = [(i, d) for i in range(len(answer)) for d in (-1, 1) if 0 <= int(answer[i]) + d <= 9]
    rng.shuffle(edits)
    for i, d in edits:
        cand = list(answer)
        cand[i] = str(int(cand[i]) + d)
        cand = sorted(cand)
        if cand != answer and cand not in wrong:
            wrong.append(cand)
    picked = wrong[:1] + rng.sample(wrong[1:], k - 1)  # one swap always, the others drawn
    return picked


def mc_rows(prompts: list[str]) -> list[dict]:
    """``{"prompt", "choices", "label"}`` per prompt, the right answer at a seeded position."""
    rows = []
    for prompt in prompts:
        rng = random.Random(f"vrpo_sort_mc/{prompt}")
        answer = reference_answer(prompt).split()
        choices = [" ".join(c) for c in [answer, *near_misses(answer, rng)]]
        order = list(range(CHOICES))
        rng.shuffle(order)
        rows.append({"prompt": prompt, "choices": [choices[i] for i in order], "label": order.index(0)})
    return rows


def gen_rows(prompts: list[str]) -> list[dict]:
    return [{"prompt": p, "answer": reference_answer(p)} for p in prompts]


def _load(data_file: str, digits: int | None = None) -> DatasetDict:
    path = os.path.join(data_dir(), data_file)
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    if digits is not None:
        if not LENGTHS[0] <= int(digits) <= LENGTHS[1]:
            raise ValueError(f"dataset_kwargs digits={digits} is outside the demo's lengths {LENGTHS}")
        rows = [r for r in rows if len(r["prompt"].split()) - 1 == int(digits)]
    return DatasetDict({"test": Dataset.from_list(rows)})


def load_gen(digits: int | None = None, **_metadata) -> DatasetDict:
    """lm-eval ``custom_dataset`` of ``vrpo_sort_gen_{digits}``: the prompts of ``digits`` digits (all when
    None). lm-eval also passes the task metadata (unused)."""
    return _load(GEN_FILE, digits)


def load_mc(**_metadata) -> DatasetDict:
    """lm-eval ``custom_dataset`` of ``vrpo_sort_mc``."""
    return _load(MC_FILE)


def process_gen(doc: dict, results: list[str]) -> dict:
    """The verifier's grade of the first generation: ``exact_match`` (0/1) and ``credit``."""
    g = grade(doc["prompt"], results[0].strip())
    return {"exact_match": float(g.correct), "credit": g.credit}


def write(overwrite: bool = False) -> list[str]:
    prompts = test_prompts()
    written = []
    for name, rows in ((GEN_FILE, gen_rows(prompts)), (MC_FILE, mc_rows(prompts))):
        path = os.path.join(data_dir(), name)
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vrpo.tasks.sort.lm_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        for path in write(args.overwrite):
            print(f"wrote {path}")
    except FileExistsError as e:
        print(f"python -m vrpo.tasks.sort.lm_eval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
