"""Hugging Face checkpoints in and out: safetensors folders and torch model instances.

Loading is strict: every checkpoint key must be consumed, every parameter filled,
every shape right, or nothing is returned; all of that is checked from the file
headers before any tensor is read. The weights then stream through the family's
weight table (:mod:`jaxsft.models.hf_keys`, decoders and encoder-decoders alike) one
row at a time, each parameter placed straight onto its mesh sharding and dropped from
host memory, so neither a whole checkpoint nor a whole parameter on one device is ever
assembled.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft.infra import sharding as shd
from jaxsft.infra import torch_bridge
from jaxsft.models import gguf_io
from jaxsft.models import lora as lora_lib
from jaxsft.models import weights
from jaxsft.models.decoder import CausalLM
from jaxsft.models.families import AnySpec, spec_from_hf_config, table_for
from jaxsft.models.interface import LanguageModel
from jaxsft.models.options import RunOptions
from jaxsft.models.seq2seq import Seq2SeqLM
from jaxsft.models.seq2seq_spec import Seq2SeqSpec
from jaxsft.models.spec import ModelSpec
from jaxsft.models.weights import CheckpointError

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------- reading
def _read_config(folder: Path):
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json; pass a Hugging Face model folder (config.json plus "
            "model.safetensors or model.safetensors.index.json) or a transformers model instance."
        )
    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers raises several types for bad configs
        raise ValueError(f"could not read {folder / 'config.json'}: {err}") from err


def _safetensors_files(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except Exception as err:
            raise ValueError(f"could not read the shard index {index}: {err}") from err
        names = sorted(set(weight_map.values()))
        outside = [n for n in names if not isinstance(n, str) or os.path.isabs(n)
                   or os.path.normpath(n).split(os.sep)[0] == ".." or os.path.normpath(n) in (".", "")]
        if outside:
            raise ValueError(
                f"{index} names the shard file {outside[0]!r}, which is outside {folder}; shard files must sit in "
                "the model folder itself. Refusing to read it: fix the index's weight_map."
            )
        files = [folder / name for name in names]
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"{index} lists {path.name}, which is missing from {folder}.")
        return files
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".gguf"))
    hint = f" (found {', '.join(others)}: convert it to safetensors with transformers first)" if others else ""
    raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json{hint}.")


_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


class SafetensorsSource:
    """The tensors of safetensors files, read lazily: headers at open, one tensor's data per ``read``."""

    def __init__(self, files: Iterable[Path], stack: contextlib.ExitStack):
        from safetensors import safe_open

        self._where: dict[str, tuple[Path, Any]] = {}
        for path in files:
            try:
                handle = stack.enter_context(safe_open(str(path), framework="np"))
                for key in handle.keys():
                    self._where[key] = (path, handle)
            except Exception as err:
                raise ValueError(f"could not read weights file {path}: {err}") from err

    def keys(self) -> list[str]:
        return list(self._where)

    def _slice(self, key: str):
        path, handle = self._where[key]
        try:
            return handle.get_slice(key)
        except Exception as err:
            raise ValueError(f"could not read weights file {path}: {err}") from err

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def is_float(self, key: str) -> tuple[bool, str]:
        code = self._slice(key).get_dtype()
        return code.startswith(("F", "BF")), _SAFETENSORS_DTYPES.get(code, code)

    def read(self, key: str) -> np.ndarray:
        path, handle = self._where[key]
        try:
            return handle.get_tensor(key)
        except Exception as err:
            raise ValueError(f"could not read weights file {path}: {err}") from err


def _torch_state_dict(model: Any) -> weights.ArraySource:
    """A torch model's weights as a tensor source, converted to numpy one tensor at a time when read.

    Meta and sparse tensors are refused before anything is read or placed (``jaxsft.infra.torch_bridge``,
    the one jaxsft module that imports torch).
    """
    return weights.ArraySource(torch_bridge.checked_state_dict(model), torch_bridge.tensor_as_numpy)


