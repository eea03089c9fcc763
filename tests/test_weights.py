"""The declarative weight tables (jaxsft.models.weights): ops, expansion, coverage, streaming load.

No compiled program runs here (shape-only models, numpy, one placement per parameter), so these are cheap.
"""

from __future__ import annotations

import weakref

import jax.numpy as jnp
import numpy as np
import pytest

import jaxsft
import jaxsft.sharding as shd
from jaxsft.models import hf_io, weights
from jaxsft.models.hf_keys import TABLES, table_for
from jaxsft.models.spec import ModelSpec
from jaxsft.models.weights import Op, W, WeightTable, expand

from tiny import FAMILIES, tiny_torch_model


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


@pytest.mark.parametrize("text", ["h n d", "(n d) h -> h n", "((n) d) -> n d", "n d -> (n d)", "n n -> n n"])
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
    spec = ModelSpec.from_hf_config(torch_model.config)
    theirs = {name: tuple(p.shape) for name, p in torch_model.named_parameters()}
    theirs = {table_for(spec).normalise(k): v for k, v in theirs.items()}
    assert hf_io.hf_weight_shapes(spec) == theirs
    filled = [p for row in table_for(spec).active(hf_io.param_shapes(spec)) for p in row.ours]
    assert sorted(filled) == sorted(hf_io.param_shapes(spec))


def test_a_table_missing_a_parameter_is_refused():
    spec = ModelSpec.from_hf_config(tiny_torch_model("llama").config)
    partial = WeightTable("llama", tuple(r for r in TABLES["llama"].rows if r.hf != "model.norm.weight"))
    with pytest.raises(ValueError, match=r"has no row for parameters \['final_norm_scale'\]"):
        partial.hf_shapes(hf_io.param_shapes(spec))
    assert W("a.{i}.b", "layers/x").per_layer and not W("a.b", "x").per_layer


def test_folder_load_streams_one_row_at_a_time(tmp_path, monkeypatch):
    """The first parameter reaches its devices before the last tensor is read, and when a parameter is
    placed, no tensor read for an earlier row is still alive in host memory."""
    torch_model = tiny_torch_model("llama")
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
    layers = model.spec.num_layers
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
