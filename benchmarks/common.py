"""What every benchmark shares: the machine line, quantiles and the CSV writer."""

from __future__ import annotations

import csv
import os
import platform
import statistics

import torch


def machine() -> str:
    """The device, cores and torch build a result was measured on."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


def median_p20_p80(xs) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile), linearly interpolated."""
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return statistics.median(xs), q[1], q[7]


def write_csv(rows: list[dict], path, columns) -> None:
    """``rows`` as CSV with ``columns`` (missing or None values left empty, extra keys ignored)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
