"""Load masked diffusion LM checkpoints into transformers (no remote code) and save them back in their format.

:func:`load_mdm` reads a local directory holding ``config.json`` and ``model.safetensors`` or a sharded
``model.safetensors.index.json``, in a family's own format (LLaDA: ``model_type="llada"``, keys
``model.transformer.*``; Dream: ``model_type="Dream"``, Qwen2 keys) or as a transformers export
(``model_type="llama"`` / ``"qwen2"``); the family comes from the config (:mod:`vrpo.models.families`). The
model is built on the meta device and every tensor is read with ``safetensors.safe_open`` into its
parameter, one tensor at a time, so loading never holds two copies of the weights (peak RSS is the model
plus about one tensor).

:func:`save_mdm` writes the family's format back: its keys, its config schema, safetensors shards with an
index when the model is large, all written to a temporary directory that is renamed into place.
:func:`load_llada`/:func:`save_llada` and :func:`load_dream`/:func:`save_dream` are the same for one family.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from huggingface_hub import split_torch_state_dict_into_shards
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PretrainedConfig

from ..errors import CheckpointError
from ..files import read_json
from .attention import check_backend
from .dtypes import SAFETENSORS_DTYPES, resolve_dtype
from .families import (
    DREAM,
    FAMILY_ATTR,
    LLADA,
    ModelFamily,
    family_of,
    family_of_config,
)
from .llada import checked_mask_token_id
from .modeling import BidirectionalLlamaForCausalLM, BidirectionalQwen2ForCausalLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model(-\d+-of-\d+)?\.safetensors$")


# --------------------------------------------------------------------------------------------- loading


def _weight_files(path: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it, from the index or the single file's header."""
    index_file, single = path / INDEX_NAME, path / WEIGHTS_NAME
    if index_file.is_file():
        index = read_json(index_file)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_file}: no 'weight_map' listing the tensors and their shards")
        by_shard: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(key)
        for shard, keys in by_shard.items():
            if not (path / shard).is_file():
                raise FileNotFoundError(
                    f"{index_file} lists shard {shard!r} (holding {keys[0]!r} and {len(keys) - 1} more "
                    f"tensors), but {path / shard} does not exist"
                )
        return {key: path / shard for key, shard in weight_map.items()}
    if single.is_file():
        with _open(single) as f:
            return dict.fromkeys(f.keys(), single)
    raise FileNotFoundError(f"{path}: neither {WEIGHTS_NAME} nor {INDEX_NAME} is there")


