"""The bad-input catalogue: every refused input names its argument and changes nothing.

Over ``TrainConfig``, both trainers' constructors and both trainers' ``step()``: each case asserts
the exception type, that the message names the argument at fault, and that nothing changed (weights,
optimizer state, step counters, log history, the shuffling RNG, the caller's model object). Then the
failures that used to happen *after* an update: a raising callback leaves a complete, consistent state,
and a bad ``eval_dataset`` is refused at construction instead of in the middle of training.
"""

from __future__ import annotations

import copy
import math

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import jaxsft
from jaxsft.training.trainer import TrainerCallback

import tiny

VOCAB = 256


def good_ids(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, int(rng.integers(4, 12))).astype(np.int32) for _ in range(n)]


def core_config(**overrides):
    settings = dict(learning_rate=1e-3, per_device_train_batch_size=4, max_steps=10, logging_steps=1,
                    max_length=16, length_buckets=(16,), disable_tqdm=True, seed=3)
    return jaxsft.TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def mesh():
    return jaxsft.single_device_mesh()


@pytest.fixture(scope="module")
def core(mesh):
    """A core trainer that has already taken one update (so the state is not the initial one)."""
    model = jaxsft.from_pretrained(tiny.tiny_torch_model("llama", vocab_size=VOCAB), mesh=mesh)
    trainer = jaxsft.IterativeSFTTrainer(model, core_config(), mesh=mesh)
    trainer.step(input_ids=good_ids())
    return trainer, model


def host_copy(tree):
    return [np.array(jax.device_get(x)) for x in jax.tree.leaves(tree)]


def snapshot(trainer, user_model):
    state = trainer.state_dict()
    return {
        "params": host_copy(state["params"]),
        "opt_state": host_copy(state["opt_state"]),
        "host": copy.deepcopy({k: state[k] for k in ("global_step", "rng", "counters", "log_history")}),
        "caller_model": host_copy(nnx.state(user_model)),  # the arrays the caller's object points at (must be live)
        "compiled": trainer.compiled_shapes,
    }


def assert_same(before, after):
    assert before["host"] == after["host"]
    assert before["compiled"] == after["compiled"]
    for key in ("params", "opt_state", "caller_model"):
        assert len(before[key]) == len(after[key])
        for a, b in zip(before[key], after[key]):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------- TrainConfig
CONFIG_CASES = [
    ("learning_rate", float("nan")), ("learning_rate", -1e-3), ("learning_rate", "1e-3"),
    ("weight_decay", float("nan")), ("weight_decay", -0.1), ("adam_epsilon", float("nan")), ("adam_epsilon", 0.0),
    ("max_grad_norm", float("nan")), ("max_grad_norm", float("inf")), ("sgd_momentum", float("nan")),
    ("sgd_momentum", -0.5), ("adam_beta1", 1.0), ("adam_beta2", float("inf")), ("warmup_ratio", 1.5),
    ("warmup_steps", 1.5), ("bf16", "no"), ("bf16", 1), ("gradient_checkpointing", "False"),
    ("skip_nonfinite_updates", "yes"), ("disable_tqdm", None), ("seed", -1), ("seed", "42"), ("seed", 2.0),
    ("per_device_train_batch_size", 0), ("per_device_train_batch_size", 2.5), ("gradient_accumulation_steps", True),
    ("max_length", 1), ("logging_steps", -1), ("eval_steps", 0), ("max_nonfinite_in_a_row", 0),
    ("max_steps", -5), ("lr_scheduler_type", "polynomial"), ("length_buckets", (64, 32)),
    ("agreement_timeout_s", 0), ("agreement_timeout_s", float("nan")), ("loss_chunk_size", 0),
    ("optim", "lion"), ("lr_scheduler_kwargs", None),
]


@pytest.mark.parametrize("field,value", CONFIG_CASES, ids=[f"{f}={v!r}" for f, v in CONFIG_CASES])
def test_train_config_refuses(field, value):
    with pytest.raises(ValueError) as err:  # wrong types raise ConfigTypeError: a TypeError and a ValueError
        jaxsft.TrainConfig(**{field: value})
    assert field in str(err.value)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        assert isinstance(err.value, TypeError) or field in ("lr_scheduler_type", "optim", "length_buckets")


