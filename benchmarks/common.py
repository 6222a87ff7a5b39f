"""What every benchmark shares: where results go, the machine line, quantiles, the CSV writer and reader, a
report's heading, a training run of the sorting demo and how peak memory is measured."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import gc
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vrpo.files import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"  # the committed results; every default --out


def machine() -> str:
    """The device, cores and torch build a result was measured on."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return (
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )


def median_p20_p80(xs) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile), linearly interpolated."""
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return statistics.median(xs), q[1], q[7]


def write_csv(rows: list[dict], path, columns) -> None:
    """``rows`` as CSV with ``columns`` (missing or None values left empty, extra keys ignored), written
    atomically: an interrupted write, or a reader in another process, never sees half a file."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    atomic_write_text(path, text.getvalue())


def read_rows(path: Path, text: tuple[str, ...] = (), ints: tuple[str, ...] = ()) -> list[dict]:
    """The rows of a CSV that :func:`write_csv` wrote (none when it does not exist yet), numbers parsed:
    the ``text`` columns stay strings, the ``ints`` become int, every other column float; an empty cell is None."""
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k not in text:
                r[k] = None if v == "" else int(v) if k in ints else float(v)
    return rows


def mean_sd(xs) -> tuple[float, float]:
    """Mean and sample sd of the numbers in ``xs`` that are there (None and NaN dropped); NaN for what one or no
    number cannot give."""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def plus_minus(mean: float, sd: float, scale: float = 1.0, digits: int = 1) -> str:
    """``"mean ± sd"`` scaled (``"n/a"`` for a NaN mean; no ``±`` for a NaN sd, a single seed's)."""
    if math.isnan(mean):
        return "n/a"
    s = f"{scale * mean:.{digits}f}"
    return s if math.isnan(sd) else f"{s} ± {scale * sd:.{digits}f}"


# The figures every training run's summary reports: graded generations and held-out preference accuracy.
SUMMARY_METRICS = (
    "gen_acc_before",
    "gen_acc_after",
    "gen_credit_before",
    "gen_credit_after",
    "pref_acc_before",
    "pref_acc_after",
)


def report_heading(title: str, command: str, *notes: str) -> list[str]:
    """The first lines of a benchmark's Markdown report: ``# title (date, machine)``, each note as a
    paragraph, then the command that made it."""
    lines = [f"# {title} ({time.strftime('%Y-%m-%d')}, {machine()})", ""]
    for note in notes:
        lines += [note, ""]
    return lines + [f"Command: `{command}`", ""]


@dataclass(frozen=True)
class DemoRun:
    """A finished training run on the sorting demo: its summary (``summary.json``), the records it logged
    (``logs/metrics.jsonl``, in order) and its wall time in seconds, building the trainer included."""

    summary: dict
    records: list[dict]
    wall_s: float

    def mean(self, key: str) -> float:
        """The mean of a metric over the records that logged it as a float; NaN when none did (``score/var``
        with n_t = 1: one sample cannot estimate it)."""
        values = [r[key] for r in self.records if isinstance(r.get(key), float)]
        return statistics.fmean(values) if values else float("nan")


def train_demo(config, callbacks=()) -> DemoRun:
    """Build the trainer of ``config`` (:func:`vrpo.training.trainer_for`) on its bundled task (``config.task``,
    whose presets fill what ``config`` leaves unset), train it and read back what it logged."""
    from vrpo.tasks import get_task  # here, so that benchmarks without a training run do not import it
    from vrpo.training import trainer_for

    t0 = time.perf_counter()
    summary = trainer_for(config, task=get_task(config.task), callbacks=callbacks).train()
    wall = time.perf_counter() - t0
    return DemoRun(summary, read_records(config.output_dir), wall)


class StepClock:
    """An ``on_step_end`` callback: the seconds spent in optimizer steps (``seconds``)."""

    def __init__(self):
        self.seconds = 0.0

    def on_step_end(self, trainer, step: int, seconds: float):
        self.seconds += seconds


def advised(row: dict, criterion: str = "noise") -> int | None:
    """The n_t the advisor gives for a run's whole-run variances (a results row's ``var_mask``, ``var_pairs``,
    ``batch``, ``n_t`` and ``n_yt``, 1 where the row has none) under ``criterion``; None for a run that could not
    estimate them (n_t = 1). Recomputed from the CSV, so that every run is judged by the same advisor."""
    from vrpo.estimator import SamplingPlan
    from vrpo.training.advisor_tally import advice_of

    if row["var_mask"] is None or row["var_pairs"] is None:
        return None
    plan = SamplingPlan(n_t=int(row["n_t"]), n_yt=int(row.get("n_yt", 1)))
    return advice_of(row["var_mask"], row["var_pairs"], int(row["batch"]), plan, criterion).n_t


def read_records(run_dir) -> list[dict]:
    """The records a training run in ``run_dir`` logged (``logs/metrics.jsonl``), in order."""
    with open(os.path.join(run_dir, "logs", "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock beside ``path``, so that parallel pieces of a study append without losing rows."""
    with open(str(path) + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def output_dir(out, quick: bool) -> Path:
    """The folder a benchmark writes to: ``out``, except that a ``--quick`` run aimed at the committed
    ``benchmarks/results`` writes to a fresh temporary folder instead, so that toy-size numbers never
    replace measured ones."""
    out = Path(out)
    if quick and out.resolve() == RESULTS.resolve():
        out = Path(tempfile.mkdtemp(prefix="vrpo-bench-quick-"))
        print(f"--quick: results go to {out}, not over the committed {RESULTS}", file=sys.stderr)
    return out


def memory_probe_env(mmap_threshold: int = 65536) -> dict:
    """The environment of a fresh process that measures CPU peak memory with :func:`peak_extra_bytes`.

    glibc then serves blocks of ``mmap_threshold`` bytes or more with mmap and trims its heap above
    that much free memory, so freed tensors go back to the OS and the RSS tracks live tensors (cached
    arenas would hide a call's peak from the RSS delta). The repository goes first on PYTHONPATH.
    """
    threshold = str(mmap_threshold)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=threshold, MALLOC_TRIM_THRESHOLD_=threshold)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(RESULTS.parents[1]), env.get("PYTHONPATH")]))
    return env


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_peak_memory_available() -> bool:
    """Whether the kernel lets a process reset its peak RSS (Linux >= 4.0)."""
    return os.path.exists("/proc/self/clear_refs")


def peak_extra_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Bytes that one call of ``fn`` uses at its peak above what was in use just before it.

    CPU: the peak RSS (VmHWM, reset through ``/proc/self/clear_refs``) minus the RSS before the call;
    run it in a fresh process started with :func:`memory_probe_env`, after a warm-up call. CUDA:
    ``torch.cuda.max_memory_allocated`` during the call minus ``memory_allocated`` before it.
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = _proc_status_bytes("VmRSS")
        result = fn()
        peak = _proc_status_bytes("VmHWM")
    del result
    return peak - before


def write_report(out: Path, name: str, text: str, draw: Callable[[Path], bool]) -> None:
    """``out/name.md`` from ``text`` and ``out/name.png`` from ``draw(path)`` (False: matplotlib is missing, said
    once; None: nothing to draw), then the text on stdout."""
    (out / f"{name}.md").write_text(text)
    if draw(out / f"{name}.png") is False:  # None: nothing to draw
        print(f"matplotlib is not installed: {name}.png not written (pip install 'vrpo[bench]')")
    print(text)
