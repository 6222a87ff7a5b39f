"""Tokenization for masked diffusion LMs: chat template, response masks, EOS and truncation policy, padding.

The conventions come from the tokenizer's model family (:func:`vrpo.models.family_of_tokenizer`: LLaDA,
Dream). An example is a prompt and a response, TRL-style: the prompt is a string or a list of chat messages
(``{"role", "content"}``), the response a string or an assistant message (or a one-message list).

* **Prompt**: the tokenizer's chat template applied to the prompt's messages (a string prompt is one user
  message), ending with the assistant header (LLaDA: ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``;
  Dream: ``<|im_start|>assistant\\n``, after Dream's default system prompt when there is no system message).
* **Response**: the answer text (stripped when the family's template strips every message, as LLaDA's does)
  followed by the family's end-of-turn token (LLaDA ``<|eot_id|>``, Dream ``<|im_end|>``) and one
  ``<|endoftext|>`` (EOS). With ``chat_template=False`` the prompt is the raw text (after BOS for LLaDA) and
  the response ends with EOS alone.

**EOS policy.** ``response_mask`` is True on the answer tokens, its end-of-turn token and its one EOS: these
are the tokens the ELBO masks and scores. The EOS tokens that :func:`collate` appends to pad a batch are
neither scored (``response_mask`` False) nor attended to (``attention_mask`` 0), so a sequence's ELBO does
not depend on how much padding its batch has (LLaDA 1.5: padded EOS is excluded from the VRPO terms).

**Truncation policy** (``max_length``): ``truncation="error"`` (the default) raises when an example is longer
than ``max_length``: silently cutting a chosen or rejected answer changes what is preferred.
``truncation="truncate"`` first drops prompt tokens from the left (keeping a leading BOS), then, if the
response alone is still too long, drops response tokens from the right; a response cut this way loses its
end-of-turn token and EOS, so the model is not taught that the answer ends there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from ..errors import TruncationError
from ..files import read_json
from .families import (
    FAMILIES,
    ModelFamily,
    family_of_config,
    family_of_tokenizer,
    token_id,
)

_HOLE = "vrpo7f3a9c1e"  # marks where a message's content goes in a rendered chat template
_HOLES = re.compile(f"( ?){_HOLE}(\\d+){_HOLE}( ?)")
TRUNCATION = ("error", "truncate")


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _remote_code_family(path: Path) -> ModelFamily | None:
    """The family whose tokenizer to build when ``path``'s tokenizer_config.json names remote code, else None."""
    file = path / "tokenizer_config.json"
    if not file.is_file():
        return None
    tok_cfg = read_json(file)
    if "AutoTokenizer" not in (tok_cfg.get("auto_map") or {}):
        return None
    candidates = [f for f in FAMILIES.values() if f.tokenizer_class is not None]
    mask = _token_text(tok_cfg.get("mask_token"))
    for family in candidates:
        if mask == family.mask_token:
            return family
    if (path / "config.json").is_file():
        family, _ = family_of_config(read_json(path / "config.json"), str(path / "config.json"))
        if family.tokenizer_class is not None:
            return family
    raise ValueError(
        f"{file}: the tokenizer is remote code ({tok_cfg['auto_map']['AutoTokenizer']}), which vrpo does not run, "
        f"and it is not the tokenizer of a known family ({', '.join(f.display_name for f in candidates)})"
    )


def _native_model_config(path: Path) -> PretrainedConfig | None:
    """What ``AutoTokenizer`` may know of the model in checkpoint folder ``path`` when its ``config.json``
    is a family's own format (``model_type`` ``llada`` or ``Dream``), else None.

    ``AutoTokenizer`` reads a folder's ``config.json`` only to help choose the tokenizer class. A family's own
    ``model_type`` is no transformers model type, so it would parse the file as a bare ``PretrainedConfig``
    and log "You are using a model of type `llada` to instantiate a model of type ``" on every load. Passing
    that bare config (same name, no model type: the same choice of class) says the same without the warning.
    """
    file = path / "config.json"
    if not file.is_file():
        return None
    raw = read_json(file)
    try:
        _, native = family_of_config(raw, str(file))
    except ValueError:  # not a masked diffusion LM's config: AutoTokenizer reads it as it would anyway
        return None
    if not native:
        return None
    return PretrainedConfig(name_or_path=str(path), tokenizer_class=raw.get("tokenizer_class"))


