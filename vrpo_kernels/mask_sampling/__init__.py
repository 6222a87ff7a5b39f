"""Mask sampling for the masked-diffusion ELBO: which response tokens each sample hides.

Given a row's response positions and a per-sample *level*, draw one mask per sample:

* ``counts`` (the l-uniform estimator): exactly ``counts[b, j]`` response positions of row ``b``
  are masked, chosen uniformly without replacement;
* ``probs`` (the t-Bernoulli estimator): every response position is masked independently with
  probability ``probs[b, j]``.

Positions outside ``response_mask`` (prompt, padding) are never masked.

Entry point: :func:`sample_masks` with ``impl=``. The ``"torch"`` path draws from a
``torch.Generator``; the ``"triton"`` path derives its bits from ``(seed, position, sample)`` with
Philox, the seed itself drawn from the generator, so the same generator seed reproduces the same
masks (the policy and the reference can share a draw without storing it). The two paths give the
same distribution, not the same bits.

Keyed draw (:func:`keyed_noisy_draw`): one definition, two implementations with the same bits
------------------------------------------------------------------------------------------------

Every random bit of row ``b``'s draw comes from Philox4x32-10 (Salmon et al., "Parallel random
numbers: as easy as 1, 2, 3", SC 2011) under the row's 64-bit key ``k = k1 * 2^32 + k0`` (the two
32-bit key words), at counters that name a sample and a *response position*, never a row position.
Write ``X(c0, c1, c2, c3) = (x0, x1, x2, x3)`` for the four 32-bit output words under key ``k``, and
for a row with ``L_b`` response tokens, ``n = n_t * n_yt`` samples (sample ``s = j * n_yt + m`` is mask
``m`` of level ``j``) and response position ``p = 0..L_b-1`` (the p-th response token of the row in
row order, so prompt, padding and the row's batch slot never change a bit):

Counter layout (``c2`` is a purpose tag)::

    level words     X(j, 0, 1, 0)           j = 0..n_t-1 (stratified: j = 0 only, the row's offset)
    position key    K[s, p] = word (p mod 4) of X(floor(p / 4), s, 0, 0)

Levels. ``R_j(m) = floor((x1 * 2^32 + x0) * m / 2^64)`` with ``(x0, x1)`` the first words of
``X(j, 0, 1, 0)`` is uniform on ``{0..m-1}`` (up to ``m / 2^64`` per value); ``a_j = x0 >> 8`` (24 bits).

* l-uniform: ``l_j = R_j(L_b) + 1``; stratified: ``l_j = floor((j * L_b + R_0(L_b)) / n_t) + 1``, which is
  exactly ``floor(u_j L_b) + 1`` for ``u_j = (j + u) / n_t`` and a uniform offset ``u``.
  Weight ``L_b / l_j`` (float32, correctly rounded).
* t-Bernoulli: ``t_j = (2^24 - a_j) / 2^24``; stratified: ``t_j = (n_t 2^24 - j 2^24 - a_0) / (n_t 2^24)``
  (a float64 quotient rounded to float32), so ``t_j`` lies in ``(0, 1]`` (stratum ``j`` covers
  ``u in [j / n_t, (j + 1) / n_t)``, ``t = 1 - u``). Level ``p_j = fl32(fl32(c * t_j) + e)`` with
  ``c = fl32(1 - t_floor)``, ``e = fl32(t_floor)`` (two roundings, no fused multiply-add), weight
  ``fl32(1 / p_j)``.

Masks of sample ``s`` (level ``j = floor(s / n_yt)``):

* l-uniform: exactly the ``l_j`` response positions with the smallest ``(K[s, p], p)``
  (lexicographic: ties of the 32-bit keys go to the earlier position). Because the keys are
  i.i.d. uniform, the set is uniform over the ``C(L_b, l_j)`` subsets, up to a tie at the boundary
  (probability about ``L_b / 2^33``: 1e-6 at ``L_b = 8192``).
* t-Bernoulli: position ``p`` is masked iff ``(K[s, p] >> 8) * 2^-24 < p_j`` (both exact in float32).

Outputs: ``masked`` [B, n, L], the noisy inputs ``where(masked, mask_token_id, input_ids)``,
``weight`` [B, n] (level ``j``'s weight for each of its ``n_yt`` samples) and ``levels`` [B, n_t].
The torch implementation emulates the uint32 arithmetic in int64 (a 32 x 32-bit product's bit
pattern survives int64's wrap-around) and finds the ``l``-th smallest key by a histogram of the keys'
top bits; the Triton one evaluates the same counters per position and finds it by bisection. The integer parts are
exact, and
the float parts are the correctly rounded IEEE operations listed above, so the bits agree on every
device.

The package: :mod:`.op` holds the entry points, :mod:`.common` the input checks, the Philox constants
and :class:`KeyedDraw`, :mod:`.philox` Philox4x32-10 itself, :mod:`.torch_path` the PyTorch paths,
:mod:`.kernels` the Triton kernels and :mod:`.triton_path` their launchers and AOT specs.
"""