def test_train_config_accepts_numpy_scalars_as_plain_values():
    cfg = jaxsft.TrainConfig(seed=np.int64(5), learning_rate=np.float32(0.5), bf16=np.bool_(False))
    assert (type(cfg.seed), type(cfg.learning_rate), type(cfg.bf16)) == (int, float, bool)


# ---------------------------------------------------------------------------------------- core constructor
class Shouting(TrainerCallback):
    pass


def core_constructor_cases(mesh):
    return [
        ("model", TypeError, lambda m: dict(model="not a model")),
        ("config", TypeError, lambda m: dict(model=m, config={"learning_rate": 1e-3})),
        ("optimizer", TypeError, lambda m: dict(model=m, optimizer="adamw")),
        ("schedule", TypeError, lambda m: dict(model=m, schedule=3)),
        ("mesh", TypeError, lambda m: dict(model=m, mesh="data")),
        ("callbacks", TypeError, lambda m: dict(model=m, callbacks=[object()])),
        ("callbacks", TypeError, lambda m: dict(model=m, callbacks=Shouting())),
        ("eval_dataset", ValueError, lambda m: dict(model=m, eval_dataset=[[5, -1, 7]])),
        ("eval_dataset", TypeError, lambda m: dict(model=m, eval_dataset=42)),
        ("eval_dataset", ValueError, lambda m: dict(model=m, eval_dataset={"input_ids": [[5, 6]], "lables": [[5, 6]]})),
        ("eval_dataset", ValueError, lambda m: dict(model=m, eval_dataset=[[5, VOCAB + 3]])),
    ]


@pytest.mark.parametrize("case", range(11))
def test_core_constructor_refuses(case, mesh, core):
    _, model = core
    argument, kind, build = core_constructor_cases(mesh)[case]
    before = host_copy(nnx.state(model))
    kwargs = build(model)
    kwargs.setdefault("config", core_config())
    kwargs.setdefault("mesh", mesh)
    with pytest.raises(kind) as err:
        jaxsft.IterativeSFTTrainer(**kwargs)
    assert argument in str(err.value), str(err.value)
    for a, b in zip(before, host_copy(nnx.state(model))):
        np.testing.assert_array_equal(a, b)


def test_core_refuses_max_length_beyond_learned_positions(mesh):
    """GPT-2 has a learned position table: training past it turned every weight into NaN with no warning."""
    model = jaxsft.from_pretrained(tiny.tiny_torch_model("gpt2", vocab_size=VOCAB, n_positions=32), mesh=mesh)
    with pytest.raises(ValueError, match=r"max_length=64.*learned position table \(32 positions"):
        jaxsft.IterativeSFTTrainer(model, core_config(max_length=64, length_buckets=(16, 64)), mesh=mesh)
    jaxsft.IterativeSFTTrainer(model, core_config(max_length=32, length_buckets=(16, 32)), mesh=mesh)  # fits


# ---------------------------------------------------------------------------------------- core step()
def meta_tensor():
    return torch.empty(5, dtype=torch.long, device="meta")