# ---------------------------------------------------------------------------- families
def model_class(spec: AnySpec):
    """The module class of a spec's kind (the family itself is the registry's business)."""
    return Seq2SeqLM if isinstance(spec, Seq2SeqSpec) else CausalLM


# ---------------------------------------------------------------------------- conversion
@functools.lru_cache(maxsize=64)
def param_shapes(spec: AnySpec) -> dict[str, tuple[int, ...]]:
    """``{"embed": (V, H), "layers/q_proj": (L, H, N, D), ...}``: what a model of ``spec`` holds
    (a Seq2SeqLM's ``encoder/...`` and ``decoder/...``), read off a shape-only model (so the weight
    tables are checked against the model itself)."""
    state = nnx.state(abstract_model(spec), nnx.Param)
    return {"/".join(map(str, path)): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def hf_weight_shapes(spec: AnySpec) -> dict[str, tuple[int, ...]]:
    """Every HF weight name a model of ``spec`` fills (layers expanded), with its HF shape."""
    return table_for(spec).hf_shapes(param_shapes(spec))


def import_params(spec: AnySpec, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """HF-named arrays -> {'embed': ..., 'layers': {'q_proj': [L, ...]}, ...} (numpy), strictly.

    Every key is checked (present, floating point, exactly the HF shape the config
    implies) before any conversion, and all problems are reported together.
    """
    table, shapes, source = table_for(spec), param_shapes(spec), weights.ArraySource(tensors)
    weights.check(table, shapes, source, spec.model_type)
    return _nested(dict(weights.stream(table, shapes, source)))


def export_params(spec: AnySpec, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of :func:`import_params`: jaxsft arrays -> HF-named numpy arrays."""
    flat = {path: np.asarray(x) for path, x in _flat(params).items()}
    return dict(weights.export(table_for(spec), flat))


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def model_params_to_numpy(model: CausalLM) -> dict[str, Any]:
    """The model's parameters as a nested numpy dict (gathered across hosts if sharded)."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return jax.tree.map(shd.fetch_to_host, pure)


def hf_state_dict(model: CausalLM) -> dict[str, np.ndarray]:
    """HF-named numpy weights of a jaxsft model (what ``save_pretrained`` writes).

    A LoRA model's adapters are merged in (``W + scale * A @ B``), as PEFT's ``merge_and_unload`` does.
    """
    params = model_params_to_numpy(model)
    setup = lora_lib.lora_setup(model)
    if setup is not None:
        adapters = {k: np.asarray(v, np.float32) for k, v in params.pop("lora_layers").items()}
        params["layers"] = lora_lib.merged_layer_weights(setup, params["layers"], adapters)
    return export_params(model.spec, params)


# ---------------------------------------------------------------------------- building
def abstract_model(spec: ModelSpec, **kwargs: Any) -> CausalLM:
    """A shape-only model (no memory), for checking shapes and computing shardings."""
    return nnx.eval_shape(lambda: model_class(spec)(spec, rngs=nnx.Rngs(0), **kwargs))


def build_model(
    spec: ModelSpec,
    params: Union[Mapping[str, Any], Iterable[tuple[str, np.ndarray]]],
    *,
    mesh=None,
    param_dtype: Any = jnp.float32,
    sharding_rules: Optional[shd.ShardingRules] = None,
    **model_kwargs: Any,
) -> CausalLM:
    """Place host params onto devices (sharded on ``mesh`` per ``sharding_rules``) and return the module.

    ``params`` is a nested dict of numpy arrays, or an iterable of ``(path, array)`` pairs
    (:func:`jaxsft.models.weights.stream`): each array goes to its devices as it arrives and
    is dropped from host memory, so a checkpoint never sits whole in host RAM.
    """
    abstract = abstract_model(spec, param_dtype=param_dtype, **model_kwargs)
    graphdef, abstract_state = nnx.split(abstract)
    mesh = mesh if mesh is not None else shd.make_mesh()
    shardings = _flat(nnx.to_pure_dict(shd.state_shardings(abstract_state, mesh, sharding_rules)))
    expected = _flat(nnx.to_pure_dict(abstract_state))
    pairs = _flat(params).items() if isinstance(params, Mapping) else params
    placed: dict[str, jax.Array] = {}
    for path, value in pairs:
        if path not in expected:
            raise CheckpointError(f"parameter {path} does not exist in a {spec.model_type} model.")
        if tuple(value.shape) != tuple(expected[path].shape):
            raise CheckpointError(
                f"parameter {path}: checkpoint shape {tuple(value.shape)} does not match the config's "
                f"{tuple(expected[path].shape)}; check that config.json belongs to these weights."
            )
        placed[path] = shd.place_array(np.asarray(value).astype(param_dtype, copy=False), shardings[path])
        del value
    unfilled = sorted(set(expected) - set(placed))
    if unfilled:
        raise CheckpointError(f"parameter {unfilled[0]} was not filled by the checkpoint.")
    nnx.replace_by_pure_dict(abstract_state, _nested(placed))
    return nnx.merge(graphdef, abstract_state)


def init_model(
    spec: ModelSpec, *, seed: int = 0, mesh=None, param_dtype: Any = jnp.float32,
    sharding_rules: Optional[shd.ShardingRules] = None, **model_kwargs: Any
) -> CausalLM:
    """A randomly initialised model whose params are born sharded (created inside jit)."""
    abstract = abstract_model(spec, param_dtype=param_dtype, **model_kwargs)
    graphdef, abstract_state = nnx.split(abstract)
    mesh = mesh if mesh is not None else shd.make_mesh()
    out_shardings = shd.state_shardings(abstract_state, mesh, sharding_rules)

    def create():
        model = model_class(spec)(spec, rngs=nnx.Rngs(seed), param_dtype=param_dtype, **model_kwargs)
        return nnx.state(model)

    with jax.set_mesh(mesh), shd.use_rules(sharding_rules):
        state = jax.jit(create, out_shardings=out_shardings)()  # one jit: params are born on their shardings
    return nnx.merge(graphdef, state)


def from_pretrained(
    source: Any,
    *,
    dtype: Any = None,
    param_dtype: Any = None,
    mesh=None,
    remat: bool = False,
    attention_implementation: str = "auto",
    norm_implementation: str = RunOptions.norm_implementation,
    sharding_rules: Optional[shd.ShardingRules] = None,
) -> LanguageModel:
    """Load a Hugging Face causal LM (or a T5 / BART encoder-decoder, as a ``Seq2SeqLM``) as a jaxsft model.

    ``source`` is a local folder (config.json with model.safetensors or a sharded
    index; fp32, bf16 or fp16), a Llama-family ``.gguf`` file (read without torch,
    dequantized to fp32: :mod:`jaxsft.models.gguf_io`) or a ``transformers`` PreTrainedModel
    (converted in memory). ``param_dtype`` (default fp32) is the stored precision, ``dtype`` the
    compute precision (default: ``param_dtype``). ``norm_implementation``: the fused residual add + RMSNorm kernel
    on GPUs ("auto", the default), XLA's form ("xla") or the kernel anywhere ("pallas") (:class:`jaxsft.models.options.RunOptions`). ``mesh`` defaults to all devices on the
    data axis; ``sharding_rules`` (default ``jaxsft.infra.sharding.DEFAULT_RULES``) lay the
    parameters out on it. LoRA adapters (a PEFT folder or a ``peft.PeftModel``):
    :func:`jaxsft.models.peft_io.from_pretrained`, which loads the base through this.

    Checkpoints stream: every key is checked from the file headers first, then the weights go
    onto the mesh one weight-table row at a time (never the whole checkpoint in host memory).
    """
    if param_dtype is not None:
        param_dtype = float_dtype(param_dtype, "param_dtype", "from_pretrained")
    if dtype is not None:
        dtype = float_dtype(dtype, "dtype", "from_pretrained")
    with contextlib.ExitStack() as stack:
        if isinstance(source, gguf_io.GGUFCheckpoint) or gguf_io.is_gguf_file(source):
            checkpoint = source if isinstance(source, gguf_io.GGUFCheckpoint) else gguf_io.GGUFCheckpoint(source)
            config, tensors = checkpoint.config, checkpoint  # dequantized to fp32 one tensor at a time
            spec = spec_from_hf_config(config)
        elif isinstance(source, (str, os.PathLike)):
            folder = Path(source)
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"from_pretrained: {folder} is not a directory; pass a local Hugging Face model folder "
                    "(jaxsft never downloads) or a transformers model instance."
                )
            config = _read_config(folder)
            spec = spec_from_hf_config(config)  # fail on the family before reading weights
            tensors = SafetensorsSource(_safetensors_files(folder), stack)
        elif torch_bridge.is_torch_model(source):
            config = source.config
            spec = spec_from_hf_config(config)  # fail on the family before touching weights
            tensors = _torch_state_dict(source)
        else:
            raise TypeError(
                f"from_pretrained: source must be a local folder path or a transformers PreTrainedModel (a "
                f"peft.PeftModel loads through jaxsft.from_pretrained), got {type(source).__name__}."
            )
        return load(spec, config, tensors, dtype=dtype, param_dtype=param_dtype, mesh=mesh, remat=remat,
                    attention_implementation=attention_implementation, norm_implementation=norm_implementation,
                    sharding_rules=sharding_rules)


def load(
    spec: AnySpec,
    config: Any,
    tensors: weights.TensorSource,
    *,
    dtype: Any = None,
    param_dtype: Any = None,
    mesh=None,
    remat: bool = False,
    attention_implementation: str = "auto",
    norm_implementation: str = RunOptions.norm_implementation,
    sharding_rules: Optional[shd.ShardingRules] = None,
) -> LanguageModel:
    """A model of ``spec`` (built once from ``config`` by the caller) filled from HF-named ``tensors``, strictly."""
    param_dtype = jnp.dtype(param_dtype or jnp.float32)
    table, shapes = table_for(spec), param_shapes(spec)
    weights.check(table, shapes, tensors, spec.model_type)  # headers only: nothing read or placed yet
    params = weights.stream(table, shapes, tensors)  # one row of the table in host memory at a time
    return build_model(
        spec,
        params,
        mesh=mesh,
        param_dtype=param_dtype,
        sharding_rules=sharding_rules,
        dtype=jnp.dtype(dtype or param_dtype),
        remat=remat,
        attention_implementation=attention_implementation,
        norm_implementation=norm_implementation,
        hf_config_json=_plain_config_json(config),
    )


def _plain_config_json(config: Any) -> str:
    """The config as JSON, minus ``quantization_config``: jaxsft holds and writes dense float
    weights, so a GGUF/bitsandbytes source's quantization entry would mislabel saved checkpoints."""
    data = json.loads(config.to_json_string(use_diff=False))
    data.pop("quantization_config", None)
    return json.dumps(data)


# ---------------------------------------------------------------------------- writing
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int):
        return size
    match = _SIZE.match(str(size))
    if not match:
        raise ValueError(f"max_shard_size={size!r} is not a size; pass bytes (int) or a string like '5GB'.")
    unit = match.group(2).upper() if match.group(2) else None
    return int(float(match.group(1)) * _UNITS[unit])


def save_pretrained(
    model: CausalLM,
    directory: PathLike,
    *,
    tokenizer: Any = None,
    max_shard_size: Union[int, str] = "5GB",
    dtype: Any = None,
) -> Path:
    """Write a folder that ``transformers.AutoModelForCausalLM`` (``AutoModelForSeq2SeqLM`` for T5/BART) loads as is.

    Weights are written in ``dtype`` (default: the model's parameter dtype), one
    safetensors file below ``max_shard_size`` or shards with an index above it.
    Only process 0 writes; every process must call it (sharded params are gathered).
    """
    from safetensors.numpy import save_file

    from jaxsft.infra.atomic_folder import write_folder

    if not isinstance(model, (CausalLM, Seq2SeqLM)):
        raise TypeError(
            f"save_pretrained: model must be a jaxsft CausalLM or Seq2SeqLM, got {type(model).__name__}; a torch model "
            "saves itself (model.save_pretrained(dir)), or convert it first with jaxsft.from_pretrained(model)."
        )
    if model.hf_config_json is None:
        raise ValueError("save_pretrained: this model has no Hugging Face config (build it with from_pretrained).")
    out_dtype = np.dtype(float_dtype(dtype, "dtype", "save_pretrained") if dtype is not None else model.param_dtype)
    limit = parse_size(max_shard_size)
    directory = Path(directory)
    tensors = hf_state_dict(model)
    tensors = {k: np.ascontiguousarray(v.astype(out_dtype)) for k, v in tensors.items()}
    if jax.process_index() != 0:
        return directory

    write_folder(
        directory, lambda tmp: _write_folder(model, tensors, out_dtype, tmp, limit, save_file, tokenizer),
        what="save_pretrained", replaces=is_weights_file,
    )
    return directory


def is_weights_file(name: str) -> bool:
    """Whether a file name is one of a HF folder's weight files (an old model's never survive beside new ones)."""
    return name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".safetensors.index.json"))


