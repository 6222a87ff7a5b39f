"""The ``"triton"`` paths: launch settings, launchers and the AOT specs (``python -m tools.aot_report``)."""

from __future__ import annotations

import torch

from .._triton_utils import aot_spec, on_device
from ..dispatch import triton_available
from .common import KeyedDraw, _check_inputs, _floor_words

if triton_available():
    import triton

    from .kernels import _keyed_draw_kernel, _sample_masks_kernel


# On a GPU a 1024-position chunk covers most responses in one pass; in the interpreter a small chunk
# keeps the tests' rows spanning several chunks.
_GPU_CONFIG = dict(BLOCK_L=1024, num_warps=4, num_stages=2)
_INTERPRETER_CONFIG = dict(BLOCK_L=64, num_warps=4, num_stages=1)


def philox_seed(generator: torch.Generator | None, device: torch.device) -> int:
    """A 62-bit Philox seed drawn from ``generator`` (the global RNG of ``device`` when None)."""
    gen_device = generator.device if generator is not None else device
    return int(torch.randint(2**62, (1,), generator=generator, device=gen_device).item())


def sample_masks_triton(response_mask, counts=None, probs=None, generator=None, config=None):
    """Triton mask sampler: bool [B, n, L]. ``config`` overrides the block size (tests)."""
    level = _check_inputs(response_mask, counts, probs)
    B, L = response_mask.shape
    n = level.shape[1]
    dev = response_mask.device
    seed = philox_seed(generator, dev)
    masked = torch.empty((B, n, L), dtype=torch.int8, device=dev)
    if B * n * L:
        cfg = config or (_GPU_CONFIG if dev.type == "cuda" else _INTERPRETER_CONFIG)
        level_arg = counts.long().contiguous() if counts is not None else probs.float().contiguous()
        with on_device(response_mask):
            _sample_masks_kernel[(B * n,)](
                response_mask.contiguous().view(torch.int8),
                level_arg,
                masked,
                seed,
                L,
                n,
                EXACT=counts is not None,
                ONE_CHUNK=L <= cfg["BLOCK_L"],
                **cfg,
            )
    return masked.view(torch.bool)


def aot_specs() -> list[dict]:
    """The mask kernel's GPU configurations: l-uniform / t-Bernoulli, rows of one chunk or several."""
    if not triton_available():
        return []
    specs = []
    for exact in (True, False):
        for one_chunk in (True, False):
            specs.append(
                aot_spec(
                    f"mask_sampling[{'l_uniform' if exact else 't_bernoulli'},{'one_chunk' if one_chunk else 'chunked'}]",  # noqa: E501
                    _sample_masks_kernel,
                    pointers={"resp_ptr": "i8", "level_ptr": "i64" if exact else "fp32", "masked_ptr": "i8"},
                    # A 62-bit seed; a row length and a sample count that are not multiples of 16.
                    scalars={"seed": 2**61 + 3, "L": 1000 if one_chunk else 4001, "n_samples": 6},
                    constexprs={"EXACT": exact, "ONE_CHUNK": one_chunk, "BLOCK_L": _GPU_CONFIG["BLOCK_L"]},
                    num_warps=_GPU_CONFIG["num_warps"],
                    num_stages=_GPU_CONFIG["num_stages"],
                )
            )
    specs += _keyed_aot_specs()
    return specs


