"""The lm-evaluation-harness model ``vrpo``: any masked diffusion LM of the family table, loaded with
:func:`vrpo.models.load_mdm` (no remote code).

* ``loglikelihood``: the ELBO of each continuation (:mod:`vrpo.eval.likelihood`: l-uniform, stratified,
  common random numbers across the choices of a context, adaptive or fixed budget, or LLaDA's scheme),
  many requests packed into each forward (:func:`vrpo.estimator.packed_elbo_terms`, fused head).
* ``loglikelihood_rolling``: the ELBO of the whole text, in windows of ``max_length`` tokens.
* ``generate_until``: the family's sampler (:attr:`vrpo.models.ModelFamily.sampler`), batched, stop
  sequences honoured.

Each likelihood's standard error and sample count are kept in :attr:`VRPOEvalLM.sample_stats`, keyed by
``(task, doc_id, request index)``; :func:`attach_stats` adds them to lm-eval's logged samples (the
``python -m vrpo.eval --log_samples`` command does).
"""

from __future__ import annotations

from collections import defaultdict

import accelerate
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ..estimator import MaskDraw, SamplingPlan, draw_key, packed_elbo_terms
from ..models import SAMPLERS, family_of, load_mdm, load_tokenizer, resolve_dtype
from .likelihood import Estimate, LikelihoodEstimator, LikelihoodRequest, MCSettings

DEFAULT_GEN_LENGTH = 128  # tokens generated when neither the model arguments nor the request say


def _flag(value) -> bool:
    """A boolean model argument: lm-eval passes ``k=v`` strings ('True', 'false', '1', ...)."""
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected a boolean, got {value!r}")
        return value.lower() in ("true", "1")
    return bool(value)


def _optional_int(value, name: str) -> int | None:
    if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"model argument {name}={value!r} must be an integer") from None


def _load_tokenizer(pretrained: str, tokenizer: str | None):
    """The checkpoint's tokenizer (or ``tokenizer=``)."""
    path = tokenizer or pretrained
    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"model argument tokenizer: no usable tokenizer at {path} ({e}); pass tokenizer=PATH") from e


