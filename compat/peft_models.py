"""The facade's PEFT side: ``peft.PeftModel`` (LoRA) models and ``peft_config=`` in, adapters back out.

Conversion only: the adapters are converted by ``jaxsft.from_pretrained`` (which reads a
``PeftModel``) and trained by the core; this module checks what the user handed in, wraps a plain
model when ``peft_config`` is given (as TRL's SFTTrainer does), copies the trained adapters back
into the PeftModel's ``lora_A`` / ``lora_B`` parameters (lazily, like full weights in
``compat.torch_sync``) and names what is supported when something else arrives.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from jaxsft.models import peft_io

SUPPORTED = "LoRA (peft.LoraConfig, rsLoRA included; one adapter, bias='none', no DoRA or modules_to_save)"


def is_peft_model(model: Any) -> bool:
    return peft_io.is_peft_model(model)


def wrap(model: Any, peft_config: Any) -> Any:
    """``model`` as the PeftModel to train: ``get_peft_model(model, peft_config)`` when a config is given.

    Refuses (before any change) a config that is not a ``peft.LoraConfig``, a config together with a
    model that already is a PeftModel, and a PeftModel of another PEFT method.
    """
    if peft_config is not None:
        import peft

        if not isinstance(peft_config, peft.LoraConfig):
            raise ValueError(
                f"peft_config is a {type(peft_config).__name__}; the jaxsft facade trains {SUPPORTED}. Pass a "
                "peft.LoraConfig."
            )
        if is_peft_model(model):
            raise ValueError(
                "peft_config was given but model is already a PeftModel; pass either a base model with "
                "peft_config=LoraConfig(...) or the PeftModel alone."
            )
        peft_io.config_from_peft(peft_config.to_dict(), _spec_of(model))  # refuse unsupported options first
        model = peft.get_peft_model(model, peft_config)
    if is_peft_model(model):
        configs = dict(model.peft_config)
        for name, cfg in configs.items():
            try:
                peft_io.config_from_peft(cfg.to_dict(), _spec_of(model.get_base_model()))
            except peft_io.AdapterError as err:
                raise ValueError(f"model's PEFT adapter {name!r}: {err} The facade supports {SUPPORTED}.") from None
    return model


def _spec_of(model: Any):
    from jaxsft.models.families import spec_from_hf_config

    return spec_from_hf_config(model.config)


class TorchAdapterSync:
    """Copies jaxsft's trained adapters into a PeftModel's LoRA parameters, in place (base weights never change)."""

    def __init__(self, peft_model: Any):
        self._targets: dict[str, torch.nn.Parameter] = {}
        for name, param in peft_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                self._targets[peft_io.adapter_file_key(name)] = param

    @property
    def names(self) -> list[str]:
        return sorted(self._targets)

    def copy_from(self, model: Any) -> None:
        """Overwrite the PeftModel's adapter parameters with ``model``'s (a jaxsft LoRA CausalLM)."""
        arrays = peft_io.export_adapters(model)
        missing = sorted(set(arrays) ^ set(self._targets))
        if missing:
            raise RuntimeError(f"the PeftModel's adapters and jaxsft's differ in {missing[:4]}")
        with torch.no_grad():
            for key, param in self._targets.items():
                param.copy_(torch.from_numpy(np.ascontiguousarray(arrays[key])).to(param.dtype))


def save_adapter(model: Any, output_dir: Any) -> None:
    """``save_model`` for a PeftModel: the adapter folder (adapter_config.json + adapter_model.safetensors)."""
    peft_io.save_adapter(model, output_dir)
