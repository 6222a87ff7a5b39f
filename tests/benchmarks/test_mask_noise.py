"""``python -m benchmarks.mask_noise``: the buckets and the two variance parts are what they say, and with the
policy equal to the reference the antithetic score has no mask noise at all."""

from __future__ import annotations

import pytest
import torch

from benchmarks import mask_noise


def test_buckets_cover_every_pair_in_order():
    """Catches a pair dropped at an edge or counted twice, and buckets out of length order."""
    lengths = [17, 33, 21, 22, 27, 28]
    got = mask_noise.buckets(lengths, (21, 27))
    assert got == {"17-21": [0, 2], "22-27": [3, 4], "28-33": [1, 5]}
    assert mask_noise.buckets([9, 7, 9], ()) == {"7": [1], "9": [0, 2]}


def test_parts_split_mask_noise_from_pair_spread():
    """Pairs with fixed true scores (spread 1) plus mask noise of variance 4, 4 draws each: the mask part is 4 and
    the pair part the spread of the true scores, not inflated by the noise left in the means (4 / 4 = 1 more)."""
    g = torch.Generator().manual_seed(0)
    true = torch.tensor([-1.0, 1.0] * 2000, dtype=torch.float64)  # variance ~1
    scores = true + 2 * torch.randn(4, 4000, generator=g, dtype=torch.float64)
    mask, se, pair = mask_noise.parts(scores, list(range(4000)))
    assert mask == pytest.approx(4.0, rel=0.05) and se < 0.1
    assert pair == pytest.approx(true.var().item(), abs=0.2)


@pytest.mark.slow
def test_a_policy_equal_to_the_reference_has_no_mask_noise(tmp_path):
    """The SFT model against itself: with antithetic masks every score is exactly 0 (catches reference terms on
    other masks than the policy's), and the rows and files are written."""
    from vrpo.tasks import get_task

    rows = mask_noise.main(
        [
            "--task",
            "sort",
            "--policy",
            get_task("sort").model_path(),
            "--repeats",
            "2",
            "--quick",
            "--out",
            str(tmp_path),
        ]
    )
    assert rows[-1]["tokens"] == "all" and rows[-1]["pairs"] == 16
    assert all(r["mask_var"] == 0 for r in rows)
    assert (tmp_path / "mask_noise_sort.md").read_text().count("| all | 16 |") == 1