def _keyed_aot_specs() -> list[dict]:
    """The keyed-draw kernel at the GPU configurations: rows of 1000 (in registers), of 4001 (chunked)
    and of 100 (a 128-wide block, one warp), each estimator."""
    specs = []
    for L, stratified in ((1000, False), (4001, True), (100, True)):
        cfg = keyed_launch_config(L, torch.device("cuda"))
        for l_uniform in (True, False):
            specs.append(
                aot_spec(
                    f"keyed_draw[{'l_uniform' if l_uniform else 't_bernoulli'},L={L},"
                    f"block={cfg['BLOCK_L']}x{cfg['SAMPLES']}]",
                    _keyed_draw_kernel,
                    pointers={
                        "ids_ptr": "i64",
                        "resp_ptr": "i8",
                        "keys_ptr": "i64",
                        "noisy_ptr": "i64",
                        "masked_ptr": "i8",
                        "weight_ptr": "fp32",
                        "levels_ptr": "fp32",
                    },
                    scalars={
                        "mask_token_id": 126336,
                        "L": L,
                        "n_samples": 8 * 37,
                        "n_t": 8,
                        "n_yt": 1,
                        "c_floor": 0.999,
                        "e_floor": 1e-3,
                    },
                    constexprs={
                        "L_UNIFORM": l_uniform,
                        "STRATIFIED": stratified,
                        "ONE_CHUNK": L <= cfg["BLOCK_L"],
                        "BLOCK_L": cfg["BLOCK_L"],
                        "SAMPLES": cfg["SAMPLES"],
                    },
                    num_warps=cfg["num_warps"],
                    num_stages=cfg["num_stages"],
                )
            )
    return specs


# Launch settings of the keyed-draw kernel: BLOCK_L is the row length rounded up to a power of two, at
# most MAX_BLOCK_L (longer rows are swept in chunks). On the GPU one sample a program, with a warp per
# 256 positions (several samples a program spill registers at sm_90 for t-Bernoulli); in the
# interpreter, whose cost is per operation, a tile of TILE positions (many samples a program), and
# 64-wide chunks so that the tests' rows span several.
_KEYED_GPU = dict(MAX_BLOCK_L=1024, num_stages=1)
# No fused multiply-add: t-Bernoulli's p = c * t + e must round twice, as the torch path does.
KEYED_COMPILE_OPTIONS = dict(enable_fp_fusion=False)
_KEYED_INTERPRETER = dict(MAX_BLOCK_L=64, TILE=16384, num_warps=4, num_stages=1)


def keyed_launch_config(L: int, device: torch.device) -> dict:
    """``BLOCK_L``, ``SAMPLES``, ``num_warps`` and ``num_stages`` of the keyed-draw kernel for rows of L."""
    if device.type == "cuda":
        block = min(_KEYED_GPU["MAX_BLOCK_L"], triton.next_power_of_2(max(L, 32)))
        return dict(
            BLOCK_L=block, SAMPLES=1, num_warps=min(4, max(1, block // 256)), num_stages=_KEYED_GPU["num_stages"]
        )
    t = _KEYED_INTERPRETER
    block = min(t["MAX_BLOCK_L"], triton.next_power_of_2(max(L, 2)))
    return dict(BLOCK_L=block, SAMPLES=t["TILE"] // block, num_warps=t["num_warps"], num_stages=t["num_stages"])


def _keyed_draw_triton(input_ids, response_mask, keys, plan, mask_token_id, config=None) -> KeyedDraw:
    B, L = input_ids.shape
    n = plan.n_t * plan.n_yt
    dev = input_ids.device
    noisy = torch.empty((B, n, L), dtype=torch.int64, device=dev)
    masked = torch.empty((B, n, L), dtype=torch.int8, device=dev)
    weight = torch.empty((B, n), dtype=torch.float32, device=dev)
    levels = torch.empty((B, plan.n_t), dtype=torch.float32, device=dev)
    if B * L:
        cfg = config or keyed_launch_config(L, dev)
        c, e = _floor_words(plan.t_floor)
        with on_device(input_ids):
            _keyed_draw_kernel[(triton.cdiv(B * n, cfg["SAMPLES"]),)](
                input_ids.contiguous(),
                response_mask.contiguous().view(torch.int8),
                keys.contiguous(),
                noisy,
                masked,
                weight,
                levels,
                mask_token_id,
                L,
                B * n,
                plan.n_t,
                plan.n_yt,
                c,
                e,
                L_UNIFORM=plan.estimator == "l_uniform",
                STRATIFIED=plan.stratified,
                ONE_CHUNK=L <= cfg["BLOCK_L"],
                **KEYED_COMPILE_OPTIONS,
                **cfg,
            )
    return KeyedDraw(noisy, masked.view(torch.bool), weight, levels)
