"""The declarative weight tables (jaxsft.models.weights): ops, expansion, coverage, streaming load.

No compiled program runs here (shape-only models, numpy, one placement per parameter), so these are cheap.
"""

from __future__ import annotations

import weakref

import jax.numpy as jnp
import numpy as np
import pytest

import jaxsft
import jaxsft.infra.sharding as shd
from jaxsft.models import hf_io, weights
from jaxsft.models.families import table_for
from jaxsft.models.hf_keys import TABLES
from jaxsft.models.families import spec_from_hf_config
from jaxsft.models.weights import Op, W, WeightTable, expand

from tiny import FAMILIES, tiny_torch_model
from tiny_seq2seq import SEQ2SEQ_FAMILIES, tiny_seq2seq_model

# Encoder and decoder of different depths, so per-stack layer counts are exercised.
_UNEVEN = {"t5": {"num_decoder_layers": 3}, "t5v11": {"num_decoder_layers": 3}, "bart": {"decoder_layers": 3}}


def test_op_matches_the_explicit_numpy_layout_both_ways():
    rng = np.random.default_rng(0)
    hf = rng.normal(size=(3 * 5, 4)).astype(np.float32)  # torch Linear [heads*dim, hidden], 3 heads of 5
    op = Op("(n d) h -> h n d")
    (ours,) = op.to_ours(hf, [(4, 3, 5)])
    np.testing.assert_array_equal(ours, hf.T.reshape(4, 3, 5))
    np.testing.assert_array_equal(op.to_hf([ours]), hf)
    assert op.hf_shape([(4, 3, 5)]) == (15, 4)
    # the same op on jax arrays, with a leading layers axis (what the torch sync runs on device)
    stacked = np.stack([ours, 2 * ours])
    np.testing.assert_array_equal(np.asarray(op.to_hf([jnp.asarray(stacked)], lead=1)), np.stack([hf, 2 * hf]))
    # several parameters from one tensor: GPT-2's c_attn [h, 3*n*d]
    fused = rng.normal(size=(4, 3 * 2 * 5)).astype(np.float32)
    split = Op("h (parts n d) -> parts h n d")
    q, k, v = split.to_ours(fused, [(4, 2, 5)] * 3)
    np.testing.assert_array_equal(k, fused[:, 10:20].reshape(4, 2, 5))
    np.testing.assert_array_equal(split.to_hf([q, k, v]), fused)
    assert Op("").to_ours(fused, [fused.shape])[0] is not None and Op("").identity


def test_a_size_one_hf_axis_is_dropped_and_restored():
    """BART's final_logits_bias: [1, V] in HF files, [V] here."""
    hf = np.arange(7, dtype=np.float32)[None, :]
    op = Op("1 v -> v")
    (ours,) = op.to_ours(hf, [(7,)])
    assert ours.shape == (7,)
    np.testing.assert_array_equal(ours, hf[0])
    assert op.hf_shape([(7,)]) == (1, 7)
    back = op.to_hf([ours])
    assert back.shape == (1, 7)
    np.testing.assert_array_equal(back, hf)
    stacked = np.asarray(op.to_hf([jnp.stack([jnp.asarray(ours), 2 * jnp.asarray(ours)])], lead=1))
    np.testing.assert_array_equal(stacked, np.stack([hf, 2 * hf]))


@pytest.mark.parametrize("text", ["h n d", "(n d) h -> h n", "((n) d) -> n d", "n d -> (n d)", "n n -> n n",
                                  "v -> 1 v", "2 v -> v"])
def test_malformed_ops_are_refused(text):
    with pytest.raises(ValueError, match="weight op"):
        Op(text)


def test_expand_is_the_one_layer_expansion():
    assert expand("model.layers.{i}.mlp.up_proj.weight", 2) == [
        (0, "model.layers.0.mlp.up_proj.weight"), (1, "model.layers.1.mlp.up_proj.weight")]
    assert expand("model.norm.weight", 5) == [(None, "model.norm.weight")]


@pytest.mark.parametrize("family", FAMILIES)
def test_table_names_and_shapes_are_transformers_own(family):
    """For every family the table's expanded names and HF shapes are exactly the torch model's
    parameters (tied lm_head aside), and every jaxsft parameter is filled by exactly one row."""
    torch_model = tiny_torch_model(family)
    spec = spec_from_hf_config(torch_model.config)
    theirs = {name: tuple(p.shape) for name, p in torch_model.named_parameters()}
    theirs = {table_for(spec).normalise(k): v for k, v in theirs.items()}
    assert hf_io.hf_weight_shapes(spec) == theirs
    filled = [p for row in table_for(spec).active(hf_io.param_shapes(spec)) for p in row.ours]
    assert sorted(filled) == sorted(hf_io.param_shapes(spec))


@pytest.mark.parametrize("family", SEQ2SEQ_FAMILIES)
def test_seq2seq_table_names_and_shapes_are_transformers_own(family):
    """T5 v1.0, T5 v1.1 and BART: the table's names and HF shapes are the torch model's state dict (its tied
    embedding copies aside, BART's final_logits_bias buffer included), each parameter filled by one row."""
    torch_model = tiny_seq2seq_model(family, **_UNEVEN[family])
    spec = hf_io.spec_from_hf_config(torch_model.config)
    assert spec.num_encoder_layers == 2 and spec.num_decoder_layers == 3
    table, shapes = table_for(spec), hf_io.param_shapes(spec)
    theirs = {name: tuple(p.shape) for name, p in torch_model.state_dict().items()}
    theirs = {k: v for k, v in theirs.items() if not table.ignorable(k, shapes)}
    assert hf_io.hf_weight_shapes(spec) == theirs
    filled = [p for row in table.active(shapes) for p in row.ours]
    assert sorted(filled) == sorted(shapes)


