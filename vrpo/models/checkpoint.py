"""Load LLaDA checkpoints into transformers (no remote code) and save them back in LLaDA's format.

:func:`load_llada` reads a local directory holding ``config.json`` and ``model.safetensors`` or a sharded
``model.safetensors.index.json``, in LLaDA's own format (``model_type="llada"``, keys
``model.transformer.*``) or in transformers' Llama format (``model_type="llama"``). The model is built on
the meta device and every tensor is read with ``safetensors.safe_open`` into its parameter, one tensor at a
time, so loading never holds two copies of the weights (peak RSS is the model plus about one tensor).

:func:`save_llada` writes LLaDA's format back: renamed keys, LLaDA's config schema with its ``auto_map``,
safetensors shards with an index when the model is large, all written to a temporary directory that is
renamed into place.
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig

from .attention import check_backend
from .config import (
    LLADA_MASK_TOKEN,
    hf_to_llada_key,
    llada_to_hf_key,
    llada_to_llama_config,
    llama_to_llada_config,
)
from .modeling import BidirectionalLlamaForCausalLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model(-\d+-of-\d+)?\.safetensors$")
_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class CheckpointError(ValueError):
    """A checkpoint's files do not match its config: a missing, unexpected or wrongly shaped tensor."""


# --------------------------------------------------------------------------------------------- loading


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"load_llada: dtype={dtype!r} is not a torch dtype, 'auto' or one of {sorted(_DTYPES)}")


def _weight_files(path: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it, from the index or the single file's header."""
    index_file, single = path / INDEX_NAME, path / WEIGHTS_NAME
    if index_file.is_file():
        index = _read_json(index_file)
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


def _config_for(path: Path, mask_token_id: int | None) -> tuple[LlamaConfig, str]:
    if not path.is_dir():
        raise FileNotFoundError(f"load_llada: {path} is not a directory")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path}: no {CONFIG_NAME}; expected a LLaDA (or transformers Llama) checkpoint directory"
        )
    raw = _read_json(config_file)
    model_type = raw.get("model_type")
    if model_type == "llada":
        return llada_to_llama_config(raw, source=str(config_file), mask_token_id=mask_token_id), "llada"
    if model_type == "llama":
        raw.pop("model_type")
        config = LlamaConfig(**raw)
        if mask_token_id is not None:
            config.mask_token_id = int(mask_token_id)
        if getattr(config, "mask_token_id", None) is None:
            raise ValueError(
                f"{config_file} has no mask_token_id; pass mask_token_id=... explicitly "
                f"(LLaDA: 126336, token {LLADA_MASK_TOKEN!r})"
            )
        if not 0 <= int(config.mask_token_id) < config.vocab_size:
            raise ValueError(f"{config_file}: mask_token_id={config.mask_token_id} is outside the vocabulary")
        return config, "hf"
    raise ValueError(
        f"{config_file}: model_type={model_type!r} is not supported (expected 'llada' or 'llama')"
    )


def check_fits(config: LlamaConfig, dtype: torch.dtype | None, device: str, source) -> int:
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


def load_llada(path, dtype=None, attn_implementation=None, **kwargs) -> BidirectionalLlamaForCausalLM:
    """Load a local LLaDA checkpoint as a bidirectional transformers Llama (no remote code).

    Args:
        path: a directory with ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json``
            plus its shards, in LLaDA's format or transformers' Llama format.
        dtype: the parameters' dtype (``torch.bfloat16``, ``"float32"``, ...); ``None``/``"auto"`` keeps the
            stored dtype.
        attn_implementation: ``"sdpa"`` (default), ``"eager"``, ``"flash_attention_2"`` or ``"vrpo_triton"``.
        **kwargs: ``mask_token_id`` (required when the config lacks one), ``device`` (where the weights are
            read to, default ``"cpu"``), and any ``LlamaConfig`` attribute to override (e.g.
            ``attention_dropout``).

    Returns:
        :class:`BidirectionalLlamaForCausalLM` in eval mode; ``model(input_ids).logits`` is [B, S, vocab] and
        ``model.config.mask_token_id`` is the mask token.

    Raises:
        FileNotFoundError: no directory, no ``config.json`` or no weights, or a shard of the index is missing.
        CheckpointError: a missing, unexpected or wrongly shaped tensor (named with its file).
        ValueError: an unknown ``model_type``, no ``mask_token_id``, or a LLaDA option Llama cannot express.
    """
    path = Path(path)
    mask_token_id = kwargs.pop("mask_token_id", None)
    device = str(torch.device(kwargs.pop("device", "cpu")))
    config, fmt = _config_for(path, mask_token_id)
    for name, value in kwargs.items():
        if not hasattr(config, name):
            raise TypeError(
                f"load_llada got an unexpected keyword argument {name!r} "
                "(not mask_token_id, device, or a LlamaConfig field)"
            )
        setattr(config, name, value)
    attn = check_backend(attn_implementation, device)
    dtype = _resolve_dtype(dtype)
    check_fits(config, dtype, device, path / CONFIG_NAME)
    config._name_or_path = str(path.resolve())

    files = _weight_files(path)
    headers = _headers(files)
    with init_empty_weights(include_buffers=False):
        model = BidirectionalLlamaForCausalLM(config)
    expected = dict(model.named_parameters())
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)  # the embedding, tied below

    plan: dict[str, str] = {}  # checkpoint key -> parameter name
    for key in files:
        name = llada_to_hf_key(key) if fmt == "llada" else key
        if name == "lm_head.weight" and config.tie_word_embeddings:
            if fmt == "llada":
                raise CheckpointError(
                    f"{files[key]}: {key!r} is present but config.json sets weight_tying=true"
                )
            continue  # transformers may store the tied head as well; it is the embedding.
        if name is None or name not in expected:
            raise CheckpointError(
                f"{files[key]}: unexpected tensor {key!r}, which the config's model does not have"
            )
        shape = tuple(expected[name].shape)
        if headers[key][0] != shape:
            raise CheckpointError(
                f"{files[key]}: tensor {key!r} has shape {headers[key][0]}, but config.json implies {shape} "
                f"for {name}"
            )
        if headers[key][1] not in _ST_DTYPES:
            raise CheckpointError(
                f"{files[key]}: tensor {key!r} has dtype {headers[key][1]}, not a float type"
            )
        plan[key] = name
    loaded = set(plan.values())
    for name in expected:
        if name not in loaded:
            key = (hf_to_llada_key(name) if fmt == "llada" else name) or name
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