def load_tokenizer(path, *, mask_token: str | None = None, **kwargs) -> PreTrainedTokenizerBase:
    """The tokenizer in directory ``path``, with a mask token registered and no remote code.

    A tokenizer whose ``tokenizer_config.json`` names remote code (Dream's ``auto_map``) is built as its
    family's standard transformers class (Dream: ``Qwen2Tokenizer`` from ``vocab.json``/``merges.txt``, which
    gives the same ids), and the ``auto_map`` is dropped so that ``save_pretrained`` writes a folder that
    ``AutoTokenizer`` loads without remote code. Any other tokenizer is ``AutoTokenizer.from_pretrained(path,
    **kwargs)``.

    LLaDA's released tokenizer has ``<|mdm_mask|>`` in its vocabulary but does not name it ``mask_token``;
    this registers the family's mask token (or ``mask_token``; no new token is added) so that
    ``tokenizer.mask_token_id`` works. Raises ``ValueError`` when the tokenizer has no mask token.
    """
    family = _remote_code_family(Path(path)) if Path(path).is_dir() else None
    if family is not None:
        tokenizer = getattr(transformers, family.tokenizer_class).from_pretrained(path, **kwargs)
    else:
        if "config" not in kwargs and Path(path).is_dir() and (config := _native_model_config(Path(path))):
            kwargs["config"] = config
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    tokenizer.init_kwargs.pop("auto_map", None)
    if tokenizer.mask_token_id is None:
        tokenizer.add_special_tokens(
            {"mask_token": tokenizer.convert_ids_to_tokens(get_mask_token_id(tokenizer, mask_token))}
        )
    return tokenizer


def _known_masks() -> str:
    return "; ".join(f"{f.display_name}: {f.mask_token!r}, id {f.mask_token_id}" for f in FAMILIES.values())


def get_mask_token_id(tokenizer: PreTrainedTokenizerBase, mask_token: str | None = None) -> int:
    """The mask token's id: ``tokenizer.mask_token_id``, else the id of ``mask_token`` (default: a known
    family's mask token) in the vocabulary."""
    if tokenizer.mask_token_id is not None:
        return int(tokenizer.mask_token_id)
    candidates = [mask_token] if mask_token is not None else [f.mask_token for f in FAMILIES.values()]
    for candidate in candidates:
        tid = token_id(tokenizer, candidate)
        if tid is not None:
            return tid
    raise ValueError(
        f"the tokenizer has no mask token: tokenizer.mask_token is not set and none of {candidates} is in its "
        f"vocabulary ({_known_masks()}); a masked diffusion LM needs one"
    )


def tokenizer_family(tokenizer: PreTrainedTokenizerBase) -> ModelFamily:
    """The tokenizer's model family (:func:`vrpo.models.family_of_tokenizer`); ``ValueError`` if none."""
    family = family_of_tokenizer(tokenizer)
    if family is None:
        known = "; ".join(f"{f.display_name}: {f.end_of_turn!r} and {f.mask_token!r}" for f in FAMILIES.values())
        raise ValueError(
            f"the tokenizer ({type(tokenizer).__name__}) is not a known model family's: it lacks the end-of-turn "
            f"and mask tokens of each ({known})"
        )
    return family


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token (LLaDA's and Dream's is '<|endoftext|>')")
    return int(tokenizer.eos_token_id)


ROLES = ("system", "user", "assistant")