def _open(file: Path, device: str = "cpu"):
    try:
        return safe_open(str(file), framework="pt", device=device)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def _headers(files: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Checkpoint key -> (shape, safetensors dtype), read from the headers only."""
    out = {}
    by_file: dict[Path, list[str]] = {}
    for key, file in files.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        with _open(file) as f:
            present = set(f.keys())
            for key in keys:
                if key not in present:
                    raise CheckpointError(f"{file}: the index says it holds tensor {key!r}, but it does not")
                sl = f.get_slice(key)
                out[key] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def _config_for(path: Path, mask_token_id: int | None, caller: str) -> tuple[PretrainedConfig, ModelFamily, bool]:
    """``(transformers config, family, native format?)`` of the checkpoint directory ``path``."""
    if not path.is_dir():
        raise FileNotFoundError(f"{caller}: {path} is not a directory")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path}: no {CONFIG_NAME}; expected a masked diffusion LM checkpoint directory (LLaDA or Dream, "
            "in its own format or as a transformers Llama/Qwen2 export)"
        )
    raw = read_json(config_file)
    family, native = family_of_config(raw, str(config_file))
    if native:
        config = family.to_hf_config(raw, source=str(config_file), mask_token_id=mask_token_id)
    else:
        raw = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map", "architectures")}
        config = family.config_class(**raw)
        config.mask_token_id = checked_mask_token_id(
            getattr(config, "mask_token_id", None) if mask_token_id is None else mask_token_id,
            config.vocab_size,
            str(config_file),
            f"{family.display_name}: {family.mask_token_id}, token {family.mask_token!r}",
        )
    setattr(config, FAMILY_ATTR, family.name)
    return config, family, native


def check_fits(config: PretrainedConfig, dtype: torch.dtype | None, device: str, source) -> int:
    """The parameter count of ``config``; raises :class:`CheckpointError` naming ``source`` when the weights
    alone (in ``dtype``; None: 2 bytes each, the smallest float type) exceed ``device``'s memory, before
    anything is built (``n_layers: 1000000`` would otherwise build a million layers first)."""
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    kv = config.num_key_value_heads or config.num_attention_heads
    attention = 2 * d * config.num_attention_heads * head_dim + 2 * d * kv * head_dim
    per_layer = attention + 3 * d * config.intermediate_size + 2 * d
    params = layers * per_layer + vocab * d * (1 if config.tie_word_embeddings else 2) + d
    if device.startswith("cuda"):
        memory = torch.cuda.get_device_properties(torch.device(device)).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = params * (dtype.itemsize if dtype is not None else 2)
    if need > memory:
        raise CheckpointError(
            f"{source}: the config describes {params:,} parameters ({need / 2**30:,.1f} GiB of weights), more than "
            f"the {memory / 2**30:,.1f} GiB of {device} memory (layers={layers}, hidden size={d}, vocab={vocab})"
        )
    return params


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)


def load_mdm(path, dtype=None, attn_implementation=None, **kwargs) -> nn.Module:
    """Load a local masked diffusion LM checkpoint as a bidirectional transformers model (no remote code).

    The family (LLaDA, Dream, ...) is recognised from ``config.json``: the family's own ``model_type`` or a
    transformers export (``"llama"``/``"qwen2"``, with ``mdm_family`` when set).

    Args:
        path: a directory with ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json``
            plus its shards.
        dtype: the parameters' dtype (``torch.bfloat16``, ``"float32"``, ...); ``None``/``"auto"`` keeps the
            stored dtype.
        attn_implementation: ``"sdpa"`` (default), ``"eager"``, ``"flash_attention_2"`` or ``"vrpo_triton"``.
        **kwargs: ``mask_token_id`` (required when the config lacks one), ``device`` (where the weights are
            read to, default ``"cpu"``), and any attribute of the family's transformers config to override
            (e.g. ``attention_dropout``).

    Returns:
        The family's ``model_class`` (:class:`BidirectionalLlamaForCausalLM` for LLaDA,
        :class:`BidirectionalQwen2ForCausalLM` for Dream) in eval mode; ``model(input_ids).logits`` is
        [B, S, vocab], ``model.config.mask_token_id`` the mask token, ``model.config.mdm_family`` the family.

    Raises:
        FileNotFoundError: no directory, no ``config.json`` or no weights, or a shard of the index is missing.
        CheckpointError: a missing, unexpected or wrongly shaped tensor (named with its file).
        ValueError: an unknown ``model_type``, no ``mask_token_id``, or an option the family's transformers
            class cannot express.
    """
    return _load(path, dtype, attn_implementation, kwargs, caller="load_mdm", expect=None)


def load_llada(path, dtype=None, attn_implementation=None, **kwargs) -> BidirectionalLlamaForCausalLM:
    """:func:`load_mdm` for a LLaDA checkpoint (LLaDA's format or a transformers Llama export); another
    family's checkpoint is a ``ValueError``."""
    return _load(path, dtype, attn_implementation, kwargs, caller="load_llada", expect=LLADA)


def load_dream(path, dtype=None, attn_implementation=None, **kwargs) -> BidirectionalQwen2ForCausalLM:
    """:func:`load_mdm` for a Dream checkpoint (Dream's format or a transformers Qwen2 export); another
    family's checkpoint is a ``ValueError``."""
    return _load(path, dtype, attn_implementation, kwargs, caller="load_dream", expect=DREAM)


def _load(path, dtype, attn_implementation, kwargs: dict, *, caller: str, expect: ModelFamily | None):
    path = Path(path)
    kwargs = dict(kwargs)
    mask_token_id = kwargs.pop("mask_token_id", None)
    device = str(torch.device(kwargs.pop("device", "cpu")))
    config, family, native = _config_for(path, mask_token_id, caller)
    if expect is not None and family is not expect:
        raise ValueError(
            f"{caller}: {path / CONFIG_NAME} is a {family.display_name} checkpoint, not {expect.display_name}; "
            "use load_mdm, which loads any supported family"
        )
    for name, value in kwargs.items():
        if not hasattr(config, name):
            raise TypeError(
                f"{caller} got an unexpected keyword argument {name!r} "
                f"(not mask_token_id, device, or a {type(config).__name__} field)"
            )
        setattr(config, name, value)
    attn = check_backend(attn_implementation, device)
    dtype = resolve_dtype(dtype, f"{caller}: dtype")
    check_fits(config, dtype, device, path / CONFIG_NAME)
    config._name_or_path = str(path.resolve())
    to_hf = family.to_hf_key if native else (lambda k: k)
    to_file = family.to_native_key if native else (lambda k: k)

    files = _weight_files(path)
    headers = _headers(files)
    with init_empty_weights(include_buffers=False):
        model = family.model_class(config)
    expected = dict(model.named_parameters())
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)  # the embedding, tied below

    plan: dict[str, str] = {}  # checkpoint key -> parameter name
    for key in files:
        name = to_hf(key)
        if name == "lm_head.weight" and config.tie_word_embeddings:
            if native:
                raise CheckpointError(
                    f"{files[key]}: {key!r} is present but config.json ties the embeddings and the head"
                )
            continue  # transformers may store the tied head as well; it is the embedding.
        if name is None or name not in expected:
            raise CheckpointError(f"{files[key]}: unexpected tensor {key!r}, which the config's model does not have")
        shape = tuple(expected[name].shape)
        if headers[key][0] != shape:
            raise CheckpointError(
                f"{files[key]}: tensor {key!r} has shape {headers[key][0]}, but config.json implies {shape} for {name}"
            )
        if headers[key][1] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{files[key]}: tensor {key!r} has dtype {headers[key][1]}, not a float type")
        plan[key] = name
    loaded = set(plan.values())
    for name in expected:
        if name not in loaded:
            key = to_file(name) or name
            where = path / INDEX_NAME if (path / INDEX_NAME).is_file() else path / WEIGHTS_NAME
            raise CheckpointError(f"{where}: missing tensor {key!r} (parameter {name})")

    # One tensor at a time, each file opened for just that tensor: safetensors maps the file and hands out
    # views of the mapping, so the extra memory while loading is one tensor's worth of mapped pages. The copy
    # gives the model memory of its own: the checkpoint files are no longer mapped once loading is done, so
    # overwriting them later (even in place) cannot change or crash the model.
    for key in sorted(plan, key=lambda k: (str(files[k]), k)):
        with _open(files[key], device) as f:
            tensor = f.get_tensor(key)
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        elif tensor.device.type == "cpu":
            tensor = tensor.clone()
        _set_parameter(model, plan[key], tensor)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(device)  # the non-persistent RoPE buffers; parameters are already there
    config.dtype = model.model.embed_tokens.weight.dtype
    model.set_attn_implementation(attn)
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------- saving


