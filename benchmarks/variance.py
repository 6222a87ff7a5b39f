"""The paper's Table 2, in shape: how sampling budget, allocation, antithetic and stratified sampling
change the variance of the VRPO score, loss and gradient, on the embedded tiny LLaDA.

1. Make a reference and a policy close to it, as in the paper (LLaDA 8B Instruct and its VRPO
   fine-tune): stage 1 is the default run (``python -m vrpo.train``: ``VRPOTrainer`` on the bundled SFT
   model and its own ranked answers to the sorting task) for ``--base_steps`` steps: that model is the
   reference. Stage 2 continues with VRPO from it for ``--train_steps`` steps at a lower learning rate:
   that is the policy. (``--base_steps 0``: the reference is the bundled SFT model itself.)
2. Take ``--pairs`` held-out pairs (the trainer's evaluation split, never trained on). For every
   sampling configuration and every repeat ``r = 0..R-1``, draw fresh masks (keyed by
   ``(seed, r, pair, side)``, so every number here is reproducible), and compute for every pair

   * the score ``s_hat = beta * [(B_pi(y_w) - B_ref(y_w)) - (B_pi(y_l) - B_ref(y_l))]``,
   * the loss ``-log sigmoid(s_hat)`` (the VRPO loss alone, without the SFT term),
   * the gradient of the summed loss with respect to one weight matrix of the policy.

3. Report, per configuration:

   * ``var_score``: the variance of ``s_hat`` across repeats (unbiased, ``ddof=1``), per pair, averaged
     over pairs (the paper's "Var of score");
   * ``var_loss``: the same for the per-pair loss;
   * ``var_grad``: ``(1/P) * sum over the matrix's elements of Var_r[d(sum_b loss_b)/dW]``: the trace
     of the covariance of the gradient, per pair. Masks are drawn independently for each pair, so the
     covariance of a sum is the sum of the per-pair covariances, and this equals the average over pairs
     of the trace of one pair's gradient covariance. The matrix is the last transformer layer's
     attention output projection (``layers[-1].self_attn.o_proj``, LLaDA's ``attn_out``);
     ``var_grad_head`` is the same for the LM head;
   * ``*_se``: the bootstrap standard error of each figure (resampling the repeats);
   * ``mean_score``: the mean of ``s_hat`` over pairs and repeats; every configuration is unbiased for
     the same true score, so these agree up to noise.

4. The distance sweep: (4,1,yes) against (4,1,no) with the policy's weights set to
   ``ref + alpha * (policy - ref)`` for each ``--alphas`` value, to show how the benefit of antithetic
   sampling grows as the policy nears the reference (rows with ``alpha < 1`` in the CSV).

Configurations ``(n_t, n_yt, antithetic)``: the paper's (4,1,yes), (1,1,yes), (8,1,yes), (1,4,yes),
(2,2,yes), (4,1,no), plus stratified timesteps (4,1,yes) and (8,1,yes). All use the l-uniform
estimator (the library's default).

    python -m benchmarks.variance          # ~5 CPU minutes: 150 + 40 training steps, 64 pairs x 16 repeats
    python -m benchmarks.variance --quick  # seconds, for the smoke test

Writes ``variance.csv``, ``variance.md`` and ``variance.png`` (when matplotlib is installed) under
``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from benchmarks.common import RESULTS, machine, write_csv
from vrpo.estimator.losses import preference_loss, reward_margin
from vrpo.estimator.sampling import SamplingPlan
from vrpo.training.batches import batch_terms
from vrpo.training.config import VRPOConfig


@dataclass(frozen=True)
class Setting:
    n_t: int
    n_yt: int
    antithetic: bool
    stratified: bool = False

    @property
    def label(self) -> str:
        mark = "✓" if self.antithetic else "✗"
        return f"{'strat ' if self.stratified else ''}({self.n_t},{self.n_yt},{mark})"

    @property
    def plan(self) -> SamplingPlan:
        return SamplingPlan(n_t=self.n_t, n_yt=self.n_yt, antithetic=self.antithetic, stratified=self.stratified)


# The paper's column order (Table 2), then our stratified additions.
SETTINGS = (
    Setting(4, 1, True),
    Setting(1, 1, True),
    Setting(8, 1, True),
    Setting(1, 4, True),
    Setting(2, 2, True),
    Setting(4, 1, False),
    Setting(4, 1, True, stratified=True),
    Setting(8, 1, True, stratified=True),
)
BASE = Setting(4, 1, True)

# Table 2 of Zhu et al. (2025), LLaDA 8B, 128 pairs x 8 repeats.
PAPER = {
    "(4,1,✓)": dict(var_score=2.2, var_loss=3.1e-3, var_grad=2.5),
    "(1,1,✓)": dict(var_score=44.0, var_loss=8.7e-2, var_grad=13.0),
    "(8,1,✓)": dict(var_score=1.0, var_loss=2.6e-3, var_grad=1.6),
    "(1,4,✓)": dict(var_score=7.3, var_loss=3.2e-2, var_grad=4.7),
    "(2,2,✓)": dict(var_score=4.7, var_loss=7.3e-3, var_grad=2.5),
    "(4,1,✗)": dict(var_score=2183.7, var_loss=62.0, var_grad=10.6),
}

# The ordering the paper's analysis predicts (smallest variance first).
EXPECTED_ORDER = ("(8,1,✓)", "(4,1,✓)", "(2,2,✓)", "(1,4,✓)", "(1,1,✓)", "(4,1,✗)")

METRICS = ("var_score", "var_loss", "var_grad", "var_grad_head")
METRIC_NAMES = {
    "var_score": "Var of score",
    "var_loss": "Var of loss",
    "var_grad": "Var of gradient (last o_proj)",
    "var_grad_head": "Var of gradient (LM head)",
}

FULL = dict(base_steps=150, train_steps=40, learning_rate=2e-4, pairs=64, repeats=16, chunk=32, alphas=(0.1, 0.3))
QUICK = dict(base_steps=2, train_steps=2, learning_rate=2e-4, pairs=4, repeats=3, chunk=4, alphas=(0.5,))


def _toy_config(workdir: str, seed: int, steps: int, eval_size: int, quick: bool, **changes) -> VRPOConfig:
    return VRPOConfig(
        task="sort",
        output_dir=workdir,
        report_to="none",
        num_samples=0,
        save_steps=0,
        seed=seed,
        max_steps=steps,
        eval_size=eval_size,
        **(dict(per_device_train_batch_size=4, eval_n_t=2) if quick else {}),
        **changes,
    )


def train_policy(
    base_steps: int,
    train_steps: int,
    learning_rate: float | None,
    seed: int,
    workdir: str,
    eval_size: int,
    quick: bool = False,
):
    """Train the reference, then the policy from it; returns ``(trainer, info)``.

    Stage 1 (``base_steps`` > 0): ``python -m vrpo.train``'s default run (the bundled SFT model, its
    learning rate) for ``base_steps`` steps gives a model tuned on the task: the reference, as LLaDA 8B
    Instruct is in the paper. Stage 2: VRPO from that model for ``train_steps`` steps at
    ``learning_rate`` gives the policy; its frozen initial copy is the reference. With ``base_steps = 0``
    the reference is the bundled SFT model. The trainer of stage 2 holds the policy, the reference and the held-out
    pairs.
    """
    from vrpo.tasks.sort import SORT_TASK
    from vrpo.training import VRPOTrainer

    info = {}
    model = tokenizer = train_pairs = eval_pairs = None
    if base_steps > 0:
        base = VRPOTrainer(
            _toy_config(os.path.join(workdir, "base"), seed, base_steps, eval_size, quick), task=SORT_TASK
        )
        summary = base.train()
        info.update(base_acc_before=summary.get("pref_acc_before"), base_acc_after=summary.get("pref_acc_after"))
        model = base.policy_model
        tokenizer, train_pairs, eval_pairs = base.tokenizer, base.train_pairs, base.eval_pairs
        del base
    changes = {} if learning_rate is None else dict(learning_rate=learning_rate)
    # Another seed for stage 2: another data order and other mask draws than stage 1's.
    trainer = VRPOTrainer(
        _toy_config(os.path.join(workdir, "policy"), seed + 1, train_steps, eval_size, quick, **changes),
        model=model,
        tokenizer=tokenizer,
        train_pairs=train_pairs,
        eval_pairs=eval_pairs,
        task=SORT_TASK,
    )
    summary = trainer.train()
    info.update(
        acc_before=summary.get("pref_acc_before"),
        acc_after=summary.get("pref_acc_after"),
        reward_acc=summary.get("reward_acc_after"),
    )
    return trainer, info


def gradient_matrices(model) -> dict[str, torch.nn.Parameter]:
    return {
        "var_grad": model.get_decoder().layers[-1].self_attn.o_proj.weight,
        "var_grad_head": model.get_output_embeddings().weight,
    }


def replicate(
    trainer, setting: Setting, pair_ids: list[int], repeat: int, seed: int, chunk: int, beta: float, grads: bool = True
):
    """One repeat of one setting over all pairs: scores [P], losses [P] and the gradients of the summed
    loss w.r.t. the chosen matrices (float64; ``grads=False``: no backward, and ``{}``). The draws, the
    reference's terms (on the policy's draw or an independent one) and the margins are the trainer's own."""
    with torch.enable_grad() if grads else torch.no_grad():
        return _replicate(trainer, setting, pair_ids, repeat, seed, chunk, beta, grads)