def float_dtype(value: Any, argument: str, where: str) -> np.dtype:
    """``value`` as one of the floating dtypes weights are held and written in, or ValueError naming ``argument``."""
    try:
        out = jnp.dtype(value)
    except (TypeError, ValueError):
        out = None
    if out is None or out not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(
            f"{where}: {argument}={value!r} is not a weight dtype; pass one of 'float32', 'bfloat16', 'float16' "
            "(or jnp.float32 / jnp.bfloat16 / jnp.float16), or None for the default."
        )
    return out


def _write_folder(model, tensors, out_dtype, directory: Path, limit: int, save_file, tokenizer) -> None:
    """Everything save_pretrained writes, into ``directory`` (a fresh temporary folder)."""
    config = model.config
    dtype_name = {np.dtype(np.float32): "float32", np.dtype(jnp.bfloat16): "bfloat16", np.dtype(np.float16): "float16"}
    name = dtype_name.get(out_dtype, "float32")
    if hasattr(config, "dtype"):  # transformers >= 4.56 (torch_dtype is a deprecated alias)
        config.dtype = name
    else:
        config.torch_dtype = name
    config.save_pretrained(str(directory))
    _save_generation_config(config, directory)
    _write_shards(tensors, directory, limit, save_file)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def _save_generation_config(config: Any, directory: Path) -> None:
    """generation_config.json beside config.json (its BOS/EOS/pad ids), as transformers' own save writes."""
    from transformers import GenerationConfig

    GenerationConfig.from_model_config(config).save_pretrained(str(directory))


def _readable(path: Path) -> None:
    """The safetensors writer creates files 0600; give them the mode any other new file gets (0666 - umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_shards(tensors: dict[str, np.ndarray], directory: Path, limit: int, save_file) -> None:
    for stale in list(directory.glob("model*.safetensors")) + list(directory.glob("model.safetensors.index.json")):
        stale.unlink()
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in tensors:
        nbytes = tensors[key].nbytes
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata=metadata)
        _readable(directory / "model.safetensors")
        return
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata=metadata)
        _readable(directory / name)
        weight_map.update({key: name for key in shard})
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
