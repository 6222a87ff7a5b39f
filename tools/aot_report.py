"""Compile every kernel configuration ahead of time for Hopper (sm_90) and report its resources.

    python -m tools.aot_report [--only SUBSTRING] [--jobs J] [--offsets]

No GPU is needed: each configuration is compiled with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))``,
then the ptxas bundled in triton (the one triton itself uses for sm_90) assembles the PTX with
``-v --gpu-name=sm_90a``; its report gives registers and spill bytes, triton's metadata the dynamic
shared memory. Configurations come from ``aot_specs()`` in each kernel module, a list of dicts with
``name, fn, signature, constexprs, num_warps, num_stages`` (and optionally ``attrs``).

The last line is ``N configurations, max registers R, spill bytes S, max shared B``. The exit status
is non-zero when a configuration fails to compile, spills, or needs more shared memory per block
than Hopper has (227 KB).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

KERNEL_MODULES = ("vrpo_kernels.masked_linear_ce", "vrpo_kernels.mask_sampling", "vrpo_kernels.attention")
HOPPER_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
TARGET = ("cuda", 90, 32)


@dataclass
class Report:
    name: str
    registers: int = 0
    spill_bytes: int = 0
    shared: int = 0
    num_warps: int = 0
    num_stages: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.spill_bytes == 0 and self.shared <= HOPPER_SHARED_LIMIT


def bundled_ptxas(arch: int = 90) -> str | None:
    """Path of the ptxas that triton ships and uses for ``arch``, or None when it is absent."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(arch).path
    except Exception:
        return None
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def collect_specs(modules=KERNEL_MODULES) -> list[dict]:
    """The configurations of every kernel module that defines ``aot_specs()``."""
    specs = []
    for mod_name in modules:
        module = importlib.import_module(mod_name)
        fn = getattr(module, "aot_specs", None)
        if fn is not None:
            specs.extend(fn())
    return specs


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "smem": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas(log: str) -> dict:
    """Registers, spill bytes (stores + loads) and static shared memory from a ``ptxas -v`` log."""

    def total(key):
        return sum(int(x) for x in _PTXAS_RE[key].findall(log))

    regs = [int(x) for x in _PTXAS_RE["registers"].findall(log)]
    if not regs:
        raise RuntimeError(f"no register count in the ptxas report:\n{log}")
    return dict(registers=max(regs), spill_bytes=total("spill_stores") + total("spill_loads"), smem=total("smem"))


def inspect_one(spec: dict, ptxas: str) -> Report:
    """Compile one configuration for sm_90 and read its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rep = Report(spec["name"], num_warps=spec["num_warps"], num_stages=spec["num_stages"])
    try:
        src = ASTSource(spec["fn"], spec["signature"], spec.get("constexprs"), spec.get("attrs"))
        compiled = triton.compile(
            src,
            target=GPUTarget(*TARGET),
            options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]},
        )
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "kernel.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            run = subprocess.run(
                [ptxas, "-v", "--gpu-name=sm_90a", ptx, "-o", os.path.join(tmp, "kernel.cubin")],
                capture_output=True,
                text=True,
            )
        if run.returncode != 0:
            raise RuntimeError(f"ptxas failed ({run.returncode}):\n{run.stderr[-2000:]}")
        res = parse_ptxas(run.stdout + run.stderr)
        rep.registers = res["registers"]
        rep.spill_bytes = res["spill_bytes"]
        rep.shared = max(int(compiled.metadata.shared), res["smem"])
    except Exception as exc:  # report every configuration, then fail at the end
        rep.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return rep


_ADDPTR_RE = re.compile(r"tt\.addptr %[\w#]+, %[\w#]+ : tensor<([\dx]+)x!tt\.ptr<\w+>>, tensor<[\dx]+x(i\d+)>")


def compile_ir(spec: dict, stage: str = "ttir") -> str:
    """The ``stage`` IR ("ttir", "ttgir", "ptx") of one configuration compiled for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(spec["fn"], spec["signature"], spec.get("constexprs"), spec.get("attrs"))
    compiled = triton.compile(
        src, target=GPUTarget(*TARGET), options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
    )
    return compiled.asm[stage]


def tensor_offset_types(ttir: str) -> list[tuple[str, str]]:
    """(tensor shape, offset integer type) of every ``tt.addptr`` on a tensor of pointers in ``ttir``:
    an ``i32`` offset of a [rows, cols] tile wraps once ``rows * stride`` passes 2^31 elements."""
    return _ADDPTR_RE.findall(ttir)


def _inspect_indexed(args):
    index, ptxas = args
    return inspect_one(collect_specs()[index], ptxas)


def run(only: str | None = None, jobs: int = 1, out=sys.stdout) -> tuple[list[Report], int]:
    """Inspect every configuration; print one line each and the summary. Returns (reports, exit code)."""
    ptxas = bundled_ptxas()
    if ptxas is None:
        print("triton's bundled ptxas for sm_90 was not found; cannot inspect", file=out)
        return [], 2
    specs = collect_specs()
    indices = [i for i, s in enumerate(specs) if only is None or only in s["name"]]
    print(f"target sm_90 (GPUTarget{TARGET}), ptxas: {ptxas}", file=out)
    if jobs > 1:
        # Fresh processes: each compiles its share without touching a GPU.
        with ProcessPoolExecutor(jobs) as pool:
            reports = list(pool.map(_inspect_indexed, [(i, ptxas) for i in indices]))
    else:
        reports = [inspect_one(specs[i], ptxas) for i in indices]
    width = max((len(r.name) for r in reports), default=10)
    print(f"{'configuration':<{width}}  warps stages  registers  spill_bytes  shared_bytes  status", file=out)
    for r in reports:
        if r.error:
            status = f"FAILED: {r.error}"
        elif r.spill_bytes:
            status = "SPILLS"
        elif r.shared > HOPPER_SHARED_LIMIT:
            status = f"SHARED > {HOPPER_SHARED_LIMIT}"
        else:
            status = "ok"
        print(
            f"{r.name:<{width}}  {r.num_warps:>5} {r.num_stages:>6}  {r.registers:>9}  {r.spill_bytes:>11}  "
            f"{r.shared:>12}  {status}",
            file=out,
        )
    max_regs = max((r.registers for r in reports), default=0)
    spills = sum(r.spill_bytes for r in reports)
    max_shared = max((r.shared for r in reports), default=0)
    print(
        f"{len(reports)} configurations, max registers {max_regs}, spill bytes {spills}, max shared {max_shared}",
        file=out,
    )
    code = 0 if reports and all(r.ok for r in reports) else 1
    return reports, code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.aot_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="inspect only configurations whose name contains this substring")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compile processes")
    parser.add_argument(
        "--offsets",
        action="store_true",
        help="instead of resources, print the integer type of every tile pointer offset (TTIR)",
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: ahead-of-time compilation needs the real compiler", file=sys.stderr)
        return 2
    # Triton 3.9 warns that its FP-fusion default will change; pin today's default (fusion on), which
    # is what the kernels are launched with, so the report matches the runtime and stays quiet.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if args.offsets:
        for spec in collect_specs():
            if args.only is None or args.only in spec["name"]:
                offsets = tensor_offset_types(compile_ir(spec))
                print(spec["name"], " ".join(f"{shape}:{ty}" for shape, ty in offsets))
        return 0
    _, code = run(args.only, args.jobs)
    return code


if __name__ == "__main__":
    sys.exit(main())