def _replicate(trainer, setting, pair_ids, repeat, seed, chunk, beta, grads):
    cfg = trainer.config
    plan = setting.plan
    mats = gradient_matrices(trainer.policy_model) if grads else {}
    for p in mats.values():
        p.grad = None
    scores, losses = [], []
    for start in range(0, len(pair_ids), chunk):
        ids = pair_ids[start : start + chunk]
        # Keyed by (seed, "variance", repeat, pair, side): the repeat stands in for the epoch.
        items = [(repeat, i) for i in ids]
        batch = trainer.batches.of(trainer.eval_pairs, items)  # chosen rows, then rejected
        draw, ref_draw = trainer.batches.draws(batch, items, plan, "variance", "variance-ref", seed)
        pol = batch_terms(trainer.policy_elbo, batch, draw).mean(-1)
        ref = trainer.reference.terms(batch, items, ref_draw)[0].mean(-1)
        B = len(items)
        margin = reward_margin(pol[:B], pol[B:], ref[:B], ref[B:])
        loss = preference_loss(margin, beta, cfg.loss_type, cfg.label_smoothing)
        if grads:
            loss.sum().backward()
        scores.append(beta * margin.detach().double())
        losses.append(loss.detach().double())
    grads = {name: p.grad.detach().double().flatten().clone() for name, p in mats.items()}
    return torch.cat(scores), torch.cat(losses), grads


