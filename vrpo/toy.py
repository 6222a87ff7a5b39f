"""The embedded demo task: sort a short list of digits.

A pair's prompt is ``"sort 5 2 8"``; the chosen answer is the sorted list ``"2 5 8"`` and the rejected
one the same digits in a wrong order, so both answers have the same tokens and length and only the
order tells them apart. Whether an answer is right is checkable (:func:`is_correct`), which makes
the effect of training visible in generated samples too.

``python -m vrpo.toy OUT.jsonl`` regenerates the bundled file.
"""

from __future__ import annotations

import json
import random
import sys
from importlib import resources

TOY_FILE = "toy_sort.jsonl"


def make_pair(rng: random.Random) -> dict:
    k = rng.randint(3, 6)
    digits = [rng.randint(0, 9) for _ in range(k)]
    while len(set(digits)) == 1:
        digits = [rng.randint(0, 9) for _ in range(k)]
    answer = sorted(digits)
    kind = rng.random()
    if kind < 0.4:  # one adjacent swap: the hardest negatives
        wrong = list(answer)
        candidates = [i for i in range(k - 1) if wrong[i] != wrong[i + 1]]
        i = rng.choice(candidates)
        wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    elif kind < 0.6:
        wrong = sorted(digits, reverse=True)
    else:
        wrong = list(digits)
        while wrong == answer:
            rng.shuffle(wrong)
    fmt = lambda xs: " ".join(map(str, xs))  # noqa: E731
    return {"prompt": f"sort {fmt(digits)}", "chosen": fmt(answer), "rejected": fmt(wrong)}


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [make_pair(rng) for _ in range(n)]


def is_correct(prompt: str, answer: str) -> bool:
    """True when ``answer`` is the prompt's digits in ascending order."""
    digits = prompt.split()[1:]
    return answer.split() == sorted(digits)


def toy_dataset_path() -> str:
    """Path of the bundled toy preference set (JSON Lines)."""
    return str(resources.files("vrpo") / "data_files" / TOY_FILE)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else toy_dataset_path()
    with open(out, "w", encoding="utf-8") as f:
        for pair in make_pairs(2000, seed=0):
            f.write(json.dumps(pair) + "\n")
    print(f"wrote 2000 pairs to {out}")
