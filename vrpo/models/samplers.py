"""Samplers of masked diffusion LMs; a model's family (:mod:`vrpo.models.families`) names its own.

Both start from the prompt followed by ``gen_length`` mask tokens and fill the answer in blocks of
``block_length`` tokens, left to right, each block with ``steps / num_blocks`` denoising steps
(``block_length = gen_length``, the default, is one block).

* :func:`generate`, LLaDA's: at a step the model predicts every masked token, and the most confident
  predictions of the current block (a quota per step, spread evenly) are kept; the rest stay masked.
* :func:`generate_dream`, Dream's (its logits are shifted: position i - 1 predicts token i): timesteps
  go linearly from 1 to ``eps``; from t to s, ``alg="origin"`` (Dream's default) unmasks each masked token
  independently with probability ``1 - s/t`` and samples it; ``"maskgit_plus"`` (top-1 probability),
  ``"topk_margin"`` (top-1 minus top-2) and ``"entropy"`` (negative entropy) unmask the
  ``1 - s/t`` most confident fraction instead.

:func:`sample` runs the sampler of the model's family.
"""

from __future__ import annotations

import torch

from .families import family_of


def transfer_schedule(masked_per_row: torch.Tensor, steps: int) -> torch.Tensor:
    """int64 [B, steps]: tokens to unmask at each step, as even as possible (earlier steps get the remainder)."""
    base = masked_per_row[:, None] // steps
    extra = (torch.arange(steps, device=masked_per_row.device)[None] < (masked_per_row[:, None] % steps)).long()
    return base + extra


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """argmax of ``logits / temperature + Gumbel noise`` (greedy when temperature is 0). int64 [..., L]."""
    if temperature == 0:
        return logits.argmax(-1)
    # float64: low-precision Gumbel noise measurably hurts the sample quality of masked diffusion LMs.
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-30)))
    return (logits.double() / temperature + gumbel).argmax(-1)