def _saveable(model) -> tuple[nn.Module, bool]:
    """The transformers model whose weights ``save_mdm`` writes, and whether LoRA adapters must be merged in
    (a PEFT model); refuses adapters that have no equivalent in the weights."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    if isinstance(model, PeftModel):
        if model.peft_config[model.active_adapter].is_prompt_learning:
            raise ValueError(
                f"save_mdm: a {model.peft_config[model.active_adapter].peft_type} adapter "
                "(prompt learning) has no equivalent in the checkpoint's weights; save it with "
                "model.save_pretrained instead"
            )
        return model.get_base_model(), True
    return model, False


def _merged_weights(
    model: nn.Module, is_peft: bool
) -> Iterator[tuple[str, Callable[[], torch.Tensor], torch.Size, torch.dtype]]:
    """``(parameter name, thunk giving the tensor, shape, dtype)`` for every weight, LoRA adapters merged in.

    Merging is non-destructive: ``W + delta`` is computed per tensor when it is written, the model keeps its
    adapters (the same arithmetic as PEFT's ``merge_and_unload``).
    """
    if not is_peft:
        for name, p in model.named_parameters():
            yield name, (lambda p=p: p.detach()), p.shape, p.dtype
        return
    skip: set[str] = set()
    for mod_name, module in model.named_modules():
        if any(mod_name == s or mod_name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            active = (
                module.modules_to_save[module.active_adapter] if not module.disable_adapters else module.original_module
            )
            for pname, p in active.named_parameters():
                yield f"{mod_name}.{pname}", (lambda p=p: p.detach()), p.shape, p.dtype
            skip.add(mod_name)
        elif isinstance(module, BaseTunerLayer):
            variant = isinstance(module, LoraLayer) and any(
                a in getattr(module, "lora_variant", {}) or module.lora_bias.get(a, False)
                for a in module.active_adapters
            )
            if not isinstance(module, LoraLayer) or variant:
                raise ValueError(
                    f"save_mdm: cannot merge the adapter on {mod_name} ({type(module).__name__}); only "
                    "plain LoRA (no DoRA or other variant, no LoRA bias) is merged on save. Call "
                    "model.merge_and_unload() first, or save the adapter with model.save_pretrained"
                )
            base = module.get_base_layer()
            for pname, p in base.named_parameters(recurse=False):
                if pname == "weight" and not module.merged and not module.disable_adapters:
                    adapters = [a for a in module.active_adapters if a in module.lora_A]

                    def merged(p=p, module=module, adapters=adapters):
                        w = p.detach().clone()
                        for a in adapters:
                            w += module.get_delta_weight(a).to(w.dtype)
                        return w

                    yield f"{mod_name}.{pname}", merged, p.shape, p.dtype
                else:
                    yield f"{mod_name}.{pname}", (lambda p=p: p.detach()), p.shape, p.dtype
            skip.add(mod_name)
        else:
            for pname, p in module.named_parameters(recurse=False):
                yield (
                    (f"{mod_name}.{pname}" if mod_name else pname),
                    (lambda p=p: p.detach()),
                    p.shape,
                    p.dtype,
                )


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "full_tensor"):  # a DTensor (FSDP2 / tensor parallel): gather the full weight
        t = t.full_tensor()
    return t.to("cpu").contiguous()


def _remote_code_files(config, native_cfg: dict) -> list[Path]:
    """The remote-code .py files named by ``auto_map`` next to the checkpoint the model was loaded from."""
    source = getattr(config, "_name_or_path", None)
    if not source or not Path(source).is_dir():
        return []
    refs = []
    for ref in (native_cfg.get("auto_map") or {}).values():
        refs += ref if isinstance(ref, list) else [ref]
    modules = {ref.split(".")[0] for ref in refs if isinstance(ref, str)}
    return [Path(source) / f"{m}.py" for m in sorted(modules) if (Path(source) / f"{m}.py").is_file()]


def _is_checkpoint_file(name: str) -> bool:
    return name in (CONFIG_NAME, INDEX_NAME) or bool(_SHARD_RE.match(name))


def _write_into_place(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` directory to ``path``; files of an existing ``path`` that are not checkpoint
    files (a tokenizer, say) are carried over, stale weights and configs are dropped."""
    if not path.exists():
        os.rename(tmp, path)
        return
    if not path.is_dir():
        raise FileExistsError(f"save_mdm: {path} exists and is not a directory")
    for entry in path.iterdir():
        if _is_checkpoint_file(entry.name) or (tmp / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, tmp / entry.name)
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rename(path, aside / path.name)
    try:
        os.rename(tmp, path)
    except OSError:
        os.rename(aside / path.name, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)
    return dst


def save_mdm(model, path, *, max_shard_size: int | str = "5GB") -> Path:
    """Write ``model`` in its family's own checkpoint format: ``config.json`` (the family's schema, e.g.
    ``model_type="llada"`` or ``"Dream"``) and safetensors weights with the family's keys, sharded with
    ``model.safetensors.index.json`` when larger than ``max_shard_size``.

    ``model`` is a model from :func:`load_mdm` (or any model of a known family, see
    :func:`~vrpo.models.families.family_of`) on any device and in any dtype; tensors are written in the
    model's dtype. A PEFT model with LoRA adapters is saved with the adapters merged into the weights (the
    model itself is left unchanged); other adapter types are refused. The family's remote-code files are
    copied from the directory the model was loaded from when they are there, and ``config.json`` keeps its
    ``auto_map`` only then: an ``auto_map`` naming files that are not in the folder would make
    ``AutoTokenizer``/``AutoConfig`` ask for remote code. The directory is written under a temporary name in
    the same parent and renamed into place; non-checkpoint files already in ``path`` (a tokenizer) are kept.

    Returns the checkpoint directory.
    """
    return _save(model, path, max_shard_size, caller="save_mdm", expect=None)


def save_llada(model, path, *, max_shard_size: int | str = "5GB") -> Path:
    """:func:`save_mdm` for a LLaDA model (LLaDA's format, readable by its official code)."""
    return _save(model, path, max_shard_size, caller="save_llada", expect=LLADA)


def save_dream(model, path, *, max_shard_size: int | str = "5GB") -> Path:
    """:func:`save_mdm` for a Dream model (Dream's format, readable by its official code)."""
    return _save(model, path, max_shard_size, caller="save_dream", expect=DREAM)


def _save(model, path, max_shard_size, *, caller: str, expect: ModelFamily | None) -> Path:
    base, is_peft = _saveable(model)
    family = family_of(base)
    config = getattr(base, "config", None)
    if family is None or not isinstance(config, family.config_class):
        raise TypeError(
            f"{caller}: expected a masked diffusion LM of a known family (from load_mdm), got {type(base).__name__}"
        )
    if expect is not None and family is not expect:
        raise ValueError(f"{caller}: the model is {family.display_name}, not {expect.display_name}; use save_mdm")
    if getattr(config, "mask_token_id", None) is None:
        raise ValueError(f"{caller}: model.config.mask_token_id is not set; {family.display_name}'s config needs it")

    tensors: dict[str, tuple] = {}
    for name, thunk, shape, dt in _merged_weights(base, is_peft):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        key = family.to_native_key(name)
        if key is None:
            raise ValueError(f"{caller}: parameter {name!r} has no {family.display_name} counterpart")
        tensors[key] = (thunk, shape, dt)
    native_cfg = family.to_native_config(config, dtype=base.get_input_embeddings().weight.dtype)
    remote_code = _remote_code_files(config, native_cfg)
    if not remote_code:
        native_cfg.pop("auto_map", None)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the renamed checkpoint gets ordinary permissions
    try:
        meta = {k: torch.empty(shape, dtype=dt, device="meta") for k, (_, shape, dt) in tensors.items()}
        split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)
        for filename, keys in split.filename_to_tensors.items():
            with torch.no_grad():
                shard = {k: _to_cpu(tensors[k][0]()) for k in keys}
            save_file(shard, str(tmp / filename), metadata={"format": "pt"})
            del shard
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG_NAME).write_text(json.dumps(native_cfg, indent=2) + "\n")
        for file in remote_code:
            shutil.copy2(file, tmp / file.name)
        _write_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