STEP_CASES = [
    ("input_ids", ValueError, dict(input_ids=None)),
    # input_ids=[] is an empty round, a warned no-op (tests/test_loop.py), not a bad input.
    ("input_ids", ValueError, dict(input_ids=[np.array([4, -2, 9])])),
    ("input_ids", ValueError, dict(input_ids=[np.array([4, 2**40, 9], np.uint64)])),
    ("input_ids", ValueError, dict(input_ids=[np.array([4, VOCAB, 9])])),
    ("input_ids", TypeError, dict(input_ids=[np.array([4.0, 5.0])])),
    ("input_ids", TypeError, dict(input_ids="4 5 6")),
    ("input_ids", ValueError, dict(input_ids=[np.ones((2, 3), np.int32)])),
    ("input_ids", ValueError, dict(input_ids=[meta_tensor()])),
    ("input_ids", ValueError, dict(input_ids=[torch.tensor([4, 5, 6]).to_sparse()])),
    ("labels", ValueError, dict(input_ids=[np.array([4, 5, 6])], labels=[np.array([4, 5])])),
    ("labels", ValueError, dict(input_ids=[np.array([4, 5, 6])], labels=[np.array([4, -5, 6])])),
    ("labels", ValueError, dict(input_ids=[np.array([4, 5, 6])], labels=[np.array([4, 5, VOCAB + 1])])),
    ("attention_mask", ValueError, dict(input_ids=[np.array([4, 5, 6])], attention_mask=[np.array([1, 2, 1])])),
    ("attention_mask", ValueError, dict(input_ids=[np.array([4, 5, 6])], attention_mask=[np.array([0, 0, 0])])),
    ("attention_mask", ValueError, dict(input_ids=[np.array([4, 5, 6]), np.array([7, 8])],
                                        attention_mask=[np.array([1, 1, 1])])),
    ("texts", ValueError, dict(texts=["hello"])),  # no tokenizer on this trainer
    ("texts_labels", ValueError, dict(input_ids=[np.array([4, 5, 6])], texts_labels=["x"])),
]


@pytest.mark.parametrize("argument,kind,kwargs", STEP_CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(STEP_CASES)])
def test_core_step_refuses_without_changes(core, argument, kind, kwargs):
    trainer, model = core
    before = snapshot(trainer, model)
    with pytest.raises(kind) as err:
        trainer.step(**kwargs)
    assert argument in str(err.value), str(err.value)
    assert_same(before, snapshot(trainer, model))


def test_huge_unsigned_id_is_not_reported_as_negative(core):
    trainer, _ = core
    with pytest.raises(ValueError) as err:
        trainer.step(input_ids=[np.array([4, 2**63 + 5], np.uint64)])
    assert "beyond int32" in str(err.value) and "negative" not in str(err.value)


# ---------------------------------------------------------------------------------------- failures after an update
class RaisingCallback(TrainerCallback):
    def __init__(self):
        self.calls = 0

    def on_log(self, trainer, logs):
        self.calls += 1
        raise RuntimeError("callback exploded")


def test_raising_callback_leaves_a_complete_consistent_state(mesh):
    model = jaxsft.from_pretrained(tiny.tiny_torch_model("llama", vocab_size=VOCAB), mesh=mesh)
    boom = RaisingCallback()
    trainer = jaxsft.IterativeSFTTrainer(model, core_config(per_device_train_batch_size=2), mesh=mesh, callbacks=[boom])
    with pytest.raises(RuntimeError, match="callback exploded"):
        trainer.step(input_ids=good_ids(6))  # three updates
    # Collect -> apply -> notify: every update's bookkeeping was stored before the first callback ran.
    assert trainer.state.global_step == 3
    assert [e["step"] for e in trainer.state.log_history] == [1, 2, 3]
    assert trainer.state.num_input_tokens_seen > 0 and boom.calls == 1
    # The caller's model points at the trainer's live arrays (not at donated, deleted ones).
    for a, b in zip(host_copy(nnx.state(model)), host_copy(trainer.params)):
        np.testing.assert_array_equal(a, b)
    trainer.callbacks.clear()
    assert trainer.step(input_ids=good_ids(2))["global_step"] == 4  # and it trains on


def test_bad_eval_dataset_is_refused_before_any_update(mesh):
    model = jaxsft.from_pretrained(tiny.tiny_torch_model("llama", vocab_size=VOCAB), mesh=mesh)
    before = host_copy(nnx.state(model))
    with pytest.raises(ValueError, match=r"eval_dataset: input_ids\[1\] contains the negative id"):
        jaxsft.IterativeSFTTrainer(model, core_config(eval_steps=1), mesh=mesh, eval_dataset=[[5, 6, 7], [5, -3]])
    for a, b in zip(before, host_copy(nnx.state(model))):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------- NaN guard switches
def poison(trainer):
    """One inf in the final norm: every later loss is NaN (as after a divergent update)."""
    state = trainer.state_dict()
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x.at[(0,) * x.ndim].set(np.inf) if "final_norm" in jax.tree_util.keystr(p) else x, state["params"]
    )
    trainer.load_state_dict({**state, "params": params})