def _resampled_variances(values: torch.Tensor, n_boot: int = 200, seed: int = 0) -> torch.Tensor:
    """[n_boot, ...]: the variance over dim 0 (ddof 1) of ``n_boot`` resamplings of the repeats (dim 0)
    with replacement. Through the resampling counts, so the cost is one matmul."""
    g = torch.Generator().manual_seed(seed)
    R = values.shape[0]
    counts = torch.zeros(n_boot, R, dtype=values.dtype)
    picks = torch.randint(R, (n_boot, R), generator=g)
    counts.scatter_add_(1, picks, torch.ones(n_boot, R, dtype=values.dtype))
    flat = values.reshape(R, -1)
    mean = counts @ flat / R
    var = (counts @ flat.square() / R - mean.square()) * (R / (R - 1))
    return var.clamp_min(0).view(n_boot, *values.shape[1:])


def summarise(scores: torch.Tensor, losses: torch.Tensor, grads: dict[str, torch.Tensor]) -> dict:
    """scores, losses float64 [R, P]; grads name -> float64 [R, numel]. See the module docstring.

    The ``*_se`` entries are bootstrap standard errors (200 resamplings of the repeats).
    """
    R, P = scores.shape
    out = {
        "var_score": scores.var(0).mean().item(),
        "var_score_se": _resampled_variances(scores).mean(1).std().item(),
        "var_loss": losses.var(0).mean().item(),
        "var_loss_se": _resampled_variances(losses).mean(1).std().item(),
        "mean_score": scores.mean().item(),
        "mean_score_se": (scores.mean(1).std() / math.sqrt(R)).item(),
    }
    for name, g in grads.items():
        out[name] = g.var(0).sum().item() / P
        out[f"{name}_se"] = (_resampled_variances(g).sum(1) / P).std().item()
    return out


