"""Hugging Face checkpoints in and out: exact round trips with transformers, and strict refusals.

Nothing here needs a compiled forward pass except one logits check, so these tests are cheap.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import jaxsft.infra.sharding as shd
from jaxsft.models import (
    SUPPORTED_MODEL_TYPES,
    CheckpointError,
    UnsupportedModelError,
    from_pretrained,
    hf_state_dict,
    save_pretrained,
)
from jaxsft.models import hf_io
from tiny import FAMILIES, load_tokenizer, tiny_config, tiny_torch_model, tokenizer_dir

SUPPORTED_LIST = ", ".join(SUPPORTED_MODEL_TYPES)
TIED = {"smollm2", "qwen2", "gpt2"}


def _mesh():
    return shd.single_device_mesh()


def _load(source, **kwargs):
    return from_pretrained(source, mesh=_mesh(), **kwargs)


def _file_tensors(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a folder's safetensors files (single or sharded), any dtype, as numpy."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def _assert_same_state_dict(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def _ids(vocab=300, shape=(2, 33), seed=0):
    return torch.tensor(np.random.default_rng(seed).integers(3, vocab, size=shape))


def _hf_save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(str(folder))
    return folder


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("family", FAMILIES)
def test_folder_round_trip_is_bit_identical(family, tmp_path):
    torch_model = tiny_torch_model(family)
    src = _hf_save(torch_model, tmp_path / "hf")
    model = _load(src)
    out = save_pretrained(model, tmp_path / "out")
    assert out == tmp_path / "out"

    # the same files transformers itself writes: same keys, same bytes per tensor
    ours, theirs = _file_tensors(out), _file_tensors(src)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    if family in TIED:
        assert "lm_head.weight" not in ours  # tied: transformers re-ties on load
    else:
        assert "lm_head.weight" in ours
    # and the same config
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())

    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(reloaded) is type(torch_model)
    _assert_same_state_dict(torch_model, reloaded)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, torch_model(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_instance_round_trip_is_bit_identical(family, tmp_path):
    torch_model = tiny_torch_model(family, seed=1)
    model = _load(torch_model)
    assert model.config.model_type == torch_model.config.model_type
    save_pretrained(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    _assert_same_state_dict(torch_model, reloaded)
    ids = _ids(seed=1)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, torch_model(ids).logits)


def test_jaxsft_logits_identical_after_jaxsft_round_trip(tmp_path):
    model = _load(tiny_torch_model("qwen2"))
    save_pretrained(model, tmp_path / "out")
    again = _load(tmp_path / "out")
    ids = jnp.asarray(_ids().numpy())
    np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))


def test_original_gpt2_key_layout_loads(tmp_path):
    """OpenAI-style GPT-2 files: keys without the ``transformer.`` prefix, plus attn.bias buffers."""
    torch_model = tiny_torch_model("gpt2")
    src = _hf_save(torch_model, tmp_path / "hf")
    expected = hf_state_dict(_load(src))

    def strip(tensors):
        for key in list(tensors):
            tensors[key.removeprefix("transformer.")] = tensors.pop(key)
        for i in range(torch_model.config.n_layer):
            tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 512, 512), np.float32))

    _rewrite(src, strip)
    assert "wte.weight" in load_file(str(src / "model.safetensors"))
    got = hf_state_dict(_load(src))
    assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got)


def test_sharded_save_loads_in_transformers_and_back(tmp_path):
    torch_model = tiny_torch_model("llama")
    model = _load(torch_model)
    out = save_pretrained(model, tmp_path / "out", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["weight_map"].keys() == torch_model.state_dict().keys()
    for shard in shards:  # every shard below the limit unless it is a single oversized tensor
        keys = load_file(str(shard)).keys()
        assert shard.stat().st_size <= 40_000 + 1_000 or len(keys) == 1
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    _assert_same_state_dict(torch_model, reloaded)
    back = _load(out)
    a, b = hf_state_dict(back), hf_state_dict(model)
    assert all(np.array_equal(a[k], b[k]) for k in a)

    # saving again into the same folder, unsharded, leaves no stale shards or index behind
    save_pretrained(model, out, max_shard_size=10**9)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    _assert_same_state_dict(torch_model, AutoModelForCausalLM.from_pretrained(str(out)))


@pytest.mark.parametrize("torch_dtype,name", [(torch.bfloat16, "BF16"), (torch.float16, "F16")])
def test_half_precision_checkpoints_load_exactly(torch_dtype, name, tmp_path):
    torch_model = tiny_torch_model("qwen3").to(torch_dtype)
    src = _hf_save(torch_model, tmp_path / "hf")
    with open(src / "model.safetensors", "rb") as f:  # really a 16-bit file
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {name}

    model = _load(src)  # default param_dtype: fp32, an exact widening
    assert model.layers.q_proj[...].dtype == jnp.float32
    ours = hf_state_dict(model)
    for key, tensor in torch_model.state_dict().items():
        if key in ours:
            np.testing.assert_array_equal(ours[key], tensor.float().numpy(), err_msg=key)

    # kept in 16 bits, and written back in 16 bits: bit-identical for transformers
    jdtype = jnp.bfloat16 if torch_dtype == torch.bfloat16 else jnp.float16
    half = _load(src, param_dtype=jdtype)
    assert half.layers.q_proj[...].dtype == jdtype and half.dtype == jdtype
    out = save_pretrained(half, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["dtype"] == {"BF16": "bfloat16", "F16": "float16"}[name]
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert reloaded.dtype == torch_dtype
    _assert_same_state_dict(torch_model, reloaded)


def test_save_in_bf16_from_fp32_model(tmp_path):
    torch_model = tiny_torch_model("gpt2")
    out = save_pretrained(_load(torch_model), tmp_path / "out", dtype=jnp.bfloat16)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert reloaded.dtype == torch.bfloat16
    # jaxsft's fp32 -> bf16 rounding is torch's (round to nearest even)
    _assert_same_state_dict(torch_model.to(torch.bfloat16), reloaded)


def test_save_with_tokenizer_writes_a_loadable_tokenizer(tmp_path):
    tok = load_tokenizer(tokenizer_dir(str(tmp_path / "tok")))
    model = _load(tiny_torch_model("llama"))
    out = save_pretrained(model, tmp_path / "out", tokenizer=tok)
    again = AutoTokenizer.from_pretrained(str(out))
    text = "the quick brown fox jumps over the lazy dog"
    assert again(text)["input_ids"] == tok(text)["input_ids"] and len(tok(text)["input_ids"]) > 3
    assert (again.pad_token_id, again.eos_token_id, again.bos_token_id) == (0, 1, 2)
    assert again.decode(again(text)["input_ids"]) == text
    assert AutoConfig.from_pretrained(str(out)).model_type == "llama"


def test_save_refuses_a_model_without_hf_config(tmp_path):
    model = _load(tiny_torch_model("llama"))
    model.hf_config_json = None  # as a model built with init_model(spec) has
    with pytest.raises(ValueError, match="no Hugging Face config"):
        save_pretrained(model, tmp_path / "out")
    with pytest.raises(ValueError, match="max_shard_size='lots'"):
        hf_io.parse_size("lots")
    assert hf_io.parse_size("2MB") == 2_000_000 and hf_io.parse_size("1KiB") == 1024


# --------------------------------------------------------------------------- refusals
@pytest.fixture
def llama_folder(tmp_path):
    return _hf_save(tiny_torch_model("llama"), tmp_path / "hf")


@pytest.fixture
def no_placement(monkeypatch):
    """Fails the test if any parameter reaches a device: errors must come before placement."""
    calls = []
    original = shd.place_array
    monkeypatch.setattr(shd, "place_array", lambda *a, **k: calls.append(1) or original(*a, **k))
    yield calls
    assert calls == [], "a parameter was placed on device before the error"


def _rewrite(folder: Path, mutate) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    mutate(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_unsupported_model_type_folder_names_it_and_lists_families(tmp_path, no_placement):
    from transformers import PhiConfig, PhiForCausalLM

    cfg = PhiConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    PhiForCausalLM(cfg).save_pretrained(str(tmp_path / "phi"))
    with pytest.raises(UnsupportedModelError, match=f"model_type 'phi' is not supported.*{SUPPORTED_LIST}"):
        _load(tmp_path / "phi")


def test_unsupported_torch_model_is_refused_before_copying_weights(monkeypatch, no_placement):
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64))
    monkeypatch.setattr(hf_io, "_torch_state_dict", lambda m: pytest.fail("weights copied before the family check"))
    with pytest.raises(UnsupportedModelError, match=f"model_type 'bert'.*{SUPPORTED_LIST}"):
        _load(bert)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}), "'yarn'"),
        (dict(hidden_act="gelu_fast"), "hidden_act 'gelu_fast'"),
    ],
)
def test_unsupported_options_are_refused(change, match, no_placement):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, max_position_embeddings=128, **change)
    with pytest.raises(UnsupportedModelError, match=match):
        _load(LlamaForCausalLM(cfg))


def test_qwen2_sliding_window_and_gpt2_options_are_refused(no_placement):
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        _load(tiny_torch_model("qwen2", use_sliding_window=True))
    with pytest.raises(UnsupportedModelError, match="scale_attn_by_inverse_layer_idx"):
        _load(tiny_torch_model("gpt2", scale_attn_by_inverse_layer_idx=True))


def test_missing_weight_is_named(llama_folder, no_placement):
    _rewrite(llama_folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing weights: model\.layers\.1\.mlp\.up_proj\.weight"):
        _load(llama_folder)


def test_extra_weight_is_named(llama_folder, no_placement):
    _rewrite(llama_folder, lambda t: t.__setitem__("model.layers.0.self_attn.rotary.scale", np.ones(3, np.float32)))
    with pytest.raises(CheckpointError, match=r"unexpected weights: model\.layers\.0\.self_attn\.rotary\.scale"):
        _load(llama_folder)


@pytest.mark.parametrize(
    "key,shape,expected",
    [
        ("model.norm.weight", (65,), (64,)),
        ("model.embed_tokens.weight", (301, 64), (300, 64)),
        ("model.layers.0.self_attn.q_proj.weight", (64, 60), (64, 64)),
        # same number of elements: a reshape would accept it silently
        ("model.layers.1.self_attn.q_proj.weight", (128, 32), (64, 64)),
        # transposed (in, out) instead of torch's (out, in)
        ("model.layers.0.mlp.up_proj.weight", (64, 128), (128, 64)),
    ],
)
def test_misshaped_weight_names_key_and_both_shapes(llama_folder, key, shape, expected, no_placement):
    _rewrite(llama_folder, lambda t: t.__setitem__(key, np.zeros(shape, np.float32)))
    pattern = re.escape(f"{key} has shape {shape}, expected {expected}")
    with pytest.raises(CheckpointError, match=pattern):
        _load(llama_folder)


def test_non_float_weight_is_refused(llama_folder, no_placement):
    _rewrite(llama_folder, lambda t: t.__setitem__("model.norm.weight", np.ones(64, np.int64)))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has dtype int64"):
        _load(llama_folder)


def test_torch_base_model_without_lm_head_prefix_is_refused(no_placement):
    from transformers import LlamaModel

    with pytest.raises(CheckpointError, match=r"missing weights: model\.embed_tokens\.weight"):
        _load(LlamaModel(tiny_config("llama")))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors_names_the_file(llama_folder, damage, no_placement):
    path = llama_folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(b"not a safetensors file at all" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"could not read weights file .*{re.escape(str(path))}"):
        _load(llama_folder)


def test_shard_index_naming_a_missing_file(tmp_path, no_placement):
    model = _load(tiny_torch_model("llama"))
    out = save_pretrained(model, tmp_path / "out", max_shard_size="40KB")
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    no_placement.clear()  # only the load below must not place anything
    with pytest.raises(FileNotFoundError, match=re.escape(victim.name)):
        _load(out)


def test_folder_without_config(llama_folder, no_placement):
    (llama_folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        _load(llama_folder)


def test_folder_without_weights(llama_folder, tmp_path, no_placement):
    (llama_folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        _load(llama_folder)
    (llama_folder / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="found pytorch_model.bin: convert it to safetensors"):
        _load(llama_folder)


def test_path_that_is_not_a_folder(tmp_path, no_placement):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        _load(tmp_path / "nowhere")
    (tmp_path / "file.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        _load(str(tmp_path / "file.safetensors"))


@pytest.mark.parametrize("source", [None, 3, {"model.embed_tokens.weight": np.zeros((3, 3))}, tiny_config("llama")])
def test_non_path_non_model_source_is_a_type_error(source, no_placement):
    with pytest.raises(TypeError, match="source must be a local folder path or a transformers PreTrainedModel"):
        _load(source)



def test_saved_files_have_normal_permissions_and_a_generation_config(tmp_path):
    """safetensors writes 0600; the folder's files get 0666 - umask like config.json, and generation_config.json
    carries the model's BOS/EOS/pad ids so transformers' generate stops where jaxsft's does."""
    import os
    import stat

    from transformers import GenerationConfig

    torch_model = tiny_torch_model("llama")
    model = _load(torch_model)
    umask = os.umask(0o022)
    try:
        for limit in (10**9, "40KB"):
            out = save_pretrained(model, tmp_path / f"out-{limit}", max_shard_size=limit)
            for path in list(out.glob("*.safetensors")) + [out / "config.json"]:
                assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
    finally:
        os.umask(umask)
    gen = GenerationConfig.from_pretrained(str(out))
    assert (gen.eos_token_id, gen.bos_token_id, gen.pad_token_id) == (1, 2, 0)
    assert AutoModelForCausalLM.from_pretrained(str(out)).generation_config.eos_token_id == 1


