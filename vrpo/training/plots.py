"""``plots/training.png``: a run's curves from ``logs/metrics.jsonl`` and its ``summary.json`` figures.

Four panels: the VRPO loss, preference accuracy (training batches and held-out), ``score/var`` (the
variance of the estimated score that VRPO reduces), and, when the run graded generations, held-out
exact-sort accuracy and partial credit before and after. matplotlib is a dependency of vrpo (since 0.2).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os

logger = logging.getLogger("vrpo")

PLOT_FILE = os.path.join("plots", "training.png")


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of the records that have ``key``."""
    rows = [
        (r["step"], r[key])
        for r in records
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
    ]
    return [s for s, _ in rows], [v for _, v in rows]


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_training(records: list[dict], summary: dict, path: str) -> str | None:
    """Draw the run's panels into ``path`` (a PNG, written atomically). Returns the path, or None when
    matplotlib is missing (logged at WARNING: an install from before 0.2 may lack it)."""
    if importlib.util.find_spec("matplotlib") is None:
        logger.warning(
            "matplotlib is not installed, so no %s: it is a dependency of vrpo since 0.2 "
            "(pip install -e . again, or pip install matplotlib)",
            path,
        )
        return None
    import matplotlib  # imported here: a run pays for it only when it draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    ax = axes[0]
    ax.plot(*series(records, "loss/vrpo"), ".-")
    ax.set(title="loss", xlabel="step")
    ax = axes[1]
    ax.plot(*series(records, "rewards/accuracies"), ".-", label="training batches (implicit reward)")
    ax.plot(*series(records, "eval/pref_acc"), "o-", label="held-out (ELBO margin)")
    ax.set(title="preference accuracy", xlabel="step", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    ax = axes[2]
    steps, var = series(records, "score/var")
    ax.plot(steps, var, ".-")
    ax.set(title="score/var (estimator variance)", xlabel="step")
    if var and min(var) > 0:
        ax.set_yscale("log")
    ax = axes[3]
    if summary.get("gen_acc_before") is not None:
        names = ["exact-sort accuracy", "partial credit"]
        before = [summary["gen_acc_before"], summary["gen_credit_before"]]
        after = [summary["gen_acc_after"], summary["gen_credit_after"]]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], before, 0.4, label="before")
        ax.bar([i + 0.2 for i in x], after, 0.4, label="after")
        for i, (b, a) in enumerate(zip(before, after)):
            ax.text(i - 0.2, b, f"{b:.0%}", ha="center", va="bottom", fontsize=8)
            ax.text(i + 0.2, a, f"{a:.0%}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), names)
        ax.set(
            title=f"greedy generations, {summary.get('gen_prompts', '?')} {summary.get('gen_split', 'test')} prompts",
            ylim=(0, 1.1),
        )
        ax.legend(fontsize=8)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "no graded generations\n(only the bundled task has a verifier)", ha="center", va="center")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
