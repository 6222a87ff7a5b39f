"""Model families: everything vrpo needs to know about a masked diffusion LM, one table entry per family.

A family says which transformers class runs it, how its checkpoint's config and parameter names map onto
that class, whether its logits are shifted, its mask and end-of-turn tokens, its chat conventions and its
sampler. The loader, the ELBO, the data pipeline and the trainer read these fields (through
:func:`family_of` a model, :func:`family_of_config` a checkpoint config, :func:`family_of_tokenizer` a
tokenizer) and never compare family names.

Adding a family is one :class:`ModelFamily` in :data:`FAMILIES` (plus its config converters if its
``config.json`` is not a transformers config) and its tests; see docs/models.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import LlamaConfig, PretrainedConfig, Qwen2Config

from ..estimator import unwrap
from .dream import DREAM_MASK_TOKEN, dream_to_qwen2_config, qwen2_to_dream_config
from .llada import (
    LLADA_CHAT_TEMPLATE,
    LLADA_MASK_TOKEN,
    hf_to_llada_key,
    llada_to_hf_key,
    llada_to_llama_config,
    llama_to_llada_config,
)
from .modeling import BidirectionalLlamaForCausalLM, BidirectionalQwen2ForCausalLM

# The config attribute that names a model's family; written by the loaders, kept in transformers exports.
FAMILY_ATTR = "mdm_family"


def _identity(key: str) -> str:
    return key


@dataclass(frozen=True)
class ModelFamily:
    """One masked diffusion LM family.

    Attributes:
        name: the id stored in ``config.mdm_family`` (lower case, e.g. ``"dream"``).
        display_name: for messages (``"Dream"``).
        model_types: ``model_type`` values of the family's own ``config.json``.
        hf_model_type: ``model_type`` of a transformers-format export (``"qwen2"``).
        model_class: the bidirectional transformers class the weights load into.
        config_class: that class's config class.
        to_hf_config: ``(native config dict, source, mask_token_id) -> config_class`` (source names the file).
        to_native_config: ``(config, dtype) -> native config dict`` for saving.
        to_hf_key / to_native_key: checkpoint key <-> parameter name (None: not a parameter).
        logit_shift: 0 when the output at position i predicts token i (LLaDA); 1 when the output at i - 1
            does (Dream, like an autoregressive LM).
        mask_token: the mask token's text; ``mask_token_id``: its id in the released checkpoint (messages).
        end_of_turn: the token closing an assistant turn; the response is its answer, this token and one EOS.
        user_header: the chat template's text opening a user turn (to show the last user message).
        trims_messages: the chat template strips each message's content (the response is stripped alike).
        raw_text_bos: a raw-text prompt (no chat template) starts with BOS.
        chat_template: the released chat template (for tokenizers built in-process).
        tokenizer_class: the transformers tokenizer class to build when the checkpoint's tokenizer names
            remote code (``auto_map``); None: ``AutoTokenizer``.
        sampler: the key of its sampler in :data:`vrpo.models.samplers.SAMPLERS`
            (``sampler(model, prompt_ids, mask_token_id, gen_length=, steps=, block_length=, ...)``).
        sampler_name: what the sampler is, for messages.
    """

    name: str
    display_name: str
    model_types: tuple[str, ...]
    hf_model_type: str
    model_class: type
    config_class: type
    to_hf_config: Callable[..., PretrainedConfig]
    to_native_config: Callable[..., dict]
    to_hf_key: Callable[[str], str | None]
    to_native_key: Callable[[str], str | None]
    mask_token: str
    mask_token_id: int
    end_of_turn: str
    user_header: str
    trims_messages: bool
    raw_text_bos: bool
    chat_template: str | None
    tokenizer_class: str | None
    sampler: str
    sampler_name: str

    @property
    def logit_shift(self) -> int:
        """0 when the output at i predicts token i (LLaDA); 1 when the output at i - 1 does (Dream, like an
        autoregressive LM). Declared by the family's model class, which the ELBO reads."""
        return self.model_class.logit_shift

    def last_user_message(self, prompt_text: str) -> str:
        """The content of the last user turn of a prompt rendered with this family's chat template (the
        stripped text itself when it has no user turn)."""
        if self.user_header not in prompt_text:
            return prompt_text.strip()
        return prompt_text.rsplit(self.user_header, 1)[1].split(self.end_of_turn, 1)[0].strip()