def measure(trainer, settings, pairs: int, repeats: int, seed: int, chunk: int, progress: bool = True) -> list[dict]:
    beta = trainer.config.beta
    n_pairs = len(trainer.eval_pairs)
    if pairs > n_pairs:
        raise ValueError(f"--pairs {pairs}: only {n_pairs} held-out pairs are available")
    pair_ids = list(range(pairs))
    model = trainer.policy_model
    # Only the measured matrices need gradients: backward then stops at the last layer (the values are
    # the same, the cost far lower).
    wanted = {id(p) for p in gradient_matrices(model).values()}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(id(p) in wanted)
    try:
        return _measure(trainer, settings, pair_ids, repeats, seed, chunk, beta, progress)
    finally:
        for p, requires_grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = None


def _measure(trainer, settings, pair_ids, repeats, seed, chunk, beta, progress):
    from tqdm.auto import tqdm

    pairs = len(pair_ids)
    rows = []
    bar = tqdm(total=len(settings) * repeats, desc="variance", disable=not progress)
    for setting in settings:
        t0 = time.perf_counter()
        runs = []
        for r in range(repeats):
            runs.append(replicate(trainer, setting, pair_ids, r, seed, chunk, beta))
            bar.update(1)
        scores = torch.stack([s for s, _, _ in runs])
        losses = torch.stack([l for _, l, _ in runs])  # noqa: E741
        grads = {name: torch.stack([g[name] for _, _, g in runs]) for name in runs[0][2]}
        row = dict(
            config=setting.label,
            alpha=1.0,
            n_t=setting.n_t,
            n_yt=setting.n_yt,
            n=setting.plan.n,
            antithetic=setting.antithetic,
            stratified=setting.stratified,
            pairs=pairs,
            repeats=repeats,
        )
        row.update(summarise(scores, losses, grads))
        paper = PAPER.get(setting.label, {})
        row.update({f"paper_{k}": paper.get(k) for k in ("var_score", "var_loss", "var_grad")})
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    bar.close()
    return rows


@contextlib.contextmanager
def interpolated_policy(trainer, alpha: float):
    """Within the block, the policy's weights are ``ref + alpha * (policy - ref)``."""
    policy = trainer.policy_model
    ref = trainer.reference.elbo.model
    pairs = list(zip(policy.named_parameters(), ref.named_parameters()))
    if len(pairs) != len(list(ref.parameters())) or any(a[0] != b[0] for a, b in pairs):
        raise ValueError("interpolated_policy: the policy and the reference have different parameters")
    saved = [p.detach().clone() for (_, p), _ in pairs]
    with torch.no_grad():
        for (_, p), (_, q) in pairs:
            p.copy_(q + alpha * (p - q))
    try:
        yield
    finally:
        with torch.no_grad():
            for ((_, p), _), value in zip(pairs, saved):
                p.copy_(value)