@pytest.mark.parametrize("guard", [True, False], ids=["guarded", "unguarded"])
def test_stop_after_k_nonfinite_updates_in_a_row(mesh, guard):
    model = jaxsft.from_pretrained(tiny.tiny_torch_model("llama", vocab_size=VOCAB), mesh=mesh)
    trainer = jaxsft.IterativeSFTTrainer(
        model, core_config(per_device_train_batch_size=2, skip_nonfinite_updates=guard, max_nonfinite_in_a_row=3),
        mesh=mesh,
    )
    trainer.step(input_ids=good_ids(2))
    poison(trainer)
    with pytest.warns(UserWarning, match="non-finite"):
        trainer.step(input_ids=good_ids(4, seed=1))  # two bad updates: under the limit
    assert trainer.state.nonfinite_in_a_row == 2
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(
        FloatingPointError, match=r"3 updates in a row .*max_nonfinite_in_a_row=3"
    ):
        trainer.step(input_ids=good_ids(2, seed=2))
    assert trainer.state.global_step == 4  # consistent: every update that ran is counted
    if guard:
        # The skipped updates' NaN never entered the logged loss: the entries after the poisoning have none.
        after = [e for e in trainer.state.log_history if e["step"] > 1]
        assert after and all("loss" not in e and e["skipped_updates"] == 1 for e in after)
        assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


# ---------------------------------------------------------------------------------------- compat (the facade)
@pytest.fixture(scope="module")
def facade(tmp_path_factory, mesh):
    from transformers import TrainingArguments

    from compat import IterativeSFTTrainer

    out = tmp_path_factory.mktemp("facade")
    torch_model = tiny.tiny_torch_model("llama", vocab_size=VOCAB)
    args = TrainingArguments(output_dir=str(out), report_to=[], disable_tqdm=True, learning_rate=1e-3, max_steps=10,
                             logging_steps=1, per_device_train_batch_size=4)
    trainer = IterativeSFTTrainer(torch_model, args, mesh=mesh, max_length=16)
    trainer.step(input_ids=[torch.tensor(x, dtype=torch.long) for x in good_ids()])
    return trainer, torch_model, args


def facade_snapshot(trainer, torch_model):
    snap = snapshot(trainer.core, trainer.jax_model)
    snap["facade"] = (trainer.state.global_step, copy.deepcopy(trainer.state.log_history))
    snap["torch"] = [v.clone() for v in torch_model.state_dict().values()]
    return snap


FACADE_STEP_CASES = [
    ("input_ids", dict(input_ids=[torch.tensor([4, -2, 9])])),
    ("input_ids", dict(input_ids=[torch.tensor([4, VOCAB + 7])])),
    ("input_ids", dict(input_ids=[torch.empty(4, dtype=torch.long, device="meta")])),
    ("labels", dict(input_ids=[torch.tensor([4, 5, 6])], labels=[torch.tensor([4, 5])])),
    ("attention_mask", dict(input_ids=[torch.tensor([4, 5, 6])], attention_mask=[torch.tensor([1, 3, 1])])),
]


@pytest.mark.parametrize("argument,kwargs", FACADE_STEP_CASES, ids=[c[0] + str(i) for i, c in enumerate(FACADE_STEP_CASES)])
def test_facade_step_refuses_without_changes(facade, argument, kwargs):
    trainer, torch_model, _ = facade
    before = facade_snapshot(trainer, torch_model)
    with pytest.raises((ValueError, TypeError)) as err:
        trainer.step(**kwargs)
    assert argument in str(err.value), str(err.value)
    after = facade_snapshot(trainer, torch_model)
    assert before["facade"] == after["facade"]
    for a, b in zip(before.pop("torch"), after.pop("torch")):
        assert torch.equal(a, b)
    before.pop("facade"), after.pop("facade")
    assert_same(before, after)