def check_messages(messages, name: str, assistant_only: bool = False) -> list[dict]:
    """The one chat-message validator (the data reader adds the file and line): a non-empty list of
    ``{'role', 'content'}`` messages with a known role and non-empty string content; ``assistant_only``: a
    response, one assistant message. Raises ``ValueError`` naming the message; returns plain dicts."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"field '{name}' must be a string or a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError(f"field '{name}' is an empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} of '{name}' must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"message {i} of '{name}' has unknown role {role!r} (expected one of {ROLES})")
        if assistant_only and role != "assistant":
            raise ValueError(f"message {i} of '{name}' has role {role!r}; responses must be 'assistant' turns")
        if not isinstance(content, str):
            raise ValueError(f"message {i} of '{name}' has content of type {type(content).__name__}, expected a string")
        if not content.strip():
            raise ValueError(f"message {i} of '{name}' has empty content")
    if assistant_only and len(messages) != 1:
        raise ValueError(f"field '{name}' must be one assistant message, got {len(messages)} messages")
    return [dict(m) for m in messages]


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt, *, chat_template: bool = True) -> str:
    """The prompt text: the chat template applied to ``prompt`` (a string is one user message), ending with
    the assistant header; with ``chat_template=False``, the string prompt as is."""
    if not chat_template:
        if not isinstance(prompt, str):
            raise ValueError("chat_template=False needs a string prompt, not messages")
        return prompt
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat_template; pass chat_template=False for raw text prompts")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else check_messages(prompt, "prompt")
    if messages[-1]["role"] == "assistant":
        raise ValueError("the prompt's last message is from the assistant; the answer belongs in the response")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of user text, where a special token's spelling (``<|eot_id|>``, ``<|mdm_mask|>``, ...) is
    plain text: user content must not inject control tokens."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt, chat_template: bool) -> list[int]:
    """Token ids of :func:`format_prompt`: the template's own text may hold special tokens, the messages'
    content never does. The template is rendered with a placeholder per message, and each message's
    content is tokenized apart from the template text around it. Those boundaries are special tokens and
    newlines in LLaDA's and Qwen's templates, so the ids are the whole string's, except that content
    starting with a newline is not merged with the template's newline before it."""
    if not chat_template:
        return text_ids(tokenizer, format_prompt(tokenizer, prompt, chat_template=False))
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else check_messages(prompt, "prompt")
    # Spaces around each placeholder show whether the template trims content (LLaDA's: `| trim`).
    holes = [{**m, "content": f" {_HOLE}{i}{_HOLE} "} for i, m in enumerate(messages)]
    pieces = _HOLES.split(format_prompt(tokenizer, holes))
    if [int(i) for i in pieces[2::4]] != list(range(len(messages))):
        raise ValueError("the tokenizer's chat_template does not place each message's content exactly once")
    template = tokenizer(pieces[::4], add_special_tokens=False)["input_ids"]  # one call each: they are slow
    contents = [messages[int(index)]["content"] for index in pieces[2::4]]
    trimmed = [c if left and right else c.strip() for c, left, right in zip(contents, pieces[1::4], pieces[3::4])]
    contents = tokenizer(trimmed, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ids = list(template[0])
    for content, after in zip(contents, template[1:]):
        ids += content + after
    return ids


def _response_text(response) -> str:
    if isinstance(response, str):
        return response
    if isinstance(response, Mapping):
        response = [response]
    messages = check_messages(response, "response")
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise ValueError(f"the response must be one assistant message, got roles {[m['role'] for m in messages]}")
    return messages[0]["content"]


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt,
    response,
    *,
    max_length: int | None = None,
    truncation: str = "error",
    chat_template: bool = True,
) -> dict[str, list]:
    """Token ids of ``[prompt, response]`` and which of them are the response.

    Returns ``{"input_ids": list[int], "response_mask": list[bool]}``; ``response_mask`` is True on the answer
    tokens, the end-of-turn token and one EOS (see the module docstring for the EOS and truncation policies).
    """
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation={truncation!r} is not one of {TRUNCATION}")
    prompt_ids = _prompt_ids(tokenizer, prompt, chat_template)
    return _with_response(tokenizer, prompt_ids, response, max_length, truncation, chat_template)


def _with_response(tokenizer, prompt_ids: list[int], response, max_length, truncation: str, chat_template: bool):
    """:func:`encode_example` once the prompt is tokenized (a preference pair's two sides share it)."""
    eos = _eos_id(tokenizer)
    family = tokenizer_family(tokenizer)
    if not chat_template and family.raw_text_bos and tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    answer = _response_text(response)
    if chat_template:
        answer = answer.strip() if family.trims_messages else answer
        end = [token_id(tokenizer, family.end_of_turn), eos]
    else:
        end = [eos]
    response_ids = text_ids(tokenizer, answer) + end

    if max_length is not None and len(prompt_ids) + len(response_ids) > max_length:
        total = len(prompt_ids) + len(response_ids)
        if truncation == "error":
            raise TruncationError(
                f"example has {total} tokens ({len(prompt_ids)} prompt + {len(response_ids)} response), "
                f"more than max_length={max_length}; raise max_length or pass truncation='truncate'"
            )
        keep_bos = 1 if prompt_ids and prompt_ids[0] == tokenizer.bos_token_id else 0
        if max_length <= keep_bos:
            raise ValueError(f"max_length={max_length} leaves no room for the response")
        overflow = total - max_length
        drop = min(overflow, len(prompt_ids) - keep_bos)
        prompt_ids = prompt_ids[:keep_bos] + prompt_ids[keep_bos + drop :]
        overflow -= drop
        if overflow:
            response_ids = response_ids[: len(response_ids) - overflow]
    return {
        "input_ids": prompt_ids + response_ids,
        "response_mask": [False] * len(prompt_ids) + [True] * len(response_ids),
    }