ANTITHETIC_SETTINGS = (Setting(4, 1, True), Setting(4, 1, False))


def distance_sweep(trainer, alphas, pairs: int, repeats: int, seed: int, chunk: int, progress: bool = True):
    """(4,1,✓) against (4,1,✗) for policies ``ref + alpha * (policy - ref)``: how the benefit of
    antithetic sampling depends on how far the policy is from the reference (0 at alpha = 0)."""
    rows = []
    for alpha in alphas:
        with interpolated_policy(trainer, alpha):
            for row in measure(trainer, ANTITHETIC_SETTINGS, pairs, repeats, seed, chunk, progress):
                row.update(alpha=alpha, paper_var_score=None, paper_var_loss=None, paper_var_grad=None)
                rows.append(row)
    return rows


# --- output -----------------------------------------------------------------------------------------

CSV_COLUMNS = (
    "config",
    "alpha",
    "n_t",
    "n_yt",
    "n",
    "antithetic",
    "stratified",
    "pairs",
    "repeats",
    "var_score",
    "var_score_se",
    "var_loss",
    "var_loss_se",
    "var_grad",
    "var_grad_se",
    "var_grad_head",
    "var_grad_head_se",
    "mean_score",
    "mean_score_se",
    "paper_var_score",
    "paper_var_loss",
    "paper_var_grad",
    "seconds",
)


def _g(x, digits=2):
    if x is None:
        return "—"
    if x == 0:
        return "0"
    if abs(x) >= 0.1 and abs(x) < 10_000:
        return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"
    return f"{x:.{max(digits - 1, 0)}e}".replace("e-0", "e-").replace("e+0", "e")


def order_report(rows, metric) -> str:
    """Whether EXPECTED_ORDER holds for ``metric``; names the adjacent pairs that are out of order."""
    by = {r["config"]: r for r in rows}
    chain = [c for c in EXPECTED_ORDER if c in by]
    broken = []
    for a, b in zip(chain, chain[1:]):
        if not by[a][metric] < by[b][metric]:
            gap = abs(by[a][metric] - by[b][metric])
            se = math.hypot(by[a][f"{metric}_se"], by[b][f"{metric}_se"])
            broken.append(
                f"{a} ≥ {b} ({_g(by[a][metric], 3)} vs {_g(by[b][metric], 3)}, gap {gap / se:.1f} s.e.)"
                if se > 0
                else f"{a} ≥ {b}"
            )
    ours = " < ".join(sorted(chain, key=lambda c: by[c][metric]))
    verdict = "holds" if not broken else "broken at " + "; ".join(broken)
    return f"- {METRIC_NAMES[metric]}: {verdict}. Ours, smallest first: {ours}."


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.0f}%"


def setup_text(meta) -> str:
    """The paragraph that says what was measured."""
    if meta["base_steps"] > 0:
        ref = (
            f"Reference: the bundled tiny SFT LLaDA (`vrpo.tasks.sort.task.sft_path()`) after {meta['base_steps']} steps of "  # noqa: E501
            f"the default run (`VRPOTrainer` on its own ranked answers to the sorting task; held-out preference accuracy "  # noqa: E501
            f"{_pct(meta.get('base_acc_before'))} -> {_pct(meta.get('base_acc_after'))}), the stand-in for LLaDA "
            f"8B Instruct. Policy: VRPO from the reference for {meta['train_steps']} more steps at learning rate "
            f"{meta['learning_rate']:g}"
        )
    else:
        ref = (
            f"Reference: the bundled tiny SFT LLaDA (`vrpo.tasks.sort.task.sft_path()`). Policy: VRPO "
            f"from it for {meta['train_steps']} steps at learning rate {meta['learning_rate']:g}"
        )
    return (
        f"{ref} (held-out preference accuracy {_pct(meta.get('acc_before'))} -> {_pct(meta.get('acc_after'))}, "
        f"implicit-reward accuracy {_pct(meta.get('reward_acc'))}). Measured on {meta['pairs']} held-out pairs x "
        f"{meta['repeats']} repeats (the paper: 128 x 8), l-uniform estimator, beta = {meta['beta']}, seed "
        f"{meta['seed']}. Gradient matrix: the last layer's `self_attn.o_proj` ({meta['o_proj_shape']}; LLaDA's "
        f"`attn_out`), and the LM head ({meta['head_shape']}) in its own row."
    )


