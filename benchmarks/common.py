"""What every benchmark shares: the machine line, quantiles, the CSV writer, where results go and how
peak memory is measured."""

from __future__ import annotations

import csv
import gc
import io
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from vrpo.files import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


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
    """``rows`` as CSV with ``columns`` (missing or None values left empty, extra keys ignored), written
    atomically: an interrupted write, or a reader in another process, never sees half a file."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    atomic_write_text(path, text.getvalue())


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
    once), then the text on stdout."""
    (out / f"{name}.md").write_text(text)
    if not draw(out / f"{name}.png"):
        print(f"matplotlib is not installed: {name}.png not written (pip install 'vrpo[bench]')")
    print(text)