def test_facade_constructor_refuses(facade, mesh, tmp_path):
    from transformers import TrainingArguments

    from compat import IterativeSFTTrainer

    _, torch_model, args = facade
    weights = [v.clone() for v in torch_model.state_dict().values()]  # state_dict() syncs the lazy torch copy
    cases = [
        ("weight_decay", ValueError, dict(model=torch_model, args=TrainingArguments(
            output_dir=str(tmp_path), report_to=[], weight_decay=float("nan")))),
        ("max_grad_norm", ValueError, dict(model=torch_model, args=TrainingArguments(
            output_dir=str(tmp_path), report_to=[], max_grad_norm=float("nan")))),
        ("model", ValueError, dict(model=42, args=args)),
        ("optimizers", TypeError, dict(model=torch_model, args=args, optimizers=3)),
        ("eval_dataset", ValueError, dict(model=torch_model, args=args, eval_dataset=[[5, -3]])),
    ]
    for argument, kind, kwargs in cases:
        with pytest.raises(kind) as err:
            IterativeSFTTrainer(mesh=mesh, max_length=16, **kwargs)
        assert argument in str(err.value), (argument, str(err.value))
    for a, b in zip(weights, torch_model.state_dict().values()):
        assert torch.equal(a, b)


def test_facade_missing_local_folder_is_not_a_hub_error(mesh, tmp_path):
    from compat import IterativeSFTTrainer

    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError) as err:
        IterativeSFTTrainer(missing, mesh=mesh)
    assert missing in str(err.value) and "repo" not in str(err.value).lower()


# ---------------------------------------------------------------------------------------- loading
def test_shard_index_naming_files_outside_the_folder_is_refused(tmp_path):
    """model.safetensors.index.json may only name files inside the model folder (no ../, no absolute paths)."""
    import json
    import shutil

    folder = tmp_path / "model"
    tiny.tiny_torch_model("llama", vocab_size=VOCAB).save_pretrained(folder, max_shard_size="100KB")
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    for outside in ("../" + shard, str((tmp_path / shard).resolve())):
        shutil.copy(folder / shard, tmp_path / shard)  # a readable file is there: it must still not be read
        bad = dict(index, weight_map={k: (outside if v == shard else v) for k, v in index["weight_map"].items()})
        index_file.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=r"names the shard file .* outside"):
            jaxsft.from_pretrained(str(folder))
    index_file.write_text(json.dumps(index))
    jaxsft.from_pretrained(str(folder))  # the untouched index loads


def test_every_config_field_has_a_type_rule():
    """A new TrainConfig field must say what type it takes (else its wrong types would slip through)."""
    import dataclasses

    from jaxsft.infra import config as cfg

    names = [f.name for cls in (cfg.TrainConfig, *cfg.GROUPS.values()) for f in dataclasses.fields(cls)
             if f.name not in cfg.GROUPS]
    assert sorted(set(names) - set(cfg._FIELD_KINDS)) == []
    assert sorted(set(cfg._FIELD_KINDS) - set(names)) == []


# ======================================================================================== issue 26: side doors
# Values that entered through a door other than TrainConfig(...)'s constructor, and messages that did
# not name the argument. Each: the type, the argument in the message, and nothing changed.
ASSIGNMENTS = [
    ("weight_decay", float("nan")), ("per_device_train_batch_size", 0), ("learning_rate", float("inf")),
    ("max_grad_norm", float("nan")), ("lr_scheduler_kwargs", {"num_cycles": float("nan")}), ("seed", -1),
]


@pytest.mark.parametrize("field,value", ASSIGNMENTS, ids=[f for f, _ in ASSIGNMENTS])
def test_config_assignment_after_construction_is_refused_and_the_old_value_kept(field, value):
    """``c.weight_decay = nan`` after construction was never re-checked: every weight went NaN."""
    config = core_config()
    before = copy.deepcopy(config)
    with pytest.raises(ValueError) as err:
        setattr(config, field, value)
    assert field in str(err.value)
    assert config == before
    group = {"weight_decay": "optimization", "learning_rate": "optimization", "max_grad_norm": "optimization",
             "lr_scheduler_kwargs": "optimization"}.get(field)
    if group is not None:  # the same through the group the field lives in
        with pytest.raises(ValueError, match=field):
            setattr(getattr(config, group), field, value)
        assert config == before


