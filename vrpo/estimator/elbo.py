"""Monte Carlo ELBO of a masked diffusion LM: ``B_hat(y|x)`` from a :class:`~vrpo.estimator.sampling.MaskDraw`.

Each sample ``j`` of row ``b`` replaces its masked response tokens with the mask token, runs the
model bidirectionally on ``[prompt, masked response]``, and scores the hidden tokens:

    term[b, j] = weight[b, j] * sum_{i masked} log p(y_i | y_masked, x)

``B_hat[b]`` is the mean of ``term[b, :]``. Log-probabilities are always computed in float32, whatever
the model's dtype.

**Shifted families.** Where a model's family has ``logit_shift = 1`` (Dream: the output at position
``i - 1`` predicts token ``i``, :mod:`vrpo.models.families`), token ``i`` is scored with the output at
``i - 1``; everything else (weights, antithetic sharing, the DPO score) is unchanged. The shift is read from
the model (or given as ``logit_shift=``); a token at a row's (or a packed segment's) first position has no
output before it and is refused.

Two paths give the same numbers:

* **generic**: any callable ``LongTensor [N, L] -> logits [N, L, V]`` (or an output with ``.logits``);
* **fused**: a ``transformers`` causal LM whose head is a plain ``nn.Linear``: the body gives hidden
  states and :func:`vrpo_kernels.masked_linear_ce` applies the head only to the masked positions
  (for a shifted family, to the hidden state before each), never materialising ``[N, L, V]`` logits.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import combinations
from math import comb

import torch
from torch import nn

from vrpo_kernels import masked_linear_ce
from vrpo_kernels.masked_linear_ce import DEFAULT_MAX_BUFFER_BYTES

from ..errors import NonFiniteELBOError
from .packing import pack_rows, packing_kwargs, segment_positions
from .sampling import MaskDraw

logger = logging.getLogger(__name__)
_warned_unfused: set[str] = set()


@dataclass(frozen=True)
class HeadOptions:
    """How the ELBO computes log-probabilities at the LM head (one default for every caller).

    Attributes:
        fused: ``"auto"`` fuses the head when :func:`fusable_head` allows it; ``True`` requires it;
            ``False`` uses the generic logits path (full ``[N, L, vocab]`` logits).
        impl: the :func:`vrpo_kernels.masked_linear_ce` implementation on the fused path
            (``"auto"``, ``"triton"``, ``"torch"``, ``"eager"``).
        max_buffer_bytes: the fused path's memory budget for its largest intermediate (the selected rows'
            fp32 logits). Below what those logits need, the op recomputes them in chunks in the backward
            (one more GEMM) instead of keeping them.
    """

    fused: bool | str = "auto"
    impl: str = "auto"
    max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES

    def __post_init__(self):
        if self.fused not in ("auto", True, False):
            raise ValueError(f"HeadOptions: fused must be 'auto', True or False, got {self.fused!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"HeadOptions: impl must be one of {IMPLS}, got {self.impl!r}")
        if (
            isinstance(self.max_buffer_bytes, bool)
            or not isinstance(self.max_buffer_bytes, int)
            or self.max_buffer_bytes < 1
        ):
            raise ValueError(f"HeadOptions: max_buffer_bytes must be a positive integer, got {self.max_buffer_bytes!r}")


IMPLS = ("auto", "triton", "torch", "eager")
OLD_HEAD_KEYWORDS = ("fused", "impl", "max_buffer_bytes")  # vrpo 0.1's; head=HeadOptions(...) since 0.2


def head_options(head: HeadOptions, old: Mapping, caller: str) -> HeadOptions:
    """``head``, or the :class:`HeadOptions` that vrpo 0.1's keywords ``fused=``, ``impl=`` and
    ``max_buffer_bytes=`` (``None``: the default budget) spelled, with a ``DeprecationWarning``: they are
    accepted in 0.2 and go in 0.3. Any other keyword is a ``TypeError``, as Python's own would be."""
    unknown = sorted(set(old) - set(OLD_HEAD_KEYWORDS))
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
    if not isinstance(head, HeadOptions):
        raise TypeError(f"{caller}: head must be a HeadOptions, got {type(head).__name__} {head!r}")
    if not old:
        return head
    spelled = ", ".join(f"{k}={v!r}" for k, v in old.items())
    if head != HeadOptions():
        raise TypeError(f"{caller}: give head=HeadOptions(...) or the deprecated {spelled}, not both")
    warnings.warn(
        f"{caller}({spelled}) is deprecated since vrpo 0.2 and goes in 0.3: pass "
        f"head=HeadOptions({spelled}) (vrpo.HeadOptions)",
        DeprecationWarning,
        stacklevel=3,
    )
    return HeadOptions(**{k: v for k, v in old.items() if not (k == "max_buffer_bytes" and v is None)})