def test_plain_folder_load_builds_one_spec_and_touches_no_peft_or_torch_code(tmp_path, monkeypatch):
    """A plain Llama folder loads through the HF loader alone: no PEFT or torch detection, the family's
    spec builder runs once, and init_model compiles its creation once."""
    import dataclasses

    import jax

    from jaxsft.infra import torch_bridge
    from jaxsft.models import families, init_model, peft_io

    folder = _hf_save(tiny_torch_model("llama"), tmp_path / "llama")
    boom = lambda *a, **k: pytest.fail("a plain folder load reached PEFT/torch detection")  # noqa: E731
    monkeypatch.setattr(peft_io, "is_peft_model", boom)
    monkeypatch.setattr(peft_io, "from_pretrained", boom)
    monkeypatch.setattr(torch_bridge, "is_torch_model", boom)
    builds = []
    record = families.REGISTRY["llama"]
    monkeypatch.setitem(families.REGISTRY, "llama", dataclasses.replace(
        record, build_spec=lambda cfg: builds.append(1) or record.build_spec(cfg)))
    model = _load(folder)
    assert builds == [1]
    jits = []
    real_jit = jax.jit
    monkeypatch.setattr(jax, "jit", lambda *a, **k: jits.append(1) or real_jit(*a, **k))
    init_model(model.spec, mesh=_mesh())
    assert jits == [1]


def test_registry_is_the_one_place_a_family_is_named():
    """Every supported model_type resolves through its record to a spec whose weight table fills every parameter."""
    from jaxsft.models import families

    assert set(SUPPORTED_MODEL_TYPES) | set(families.SEQ2SEQ_MODEL_TYPES) == set(families.REGISTRY)
    for family in FAMILIES:
        cfg = tiny_config(family)
        spec = families.spec_from_hf_config(cfg)
        record = families.family_of(cfg.model_type)
        table = record.weight_table(spec)
        filled = {p for row in table.active(hf_io.param_shapes(spec)) for p in row.ours}
        assert filled == set(hf_io.param_shapes(spec)) - ({"lm_head"} if spec.tie_word_embeddings else set()), family
        assert families.lora_sites(spec) == record.lora_sites and record.lora_sites