def test_scheduler_kwargs_nan_is_refused_where_it_enters(mesh, core):
    """``num_cycles=nan`` silently made the learning rate 0; a dict changed in place is seen by the trainer."""
    _, model = core
    with pytest.raises(ValueError, match=r"lr_scheduler_kwargs\['num_cycles'\]=nan: must be a finite number"):
        core_config(lr_scheduler_type="cosine", lr_scheduler_kwargs={"num_cycles": float("nan")})
    config = core_config(lr_scheduler_type="cosine", lr_scheduler_kwargs={"num_cycles": 0.5})
    config.lr_scheduler_kwargs["num_cycles"] = float("inf")  # in place: no assignment to check
    before = host_copy(nnx.state(model))
    with pytest.raises(ValueError, match=r"lr_scheduler_kwargs\['num_cycles'\]=inf"):
        jaxsft.IterativeSFTTrainer(model, config, mesh=mesh)
    for a, b in zip(before, host_copy(nnx.state(model))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -1.0])
def test_lora_config_refuses_non_finite_alpha(alpha):
    with pytest.raises(ValueError, match=r"LoraConfig\.lora_alpha=.* must be a finite positive number"):
        jaxsft.LoraConfig(lora_alpha=alpha)


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory, mesh):
    folder = tmp_path_factory.mktemp("adapter")
    model = jaxsft.from_pretrained(tiny.tiny_torch_model("llama", vocab_size=VOCAB), mesh=mesh)
    jaxsft.add_lora(model, jaxsft.LoraConfig(r=4, lora_alpha=8.0))
    jaxsft.save_adapter(model, folder)
    return folder


