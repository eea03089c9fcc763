"""LoRA adapters in and out in PEFT's formats: adapter folders and in-memory ``peft.PeftModel``s.

A PEFT LoRA folder is ``adapter_config.json`` plus ``adapter_model.safetensors`` whose keys are
``base_model.model.<module>.lora_A.weight`` (``[r, in]``) and ``...lora_B.weight`` (``[out, r]``).
Writing needs no ``peft`` install; reading a ``PeftModel`` instance needs one only because the
instance is one. Loading is strict, as for base checkpoints: every adapter present, every shape
right, no stray keys, and any PEFT option jaxsft does not implement is refused by name.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Union

import jax
import numpy as np

from jaxsft.models import hf_io
from jaxsft.models.families import lora_sites, spec_from_hf_config
from jaxsft.models.weights import ArraySource, expand
from jaxsft.models import lora as lora_lib
from jaxsft.models.lora import LoraConfig, LoraSetup, b_name

if TYPE_CHECKING:  # pragma: no cover
    from jaxsft.models.decoder import CausalLM

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

# PEFT LoraConfig fields jaxsft implements only at these values (anything else is refused by name).
_PLAIN_DEFAULTS: dict[str, Any] = {
    "bias": "none",
    "use_dora": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "exclude_modules": None,
    "lora_bias": False,
    "trainable_token_indices": None,
    "target_parameters": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "layer_replication": None,
    "megatron_config": None,
    "loftq_config": {},
}


def _plain(value: Any, plain: Any) -> bool:
    """True when a PEFT option is at its plain-LoRA value (unset, empty, False or the default)."""
    return value == plain or value is None or value is False or (isinstance(value, (dict, list, tuple)) and not value)


class AdapterError(ValueError):
    """An adapter that does not fit its base model, or uses a PEFT feature jaxsft does not implement."""


# ---------------------------------------------------------------------------------- conversion
def _flat(x: np.ndarray, lead: int) -> np.ndarray:
    """Collapse all dimensions after the first ``lead`` ones."""
    return x.reshape(*x.shape[:lead], -1)


def export_adapters(model: "CausalLM") -> dict[str, np.ndarray]:
    """The model's adapters as PEFT-named fp32 arrays (what ``adapter_model.safetensors`` holds)."""
    setup = _require_lora(model, "export_adapters")
    arrays = lora_lib.adapter_arrays(model)
    out: dict[str, np.ndarray] = {}
    for site in setup.sites:
        a = arrays[site.a_name]  # [L, *in, r]
        bs = [arrays[b_name(o)] for o in site.outputs]  # [L, r, *out]
        for i, module in expand(site.module, model.spec.num_layers):
            module = PREFIX + module
            out[f"{module}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, a.shape[-1]).T)
            out[f"{module}.lora_B.weight"] = np.ascontiguousarray(np.concatenate([_flat(b[i], 1) for b in bs], axis=1).T)
    return out


def import_adapters(model: "CausalLM", setup: LoraSetup, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PEFT-named arrays -> our stacked adapters, strictly (all problems reported together)."""
    shapes = lora_lib.adapter_shapes(model.spec, setup)
    tensors = {adapter_file_key(k): v for k, v in tensors.items()}
    remaining = set(tensors)
    problems: list[str] = []
    layers = model.spec.num_layers
    out = {name: np.zeros((layers, *shape), np.float32) for name, (shape, _) in shapes.items()}
    for site in setup.sites:
        a_shape = shapes[site.a_name][0]
        b_shapes = [shapes[b_name(o)][0] for o in site.outputs]
        want_a = (setup.config.r, int(np.prod(a_shape[:-1])))
        want_b = (sum(int(np.prod(s[1:])) for s in b_shapes), setup.config.r)
        for i, module in expand(site.module, layers):
            module = PREFIX + module
            a_key, b_key = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
            for key, want in ((a_key, want_a), (b_key, want_b)):
                if key not in tensors:
                    problems.append(f"missing {key}")
                elif tuple(tensors[key].shape) != want:
                    problems.append(f"{key} has shape {tuple(tensors[key].shape)}, expected {want}")
                remaining.discard(key)
            if problems:
                continue
            out[site.a_name][i] = np.asarray(tensors[a_key], np.float32).T.reshape(a_shape)
            b_rows = np.asarray(tensors[b_key], np.float32).T  # [r, sum(out)]
            start = 0
            for output, shape in zip(site.outputs, b_shapes):
                width = int(np.prod(shape[1:]))
                out[b_name(output)][i] = b_rows[:, start : start + width].reshape(shape)
                start += width
    problems += [f"unexpected {k}" for k in sorted(remaining)]
    if problems:
        raise AdapterError(
            f"the adapter does not fit this {model.spec.model_type} base model ({len(problems)} problems: "
            f"{'; '.join(problems[:6])}{' ...' if len(problems) > 6 else ''}); check that it was trained on this base."
        )
    return out


def adapter_file_key(key: str) -> str:
    """A PEFT parameter name -> its adapter-file key: in memory it carries the adapter name
    (``...lora_A.default.weight``), files do not (``...lora_A.weight``)."""
    for part in ("lora_A", "lora_B"):
        head, sep, tail = key.partition(f".{part}.")
        if sep and tail != "weight" and tail.endswith(".weight"):
            return f"{head}.{part}.weight"
    return key


def config_from_peft(data: Mapping[str, Any], spec: Any, where: str = "adapter config") -> LoraConfig:
    """A PEFT ``LoraConfig`` (as its dict) -> ours, refusing every option jaxsft does not implement.

    ``where`` names the source in error messages (the ``adapter_config.json`` path when read from a folder)."""
    peft_type = str(data.get("peft_type", "LORA")).upper().replace("PEFTTYPE.", "")
    if peft_type != "LORA":
        raise AdapterError(
            f"adapter peft_type={peft_type!r}: jaxsft supports LoRA adapters only (peft.LoraConfig, "
            "including rsLoRA); convert or retrain the adapter as LoRA."
        )
    unsupported = [f"{k}={data[k]!r}" for k, plain in _PLAIN_DEFAULTS.items() if k in data and not _plain(data[k], plain)]
    init = data.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        unsupported.append(f"init_lora_weights={init!r}")
    if unsupported:
        raise AdapterError(
            f"adapter options {', '.join(unsupported)} are not supported; jaxsft supports plain LoRA: r, lora_alpha, "
            "lora_dropout, target_modules (module names or 'all-linear'), use_rslora, bias='none'."
        )
    targets = data.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        valid = sorted({site.target for site in lora_sites(spec)})
        raise AdapterError(
            f"adapter target_modules={targets!r} is a regular expression; jaxsft takes a list of module names "
            f"(some of {valid}) or 'all-linear'."
        )
    if isinstance(targets, (list, tuple, set)):
        targets = tuple(sorted(targets))
    numbers = checked_numbers(data, where)
    return LoraConfig(target_modules=targets, use_rslora=bool(data.get("use_rslora", False)), **numbers)


def checked_numbers(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``r``, ``lora_alpha`` and ``lora_dropout`` of an adapter config, refused (naming the field and ``where``)
    unless ``r`` is a whole number >= 1 and the others finite numbers: a NaN alpha would train to NaN, a
    fractional rank would be silently truncated."""
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if "r" not in data:
        raise AdapterError(f"{where}: the field 'r' (the LoRA rank) is missing; add e.g. \"r\": 8.")
    r = data["r"]
    if not number(r) or r != int(r) or r < 1:
        raise AdapterError(f"{where}: field 'r'={r!r} must be a whole number >= 1 (the LoRA rank), e.g. \"r\": 8.")
    out = {"r": int(r)}
    for name, default, rule, example in (("lora_alpha", 8, lambda v: v > 0, 16), ("lora_dropout", 0.0, lambda v: 0 <= v < 1, 0.05)):
        value = data.get(name, default)
        if not number(value) or not rule(value):
            raise AdapterError(
                f"{where}: field {name!r}={value!r} must be a finite number "
                f"({'> 0' if name == 'lora_alpha' else 'in [0, 1)'}), e.g. \"{name}\": {example}."
            )
        out[name] = float(value)
    return out


def peft_config_dict(model: "CausalLM") -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT reads back into an equivalent ``peft.LoraConfig``."""
    setup = _require_lora(model, "save_adapter")
    c = setup.config
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": c.r,
        "lora_alpha": c.lora_alpha,
        "lora_dropout": c.lora_dropout,
        "target_modules": sorted({s.target for s in setup.sites}),
        "use_rslora": c.use_rslora,
        "bias": "none",
        "fan_in_fan_out": model.spec.model_type == "gpt2",  # GPT-2's Conv1D stores weights as [in, out]
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


# ---------------------------------------------------------------------------------- folders
def save_adapter(model: "CausalLM", directory: Union[str, os.PathLike]) -> Path:
    """Write a PEFT LoRA folder (``peft.PeftModel.from_pretrained(base, directory)`` loads it).

    Only process 0 writes; every process must call it (sharded adapters are gathered).
    """
    from safetensors.numpy import save_file

    tensors = export_adapters(model)
    config = peft_config_dict(model)
    directory = Path(directory)
    if jax.process_index() != 0:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return directory


def load_adapter(model: "CausalLM", directory: Union[str, os.PathLike]) -> "CausalLM":
    """Attach the PEFT LoRA adapter in ``directory`` to ``model`` (in place; returns it), to continue training it."""
    folder = Path(directory)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"adapter={str(directory)!r}: not a PEFT adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
            "pass the folder peft's save_pretrained or jaxsft.save_adapter wrote."
        )
    from safetensors.numpy import load_file

    try:
        data = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise AdapterError(
            f"{config_path}: not valid JSON ({err}); restore the adapter_config.json that peft's save_pretrained "
            "or jaxsft.save_adapter wrote."
        ) from None
    if not isinstance(data, dict):
        raise AdapterError(f"{config_path}: must hold a JSON object (PEFT's LoraConfig), got {type(data).__name__}.")
    return attach_peft(model, data, load_file(str(weights_path)), where=str(config_path))


def attach_peft(
    model: "CausalLM", config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], where: str = "adapter config"
) -> "CausalLM":
    """Attach adapters given as PEFT's config dict and PEFT-named arrays; every check runs first."""
    if lora_lib.lora_setup(model) is not None:
        raise AdapterError("the model already has LoRA adapters; load the adapter onto a fresh base model.")
    ours = config_from_peft(config, model.spec, where)
    setup = LoraSetup(ours, ours.resolve(model.spec))
    arrays = import_adapters(model, setup, {k: np.asarray(v) for k, v in tensors.items()})
    return lora_lib.attach(model, setup, arrays)


# ---------------------------------------------------------------------------------- loading base + adapter
def from_pretrained(source: Any, *, adapter: Union[str, os.PathLike, None] = None, **load_options: Any) -> "CausalLM":
    """Load a base model and attach a LoRA adapter: ``source`` a ``peft.PeftModel`` (base and its one
    adapter, both converted), or any :func:`jaxsft.models.hf_io.from_pretrained` source with
    ``adapter`` a PEFT LoRA folder (to continue training it). ``load_options`` go to the base's load;
    adapters are always fp32.
    """
    if is_peft_model(source):
        if adapter is not None:
            raise ValueError("from_pretrained: source is a PeftModel, which has its adapter; leave adapter=None.")
        config, tensors, peft_config, adapter_tensors = split_peft_model(source)
        model = hf_io.load(spec_from_hf_config(config), config, ArraySource(tensors), **load_options)
        return attach_peft(model, peft_config, adapter_tensors)
    if adapter is None:
        return hf_io.from_pretrained(source, **load_options)
    if not (Path(adapter) / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"from_pretrained: adapter={str(adapter)!r} has no {CONFIG_FILE}; pass a PEFT LoRA adapter folder."
        )
    return load_adapter(hf_io.from_pretrained(source, **load_options), adapter)


# ---------------------------------------------------------------------------------- PeftModel instances
def is_peft_model(obj: Any) -> bool:
    return any(c.__module__.split(".")[0] == "peft" and c.__name__ == "PeftModel" for c in type(obj).__mro__)


def split_peft_model(peft_model: Any) -> tuple[Any, dict[str, np.ndarray], dict[str, Any], dict[str, np.ndarray]]:
    """A ``peft.PeftModel`` -> (base HF config, base HF-named weights, adapter config dict, PEFT-named adapters).

    Only a single LoRA adapter is taken; any other PEFT method is refused naming what is supported.
    """
    from peft import get_peft_model_state_dict

    from jaxsft.infra.torch_bridge import tensor_as_numpy

    configs = dict(peft_model.peft_config)
    if len(configs) != 1:
        raise AdapterError(
            f"the PeftModel holds {len(configs)} adapters ({sorted(configs)}); jaxsft trains one LoRA adapter: "
            "delete the others (peft_model.delete_adapter) first."
        )
    (name, cfg), = configs.items()
    data = cfg.to_dict()
    base = peft_model.get_base_model()
    adapter = {k: v.detach().cpu().float().numpy() for k, v in get_peft_model_state_dict(peft_model, adapter_name=name).items()}
    weights = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key:
            continue
        weights[key.replace(".base_layer.", ".")] = tensor_as_numpy(tensor)
    return base.config, weights, data, adapter


def _require_lora(model: Any, what: str) -> LoraSetup:
    setup = lora_lib.lora_setup(model)
    if setup is None:
        raise ValueError(f"{what}: the model has no LoRA adapters (add them with jaxsft.add_lora or load one).")
    return setup