def sweep_markdown(rows) -> list[str]:
    """The distance sweep's table: (4,1,✓) against (4,1,✗) per alpha (alpha = 1 is the main table)."""
    by = {(r["alpha"], r["config"]): r for r in rows}
    alphas = sorted({a for a, _ in by if (a, "(4,1,✗)") in by and (a, "(4,1,✓)") in by})
    lines = [
        "## Antithetic sampling and the distance from the reference",
        "",
        "The policy's weights replaced by `reference + alpha * (policy - reference)` (alpha = 1: the trained "
        "policy of the tables above; alpha = 0: the reference itself, where antithetic scores are exactly 0). "
        "(4,1,✓) against (4,1,✗) on the same pairs and repeats.",
        "",
        "| alpha | mean score | Var of score ✓ | Var of score ✗ | ✗ / ✓ | Var of loss ✓ | Var of loss ✗ | ✗ / ✓ "
        "| Var of gradient ✓ | Var of gradient ✗ | ✗ / ✓ |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for alpha in alphas:
        a, b = by[(alpha, "(4,1,✓)")], by[(alpha, "(4,1,✗)")]
        cells = [f"{alpha:g}", _g(a["mean_score"], 3)]
        for metric in ("var_score", "var_loss", "var_grad"):
            cells += [_g(a[metric]), _g(b[metric]), f"{b[metric] / a[metric]:.1f}x" if a[metric] > 0 else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(all_rows, meta) -> str:
    rows = [r for r in all_rows if r["alpha"] == 1.0]
    labels = [r["config"] for r in rows]
    by = {r["config"]: r for r in rows}
    head = "| (n_t, n_yt, antithetic) | " + " | ".join(labels) + " |"
    sep = "|---|" + "---|" * len(labels)
    lines = [
        "# Variance of the VRPO estimators (the shape of the paper's Table 2)",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}); {meta['seconds']:.0f} s in all.",
        "",
        setup_text(meta),
        "",
        "## Ours beside the paper's (LLaDA 8B)",
        "",
        head,
        sep,
    ]
    for metric in METRICS:
        cells = [f"{_g(by[c][metric])} ± {_g(by[c][metric + '_se'], 1)}" for c in labels]
        lines.append(f"| {METRIC_NAMES[metric]}, ours | " + " | ".join(cells) + " |")
        if metric != "var_grad_head":
            paper_key = metric
            lines.append(
                f"| {METRIC_NAMES[metric].split(' (')[0]}, paper | "
                + " | ".join(_g(PAPER.get(c, {}).get(paper_key)) for c in labels)
                + " |"
            )
    lines.append("| Mean score, ours | " + " | ".join(_g(by[c]["mean_score"], 3) for c in labels) + " |")
    lines += [
        "",
        "## Relative to (4,1,✓) (the scales differ; the shape is the point)",
        "",
        head,
        sep,
    ]
    base = by.get(BASE.label)
    for metric in ("var_score", "var_loss", "var_grad"):
        if base is None:
            break
        ours = [_g(by[c][metric] / base[metric]) for c in labels]
        lines.append(f"| {METRIC_NAMES[metric]}, ours | " + " | ".join(ours) + " |")
        paper_base = PAPER[BASE.label][metric]
        theirs = [_g(PAPER[c][metric] / paper_base) if c in PAPER else "—" for c in labels]
        lines.append(f"| {METRIC_NAMES[metric].split(' (')[0]}, paper | " + " | ".join(theirs) + " |")
    lines += [
        "",
        "## The expected order: (8,1,✓) < (4,1,✓) < (2,2,✓) < (1,4,✓) < (1,1,✓) ≪ (4,1,✗)",
        "",
        *[order_report(rows, m) for m in METRICS],
        "",
        *sweep_markdown(all_rows),
        "Definitions: Var of score / loss = the variance across repeats (ddof 1) of each pair's `s_hat` / "
        "`-log sigmoid(s_hat)`, averaged over pairs. Var of gradient = the sum over the matrix's elements of "
        "the variance across repeats of the gradient of the summed loss, divided by the number of pairs (the "
        "trace of one pair's gradient covariance, averaged over pairs). ± = bootstrap standard error over "
        "repeats. See `benchmarks/README.md` for the discussion.",
        "",
    ]
    return "\n".join(lines)