ADAPTER_CASES = [
    ("lora_alpha", lambda text: text.replace('"lora_alpha": 8.0', '"lora_alpha": NaN')),
    ("'r'=4.7", lambda text: text.replace('"r": 4', '"r": 4.7')),
    ("'r' (the LoRA rank) is missing", lambda text: text.replace('"r": 4,', "")),
    ("not valid JSON", lambda text: text[: len(text) // 2]),
]


@pytest.mark.parametrize("named,edit", ADAPTER_CASES, ids=["nan_alpha", "fractional_r", "missing_r", "not_json"])
def test_adapter_config_refused_naming_field_and_file(adapter_folder, tmp_path, mesh, named, edit):
    """NaN alpha trained to NaN, "r": 4.7 was truncated, a missing r was a bare KeyError, bad JSON named no file."""
    import shutil

    from jaxsft.models import AdapterError
    from jaxsft.models import lora as lora_lib

    folder = tmp_path / "edited"
    shutil.copytree(adapter_folder, folder)
    config_file = folder / "adapter_config.json"
    text = config_file.read_text()
    config_file.write_text(edit(text))
    assert config_file.read_text() != text
    base = jaxsft.from_pretrained(tiny.tiny_torch_model("llama", vocab_size=VOCAB), mesh=mesh)
    before = host_copy(nnx.state(base))
    with pytest.raises(AdapterError) as err:
        jaxsft.load_adapter(base, folder)
    assert named in str(err.value) and str(config_file) in str(err.value), str(err.value)
    assert lora_lib.lora_setup(base) is None
    for a, b in zip(before, host_copy(nnx.state(base))):
        np.testing.assert_array_equal(a, b)


def test_dtype_and_model_arguments_are_named(core, tmp_path):
    _, model = core
    torch_model = tiny.tiny_torch_model("llama", vocab_size=VOCAB)
    for argument in ("dtype", "param_dtype"):
        with pytest.raises(ValueError, match=rf"from_pretrained: {argument}='float7' is not a weight dtype"):
            jaxsft.from_pretrained(torch_model, **{argument: "float7"})
    target = tmp_path / "out"
    with pytest.raises(ValueError, match=r"save_pretrained: dtype='float7' is not a weight dtype"):
        jaxsft.save_pretrained(model, target, dtype="float7")
    with pytest.raises(TypeError, match=r"save_pretrained: model must be a jaxsft CausalLM .* got LlamaForCausalLM"):
        jaxsft.save_pretrained(torch_model, target)
    assert not target.exists()  # nothing written


def test_save_checkpoint_none_names_directory(core, tmp_path):
    trainer, model = core
    before = snapshot(trainer, model)
    with pytest.raises(TypeError, match=r"save_checkpoint: directory=None must be a folder path"):
        trainer.save_checkpoint(None)
    assert_same(before, snapshot(trainer, model))


CONSTRUCTOR_CASES_26 = [
    ("tokenizer", dict(tokenizer="gpt2")),
    ("compute_metrics", dict(compute_metrics=42)),
    ("preprocess_logits_for_metrics", dict(preprocess_logits_for_metrics="argmax")),
    ("optimizer", dict(optimizer=lambda schedule: "adamw")),  # a factory returning a non-transformation
]


@pytest.mark.parametrize("argument,kwargs", CONSTRUCTOR_CASES_26, ids=[c[0] for c in CONSTRUCTOR_CASES_26])
def test_core_constructor_refuses_side_door_arguments(mesh, core, argument, kwargs):
    _, model = core
    before = host_copy(nnx.state(model))
    with pytest.raises(TypeError) as err:
        jaxsft.IterativeSFTTrainer(model, core_config(), mesh=mesh, **kwargs)
    assert str(err.value).startswith(argument), str(err.value)
    for a, b in zip(before, host_copy(nnx.state(model))):
        np.testing.assert_array_equal(a, b)


class LengthExplodes(list):
    def __len__(self):
        raise RuntimeError("this input cannot tell its length")


def test_input_failure_of_any_type_changes_nothing(core):
    """A RuntimeError while reading inputs (not a TypeError/ValueError) is refused like them; multi-process,
    tests/test_multihost_agreement.py shows every process raising it together."""
    trainer, model = core
    before = snapshot(trainer, model)
    with pytest.raises(RuntimeError, match="cannot tell its length"):
        trainer.step(input_ids=LengthExplodes(good_ids()))
    assert_same(before, snapshot(trainer, model))


# ---------------------------------------------------------------------------------------- generate (issues 26, 27)
# Every refused generate() call names its argument and the public method, before any work (no program compiled).
GENERATE_CASES = [
    ("temperature", dict(temperature="hot")),
    ("top_p", dict(temperature=1.0, top_p="0.9")),
    ("batch_size", dict(batch_size="2")),
    ("batch_size", dict(batch_size=1.5)),
    ("stop", dict(stop=5)),
    ("prompts", dict(prompts=[123])),
    ("max_new_tokens", dict(max_new_tokens=True)),
    ("stop_check_every", dict(stop_check_every=0)),
    ("eos_token_ids", dict(eos_token_ids=[VOCAB + 3])),
    ("max_new_tokens", dict(max_new_tokens=10**9)),  # its KV cannot fit: refused at once, not after allocating
]


@pytest.fixture(scope="module")
def gen_tokenizer(tmp_path_factory):
    return tiny.load_tokenizer(tiny.tokenizer_dir(str(tmp_path_factory.mktemp("gen-tok"))))


@pytest.mark.parametrize("argument,kwargs", GENERATE_CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(GENERATE_CASES)])
def test_generate_refuses_by_name_before_any_work(core, gen_tokenizer, argument, kwargs):
    import time

    from jaxsft.generation import compiled_programs

    _, model = core
    args = {**dict(prompts=[[4, 5, 6], [7, 8]], max_new_tokens=3), **kwargs}
    before = compiled_programs()
    start = time.perf_counter()
    with pytest.raises((TypeError, ValueError)) as err:
        jaxsft.generate(model, gen_tokenizer, args.pop("prompts"), **args)
    assert argument in str(err.value) and "generate()" in str(err.value), str(err.value)
    assert time.perf_counter() - start < 1.0
    assert compiled_programs() == before


def test_generate_warns_once_past_a_rope_models_trained_positions(core, gen_tokenizer):
    _, model = core
    limit = model.spec.max_position_embeddings
    with pytest.warns(UserWarning, match="trained on"):
        jaxsft.generate(model, gen_tokenizer, [[4, 5, 6]], max_new_tokens=limit)
