"""The scale-out layer on 8 simulated CPU devices (see conftest.py).

* Meshes data x fsdp x tensor = (8,1,1), (1,8,1), (2,2,2), (1,2,4) train exactly as
  one device does (per-update losses and final weights, rtol 1e-5, fp32), with
  gradient accumulation 1 and 2 and calls of varying lengths. The global
  micro-batch is the same everywhere: 8 rows = per_device x (data x fsdp).
* Parameters and Adam moments are laid out as LOGICAL_AXIS_RULES says, and are
  born sharded (``init_model``, ``from_pretrained``): no device holds a full copy.
* A tensor axis that does not divide query heads / MLP / vocab fails at construction,
  naming the parameter or dimension; KV heads it does not divide are replicated (GQA on
  ``make_mesh(tensor=4)`` with 2 KV heads trains as one device does); ``make_mesh`` rejects
  bad arguments. The rules table is an argument (``sharding_rules=``).
* A batch smaller than the data axes is padded with zero-weight rows and split
  over the data axes (never replicated, never an XLA error).
* ``save_pretrained`` gathers sharded params into a folder transformers loads.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxsft
from jaxsft.training import batching
from jaxsft.infra import sharding as shd
from jaxsft.models.hf_io import hf_state_dict

import tiny

VOCAB = 256
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
GLOBAL_ROWS = 8


def mesh_id(sizes) -> str:
    return "x".join(map(str, sizes))


@functools.lru_cache(maxsize=None)
def torch_model(**overrides):
    """Tiny Llama: 4 query and 4 KV heads, MLP 128, vocab 256 (all divisible by tensor=4 and fsdp=8)."""
    return tiny.tiny_torch_model("llama", vocab_size=VOCAB, **{"num_key_value_heads": 4, **overrides})


def config(per_device: int, ga: int) -> jaxsft.TrainConfig:
    return jaxsft.TrainConfig(
        learning_rate=1e-3,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=ga,
        weight_decay=0.01,
        warmup_steps=1,
        max_steps=20,
        logging_steps=1,
        # GA 1 compiles one fused program per bucket (two shapes); GA 2 one accumulate shape (compiles are the slow part)
        length_buckets=(16, 32) if ga == 1 else (32,),
        max_length=32,
        disable_tqdm=True,
        seed=3,
    )


def calls() -> list[dict]:
    """Three step() calls: one micro-batch of short rows (bucket 16), two of longer rows with
    prompt labels masked (bucket 32), and 13 short rows (a full micro-batch plus one with 3 filler rows)."""
    rng = np.random.default_rng(11)

    def ex(n, lo, hi):
        return [rng.integers(3, VOCAB, size=int(rng.integers(lo, hi + 1))) for _ in range(n)]

    long = ex(16, 17, 32)
    labels = [np.where(np.arange(len(x)) < rng.integers(0, len(x) // 2), -100, x) for x in long]
    return [dict(input_ids=ex(8, 3, 16)), dict(input_ids=long, labels=labels), dict(input_ids=ex(13, 3, 16))]


def make_trainer(sizes, ga: int, kv_heads: int = 4):
    mesh = shd.single_device_mesh() if sizes is None else jaxsft.make_mesh(*sizes)
    per_device = GLOBAL_ROWS // shd.batch_rows_multiple(mesh)
    model = jaxsft.from_pretrained(torch_model(num_key_value_heads=kv_heads), mesh=mesh)
    return jaxsft.IterativeSFTTrainer(model, config(per_device, ga), mesh=mesh)


@functools.lru_cache(maxsize=None)
def trained(sizes, ga: int, kv_heads: int = 4):
    """(trainer, per-update losses) after the three calls; cached so each (mesh, ga) compiles once."""
    trainer = make_trainer(sizes, ga, kv_heads)
    losses = []
    for kwargs in calls():
        out = trainer.step(**kwargs)
        losses += out["update_losses"]
    return trainer, np.asarray(losses)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_same_weights(got: dict, want: dict, rtol: float = 1e-5) -> None:
    assert set(got) == set(want)
    errors = {k: rel_err(got[k], want[k]) for k in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"{worst}: relative error {errors[worst]:.2e} > {rtol}"


def expected_specs(model, mesh) -> dict[str, P]:
    """'layers/q_proj' -> the PartitionSpec LOGICAL_AXIS_RULES gives it on ``mesh``."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = "/".join(map(str, path))
        out[name] = shd.logical_to_spec(var.logical_axes, var.shape, mesh, name)
    return out