def unwrap(model):
    """The LM inside the wrappers a training run puts around it: :class:`ELBOModule`, PEFT (its base model)
    and DistributedDataParallel (``.module``). Anything else is returned as it is."""
    while True:
        if isinstance(model, ELBOModule):
            model = model.model
        elif callable(getattr(model, "get_base_model", None)):  # PEFT
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DistributedDataParallel
            model = model.module
        else:
            return model


def model_logit_shift(model) -> int:
    """The logit shift a model declares (``logit_shift`` on the unwrapped LM; vrpo's model classes set it),
    0 for one that declares none (logits per position)."""
    return getattr(unwrap(model), "logit_shift", 0)


def noisy_inputs(input_ids: torch.Tensor, masked: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """LongTensor [B, n, L]: ``input_ids`` [B, L] with the masked positions of each sample replaced."""
    return torch.where(masked, torch.as_tensor(mask_token_id, device=input_ids.device), input_ids[:, None, :])


def _noisy(input_ids: torch.Tensor, draw, mask_token_id: int) -> torch.Tensor:
    """The draw's noisy inputs [B, n, L]: made with the draw (:class:`~vrpo.estimator.noise.NoisyDraw`) or here."""
    made = getattr(draw, "input_ids", None)
    return made if made is not None else noisy_inputs(input_ids, draw.masked, mask_token_id)


def fusable_head(model) -> tuple[nn.Module, nn.Linear] | None:
    """``(body, head)`` when ``model`` is a transformers LM whose head can be fused, else None.

    ``body(input_ids, **kwargs).last_hidden_state`` must be what the head reads. Heads that are not a
    plain ``nn.Linear`` (a LoRA-wrapped head, say) or configs that post-process logits fall back to
    the generic path.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    get_body = getattr(model, "get_decoder", None)
    if get_head is None or get_body is None:
        return None
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return None
    head, body = get_head(), get_body()
    if type(head) is not nn.Linear or body is None or body is model:
        return None
    return body, head


def _repeat_rows(model_kwargs: Mapping | None, n: int) -> dict:
    return {k: (v.repeat_interleave(n, dim=0) if torch.is_tensor(v) else v) for k, v in (model_kwargs or {}).items()}


def _check_mask_id(mask_token_id: int, vocab: int):
    if not 0 <= mask_token_id < vocab:
        raise ValueError(
            f"mask_token_id={mask_token_id} is outside the model's vocabulary of {vocab} tokens; "
            "pass the checkpoint's mask id (LLaDA: 126336)"
        )


def _check_draw(draw: MaskDraw, response_mask: torch.Tensor):
    if (draw.masked & ~response_mask[:, None, :]).any():
        raise ValueError("draw.masked marks positions outside response_mask: draw it from this batch's mask")


def _shift(model, logit_shift: int | None) -> int:
    shift = model_logit_shift(model) if logit_shift is None else logit_shift
    if shift not in (0, 1):
        raise ValueError(f"logit_shift={shift} is not 0 or 1")
    return shift


def _check_first_positions(masked: torch.Tensor, first: torch.Tensor, what: str):
    """A shifted family cannot score a token with no output before it (a row's or segment's first token)."""
    bad = masked & first
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"a masked token is at the first position of {what} {row}: the model's family predicts token i from "
            "the output at i - 1 (logit_shift=1), so the response must follow a non-empty prompt"
        )


def _warn_unfused(model, fused):
    name = type(model).__name__
    if fused == "auto" and name not in _warned_unfused:
        _warned_unfused.add(name)
        logger.warning(
            "ELBO of %s: the head cannot be fused (no plain nn.Linear head reachable through "
            "get_output_embeddings/get_decoder), so full [N, L, vocab] logits are materialised; at a 126k "
            "vocabulary that is the largest tensor of the step",
            name,
        )


def _check_finite(terms: torch.Tensor, n: int):
    bad = ~torch.isfinite(terms)
    if bad.any():
        flat = bad.flatten().nonzero()[:, 0]
        rows = sorted({int(i) // n for i in flat[:50]})
        raise NonFiniteELBOError(
            f"non-finite log-probabilities in the ELBO of rows {rows[:10]} "
            f"({int(bad.sum())} of {terms.numel()} samples): the model produced NaN or inf logits"
        )


def masked_token_logprobs(
    model: Callable,
    noisy_ids: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    token_weight: torch.Tensor,
    mask_token_id: int,
    *,
    model_kwargs: Mapping | None = None,
    head: HeadOptions = HeadOptions(),
    logit_shift: int | None = None,
    **old_head_keywords,
) -> torch.Tensor:
    """The core of every ELBO: ``token_weight * log p(target)`` at the masked positions, 0 elsewhere.

    Args:
        model: callable ``[N, S] -> logits`` or a transformers LM (see the module docstring).
        noisy_ids: int64 [N, S], the model input (masked positions hold the mask token).
        targets: int64 [N, S], the clean tokens.
        masked: bool [N, S], where a log-probability is wanted.
        token_weight: float [N, S], the estimator weight of each position's sample.
        model_kwargs: extra model inputs, already [N, ...].
        head: the head's options (:class:`HeadOptions`).
        logit_shift: 1 when the output at i - 1 predicts token i; None reads it from the model.
        old_head_keywords: vrpo 0.1's ``fused=``, ``impl=``, ``max_buffer_bytes=`` (deprecated,
            :func:`head_options`).

    Returns:
        float32 [N, S], indexed by the scored token's position.
    """
    head = head_options(head, old_head_keywords, "masked_token_logprobs")
    N, S = noisy_ids.shape
    shift = _shift(model, logit_shift)
    if shift:
        first = torch.zeros_like(masked)
        first[:, :shift] = True
        _check_first_positions(masked, first, "row")
        # The output at position p scores the token at p + shift: move targets, masks and weights back by
        # `shift` so that everything below is per output position, then move the result forward again.
        targets, masked, token_weight = (t.roll(-shift, dims=1) for t in (targets, masked, token_weight))
        masked = masked.clone()
        masked[:, S - shift :] = False
    split = fusable_head(model) if head.fused else None
    if head.fused is True and split is None:
        raise ValueError(f"fused=True needs a transformers LM with a plain nn.Linear head, got {type(model).__name__}")
    if split is not None:
        body, lm_head = split
        _check_mask_id(mask_token_id, lm_head.weight.shape[0])
        hidden = body(input_ids=noisy_ids, **(model_kwargs or {})).last_hidden_state
        out = masked_linear_ce(
            hidden.reshape(N * S, -1),
            lm_head.weight,
            targets.reshape(-1),
            token_weight.reshape(-1).float(),
            masked.reshape(-1),
            bias=lm_head.bias,
            impl=head.impl,
            max_buffer_bytes=head.max_buffer_bytes,
        ).view(N, S)
    else:
        _warn_unfused(model, head.fused)
        logits = model(noisy_ids, **(model_kwargs or {}))
        logits = logits.logits if hasattr(logits, "logits") else logits
        _check_mask_id(mask_token_id, logits.shape[-1])
        rows, cols = masked.nonzero(as_tuple=True)
        logp = torch.log_softmax(logits[rows, cols].float(), dim=-1)
        logp = logp.gather(-1, targets[rows, cols][:, None])[:, 0]
        out = torch.zeros(N, S, device=logp.device, dtype=torch.float32)
        out = out.index_put((rows, cols), logp * token_weight[rows, cols].float())
    return out.roll(shift, dims=1) if shift else out


def elbo_terms(
    model: Callable,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    draw: MaskDraw,
    mask_token_id: int,
    *,
    model_kwargs: Mapping | None = None,
    head: HeadOptions = HeadOptions(),
    logit_shift: int | None = None,
    **old_head_keywords,
) -> torch.Tensor:
    """Per-sample ELBO terms, float32 [B, n].

    Args:
        model: callable ``[N, L] -> logits`` or a transformers LM (see the module docstring).
        input_ids: int64 [B, L], the clean sequences (prompt and response).
        response_mask: bool [B, L]; only used to check that the draw matches it.
        draw: the masks and weights, ``draw.masked`` [B, n, L].
        mask_token_id: the id that replaces masked tokens.
        model_kwargs: extra per-row model inputs ([B, ...] tensors such as ``attention_mask`` or
            ``position_ids``), repeated for the ``n`` samples.
        head: how the head computes log-probabilities (:class:`HeadOptions`: fused or not, the kernel,
            the fused path's memory budget).
        logit_shift: 1 when the output at i - 1 predicts token i (Dream), 0 when the output at i does
            (LLaDA); None (the default) reads it from the model (:func:`model_logit_shift`).
        old_head_keywords: vrpo 0.1's ``fused=``, ``impl=``, ``max_buffer_bytes=``, accepted with a
            ``DeprecationWarning`` until 0.3 (:func:`head_options`).
    """
    head = head_options(head, old_head_keywords, "elbo_terms")
    B, n, L = draw.masked.shape
    if input_ids.shape != (B, L) or response_mask.shape != (B, L):
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and response_mask {tuple(response_mask.shape)} must both be "
            f"[B, L] = {(B, L)} to match draw.masked {tuple(draw.masked.shape)}"
        )
    _check_draw(draw, response_mask)
    per_token = masked_token_logprobs(
        model,
        _noisy(input_ids, draw, mask_token_id).view(B * n, L),
        input_ids[:, None, :].expand(B, n, L).reshape(B * n, L),
        draw.masked.reshape(B * n, L),
        draw.weight.float().reshape(B * n, 1).expand(B * n, L),
        mask_token_id,
        model_kwargs=_repeat_rows(model_kwargs, n),
        head=head,
        logit_shift=logit_shift,
    )
    terms = per_token.view(B, n, L).sum(-1)
    _check_finite(terms, n)
    return terms


def packed_elbo_terms(
    model: Callable,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    draw: MaskDraw,
    mask_token_id: int,
    *,
    lengths: torch.Tensor,
    row_length: int,
    head: HeadOptions = HeadOptions(),
    logit_shift: int | None = None,
    **old_head_keywords,
) -> torch.Tensor:
    """:func:`elbo_terms` with the ``B * n`` masked copies packed into rows of ``row_length`` tokens.

    Each copy is one segment of a packed row: attention is blocked across segments and positions
    restart at 0 per segment (:func:`vrpo.models.packing_kwargs`), so the terms equal the unpacked
    ones while padding costs nothing but the tail of the last rows. This is how the paper runs VRPO
    (rows of 4096 tokens). For a shifted family a token is scored with the output before it, which is
    in its own segment: a masked token at a segment's first position is refused (``ValueError``).

    Args:
        input_ids, response_mask, draw, mask_token_id, head, logit_shift, old_head_keywords: as in
            :func:`elbo_terms` (right-padded rows).
        lengths: int [B], the real (unpadded) length of each row.
        row_length: tokens per packed row; at least the longest sequence.
        model: must accept ``segment_ids=`` and ``position_ids=`` (models from
            :func:`vrpo.models.load_mdm` do, for every attention backend).

    Returns:
        float32 [B, n].
    """
    head = head_options(head, old_head_keywords, "packed_elbo_terms")
    B, n, L = draw.masked.shape
    _check_draw(draw, response_mask)
    sizes = [int(x) for x in lengths.tolist()]
    if max(sizes) > row_length:
        raise ValueError(f"packing: a sequence of {max(sizes)} tokens does not fit rows of row_length={row_length}")
    device = input_ids.device
    noisy = _noisy(input_ids, draw, mask_token_id)
    # Longest first: first-fit packs tighter that way.
    order = sorted(range(B * n), key=lambda k: -sizes[k // n])
    ids, seg = pack_rows([noisy[k // n, k % n, : sizes[k // n]] for k in order], row_length, pad_id=mask_token_id)
    ids, seg = ids.to(device), seg.to(device)
    valid = seg >= 0
    item = torch.tensor(order, device=device)[seg.clamp(min=0)]  # which (row, sample) a token belongs to
    b, j = item // n, item % n
    pos = torch.where(valid, segment_positions(seg), 0)
    masked = draw.masked[b, j, pos] & valid
    shift = _shift(model, logit_shift)
    if shift:
        _check_first_positions(masked, pos < shift, "packed row")
    per_token = masked_token_logprobs(
        model,
        ids,
        torch.where(valid, input_ids[b, pos], 0),
        masked,
        draw.weight.float()[b, j],
        mask_token_id,
        model_kwargs=packing_kwargs(seg),
        head=head,
        logit_shift=shift,
    )
    # Back to the unpacked layout [B * n, L] (each (sample, position) holds at most one token, so the
    # write has unique indices and needs no accumulation), then the same sum as elbo_terms. Not
    # index_add over samples: on CUDA that adds atomically, in no fixed order.
    dense = torch.zeros(B * n, L, device=device, dtype=torch.float32)
    dense = dense.index_put((item[masked], pos[masked]), per_token[masked])
    terms = dense.sum(-1).view(B, n)
    _check_finite(terms, n)
    return terms


def elbo_estimate(
    model: Callable,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    draw: MaskDraw,
    mask_token_id: int,
    **kwargs,
) -> torch.Tensor:
    """``B_hat`` per sequence, float32 [B]: the mean over the draw's ``n`` samples of
    ``weight * sum of masked log p``. Keyword arguments as in :func:`elbo_terms`.
    """
    old = {k: kwargs.pop(k) for k in OLD_HEAD_KEYWORDS if k in kwargs}
    if old:
        kwargs["head"] = head_options(kwargs.get("head", HeadOptions()), old, "elbo_estimate")
    return elbo_terms(model, input_ids, response_mask, draw, mask_token_id, **kwargs).mean(-1)


def exact_elbo(logp_fn: Callable, input_ids: torch.Tensor, response_mask: torch.Tensor, mask_token_id: int):
    """The exact ELBO by enumerating every non-empty mask of the response (tiny ``L_b`` only).

    ``logp_fn`` gives per-position log-probabilities of the token at that position: for a shifted family
    (Dream) shift the model's output before returning it (position i from the output at i - 1).

    ``B = sum_m 1 / (|m| C(L_b, |m|)) * sum_{i in m} log p(y_i | y with m masked, x)``.

    Args:
        logp_fn: maps LongTensor [N, L] -> log-probabilities [N, L, V] (float64 preferred).
        input_ids: int64 [B, L]; response_mask: bool [B, L] with at most 16 response tokens per row
            (2^16 masks: enumeration beyond that is too slow to be useful).

    Returns:
        float64 [B].
    """
    out = torch.zeros(input_ids.shape[0], dtype=torch.float64)
    for b in range(input_ids.shape[0]):
        positions = response_mask[b].nonzero()[:, 0].tolist()
        Lb = len(positions)
        if Lb > 16:
            raise ValueError(f"exact_elbo: row {b} has {Lb} response tokens; enumeration needs <= 16")
        masks, weights = [], []
        for k in range(1, Lb + 1):
            for subset in combinations(positions, k):
                m = torch.zeros(input_ids.shape[1], dtype=torch.bool)
                m[list(subset)] = True
                masks.append(m)
                weights.append(1.0 / (k * comb(Lb, k)))
        m = torch.stack(masks)
        ids = torch.where(m, torch.as_tensor(mask_token_id), input_ids[b][None])
        logp = logp_fn(ids).double().gather(-1, input_ids[b][None, :, None].expand(len(masks), -1, 1))[..., 0]
        per_mask = (logp * m).sum(-1)
        out[b] = (per_mask * torch.tensor(weights, dtype=torch.float64)).sum()
    return out


class ELBOModule(nn.Module):
    """An LM wrapped so that one ``forward`` returns its ELBO terms.

    This is the module to hand to ``accelerate.prepare``: DDP, FSDP and DeepSpeed then see a single
    forward, while the fused head path inside still reaches the LM's body and head directly.
    """

    def __init__(
        self,
        model: nn.Module,
        mask_token_id: int,
        head: HeadOptions = HeadOptions(),
        pack_length: int | None = None,
        **old_head_keywords,
    ):
        super().__init__()
        self.model = model
        self.mask_token_id = mask_token_id
        self.head = head_options(head, old_head_keywords, "ELBOModule")
        self.pack_length = pack_length

    def forward(self, input_ids, response_mask, draw: MaskDraw, attention_mask=None, **model_kwargs) -> torch.Tensor:
        """float32 [B, n]; see :func:`elbo_terms` (or :func:`packed_elbo_terms` with ``pack_length``).

        ``attention_mask`` [B, L] marks real tokens (right padding); packing reads the lengths from it.
        """
        if self.pack_length:
            lengths = (
                attention_mask.sum(-1)
                if attention_mask is not None
                else torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
            )
            return packed_elbo_terms(
                self.model,
                input_ids,
                response_mask,
                draw,
                self.mask_token_id,
                lengths=lengths,
                row_length=self.pack_length,
                head=self.head,
            )
        if attention_mask is not None:
            model_kwargs["attention_mask"] = attention_mask
        return elbo_terms(
            self.model,
            input_ids,
            response_mask,
            draw,
            self.mask_token_id,
            model_kwargs=model_kwargs,
            head=self.head,
        )
