"""The README's promises that code can check: its API example runs, and CI runs its test command."""

from __future__ import annotations

import pathlib
import re

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- test-command -->\n```bash\n(.+)\n```", readme)
    assert match, "README.md lost its test-command block"
    assert "awk '/<!-- test-command -->/" in (ROOT / ".ci" / "run").read_text()
    assert "pytest" in match.group(1)


def test_readme_api_example_runs():
    from vrpo import SamplingPlan, draw_masks, elbo_estimate, elbo_terms, vrpo_loss
    from vrpo.models import build_tiny_llada

    policy = build_tiny_llada(seed=0, vocab_size=128)
    ref = build_tiny_llada(seed=0, vocab_size=128)
    mask_id = policy.config.mask_token_id
    g = torch.Generator().manual_seed(0)
    ids_w, ids_l = torch.randint(0, 100, (2, 12), generator=g), torch.randint(0, 100, (2, 12), generator=g)
    resp_w = resp_l = torch.arange(12).expand(2, 12) >= 5

    plan = SamplingPlan(n_t=8, n_yt=1, estimator="l_uniform", antithetic=True, stratified=False)
    draw_w, draw_l = draw_masks(resp_w, plan, generator=g), draw_masks(resp_l, plan, generator=g)
    pc = elbo_estimate(policy, ids_w, resp_w, draw_w, mask_token_id=mask_id)
    pr = elbo_estimate(policy, ids_l, resp_l, draw_l, mask_token_id=mask_id)
    with torch.inference_mode():
        rc = elbo_estimate(ref, ids_w, resp_w, draw_w, mask_token_id=mask_id)
        rr = elbo_estimate(ref, ids_l, resp_l, draw_l, mask_token_id=mask_id)
    loss, metrics = vrpo_loss(pc, pr, rc.clone(), rr.clone(), beta=0.2)
    loss.backward()
    assert loss.item() == torch.nn.functional.softplus(torch.tensor(0.0)).item()  # policy == reference
    assert metrics["rewards/margins"].item() == 0.0
    assert policy.lm_head.weight.grad is not None
    terms = elbo_terms(policy, ids_w, resp_w, draw_w, mask_id)
    assert terms.shape == (2, 8)