def plot(all_rows, path) -> bool:
    """Bars per configuration, relative to (4,1,✓), ours beside the paper's, log scale; and the score
    variance of (4,1,✓) and (4,1,✗) against the distance from the reference. False when matplotlib is
    missing (``pip install vrpo[bench]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in all_rows if r["alpha"] == 1.0]
    by = {r["config"]: r for r in rows}
    labels = [r["config"] for r in rows]
    base = by[BASE.label]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.4), gridspec_kw=dict(width_ratios=[3, 3, 3, 2]))
    x = torch.arange(len(labels)).numpy()
    for ax, metric in zip(axes, ("var_score", "var_loss", "var_grad")):
        ours = [by[c][metric] / base[metric] for c in labels]
        err = [by[c][metric + "_se"] / base[metric] for c in labels]
        theirs = [PAPER[c][metric] / PAPER[BASE.label][metric] if c in PAPER else float("nan") for c in labels]
        ax.bar(x - 0.2, ours, 0.4, yerr=err, label="ours (tiny LLaDA)", color="tab:blue", capsize=2)
        ax.bar(x + 0.2, theirs, 0.4, label="paper (LLaDA 8B)", color="tab:orange")
        ax.set_yscale("log")
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(METRIC_NAMES[metric], fontsize=10)
        ax.axhline(1.0, color="gray", lw=0.6)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("variance relative to (4,1,✓)")
    axes[0].legend(fontsize=8)
    ax = axes[3]
    for label, color in (("(4,1,✓)", "tab:green"), ("(4,1,✗)", "tab:red")):
        points = sorted((r["alpha"], r["var_score"], r["var_score_se"]) for r in all_rows if r["config"] == label)
        a, v, e = zip(*points)
        ax.errorbar(a, v, yerr=e, marker="o", label=label, color=color, capsize=2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("alpha: policy = ref + alpha (policy - ref)")
    ax.set_title("Var of score vs distance from the reference", fontsize=10)
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("VRPO estimator variance by (n_t, n_yt, antithetic), tiny LLaDA on the toy task")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(
    out_dir=str(RESULTS),
    quick=False,
    seed=42,
    progress=True,
    settings=SETTINGS,
    command="python -m benchmarks.variance",
    **overrides,
) -> list[dict]:
    """Train, measure, and write ``variance.{csv,md,png}`` under ``out_dir``. Returns the rows.

    ``overrides``: any of ``base_steps, train_steps, learning_rate, pairs, repeats, chunk, alphas`` (None
    keeps the default of the full or quick size). The rows are the configurations (``alpha = 1``), then
    the distance sweep's (see :func:`distance_sweep`).
    """
    sizes = dict(QUICK if quick else FULL)
    minimum = dict(base_steps=0, train_steps=1, pairs=1, repeats=2, chunk=1)
    for key, value in overrides.items():
        if key not in sizes:
            raise TypeError(f"run: unknown size {key!r}")
        if value is None:
            continue
        if key == "alphas" and not all(0 < a < 1 for a in value):
            raise ValueError(f"--alphas must lie in (0, 1), got {value}")
        if key == "learning_rate" and not value > 0:
            raise ValueError(f"--learning_rate must be > 0, got {value}")
        if key in minimum and value < minimum[key]:
            raise ValueError(f"--{key} must be at least {minimum[key]}, got {value}")
        sizes[key] = value
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="vrpo-variance-") as workdir:
        trainer, info = train_policy(
            sizes["base_steps"],
            sizes["train_steps"],
            sizes["learning_rate"],
            seed,
            workdir,
            eval_size=max(sizes["pairs"], 8),
            quick=quick,
        )
        rows = measure(trainer, settings, sizes["pairs"], sizes["repeats"], seed, sizes["chunk"], progress)
        rows += distance_sweep(
            trainer, sizes["alphas"], sizes["pairs"], sizes["repeats"], seed, sizes["chunk"], progress
        )
    mats = gradient_matrices(trainer.policy_model)
    meta = dict(
        command=command,
        date=datetime.date.today().isoformat(),
        machine=machine(),
        seconds=time.perf_counter() - t0,
        seed=seed,
        beta=trainer.config.beta,
        **sizes,
        **info,
        o_proj_shape="x".join(map(str, mats["var_grad"].shape)),
        head_shape="x".join(map(str, mats["var_grad_head"].shape)),
    )
    os.makedirs(out_dir, exist_ok=True)
    write_csv(rows, os.path.join(out_dir, "variance.csv"), CSV_COLUMNS)
    with open(os.path.join(out_dir, "variance.md"), "w", encoding="utf-8") as f:
        f.write(markdown(rows, meta))
    if not plot(rows, os.path.join(out_dir, "variance.png")):
        print("matplotlib is not installed: variance.png not written (pip install 'vrpo[bench]')")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes that run in seconds (smoke test)")
    parser.add_argument("--out", default=str(RESULTS), help="output directory (default: benchmarks/results)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the training run and of every mask draw")
    parser.add_argument(
        "--base_steps",
        type=int,
        default=None,
        help=f"stage 1: default-run steps that train the reference from the bundled SFT model "
        f"({FULL['base_steps']}; 0: the reference is the SFT model)",
    )
    parser.add_argument(
        "--train_steps",
        type=int,
        default=None,
        help=f"stage 2: VRPO steps from the reference to the policy ({FULL['train_steps']})",
    )
    parser.add_argument(
        "--learning_rate", type=float, default=None, help=f"stage 2 learning rate ({FULL['learning_rate']})"
    )
    parser.add_argument("--pairs", type=int, default=None, help=f"held-out pairs ({FULL['pairs']})")
    parser.add_argument("--repeats", type=int, default=None, help=f"repeats per configuration ({FULL['repeats']})")
    parser.add_argument("--chunk", type=int, default=None, help=f"pairs per forward/backward ({FULL['chunk']})")
    parser.add_argument(
        "--alphas",
        type=float,
        nargs="*",
        default=None,
        help=f"distance sweep: policy = ref + alpha (policy - ref) ({' '.join(map(str, FULL['alphas']))})",
    )
    args = parser.parse_args(argv)
    argv_str = " ".join(["python -m benchmarks.variance", *(argv if argv is not None else sys.argv[1:])])
    rows = run(
        args.out,
        args.quick,
        args.seed,
        command=argv_str,
        base_steps=args.base_steps,
        train_steps=args.train_steps,
        learning_rate=args.learning_rate,
        pairs=args.pairs,
        repeats=args.repeats,
        chunk=args.chunk,
        alphas=None if args.alphas is None else tuple(args.alphas),
    )
    with open(os.path.join(args.out, "variance.md"), encoding="utf-8") as f:
        print(f.read())
    return rows


if __name__ == "__main__":
    main()