def _unwrap(model) -> tuple[nn.Module, bool]:
    """The transformers model inside ``model`` and whether it is a PEFT model."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = ()
    model = getattr(model, "module", model)  # DistributedDataParallel
    if PeftModel and isinstance(model, PeftModel):
        if model.peft_config[model.active_adapter].is_prompt_learning:
            raise ValueError(
                f"save_llada: a {model.peft_config[model.active_adapter].peft_type} adapter "
                "(prompt learning) has no equivalent in LLaDA's weights; save it with "
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
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    skip: set[str] = set()
    for mod_name, module in model.named_modules():
        if any(mod_name == s or mod_name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            active = (
                module.modules_to_save[module.active_adapter]
                if not module.disable_adapters
                else module.original_module
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
                    f"save_llada: cannot merge the adapter on {mod_name} ({type(module).__name__}); only "
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


def _remote_code_files(config, llada_cfg: dict) -> list[Path]:
    """LLaDA's modeling/config .py files next to the checkpoint the model was loaded from, if any."""
    source = getattr(config, "_name_or_path", None)
    if not source or not Path(source).is_dir():
        return []
    modules = {
        ref.split(".")[0] for ref in (llada_cfg.get("auto_map") or {}).values() if isinstance(ref, str)
    }
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
        raise FileExistsError(f"save_llada: {path} exists and is not a directory")
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


def save_llada(model, path, *, max_shard_size: int | str = "5GB") -> Path:
    """Write ``model`` as a LLaDA checkpoint: ``config.json`` (``model_type="llada"``, ``auto_map`` kept) and
    safetensors weights with LLaDA's keys, sharded with ``model.safetensors.index.json`` when larger than
    ``max_shard_size``.

    ``model`` is a model from :func:`load_llada` (or any bidirectional transformers Llama with
    ``config.mask_token_id``) on any device and in any dtype; tensors are written in the model's dtype. A PEFT
    model with LoRA adapters is saved with the adapters merged into the weights (the model itself is left
    unchanged); other adapter types are refused. LLaDA's remote-code files are copied from the directory the
    model was loaded from when they are there. The directory is written under a temporary name in the same
    parent and renamed into place; non-checkpoint files already in ``path`` (a tokenizer) are kept.

    Returns the checkpoint directory.
    """
    base, is_peft = _unwrap(model)
    config = getattr(base, "config", None)
    if not isinstance(config, LlamaConfig):
        raise TypeError(
            f"save_llada: expected a transformers Llama model (from load_llada), got {type(base).__name__}"
        )
    if getattr(config, "mask_token_id", None) is None:
        raise ValueError("save_llada: model.config.mask_token_id is not set; LLaDA's config needs it")

    tensors: dict[str, tuple] = {}
    for name, thunk, shape, dt in _merged_weights(base, is_peft):
        key = hf_to_llada_key(name)
        if key is None:
            raise ValueError(f"save_llada: parameter {name!r} has no LLaDA counterpart")
        if key == "model.transformer.ff_out.weight" and config.tie_word_embeddings:
            continue
        tensors[key] = (thunk, shape, dt)
    dtype = tensors["model.transformer.wte.weight"][2]
    llada_cfg = llama_to_llada_config(config, dtype=dtype)

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
        (tmp / CONFIG_NAME).write_text(json.dumps(llada_cfg, indent=2) + "\n")
        for file in _remote_code_files(config, llada_cfg):
            shutil.copy2(file, tmp / file.name)
        _write_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