def test_a_parameter_filled_by_two_rows_is_refused():
    """T5's wi (v1.0) and wi_1 (v1.1) both mean up_proj: one table holding both would be ambiguous."""
    spec = spec_from_hf_config(tiny_torch_model("llama").config)
    doubled = WeightTable("llama", TABLES["llama"].rows + (W("model.layers.{i}.mlp.wi.weight", "layers/up_proj"),))
    with pytest.raises(ValueError, match=r"fills parameters \['layers/up_proj'\] from more than one row"):
        doubled.hf_shapes(hf_io.param_shapes(spec))


def test_an_optional_row_loads_zeros_when_absent_and_is_refused_when_partly_there():
    table = WeightTable("toy", (W("a.{i}.w", "layers/w", "o i -> i o"), W("b.{i}", "layers/b", optional=True)))
    shapes = {"layers/w": (2, 3, 4), "layers/b": (2, 4)}
    w = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    source = weights.ArraySource({"a.0.w": w[0], "a.1.w": w[1]})
    weights.check(table, shapes, source, "toy")
    got = dict(weights.stream(table, shapes, source))
    np.testing.assert_array_equal(got["layers/w"], w.transpose(0, 2, 1))
    np.testing.assert_array_equal(got["layers/b"], np.zeros((2, 4), np.float32))
    present = weights.ArraySource({"a.0.w": w[0], "a.1.w": w[1], "b.0": np.ones(4, np.float32), "b.1": 2 * np.ones(4, np.float32)})
    weights.check(table, shapes, present, "toy")
    np.testing.assert_array_equal(dict(weights.stream(table, shapes, present))["layers/b"], [[1] * 4, [2] * 4])
    partly = weights.ArraySource({"a.0.w": w[0], "a.1.w": w[1], "b.0": np.ones(4, np.float32)})
    with pytest.raises(weights.CheckpointError, match=r"missing weights: b\.1\b"):
        weights.check(table, shapes, partly, "toy")
    assert sorted(k for k, _ in weights.export(table, got)) == ["a.0.w", "a.1.w", "b.0", "b.1"]  # always written


def test_a_table_missing_a_parameter_is_refused():
    spec = spec_from_hf_config(tiny_torch_model("llama").config)
    partial = WeightTable("llama", tuple(r for r in TABLES["llama"].rows if r.hf != "model.norm.weight"))
    with pytest.raises(ValueError, match=r"has no row for parameters \['final_norm_scale'\]"):
        partial.hf_shapes(hf_io.param_shapes(spec))
    assert W("a.{i}.b", "layers/x").per_layer and not W("a.b", "x").per_layer


def test_folder_load_streams_one_row_at_a_time(tmp_path, monkeypatch):
    """The first parameter reaches its devices before the last tensor is read, and when a parameter is
    placed, no tensor read for an earlier row is still alive in host memory."""
    _assert_streams(tiny_torch_model("llama"), tmp_path, monkeypatch)


@pytest.mark.parametrize("family", ["t5v11", "bart"])
def test_seq2seq_folder_load_streams_one_row_at_a_time(family, tmp_path, monkeypatch):
    """The same for an encoder-decoder whose stacks differ in depth (BART's final_logits_bias included)."""
    _assert_streams(tiny_seq2seq_model(family, **_UNEVEN[family]), tmp_path, monkeypatch)


def _assert_streams(torch_model, tmp_path, monkeypatch):
    torch_model.save_pretrained(str(tmp_path / "hf"))
    events, alive = [], []
    read, place = hf_io.SafetensorsSource.read, shd.place_array

    def reading(self, key):
        array = read(self, key)
        events.append(("read", key))
        alive.append((key, weakref.ref(array)))
        return array

    def placing(host, sharding):
        still = [k for k, ref in alive if ref() is not None]
        events.append(("place", tuple(still)))
        return place(host, sharding)

    monkeypatch.setattr(hf_io.SafetensorsSource, "read", reading)
    monkeypatch.setattr(shd, "place_array", placing)
    model = jaxsft.from_pretrained(tmp_path / "hf", mesh=shd.single_device_mesh())
    kinds = [kind for kind, _ in events]
    assert kinds.index("place") < len(kinds) - 1 - kinds[::-1].index("read")  # interleaved, not read-all-then-place
    layers = max(getattr(model.spec, n, 0) for n in ("num_layers", "num_encoder_layers", "num_decoder_layers"))
    for kind, still in events:
        if kind == "place":
            assert len(still) <= layers, still  # at most the tensors of the row being placed
    reference = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    for key, value in hf_io.hf_state_dict(model).items():
        np.testing.assert_array_equal(value, reference[key], err_msg=key)


def test_check_reads_headers_only(tmp_path, monkeypatch):
    """A bad checkpoint is refused from its headers: no tensor data is read."""
    from safetensors.numpy import load_file, save_file

    tiny_torch_model("llama").save_pretrained(str(tmp_path / "hf"))
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    tensors.pop("model.norm.weight")
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setattr(hf_io.SafetensorsSource, "read", lambda self, key: pytest.fail(f"read {key} before the check"))
    with pytest.raises(weights.CheckpointError, match=r"missing weights: model\.norm\.weight"):
        jaxsft.from_pretrained(tmp_path / "hf", mesh=shd.single_device_mesh())
