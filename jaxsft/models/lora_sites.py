"""Which modules of a family can carry a LoRA adapter, named as PEFT names them.

A family's registry record (:mod:`jaxsft.models.families`) holds one of these tuples; the
adapter code (:mod:`jaxsft.models.lora`) and the PEFT files (:mod:`jaxsft.models.peft_io`) read
them from there.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Site:
    """One adapted module: its PEFT path, the name ``target_modules`` matches, and the base weights it adapts.

    GPT-2's ``c_attn`` is one Conv1D producing q, k and v: PEFT gives it one A and one B of
    ``3 * hidden`` rows, so here it is one shared A and three B blocks.
    """

    module: str  # PEFT module path below the base model, "{i}" = layer index
    target: str  # what target_modules names ("q_proj", "c_attn", "c_proj", ...)
    key: str  # our A's name stem: lora_a_<key>
    outputs: tuple[str, ...]  # base layer weights adapted, in PEFT's row order of lora_B

    @property
    def a_name(self) -> str:
        return f"lora_a_{self.key}"


def b_name(output: str) -> str:
    return f"lora_b_{output}"


# Llama's module names, shared by every family that kept them (Mistral, Qwen2/3, Gemma 2/3).
LLAMA_SITES = tuple(
    Site(f"model.layers.{{i}}.{block}.{name}", name, name, (name,))
    for block, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
    for name in names
)
GPT2_SITES = (
    Site("transformer.h.{i}.attn.c_attn", "c_attn", "qkv", ("q_proj", "k_proj", "v_proj")),
    Site("transformer.h.{i}.attn.c_proj", "c_proj", "o_proj", ("o_proj",)),
    Site("transformer.h.{i}.mlp.c_fc", "c_fc", "up_proj", ("up_proj",)),
    Site("transformer.h.{i}.mlp.c_proj", "c_proj", "down_proj", ("down_proj",)),
)