LLADA = ModelFamily(
    name="llada",
    display_name="LLaDA",
    model_types=("llada",),
    hf_model_type="llama",
    model_class=BidirectionalLlamaForCausalLM,
    config_class=LlamaConfig,
    to_hf_config=llada_to_llama_config,
    to_native_config=llama_to_llada_config,
    to_hf_key=llada_to_hf_key,
    to_native_key=hf_to_llada_key,
    mask_token=LLADA_MASK_TOKEN,
    mask_token_id=126336,
    end_of_turn="<|eot_id|>",
    user_header="<|start_header_id|>user<|end_header_id|>",
    trims_messages=True,
    raw_text_bos=True,
    chat_template=LLADA_CHAT_TEMPLATE,
    tokenizer_class=None,
    sampler="llada",
    sampler_name="LLaDA's low-confidence remasking sampler",
)

DREAM = ModelFamily(
    name="dream",
    display_name="Dream",
    model_types=("Dream", "dream"),
    hf_model_type="qwen2",
    model_class=BidirectionalQwen2ForCausalLM,
    config_class=Qwen2Config,
    to_hf_config=dream_to_qwen2_config,
    to_native_config=qwen2_to_dream_config,
    to_hf_key=_identity,
    to_native_key=_identity,
    mask_token=DREAM_MASK_TOKEN,
    mask_token_id=151666,
    end_of_turn="<|im_end|>",
    user_header="<|im_start|>user\n",
    trims_messages=False,
    raw_text_bos=False,
    chat_template=None,  # Dream's tokenizer_config.json carries it
    tokenizer_class="Qwen2Tokenizer",
    sampler="dream",
    sampler_name="Dream's sampler (alg='origin')",
)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (LLADA, DREAM)}


def family_named(name: str, where: str = "mdm_family") -> ModelFamily:
    """The family called ``name``; ``ValueError`` naming ``where`` and the known families otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"{where}={name!r} is not a known model family ({', '.join(FAMILIES)})")
    return FAMILIES[name]


def family_of_config(raw: dict, source: str = "config.json") -> tuple[ModelFamily, bool]:
    """``(family, native)`` for a checkpoint's ``config.json`` dict: ``native`` is True for the family's own
    format, False for a transformers export (``model_type`` llama/qwen2, family from ``mdm_family`` if set).
    Raises ``ValueError`` naming ``source`` for an unknown ``model_type``."""
    model_type = raw.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family, True
    if raw.get(FAMILY_ATTR) is not None:
        family = family_named(raw[FAMILY_ATTR], f"{source}: {FAMILY_ATTR}")
        if model_type != family.hf_model_type:
            raise ValueError(
                f"{source}: {FAMILY_ATTR}={family.name!r} needs model_type {family.hf_model_type!r} "
                f"(or {family.model_types[0]!r}), got {model_type!r}"
            )
        return family, False
    for family in FAMILIES.values():
        if model_type == family.hf_model_type:
            return family, False
    known = [t for f in FAMILIES.values() for t in (f.model_types[0], f.hf_model_type)]
    raise ValueError(f"{source}: model_type={model_type!r} is not supported (expected one of {known})")


def family_of(model) -> ModelFamily | None:
    """The family of ``model`` (a loaded MDM, possibly wrapped by PEFT, DDP or ELBOModule): its config's
    ``mdm_family``, else the family whose ``model_class`` it is; None for anything else (a plain callable)."""
    model = unwrap(model)
    name = getattr(getattr(model, "config", None), FAMILY_ATTR, None)
    if name is not None:
        return family_named(name, f"{type(model).__name__}.config.{FAMILY_ATTR}")
    for family in FAMILIES.values():
        if isinstance(model, family.model_class):
            return family
    return None


def token_id(tokenizer, token: str) -> int | None:
    """``token``'s id in ``tokenizer``'s vocabulary, or None (never the unknown token's id)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(tid)


def family_of_tokenizer(tokenizer) -> ModelFamily | None:
    """The family whose end-of-turn token and mask token ``tokenizer`` has (its ``mask_token``, or the
    family's mask token in its vocabulary when it names none), or None."""
    for family in FAMILIES.values():
        if token_id(tokenizer, family.end_of_turn) is None:
            continue
        if tokenizer.mask_token == family.mask_token or (
            tokenizer.mask_token is None and token_id(tokenizer, family.mask_token) is not None
        ):
            return family
    return None