def _block_plan(gen_length: int, steps: int | None, block_length: int | None) -> tuple[int, int, int]:
    """``(block_length, num_blocks, steps_per_block)`` with the defaults (one block, ``gen_length`` steps)."""
    steps = steps or gen_length
    block_length = block_length or gen_length
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} must be a multiple of block_length={block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps={steps} must be a multiple of the number of blocks ({num_blocks})")
    return block_length, num_blocks, steps // num_blocks


def _canvas(prompt_ids: torch.Tensor, gen_length: int, mask_token_id: int) -> torch.Tensor:
    """int64 [B, P + gen_length]: the prompts followed by mask tokens."""
    B, P = prompt_ids.shape
    x = torch.full((B, P + gen_length), mask_token_id, dtype=torch.long, device=prompt_ids.device)
    x[:, :P] = prompt_ids
    return x


def _attention(x: torch.Tensor, prompt_attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The [B, L] attention mask of the canvas ``x`` when the prompts are padded, else None."""
    if prompt_attention_mask is None:
        return None
    attention = torch.ones_like(x)
    attention[:, : prompt_attention_mask.shape[1]] = prompt_attention_mask
    return attention


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    mask_token_id: int,
    gen_length: int = 128,
    steps: int | None = None,
    block_length: int | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    prompt_attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample answers for a batch of prompts.

    Args:
        model: callable ``[B, L] -> logits`` (or an output with ``.logits``); a bidirectional MDM.
        prompt_ids: int64 [B, P]. Prompts of different lengths are left-padded and described by
            ``prompt_attention_mask`` (1 on real tokens); padding is hidden from attention.
        mask_token_id: the mask token.
        gen_length: answer tokens to generate.
        steps: denoising steps in all (default ``gen_length``); a multiple of the number of blocks.
        block_length: block size (default ``gen_length``: one block); must divide ``gen_length``.
        temperature: 0 for greedy; otherwise Gumbel-max sampling.
        remasking: ``"low_confidence"`` (keep the most probable predictions) or ``"random"``.

    Returns:
        int64 [B, P + gen_length]: the prompts followed by the generated answers.
    """
    block_length, num_blocks, steps_per_block = _block_plan(gen_length, steps, block_length)
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking must be 'low_confidence' or 'random', got {remasking!r}")

    B, P = prompt_ids.shape
    device = prompt_ids.device
    x = _canvas(prompt_ids, gen_length, mask_token_id)
    attention = _attention(x, prompt_attention_mask)
    kwargs = {} if attention is None else {"attention_mask": attention}

    for block in range(num_blocks):
        start, end = P + block * block_length, P + (block + 1) * block_length
        schedule = transfer_schedule((x[:, start:end] == mask_token_id).sum(-1), steps_per_block)
        for step in range(steps_per_block):
            masked = x == mask_token_id
            out = model(x, **kwargs)
            logits = (out.logits if hasattr(out, "logits") else out).float()
            guess = gumbel_argmax(logits, temperature, generator)
            if remasking == "low_confidence":
                confidence = torch.softmax(logits, -1).gather(-1, guess[..., None])[..., 0].double()
            else:
                confidence = torch.rand(x.shape, generator=generator, device=device, dtype=torch.float64)
            confidence[:, end:] = -float("inf")  # later blocks wait their turn
            confidence = torch.where(
                masked, confidence, torch.tensor(-float("inf"), device=device, dtype=torch.float64)
            )
            order = confidence.argsort(-1, descending=True)
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(x.shape[1], device=device).expand(B, -1))
            keep = (rank < schedule[:, step : step + 1]) & masked
            x = torch.where(keep, guess, x)
    return x


DREAM_ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def _filter_logits(logits: torch.Tensor, top_p: float | None, top_k: int | None) -> torch.Tensor:
    """``logits`` [..., V] with tokens outside the top-k / nucleus (top-p) set to -inf."""
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    return logits


def _dream_tokens(logits, temperature, top_p, top_k, alg, generator):
    """(token int64 [M], confidence float [M]) for masked positions' logits [M, V], per Dream's ``alg``."""
    if temperature > 0:
        logits = logits / temperature
    probs = _filter_logits(logits, top_p, top_k).softmax(-1)
    if temperature > 0:
        token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        confidence = probs.gather(-1, token[:, None])[:, 0]
    else:
        confidence, token = probs.max(-1)
    if alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        confidence = top2[:, 0] - top2[:, 1]
    elif alg == "entropy":
        confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
    return token, confidence


def _dream_step(x, logits, in_block, mask_token_id, p_transfer, last, opts, generator):
    """One Dream denoising step on ``x`` [B, L] in place: unmask some masked positions of the block."""
    masked = (x == mask_token_id) & in_block
    if not masked.any():
        return
    token, confidence = _dream_tokens(
        logits[masked], opts["temperature"], opts["top_p"], opts["top_k"], opts["alg"], generator
    )
    if opts["alg"] == "origin":
        u = torch.rand(token.shape, generator=generator, device=x.device)
        keep = torch.ones_like(u, dtype=torch.bool) if last else u < p_transfer
        x[masked] = torch.where(keep, token, mask_token_id)
        return
    full = torch.full(x.shape, -float("inf"), device=x.device, dtype=torch.float64)
    full[masked] = confidence.double()
    proposal = torch.full_like(x, mask_token_id)
    proposal[masked] = token
    counts = masked.sum(-1)
    quota = counts if last else (counts.double() * p_transfer).long()
    for b in range(x.shape[0]):
        k = int(quota[b])
        if k == 0:
            continue
        if opts["alg_temp"]:
            weights = (full[b] / opts["alg_temp"]).softmax(-1)
            pick = torch.multinomial(weights, k, generator=generator)
        else:
            pick = full[b].topk(k).indices
        x[b, pick] = proposal[b, pick]


@torch.no_grad()
def generate_dream(
    model,
    prompt_ids: torch.Tensor,
    mask_token_id: int,
    gen_length: int = 128,
    steps: int | None = None,
    block_length: int | None = None,
    temperature: float = 0.0,
    alg: str = "origin",
    eps: float = 1e-3,
    top_p: float | None = None,
    top_k: int | None = None,
    alg_temp: float | None = None,
    logit_shift: int = 1,
    prompt_attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample answers with Dream's sampler (see the module docstring).

    Args:
        model: callable ``[B, L] -> logits`` (or an output with ``.logits``); a bidirectional MDM whose
            logits are shifted by ``logit_shift`` (Dream: 1).
        prompt_ids: int64 [B, P]; left-padded prompts are described by ``prompt_attention_mask`` (1 on real
            tokens): padding is hidden from attention and positions count real tokens only, as Dream's do.
        mask_token_id: the mask token.
        gen_length, steps, block_length: as in :func:`generate` (default: ``steps = gen_length``, one block).
        temperature: 0 for greedy; otherwise tokens are sampled from the tempered (top-p/top-k filtered)
            distribution.
        alg: one of :data:`DREAM_ALGORITHMS`; ``alg_temp`` > 0 samples the positions to unmask by
            confidence instead of taking the most confident (not for ``"origin"``).
        eps: the last timestep (Dream: 1e-3).

    Returns:
        int64 [B, P + gen_length]: the prompts followed by the generated answers.
    """
    if alg not in DREAM_ALGORITHMS:
        raise ValueError(f"alg={alg!r} is not one of {DREAM_ALGORITHMS}")
    if not 0 < eps < 1:
        raise ValueError(f"eps={eps} must be in (0, 1)")
    block_length, num_blocks, steps_per_block = _block_plan(gen_length, steps, block_length)
    opts = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "alg": alg, "alg_temp": alg_temp}

    P = prompt_ids.shape[1]
    device = prompt_ids.device
    x = _canvas(prompt_ids, gen_length, mask_token_id)
    attention = _attention(x, prompt_attention_mask)
    kwargs = {}
    if attention is not None:  # positions count real tokens only, as Dream's sampler's do
        kwargs = {"attention_mask": attention, "position_ids": (attention.cumsum(-1) - 1).clamp(min=0)}
    timesteps = torch.linspace(1, eps, steps_per_block + 1, device=device, dtype=torch.float64)
    column = torch.arange(x.shape[1], device=device)

    for block in range(num_blocks):
        in_block = ((column >= P + block * block_length) & (column < P + (block + 1) * block_length))[None]
        for i in range(steps_per_block):
            out = model(x, **kwargs)
            logits = (out.logits if hasattr(out, "logits") else out).float()
            if logit_shift:
                logits = torch.cat([logits[:, :logit_shift], logits[:, :-logit_shift]], dim=1)
            t, s = timesteps[i], timesteps[i + 1]
            _dream_step(x, logits, in_block, mask_token_id, float(1 - s / t), i == steps_per_block - 1, opts, generator)
    return x


# Each family's record (vrpo.models.families) names its sampler by one of these keys.
SAMPLERS = {"llada": generate, "dream": generate_dream}


def sample(model, prompt_ids: torch.Tensor, mask_token_id: int, **kwargs) -> torch.Tensor:
    """Sample answers with the sampler of ``model``'s family (:mod:`vrpo.models.families`); keyword arguments
    as in :func:`generate` (``gen_length``, ``steps``, ``block_length``, ``temperature``, ...)."""
    family = family_of(model)
    if family is None:
        raise ValueError(
            f"sample: {type(model).__name__} is not a model of a known family; call generate or generate_dream"
        )
    return SAMPLERS[family.sampler](model, prompt_ids, mask_token_id, **kwargs)