@register_model("vrpo")
class VRPOEvalLM(LM):
    """lm-eval's ``--model vrpo``. Model arguments (``--model_args k=v,...``):

    Args:
        pretrained: the checkpoint directory (any family of :data:`vrpo.models.FAMILIES`).
        tokenizer: tokenizer directory (default: ``pretrained``).
        dtype: ``float32`` / ``bfloat16`` / ``float16`` / ``auto``. attn_implementation: see load_mdm.
        device: ``cpu``, ``cuda``, ``cuda:1`` (default: cuda when available; under ``accelerate launch``
            each process takes its own).
        batch_size: requests per forward (likelihoods: continuations, each with a round of samples;
            generation: prompts).
        mc_scheme, mc_num, mc_target_se, mc_max, mc_round, mc_batch, crn, seed: :class:`MCSettings`.
        max_length: longest sequence (default: the model's ``max_position_embeddings``); contexts are
            cut from the left to fit.
        gen_length, steps, block_length, temperature: the sampler's (default: the request's
            ``max_gen_toks``, else 128 tokens; ``steps = gen_length``, one block, greedy).
        greedy_check: compute lm-eval's ``is_greedy`` as LLaDA does (one token unmasked per forward, most
            confident first); off: ``is_greedy`` is reported False, as LLaDA recommends.
    """

    def __init__(
        self,
        pretrained: str,
        tokenizer: str | None = None,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        device: str | None = None,
        batch_size=32,
        max_batch_size=None,
        mc_scheme: str = "crn",
        mc_num=None,
        mc_target_se=MCSettings.mc_target_se,
        mc_max=MCSettings.mc_max,
        mc_round=MCSettings.mc_round,
        mc_batch=MCSettings.mc_batch,
        crn=True,
        seed=MCSettings.seed,
        max_length=None,
        gen_length=None,
        steps=None,
        block_length=None,
        temperature=0.0,
        greedy_check=False,
        **kwargs,
    ):
        super().__init__()
        if kwargs:
            raise ValueError(f"unknown model arguments for vrpo: {sorted(kwargs)}")
        if str(batch_size).startswith("auto"):
            raise ValueError("--batch_size auto is not supported by the vrpo model: give a number")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
        self.settings = MCSettings(
            scheme=mc_scheme,
            mc_num=_optional_int(mc_num, "mc_num"),
            mc_target_se=float(mc_target_se),
            mc_max=int(mc_max),
            mc_round=int(mc_round),
            mc_batch=int(mc_batch),
            crn=_flag(crn),
            seed=int(seed),
        )
        self._setup_device(device)
        self.model = (
            load_mdm(
                pretrained,
                dtype=resolve_dtype(dtype) if dtype != "auto" else None,
                attn_implementation=attn_implementation,
            )
            .to(self._device)
            .eval()
        )
        self.family = family_of(self.model)
        self.tokenizer = _load_tokenizer(pretrained, tokenizer)
        self.mask_token_id = int(self.model.config.mask_token_id)
        self.max_length = _optional_int(max_length, "max_length") or int(self.model.config.max_position_embeddings)
        self.gen = dict(
            gen_length=_optional_int(gen_length, "gen_length"),
            steps=_optional_int(steps, "steps"),
            block_length=_optional_int(block_length, "block_length"),
            temperature=float(temperature),
        )
        self.greedy_check = _flag(greedy_check)
        self.pretrained = pretrained
        self.sample_stats: dict[tuple, dict] = {}
        self.estimator = LikelihoodEstimator(
            self._terms, self.settings, max_sequences=self.batch_size * self.settings.round_size
        )

    # ------------------------------------------------------------------ processes and devices

    def _setup_device(self, device):
        """One process: ``device``; under ``accelerate launch`` (several processes): each process's own
        device and lm-eval's rank/world size, so the evaluator splits the documents between processes."""
        accelerator = accelerate.Accelerator()
        self.accelerator = accelerator if accelerator.num_processes > 1 else None
        if self.accelerator is not None:
            self._device = accelerator.device
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self._rank, self._world_size = 0, 1

    def all_gather(self, tensor):
        return self.accelerator.gather(tensor) if self.accelerator else tensor

    def gather_object(self, obj, dst=0):
        if not self.accelerator:
            return [obj]
        out = [None] * self._world_size
        torch.distributed.all_gather_object(out, obj)
        return out if self._rank == dst else None

    def barrier(self):
        if self.accelerator:
            self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ text

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", None) or self.pretrained

    def chat_template(self, chat_template=False):
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _bos(self) -> list[int]:
        """What starts a raw-text sequence: BOS where the family's raw text has it (LLaDA), else nothing."""
        bos = self.tokenizer.bos_token_id
        return [bos] if self.family.raw_text_bos and bos is not None else []

    def tok_encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special-token spellings, from a chat template, are parsed), after BOS
        where the family's raw text starts with one and ``text`` does not."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = self._bos()
        return ids if ids[:1] == bos else bos + ids

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(context ids, continuation ids)``: where the whole text's tokens start with the context's, the
        split is there; otherwise lm-eval's convention (trailing spaces of the context move to the
        continuation, which is what the whole text has beyond the context's tokens). Always moving the
        spaces would score a chat template's closing newlines as part of every answer."""
        if not context:
            prefix = self._bos() or [self.tokenizer.eos_token_id]
            return prefix, self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        whole, ctx = self.tok_encode(context + continuation), self.tok_encode(context)
        if whole[: len(ctx)] == ctx:
            return ctx, whole[len(ctx) :]
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole, ctx = self.tok_encode(context + continuation), self.tok_encode(context)
        return ctx, whole[len(ctx) :]

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[int, ...]:
        """The context, cut from the left so that context + continuation fits ``max_length``."""
        room = self.max_length - len(continuation)
        if room < 1:
            raise ValueError(
                f"a continuation of {len(continuation)} tokens leaves no room for its context "
                f"within max_length={self.max_length}"
            )
        return tuple(context[-room:])

    # ------------------------------------------------------------------ likelihoods

    @torch.no_grad()
    def _terms(self, ids, resp, masked, weight) -> torch.Tensor:
        """The estimator's model: per-sample ELBO terms, packed (several masked sequences per row) with the
        fused head."""
        dev = self._device
        lengths = (resp.long() * torch.arange(1, resp.shape[1] + 1)).amax(-1)  # rows are right-padded
        n = masked.shape[1]
        draw = MaskDraw(masked.to(dev), weight.to(dev), masked.sum(-1).float().to(dev), SamplingPlan(n_t=n))
        return packed_elbo_terms(
            self.model,
            ids.to(dev),
            resp.to(dev),
            draw,
            self.mask_token_id,
            lengths=lengths.to(dev),
            row_length=int(lengths.max()),
        )

    def _record(self, req: Instance, est: Estimate, **extra):
        self.sample_stats[(req.task_name, req.doc_id, req.idx)] = {
            "elbo": est.mean,
            "elbo_se": est.se,
            "mc_samples": est.n,
            **extra,
        }

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(ELBO, is_greedy)`` per request; continuations of one context share random numbers."""
        pairs = [self._encode_pair(*req.args) for req in requests]
        items = []
        for req, (ctx, cont) in zip(requests, pairs):
            if not cont:
                raise ValueError(f"request {req.args!r}: the continuation has no tokens")
            items.append(LikelihoodRequest(self._fit(ctx, cont), tuple(cont), group=req.args[0]))
        estimates = self._estimate(items, "loglikelihood", disable_tqdm)
        out = []
        for req, item, est in zip(requests, items, estimates):
            greedy = self._is_greedy(item) if self.greedy_check else False
            self._record(req, est)
            out.append((est.mean, greedy))
        return out

    def _estimate(self, items: list[LikelihoodRequest], what: str, disable_tqdm: bool) -> list[Estimate]:
        """Estimates in chunks of whole groups (progress shown per chunk)."""
        by_group = defaultdict(list)
        for k, item in enumerate(items):
            by_group[item.group].append(k)
        groups = list(by_group.values())
        out: list[Estimate | None] = [None] * len(items)
        step = max(1, self.batch_size * 8)
        for start in tqdm(range(0, len(groups), step), desc=f"vrpo {what}", disable=disable_tqdm or self._rank):
            ks = [k for g in groups[start : start + step] for k in g]
            for k, est in zip(ks, self.estimator.estimate([items[k] for k in ks])):
                out[k] = est
        return out

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """The ELBO of each whole text: windows of up to ``max_length - 1`` tokens, each after BOS (EOS
        when the family has no raw-text BOS); the windows' ELBOs and variances add up."""
        prefix = self._bos() or [self.tokenizer.eos_token_id]
        items, owner = [], []
        for r, req in enumerate(requests):
            ids = self.tokenizer(req.args[0], add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"loglikelihood_rolling: request {r} has an empty text")
            width = self.max_length - len(prefix)
            for w, start in enumerate(range(0, len(ids), width)):
                items.append(
                    LikelihoodRequest(tuple(prefix), tuple(ids[start : start + width]), group=f"{r}/{w}/{req.args[0]}")
                )
                owner.append(r)
        estimates = self._estimate(items, "loglikelihood_rolling", disable_tqdm)
        totals = [[0.0, 0.0, 0] for _ in requests]
        for r, est in zip(owner, estimates):
            totals[r][0] += est.mean
            totals[r][1] += est.se**2
            totals[r][2] += est.n
        out = []
        for req, (mean, var, n) in zip(requests, totals):
            self._record(req, Estimate(mean, var**0.5, n))
            out.append(mean)
        return out

    @torch.no_grad()
    def _is_greedy(self, item: LikelihoodRequest) -> bool:
        """LLaDA's check: from a fully masked continuation, unmask the most confident prediction one token
        per forward; greedy when the result is the continuation."""
        P, L = len(item.context), len(item.continuation)
        x = torch.tensor([item.context + (self.mask_token_id,) * L], device=self._device)
        shift = self.family.logit_shift
        for _ in range(L):
            logits = self.model(x).logits.float()
            if shift:
                logits = torch.cat([logits[:, :shift], logits[:, :-shift]], dim=1)
            masked = x[0] == self.mask_token_id
            prob, guess = logits[0].softmax(-1).max(-1)
            best = torch.where(masked, prob, -1.0).argmax()
            x[0, best] = guess[best]
        return x[0, P:].tolist() == list(item.continuation)

    # ------------------------------------------------------------------ generation

    def _stop_ids(self) -> set[int]:
        """Ids that end an answer: special and added tokens (EOS, end of turn, mask, reserved fillers)."""
        return set(self.tokenizer.all_special_ids) | set(self.tokenizer.added_tokens_decoder)

    def _answer(self, ids: list[int], until: list[str]) -> str:
        stops = self._stop_ids()
        end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        text = self.tokenizer.decode(ids[:end])
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text

    def _sampler_kwargs(self, gen_kwargs: dict) -> dict:
        """The model arguments' sampler settings; a request's ``temperature``/``do_sample`` overrides the
        temperature; ``max_gen_toks`` is the length when the model arguments give no ``gen_length``."""
        kw = dict(self.gen)
        if kw["gen_length"] is None:
            kw["gen_length"] = int(gen_kwargs.get("max_gen_toks", DEFAULT_GEN_LENGTH))
        if gen_kwargs.get("do_sample") is False:
            kw["temperature"] = 0.0
        elif "temperature" in gen_kwargs:
            kw["temperature"] = float(gen_kwargs["temperature"])
        return kw

    @torch.no_grad()
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """The family's sampler on batches of ``batch_size`` prompts (left-padded), cut at the first stop
        sequence or special token."""
        out: list[str | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        for start in tqdm(
            range(0, len(order), self.batch_size),
            desc="vrpo generate_until",
            disable=disable_tqdm or self._rank,
        ):
            batch = order[start : start + self.batch_size]
            by_kwargs = defaultdict(list)
            for i in batch:
                by_kwargs[repr(sorted(requests[i].args[1].items()))].append(i)
            for members in by_kwargs.values():
                gen_kwargs = requests[members[0]].args[1]
                until = gen_kwargs.get("until", [])
                until = [until] if isinstance(until, str) else list(until)
                answers = self._generate([requests[i].args[0] for i in members], self._sampler_kwargs(gen_kwargs))
                for i, ids in zip(members, answers):
                    out[i] = self._answer(ids, until)
        return out

    def _generate(self, contexts: list[str], kw: dict) -> list[list[int]]:
        """Generated ids per context (left-padded batch, seeded by the contexts when sampling)."""
        room = self.max_length - kw["gen_length"]
        encoded = [self.tok_encode(c)[-room:] for c in contexts]
        P = max(map(len, encoded))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        ids = torch.full((len(encoded), P), pad, dtype=torch.long)
        attention = torch.zeros(len(encoded), P, dtype=torch.long)
        for b, e in enumerate(encoded):
            ids[b, P - len(e) :], attention[b, P - len(e) :] = torch.tensor(e), 1
        g = torch.Generator(device=self._device).manual_seed(draw_key(self.settings.seed, *contexts))
        x = SAMPLERS[self.family.sampler](
            self.model,
            ids.to(self._device),
            self.mask_token_id,
            prompt_attention_mask=attention.to(self._device) if (attention == 0).any() else None,
            generator=g,
            **kw,
        )
        return x[:, P:].tolist()


def attach_stats(samples: dict, stats: dict) -> dict:
    """Add each request's ``{"elbo", "elbo_se", "mc_samples"}`` to lm-eval's logged samples (the
    ``samples`` of ``simple_evaluate(..., log_samples=True)``, per task), as the field ``"vrpo"``: one entry
    per request of the document, in request order. ``stats`` is :attr:`VRPOEvalLM.sample_stats` (all
    processes' merged). Returns ``samples``."""
    for task, examples in samples.items():
        for ex in examples:
            found = [stats.get((task, ex["doc_id"], i)) for i in range(len(ex["arguments"]))]
            if any(f is not None for f in found):
                ex["vrpo"] = found
    return samples