def split_example(example: Mapping) -> tuple[object, object]:
    """``(prompt, response)`` of a TRL-style single-response example.

    Accepts ``{"prompt", "completion"}`` or ``{"prompt", "response"}`` (strings or messages) and
    ``{"messages": [..., assistant]}``.
    """
    if "messages" in example:
        messages = check_messages(example["messages"], "messages")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise ValueError("'messages' must end with an assistant message after at least one prompt message")
        return messages[:-1], messages[-1]
    for key in ("completion", "response"):
        if "prompt" in example and key in example:
            return example["prompt"], example[key]
    raise ValueError(
        f"example has keys {sorted(example)}; expected 'messages', or 'prompt' with 'completion'/'response'"
    )


def encode(tokenizer: PreTrainedTokenizerBase, example: Mapping, **kwargs) -> dict[str, list]:
    """:func:`encode_example` of a TRL-style example (see :func:`split_example`)."""
    prompt, response = split_example(example)
    return encode_example(tokenizer, prompt, response, **kwargs)


def _implicit_prompt(chosen, rejected) -> tuple[list, list, list]:
    chosen = check_messages(chosen, "chosen")
    rejected = check_messages(rejected, "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise ValueError("chosen and rejected share no prompt messages; give the prompt as example['prompt']")
    return chosen[:n], chosen[n:], rejected[n:]


def encode_preference(tokenizer: PreTrainedTokenizerBase, example: Mapping, **kwargs) -> dict[str, list]:
    """Encode a TRL preference example (``prompt``, ``chosen``, ``rejected``; standard or conversational, or
    conversational with an implicit prompt shared by ``chosen`` and ``rejected``).

    Returns ``chosen_input_ids``, ``chosen_response_mask``, ``rejected_input_ids``, ``rejected_response_mask``
    (lists, ready for ``datasets.Dataset.map``). Keyword arguments as in :func:`encode_example`.
    """
    if "chosen" not in example or "rejected" not in example:
        raise ValueError(f"a preference example needs 'chosen' and 'rejected', got keys {sorted(example)}")
    chosen, rejected = example["chosen"], example["rejected"]
    if "prompt" in example:
        prompt = example["prompt"]
    elif isinstance(chosen, str) or isinstance(rejected, str):
        raise ValueError("a standard (string) preference example needs an explicit 'prompt'")
    else:
        prompt, chosen, rejected = _implicit_prompt(chosen, rejected)
    max_length, truncation = kwargs.pop("max_length", None), kwargs.pop("truncation", "error")
    chat_template = kwargs.pop("chat_template", True)
    if kwargs:
        raise TypeError(f"encode_preference got unexpected keyword arguments {sorted(kwargs)}")
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation={truncation!r} is not one of {TRUNCATION}")
    prompt_ids = _prompt_ids(tokenizer, prompt, chat_template)
    out = {}
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        enc = _with_response(tokenizer, prompt_ids, response, max_length, truncation, chat_template)
        out[f"{name}_input_ids"] = enc["input_ids"]
        out[f"{name}_response_mask"] = enc["response_mask"]
    return out


def collate(
    examples: Sequence[Mapping],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int | None = None,
    input_key: str = "input_ids",
    mask_key: str = "response_mask",
) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into a batch.

    Args:
        examples: mappings with ``input_key`` (token ids) and ``mask_key`` (response mask) of equal lengths.
        pad_token_id: the padding id (``tokenizer.pad_token_id``; LLaDA: EOS, 126081; Dream: EOS, 151643).
        pad_to_multiple_of: round the padded length up to a multiple of this.

    Returns:
        ``input_ids`` int64 [B, L], ``response_mask`` bool [B, L] (False on padding), ``attention_mask`` int64
        [B, L] (1 on tokens, 0 on padding).
    """
    if not examples:
        raise ValueError("collate: no examples")
    rows = []
    for i, ex in enumerate(examples):
        ids = torch.as_tensor(ex[input_key], dtype=torch.long).flatten()
        resp = torch.as_tensor(ex[mask_key], dtype=torch.bool).flatten()
        if ids.shape != resp.shape:
            raise ValueError(f"collate: example {i} has {ids.numel()} {input_key} but {resp.numel()} {mask_key}")
        rows.append((ids, resp))
    L = max(ids.numel() for ids, _ in rows)
    if pad_to_multiple_of:
        L = -(-L // pad_to_multiple_of) * pad_to_multiple_of
    B = len(rows)
    input_ids = torch.full((B, L), int(pad_token_id), dtype=torch.long)
    response_mask = torch.zeros((B, L), dtype=torch.bool)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    for b, (ids, resp) in enumerate(rows):
        n = ids.numel()
        input_ids[b, :n] = ids
        response_mask[b, :n] = resp
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "response_mask": response_mask, "attention_mask": attention_mask}
