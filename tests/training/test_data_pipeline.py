"""Load: 10,000 pairs through read -> tokenize -> collate -> pack, with flat memory."""

from __future__ import annotations

import json
import time

import numpy as np
import psutil

from vrpo.models import build_tiny_tokenizer, pack_rows
from vrpo.models.tokenization import collate
from vrpo.tasks.sort.task import make_pairs
from vrpo.training.data import DataStats, read_preference_rows, tokenize_pairs


def test_ten_thousand_pairs_flow_with_flat_memory(tmp_path, record_property):
    path = tmp_path / "pairs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for pair in make_pairs(10_000, seed=1):
            f.write(json.dumps(pair) + "\n")
    tokenizer = build_tiny_tokenizer(vocab_size=136)
    process = psutil.Process()

    t0 = time.perf_counter()
    stats = DataStats()
    rows = read_preference_rows(str(path), stats=stats)
    pairs = tokenize_pairs(rows, tokenizer, max_length=64, stats=stats, progress=False)
    t_tokenize = time.perf_counter() - t0
    assert len(pairs) == stats.kept == 10_000 - sum(stats.skipped.values())

    def one_pass():
        pad = tokenizer.pad_token_id
        for start in range(0, len(pairs), 64):
            seqs = [pairs.sequence(i, side) for side in (0, 1) for i in range(start, min(start + 64, len(pairs)))]
            batch = collate(seqs, pad)
            lengths = batch["attention_mask"].sum(-1)
            pack_rows([batch["input_ids"][b, : lengths[b]] for b in range(len(seqs))], 256, pad)

    one_pass()  # warm: allocator pools and caches settle
    rss = [process.memory_info().rss]
    t0 = time.perf_counter()
    for _ in range(3):
        one_pass()
        rss.append(process.memory_info().rss)
    t_pass = (time.perf_counter() - t0) / 3
    growth_mb = (max(rss) - rss[0]) / 2**20
    record_property("tokenize_pairs_per_s", len(pairs) / t_tokenize)
    record_property("collate_pack_pairs_per_s", len(pairs) / t_pass)
    record_property("rss_growth_mb", growth_mb)
    print(f"tokenize {len(pairs) / t_tokenize:.0f} pairs/s, collate+pack {len(pairs) / t_pass:.0f} pairs/s, "
          f"RSS growth over 3 passes {growth_mb:.1f} MB")
    assert growth_mb < 20, rss
    # The compact store: a few bytes per token, not Python objects per token.
    assert pairs._flat()[0].dtype == np.int32
