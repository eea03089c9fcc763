"""Hugging Face checkpoints in and out: safetensors folders and torch model instances.

Loading is strict: every checkpoint key must be consumed, every parameter filled,
every shape right, or nothing is returned. Parameters are placed straight onto
their mesh shardings from host memory, never assembled whole on one device.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft import sharding as shd
from jaxsft.models import lora as lora_lib
from jaxsft.models.decoder import CausalLM, layer_param_shapes
from jaxsft.models.hf_keys import is_ignorable, normalise_key, rules_for
from jaxsft.models import seq2seq_weights
from jaxsft.models.seq2seq import Seq2SeqLM
from jaxsft.models.seq2seq_spec import SEQ2SEQ_MODEL_TYPES, Seq2SeqSpec
from jaxsft.models.spec import ModelSpec

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: missing, extra or mis-shaped weights."""


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


def _read_safetensors(files: Iterable[Path]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    tensors: dict[str, np.ndarray] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="np") as handle:
                for key in handle.keys():
                    tensors[key] = handle.get_tensor(key)
        except Exception as err:
            raise ValueError(f"could not read weights file {path}: {err}") from err
    return tensors


def _torch_state_dict(model: Any) -> dict[str, np.ndarray]:
    """numpy copies of a torch model's weights (bf16/fp16 widened to fp32, which is exact)."""
    import torch

    out = {}
    for key, tensor in model.state_dict().items():
        if tensor.is_meta:
            raise ValueError(
                f"the model's weight {key} is on the meta device (no values: e.g. a model built under "
                "init_empty_weights or with device_map='meta'); load real weights before converting it."
            )
        if tensor.layout != torch.strided:
            raise ValueError(f"the model's weight {key} is a sparse tensor ({tensor.layout}); make it dense first.")
        t = tensor.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        out[key] = t.numpy()
    return out


