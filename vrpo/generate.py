"""LLaDA's sampler: semi-autoregressive blocks of low-confidence remasking.

Start from the prompt followed by ``gen_length`` mask tokens. The answer is filled in blocks of
``block_length`` tokens, left to right; each block gets ``steps / num_blocks`` denoising steps. At a
step the model predicts every masked token, and the most confident predictions of the current block
(a quota per step, spread evenly) are kept; the rest stay masked.
"""

from __future__ import annotations

import torch


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
    steps = steps or gen_length
    block_length = block_length or gen_length
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} must be a multiple of block_length={block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps={steps} must be a multiple of the number of blocks ({num_blocks})")
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking must be 'low_confidence' or 'random', got {remasking!r}")
    steps_per_block = steps // num_blocks

    B, P = prompt_ids.shape
    device = prompt_ids.device
    x = torch.full((B, P + gen_length), mask_token_id, dtype=torch.long, device=device)
    x[:, :P] = prompt_ids
    kwargs = {}
    if prompt_attention_mask is not None:
        attention = torch.ones_like(x)
        attention[:, :P] = prompt_attention_mask
        kwargs["attention_mask"] = attention

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
            confidence = torch.where(masked, confidence, torch.tensor(-float("inf"), device=device, dtype=torch.float64))
            order = confidence.argsort(-1, descending=True)
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(x.shape[1], device=device).expand(B, -1))
            keep = (rank < schedule[:, step : step + 1]) & masked
            x = torch.where(keep, guess, x)
    return x


def last_user_message(prompt_text: str) -> str:
    """The content of the last user turn of a prompt rendered with LLaDA's chat template."""
    head = "<|start_header_id|>user<|end_header_id|>"
    if head not in prompt_text:
        return prompt_text.strip()
    return prompt_text.rsplit(head, 1)[1].split("<|eot_id|>", 1)[0].strip()


@torch.no_grad()
def sample_answers(model, tokenizer, pairs, mask_token_id: int, k: int, gen_length: int | None = None,
                   steps: int | None = None, block_length: int | None = None, grade=None,
                   sampler=generate) -> list[dict]:
    """Greedy answers of ``model`` to the prompts of the first ``k`` of ``pairs`` (LLaDA's sampler).

    Args:
        pairs: :class:`~vrpo.data.TokenizedPairs`; a prompt is its chosen sequence before the response.
        gen_length: tokens generated per prompt (default: the length of the pair's chosen response).
        steps, block_length: see :func:`generate`.
        grade: optional ``(prompt, answer) -> bool``, recorded as ``"correct"`` (a task's own checker).
        sampler: the model family's sampler, called like :func:`generate`.

    Returns:
        ``[{"prompt": the last user message, "answer": decoded text, ["correct": bool]}]``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(min(k, len(pairs))):
        seq = pairs.sequence(i, 0)
        resp = seq["response_mask"]
        start = int(resp.argmax())
        prompt = torch.as_tensor(seq["input_ids"][:start], dtype=torch.long, device=device)[None]
        length = gen_length or int(resp.sum())
        ids = sampler(model, prompt, mask_token_id, gen_length=length, steps=steps or length,
                       block_length=block_length or length)
        answer = tokenizer.decode(ids[0, start:].tolist(), skip_special_tokens=True).strip()
        record = {"prompt": last_user_message(tokenizer.decode(prompt[0].tolist())), "answer": answer}
        if grade is not None:
            record["correct"] = grade(record["prompt"], answer)
        out.append(record)
    model.train(was_training)
    return out