def param_arrays(model) -> dict[str, jax.Array]:
    return {"/".join(map(str, path)): var[...] for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ---------------------------------------------------------------------------- make_mesh


def test_make_mesh_default_is_all_devices_on_data():
    mesh = jaxsft.make_mesh()
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert list(mesh.devices.reshape(-1)) == jax.devices()
    assert dict(jaxsft.make_mesh(fsdp=-1).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(jaxsft.make_mesh(tensor=-1).shape) == {"data": 1, "fsdp": 1, "tensor": 8}
    assert dict(jaxsft.make_mesh(2, -1, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(jaxsft.make_mesh(fsdp=2, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(jaxsft.make_mesh(np.int64(4), 2).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert dict(jaxsft.make_mesh(devices=jax.devices()[:2]).shape) == {"data": 2, "fsdp": 1, "tensor": 1}
    single = jaxsft.single_device_mesh()
    assert dict(single.shape) == {"data": 1, "fsdp": 1, "tensor": 1} and single.devices.item() == jax.devices()[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(data=3), r"data\*fsdp\*tensor = 3 but 8 devices"),
        (dict(data=2, fsdp=2), r"= 4 but 8 devices"),
        (dict(data=-1, fsdp=3), r"8 devices cannot be split .* size 3"),
        (dict(data=-1, fsdp=-1), r"at most one axis may be -1"),
        (dict(data=0), r"data=0 must be a positive integer or -1"),
        (dict(fsdp=-2), r"fsdp=-2 must be a positive integer or -1"),
        (dict(tensor=2.0), r"tensor=2.0 must be a positive integer"),
        (dict(tensor=True), r"tensor=True must be a positive integer"),
        (dict(data="8"), r"data='8' must be a positive integer"),
        (dict(devices=[]), r"devices is empty"),
    ],
)
def test_make_mesh_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jaxsft.make_mesh(**kwargs)


# ---------------------------------------------------------------------------- layouts


def test_logical_to_spec_follows_the_rules_table():
    mesh = jaxsft.make_mesh(1, 2, 4)
    assert shd.logical_to_spec(("layers", "embed", "q_heads", "head_dim"), (2, 64, 4, 16), mesh) == P(
        None, "fsdp", "tensor", None
    )
    assert shd.logical_to_spec(("vocab", "embed"), (256, 64), mesh) == P("tensor", "fsdp")
    assert shd.logical_to_spec(("layers", "norm"), (2, 64), mesh) == P(None, None)
    # a mesh axis of size 1 is never named (the array is simply not split there)
    assert shd.logical_to_spec(("vocab", "embed"), (256, 64), jaxsft.make_mesh(8, 1, 1)) == P(None, None)
    with pytest.raises(ValueError, match=r"logical axis 'heads' has no row in LOGICAL_AXIS_RULES"):
        shd.logical_to_spec(("heads",), (4,), mesh, "x")


def check_born_sharded(model, mesh, before: set) -> None:
    """Every param has the table's layout, each device holds only its slice, and no full copy was left on a device."""
    want = expected_specs(model, mesh)
    arrays = param_arrays(model)
    for name, x in arrays.items():
        assert x.sharding.mesh == mesh and x.sharding.spec == want[name], name
        for shard in x.addressable_shards:
            assert shard.data.shape == x.sharding.shard_shape(x.shape), name
    q = arrays["layers/q_proj"]  # [layers, embed, q_heads, head_dim]
    fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
    on_device0 = next(s for s in q.addressable_shards if s.device == jax.devices()[0]).data
    assert on_device0.shape == (2, 64 // fsdp, 4 // tensor, 16)
    assert on_device0.size * fsdp * tensor == q.size
    leftovers = [
        x for x in jax.live_arrays()
        if id(x) not in before and x.shape == q.shape and len(x.sharding.device_set) == 1
    ]  # fmt: skip
    assert not leftovers, "a full-size q_proj copy lives on one device"


@pytest.mark.parametrize("sizes", [(1, 8, 1), (1, 2, 4)], ids=mesh_id)
def test_from_pretrained_places_shards_directly(sizes):
    mesh = jaxsft.make_mesh(*sizes)
    before = {id(x) for x in jax.live_arrays()}
    model = jaxsft.from_pretrained(torch_model(), mesh=mesh)
    check_born_sharded(model, mesh, before)
    # the values are the checkpoint's
    ref = {k: v.detach().numpy() for k, v in torch_model().state_dict().items()}
    for key, value in hf_state_dict(model).items():
        np.testing.assert_array_equal(value, ref[key], err_msg=key)


@pytest.mark.slow
def test_init_model_is_born_sharded_and_mesh_independent():
    mesh = jaxsft.make_mesh(1, 8, 1)
    spec = jaxsft.models.spec_from_hf_config(torch_model().config)
    before = {id(x) for x in jax.live_arrays()}
    sharded = jaxsft.init_model(spec, mesh=mesh, seed=0)
    check_born_sharded(sharded, mesh, before)
    # same seed, same values, whatever the mesh
    single = jaxsft.init_model(spec, mesh=shd.single_device_mesh(), seed=0)
    for name, x in param_arrays(single).items():
        np.testing.assert_array_equal(shd.fetch_to_host(param_arrays(sharded)[name]), np.asarray(x), err_msg=name)


# ---------------------------------------------------------------------------- parity


@pytest.mark.parametrize("ga", [1, 2])
@pytest.mark.parametrize("sizes", MESHES, ids=mesh_id)
@pytest.mark.slow
def test_mesh_training_equals_one_device(sizes, ga):
    ref_trainer, ref_losses = trained(None, ga)
    trainer, losses = trained(sizes, ga)
    assert trainer.rows == ref_trainer.rows == GLOBAL_ROWS
    assert len(losses) == len(ref_losses) == (5 if ga == 1 else 3)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_same_weights(hf_state_dict(trainer.model), hf_state_dict(ref_trainer.model))
    assert trainer.compiled_shapes == ref_trainer.compiled_shapes  # same programs, one per shape

    # After training, parameters and Adam moments still have the rules table's layout.
    mesh = trainer.mesh
    want = expected_specs(trainer.model, mesh)
    for name, x in param_arrays(trainer.model).items():
        assert x.sharding.spec == want[name], name
    matched = {"mu": set(), "nu": set()}
    for path, leaf in jax.tree_util.tree_flatten_with_path(trainer._opt_state)[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        moment = next((m for m in ("mu", "nu") if m in keys), None)
        if moment is None:
            continue
        name = "/".join(k for k in keys[keys.index(moment) + 1 :] if k != "value")
        assert leaf.sharding.spec == want[name], f"{moment} {name}: {leaf.sharding.spec} != {want[name]}"
        matched[moment].add(name)
    assert matched["mu"] == matched["nu"] == set(want)
    if sizes == (1, 8, 1):
        q = trainer.model.layers.q_proj[...]
        assert q.addressable_shards[0].data.shape == (2, 8, 4, 16)  # 1/8 of [2, 64, 4, 16] per device


@pytest.mark.slow
def test_gqa_kv_heads_replicated_when_the_tensor_axis_does_not_divide_them():
    """2 KV heads (4 query heads) on make_mesh(tensor=4): query heads, MLP and vocab split four ways,
    the KV projections replicated, and training equals one device (losses and weights, rtol 1e-5)."""
    ref_trainer, ref_losses = trained(None, 1, kv_heads=2)
    trainer, losses = trained((2, 1, 4), 1, kv_heads=2)
    assert dict(trainer.mesh.shape) == dict(jaxsft.make_mesh(tensor=4).shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    arrays = param_arrays(trainer.model)
    assert arrays["layers/q_proj"].sharding.spec == P(None, None, "tensor", None)
    assert arrays["layers/k_proj"].sharding.spec == arrays["layers/v_proj"].sharding.spec == P(None, None, None, None)
    assert arrays["layers/k_proj"].shape[2] == 2
    assert arrays["layers/up_proj"].sharding.spec == P(None, None, "tensor")
    assert len(losses) == len(ref_losses) == 5
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_same_weights(hf_state_dict(trainer.model), hf_state_dict(ref_trainer.model))
    # the rule is the table's: without kv_heads among the replicable axes the same model is refused
    strict = shd.ShardingRules(replicate_if_indivisible=())
    with pytest.raises(ValueError, match=r"'kv_heads' dimension of size 2 is not divisible by the 'tensor' mesh axis"):
        jaxsft.from_pretrained(torch_model(num_key_value_heads=2), mesh=trainer.mesh, sharding_rules=strict)


@pytest.mark.slow
def test_sharding_rules_are_an_argument():
    """A rules table that keeps the MLP whole on the tensor axis lays the model out that way, and
    the trainer keeps (and trains on) that layout."""
    mesh = jaxsft.make_mesh(1, 2, 4)
    rules = shd.ShardingRules(params={**shd.LOGICAL_AXIS_RULES, "mlp": None},
                              activations={**shd.ACTIVATION_RULES, "mlp": None})
    assert shd.DEFAULT_RULES == shd.ShardingRules() and hash(rules) != hash(shd.DEFAULT_RULES)
    model = jaxsft.from_pretrained(torch_model(), mesh=mesh, sharding_rules=rules)
    assert param_arrays(model)["layers/up_proj"].sharding.spec == P(None, "fsdp", None)
    trainer = jaxsft.IterativeSFTTrainer(model, config(GLOBAL_ROWS // 2, 1), mesh=mesh, sharding_rules=rules)
    trainer.step(**calls()[0])
    assert param_arrays(trainer.model)["layers/up_proj"].sharding.spec == P(None, "fsdp", None)
    assert param_arrays(trainer.model)["layers/q_proj"].sharding.spec == P(None, "fsdp", "tensor", None)
    with pytest.raises(TypeError, match="sharding_rules must be a jaxsft.infra.sharding.ShardingRules"):
        jaxsft.IterativeSFTTrainer(model, config(GLOBAL_ROWS // 2, 1), mesh=mesh, sharding_rules={"mlp": None})
    with pytest.raises(ValueError, match=r"mesh axes \['model'\] are not among"):
        shd.ShardingRules(params={**shd.LOGICAL_AXIS_RULES, "mlp": "model"})


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "overrides, sizes, match",
    [
        # 6 query and KV heads (head_dim 16) on tensor=4
        (dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=6), (2, 1, 4), r"'(q|kv)_heads' dimension of size 6"),
        # MLP width 102 on tensor=4
        (dict(intermediate_size=102), (2, 1, 4), r"'mlp' dimension of size 102"),
        # 4 query heads on tensor=8 (4 KV heads would be replicated; query heads must divide)
        (dict(), (1, 1, 8), r"'q_heads' dimension of size 4"),
        # vocab 300 on tensor=8
        (dict(vocab_size=300), (1, 1, 8), r"'vocab' dimension of size 300"),
    ],
)
def test_tensor_axis_that_does_not_divide_fails_at_construction(overrides, sizes, match):
    overrides = dict(overrides)
    vocab = overrides.pop("vocab_size", VOCAB)
    tm = tiny.tiny_torch_model("llama", vocab_size=vocab, **{"num_key_value_heads": 4, **overrides})
    mesh = jaxsft.make_mesh(*sizes)
    with pytest.raises(ValueError, match=match) as err:
        jaxsft.from_pretrained(tm, mesh=mesh)
    assert "parameter layers/" in str(err.value) or "parameter embed" in str(err.value)
    # the trainer given such a mesh (model loaded on one device) refuses too, naming the config dimension
    model = jaxsft.from_pretrained(tm, mesh=shd.single_device_mesh())
    with pytest.raises(ValueError, match=r"mesh tensor axis of size \d does not divide the model's \w+"):
        jaxsft.IterativeSFTTrainer(model, config(1, 1), mesh=mesh)
    # init_model too
    with pytest.raises(ValueError, match=match):
        jaxsft.init_model(jaxsft.models.spec_from_hf_config(tm.config), mesh=mesh)


# ---------------------------------------------------------------------------- small batches


def test_batch_smaller_than_data_axis_is_padded_not_replicated():
    """3 examples on (8,1,1) with 1 row per device: 5 zero-weight rows, split over data, same result."""
    examples = calls()[0]["input_ids"][:3]
    trainer, ref = make_trainer((8, 1, 1), 1), make_trainer(None, 1)
    # Fresh state, but reuse the (identical) compiled programs of the cached runs: compiling is the slow part.
    trainer.programs.cache, ref.programs.cache = (dict(trained((8, 1, 1), 1)[0].programs.cache),
                                                  dict(trained(None, 1)[0].programs.cache))
    assert trainer.rows == ref.rows == 8

    mb = batching.plan_microbatches(
        [batching.Example(x.astype(np.int32), x.astype(np.int32)) for x in examples],
        rows=trainer.rows, buckets=trainer.buckets, rng=np.random.default_rng(0),
    )[0]  # fmt: skip
    assert mb.num_examples == 3 and mb.input_ids.shape[0] == 8 and not mb.attention_mask[3:].any()
    placed = trainer.programs.device_batch(mb)["input_ids"]
    assert placed.sharding.spec == P(("data", "fsdp"), None)
    assert len(placed.addressable_shards) == 8
    assert all(s.data.shape == (1, mb.input_ids.shape[1]) for s in placed.addressable_shards)
    assert sorted(s.index[0].start for s in placed.addressable_shards) == list(range(8))  # split, not replicated

    out, ref_out = trainer.step(input_ids=examples), ref.step(input_ids=examples)
    assert out["num_microbatches"] == ref_out["num_microbatches"] == 1
    np.testing.assert_allclose(out["update_losses"], ref_out["update_losses"], rtol=1e-5)
    assert_same_weights(hf_state_dict(trainer.model), hf_state_dict(ref.model))


# ---------------------------------------------------------------------------- saving


def test_save_pretrained_gathers_sharded_params(tmp_path):
    from transformers import AutoModelForCausalLM

    trainer, _ = trained((2, 2, 2), 1)
    assert not trainer.params["layers"]["q_proj"][...].sharding.is_fully_replicated
    weights = hf_state_dict(trainer.model)
    trainer.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", local_files_only=True)
    state = {k: v.detach().numpy() for k, v in loaded.state_dict().items()}
    assert set(state) == set(weights)
    for key, value in weights.items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)
    # and equals the one-device training's weights
    assert_same_weights(state, hf_state_dict(trained(None, 1)[0].model))