from ..dispatch import triton_available
from .common import (
    _INT64_MAX,
    _PHILOX_M,
    _PHILOX_W,
    _TAG_LEVEL,
    _TAG_POSITION,
    _U32,
    PHILOX_ROUNDS,
    KeyedDraw,
    _check_inputs,
    _check_keyed_inputs,
    _floor_words,
)
from .op import keyed_noisy_draw, sample_masks
from .philox import _check_words, _mulhilo, _xor3, philox4x32, philox4x32_words
from .torch_path import (
    _key_words,
    _keyed_draw_torch,
    _levels_torch,
    _position_keys_torch,
    _smallest_keys,
    _uniform_below,
    sample_masks_torch,
)
from .triton_path import (
    _GPU_CONFIG,
    _INTERPRETER_CONFIG,
    _KEYED_GPU,
    _KEYED_INTERPRETER,
    KEYED_COMPILE_OPTIONS,
    _keyed_aot_specs,
    _keyed_draw_triton,
    aot_specs,
    keyed_launch_config,
    philox_seed,
    sample_masks_triton,
)

__all__ = [
    "_check_inputs",
    "_check_keyed_inputs",
    "_check_words",
    "_floor_words",
    "_GPU_CONFIG",
    "_INT64_MAX",
    "_INTERPRETER_CONFIG",
    "_key_words",
    "_keyed_aot_specs",
    "_keyed_draw_torch",
    "_keyed_draw_triton",
    "_KEYED_GPU",
    "_KEYED_INTERPRETER",
    "_levels_torch",
    "_mulhilo",
    "_PHILOX_M",
    "_PHILOX_W",
    "_position_keys_torch",
    "_smallest_keys",
    "_TAG_LEVEL",
    "_TAG_POSITION",
    "_U32",
    "_uniform_below",
    "_xor3",
    "aot_specs",
    "KEYED_COMPILE_OPTIONS",
    "keyed_launch_config",
    "keyed_noisy_draw",
    "KeyedDraw",
    "philox4x32",
    "philox4x32_words",
    "PHILOX_ROUNDS",
    "philox_seed",
    "sample_masks",
    "sample_masks_torch",
    "sample_masks_triton",
]

if triton_available():
    from .kernels import (
        _ROUNDS,
        _chunk,
        _count_keys_at_most,
        _keyed_draw_kernel,
        _keys_at_most,
        _kth_key,
        _kth_smallest_key,
        _level,
        _philox_kernel,
        _position_keys,
        _response,
        _row_keys,
        _sample_masks_kernel,
        _store_chunk,
    )

    __all__ += [
        "_row_keys",
        "_response",
        "_count_keys_at_most",
        "_kth_smallest_key",
        "_sample_masks_kernel",
        "_ROUNDS",
        "_philox_kernel",
        "_chunk",
        "_position_keys",
        "_keys_at_most",
        "_kth_key",
        "_level",
        "_store_chunk",
        "_keyed_draw_kernel",
    ]