def _is_torch_model(source: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except Exception:  # pragma: no cover
        return False
    return isinstance(source, PreTrainedModel)


# ---------------------------------------------------------------------------- families
AnySpec = Union[ModelSpec, Seq2SeqSpec]


def spec_from_hf_config(config: Any) -> AnySpec:
    """The jaxsft spec of an HF config: encoder-decoder families (T5, BART) or the decoder-only ones."""
    if getattr(config, "model_type", None) in SEQ2SEQ_MODEL_TYPES:
        return Seq2SeqSpec.from_hf_config(config)
    return ModelSpec.from_hf_config(config)


def model_class(spec: AnySpec):
    return Seq2SeqLM if isinstance(spec, Seq2SeqSpec) else CausalLM


# ---------------------------------------------------------------------------- conversion
def top_level_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Shapes of the parameters outside the layer stack (as ``CausalLM.__init__`` creates them)."""
    h = spec.hidden_size
    shapes = {"embed": (spec.vocab_size, h), "final_norm_scale": (h,)}
    if spec.position == "learned":
        shapes["pos_embed"] = (spec.max_position_embeddings, h)
    if spec.norm == "layer":
        shapes["final_norm_bias"] = (h,)
    if not spec.tie_word_embeddings:
        shapes["lm_head"] = (spec.vocab_size, h)
    return shapes


def expected_hf_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The shape every HF key must have under ``spec`` (``{i}`` left in per-layer keys).

    Derived by running each rule's ``to_hf`` on zero arrays of our shapes, so it can
    never disagree with what :func:`save_pretrained` writes.
    """
    ours = {name: shape for name, (shape, _, _) in layer_param_shapes(spec).items()}
    ours.update(top_level_shapes(spec))
    out = {}
    for rule in rules_for(spec):
        dummies = tuple(np.zeros(ours[name], np.int8) for name in rule.ours)
        out[rule.hf] = tuple(rule.to_hf(dummies, spec).shape)
    return out


def import_params(spec: ModelSpec, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """HF-named arrays -> {'embed': ..., 'layers': {'q_proj': [L, ...]}, ...} (numpy), strictly.

    Every key is checked (present, floating point, exactly the HF shape the config
    implies) before any conversion, and all problems are reported together.
    """
    if isinstance(spec, Seq2SeqSpec):
        return seq2seq_weights.import_params(spec, tensors)
    tensors = {normalise_key(spec, k): v for k, v in tensors.items()}
    remaining = set(tensors)
    top: dict[str, np.ndarray] = {}
    per_layer: dict[str, list] = {name: [None] * spec.num_layers for name in layer_param_shapes(spec)}
    expected_shapes = expected_hf_shapes(spec)
    missing, misshaped = [], []
    for rule in rules_for(spec):
        indices = range(spec.num_layers) if rule.per_layer else [None]
        expected = expected_shapes[rule.hf]
        for i in indices:
            key = rule.hf.format(i=i) if i is not None else rule.hf
            if key not in tensors:
                missing.append(key)
                continue
            remaining.discard(key)
            array = np.asarray(tensors[key])
            if tuple(array.shape) != expected:
                misshaped.append(f"{key} has shape {tuple(array.shape)}, expected {expected}")
                continue
            if not np.issubdtype(array.dtype, np.floating) and array.dtype != np.dtype(jnp.bfloat16):
                misshaped.append(f"{key} has dtype {array.dtype}, expected a floating-point tensor")
                continue
            if misshaped:
                continue  # already failing: skip conversion work
            values = rule.to_ours(array, spec)
            for name, value in zip(rule.ours, values):
                if i is None:
                    top[name] = value
                else:
                    per_layer[name][i] = value
    extra = sorted(k for k in remaining if not is_ignorable(spec, k))
    if missing or extra or misshaped:
        parts = []
        if missing:
            parts.append(f"missing weights: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if extra:
            parts.append(f"unexpected weights: {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
        if misshaped:
            parts.append(f"wrong weights: {'; '.join(misshaped[:8])}{' ...' if len(misshaped) > 8 else ''}")
        raise CheckpointError(
            f"checkpoint does not match its {spec.model_type} config ({'; '.join(parts)}); "
            "check that config.json belongs to these weights."
        )
    params: dict[str, Any] = dict(top)
    params["layers"] = {name: np.stack(values) for name, values in per_layer.items()}
    return params


def export_params(spec: ModelSpec, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of :func:`import_params`: jaxsft arrays -> HF-named numpy arrays."""
    if isinstance(spec, Seq2SeqSpec):
        return seq2seq_weights.export_params(spec, params)
    out: dict[str, np.ndarray] = {}
    for rule in rules_for(spec):
        if rule.per_layer:
            for i in range(spec.num_layers):
                values = tuple(np.asarray(params["layers"][name][i]) for name in rule.ours)
                out[rule.hf.format(i=i)] = rule.to_hf(values, spec)
        else:
            out[rule.hf] = rule.to_hf(tuple(np.asarray(params[name]) for name in rule.ours), spec)
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
    params: Mapping[str, Any],
    *,
    mesh=None,
    param_dtype: Any = jnp.float32,
    **model_kwargs: Any,
) -> CausalLM:
    """Place numpy params onto devices (sharded on ``mesh``) and return the module."""
    abstract = abstract_model(spec, param_dtype=param_dtype, **model_kwargs)
    graphdef, abstract_state = nnx.split(abstract)
    mesh = mesh if mesh is not None else shd.make_mesh()
    shardings = nnx.to_pure_dict(shd.state_shardings(abstract_state, mesh))
    expected = nnx.to_pure_dict(abstract_state)

    def place(path, shape_struct, sharding):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        value = _lookup(params, path)
        if value is None:
            raise CheckpointError(f"parameter {name} was not filled by the checkpoint.")
        if tuple(value.shape) != tuple(shape_struct.shape):
            raise CheckpointError(
                f"parameter {name}: checkpoint shape {tuple(value.shape)} does not match the config's "
                f"{tuple(shape_struct.shape)}; check that config.json belongs to these weights."
            )
        return shd.place_array(np.asarray(value).astype(param_dtype, copy=False), sharding)

    placed = jax.tree_util.tree_map_with_path(place, expected, shardings)
    nnx.replace_by_pure_dict(abstract_state, placed)
    return nnx.merge(graphdef, abstract_state)


def _lookup(tree: Mapping[str, Any], path) -> Optional[np.ndarray]:
    node: Any = tree
    for k in path:
        key = getattr(k, "key", k)
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def init_model(
    spec: ModelSpec, *, seed: int = 0, mesh=None, param_dtype: Any = jnp.float32, **model_kwargs: Any
) -> CausalLM:
    """A randomly initialised model whose params are born sharded (created inside jit)."""
    abstract = abstract_model(spec, param_dtype=param_dtype, **model_kwargs)
    graphdef, abstract_state = nnx.split(abstract)
    mesh = mesh if mesh is not None else shd.make_mesh()
    out_shardings = shd.state_shardings(abstract_state, mesh)

    @jax.jit
    def create():
        model = model_class(spec)(spec, rngs=nnx.Rngs(seed), param_dtype=param_dtype, **model_kwargs)
        return nnx.state(model)

    with jax.set_mesh(mesh):
        state = jax.jit(create, out_shardings=out_shardings)()
    return nnx.merge(graphdef, state)


def from_pretrained(
    source: Any,
    *,
    dtype: Any = None,
    param_dtype: Any = None,
    mesh=None,
    remat: bool = False,
    attention_implementation: str = "auto",
    adapter: Optional[PathLike] = None,
) -> CausalLM:
    """Load a Hugging Face causal LM (or a T5 / BART encoder-decoder, as a ``Seq2SeqLM``) as a jaxsft model.

    ``source`` is a local folder (config.json with model.safetensors or a sharded
    index; fp32, bf16 or fp16), a ``transformers`` PreTrainedModel (converted in
    memory) or a ``peft.PeftModel`` with one LoRA adapter (base and adapter both
    converted). ``param_dtype`` (default fp32) is the stored precision, ``dtype`` the
    compute precision (default: ``param_dtype``); LoRA adapters are always fp32.
    ``mesh`` defaults to all devices on the data axis. ``adapter``: a PEFT LoRA
    folder to attach to the base, to continue training it.
    """
    from jaxsft.models import peft_io

    peft_parts = None
    if peft_io.is_peft_model(source):
        if adapter is not None:
            raise ValueError("from_pretrained: source is a PeftModel, which has its adapter; leave adapter=None.")
        config, tensors, *peft_parts = peft_io.split_peft_model(source)
        ModelSpec.from_hf_config(config)
    elif _is_torch_model(source):
        config = source.config
        spec_from_hf_config(config)  # fail on the family before copying weights
        tensors = _torch_state_dict(source)
    elif isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"from_pretrained: {folder} is not a directory; pass a local Hugging Face model folder "
                "(jaxsft never downloads) or a transformers model instance."
            )
        config = _read_config(folder)
        spec = spec_from_hf_config(config)  # fail on the family before reading weights
        tensors = _read_safetensors(_safetensors_files(folder))
    else:
        raise TypeError(
            f"from_pretrained: source must be a local folder path or a transformers PreTrainedModel (or a "
            f"peft.PeftModel with a LoRA adapter), got {type(source).__name__}."
        )
    if adapter is not None and not (Path(adapter) / peft_io.CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"from_pretrained: adapter={str(adapter)!r} has no {peft_io.CONFIG_FILE}; pass a PEFT LoRA adapter folder."
        )
    spec = spec_from_hf_config(config)
    param_dtype = jnp.dtype(param_dtype or jnp.float32)
    params = import_params(spec, tensors)
    model = build_model(
        spec,
        params,
        mesh=mesh,
        param_dtype=param_dtype,
        dtype=jnp.dtype(dtype or param_dtype),
        remat=remat,
        attention_implementation=attention_implementation,
        hf_config_json=_plain_config_json(config),
    )
    if peft_parts is not None:
        peft_io.attach_peft(model, *peft_parts)
    elif adapter is not None:
        peft_io.load_adapter(model, adapter)
    return model


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

    if model.hf_config_json is None:
        raise ValueError("save_pretrained: this model has no Hugging Face config (build it with from_pretrained).")
    directory = Path(directory)
    weights = hf_state_dict(model)
    out_dtype = np.dtype(jnp.dtype(dtype or model.param_dtype))
    weights = {k: np.ascontiguousarray(v.astype(out_dtype)) for k, v in weights.items()}
    if jax.process_index() != 0:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    dtype_name = {np.dtype(np.float32): "float32", np.dtype(jnp.bfloat16): "bfloat16", np.dtype(np.float16): "float16"}
    name = dtype_name.get(out_dtype, "float32")
    if hasattr(config, "dtype"):  # transformers >= 4.56 (torch_dtype is a deprecated alias)
        config.dtype = name
    else:
        config.torch_dtype = name
    config.save_pretrained(str(directory))
    _write_shards(weights, directory, parse_size(max_shard_size), save_file)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


def _write_shards(weights: dict[str, np.ndarray], directory: Path, limit: int, save_file) -> None:
    for stale in list(directory.glob("model*.safetensors")) + list(directory.glob("model.safetensors.index.json")):
        stale.unlink()
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in weights:
        nbytes = weights[key].nbytes
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = weights[key]
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata=metadata)
        weight_map.update({key: name for key in shard})
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
