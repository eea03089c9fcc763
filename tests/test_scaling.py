"""What crosses devices in a data-parallel update, on 8 simulated CPU devices (see conftest.py).

* The embedding gradient is built from the micro-batch's token rows gathered from every device
  (a few KB) instead of a dense [vocab, hidden] all-reduce, and equals the dense gradient on
  every mesh; when the tokens outnumber the table's rows it falls back to the dense path.
* The loss over batch-split rows (shard_map) equals the single-device loss and gradients.
* A data-parallel update all-reduces each parameter's gradient exactly once: its all-reduce
  bytes equal the fp32 parameter bytes (a tied embedding reduced twice, or densely, fails this).
* ``jaxsft.infra.diagnostics`` reads collectives out of HLO text, async pairs counted once.
* ``TrainConfig.xla_options`` is checked when the trainer is built; ``scan_layers=None``
  unrolls the layers of shallow models on every mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

import jaxsft
from jaxsft.infra import diagnostics
from jaxsft.infra import sharding as shd
from jaxsft.training.loss import causal_lm_loss
from jaxsft.models.embedding import embedding_lookup

import tiny

MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 8, 1)]


def _on_mesh(mesh, table, ids, cotangent):
    table_spec = shd.logical_to_spec(("vocab", "embed"), table.shape, mesh)
    return (
        jax.device_put(table, NamedSharding(mesh, table_spec)),
        jax.device_put(ids, shd.batch_sharding(mesh, 2)),
        jax.device_put(cotangent, shd.batch_sharding(mesh, 3)),
    )


@pytest.mark.parametrize("vocab", [64, 16], ids=["rows-gathered", "dense-fallback"])
@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_embedding_gradient_equals_dense_gradient(sizes, vocab):
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(vocab, 16)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, vocab, (8, 4)), jnp.int32)  # 32 tokens: fewer than 64 rows, more than 16
    cotangent = jnp.asarray(rng.normal(size=(8, 4, 16)), jnp.float32)
    expected = jax.grad(lambda t: jnp.sum(jnp.take(t, ids, axis=0) * cotangent))(table)
    mesh = jaxsft.make_mesh(*sizes)
    with jax.set_mesh(mesh):
        t, i, c = _on_mesh(mesh, table, ids, cotangent)
        fn = jax.jit(jax.grad(lambda t, i, c: jnp.sum(embedding_lookup(t, i) * c)))
        got = fn(t, i, c)
        hlo = fn.lower(t, i, c).compile().as_text()
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6, atol=1e-6)
    ops = {r["op"] for r in diagnostics.collectives(hlo)}
    if vocab == 64 and sizes[0] * sizes[1] > 1:
        assert "all-gather" in ops, ops  # token rows travel...
        reduced = [r for r in diagnostics.collectives(hlo) if r["op"] in ("all-reduce", "reduce-scatter")]
        assert all(r["bytes"] < table.size * 4 for r in reduced), reduced  # ...the dense table does not


@pytest.mark.parametrize("chunk", [None, 8], ids=["full-logits", "token-chunks"])
@pytest.mark.parametrize("sizes", [(8, 1, 1), (2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.slow
def test_loss_over_split_rows_equals_single_device(sizes, chunk):
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(8, 6, 16)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(32, 16)) * 0.3, jnp.float32)
    labels = np.asarray(rng.integers(0, 32, (8, 6)), np.int32)
    labels[1, :4] = -100
    labels = jnp.asarray(labels)

    def loss(h, w):
        total, count = causal_lm_loss(h, w, labels, chunk_size=chunk)
        return total, count

    (ref_total, ref_count), ref_grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hidden, table)
    mesh = jaxsft.make_mesh(*sizes)
    with jax.set_mesh(mesh):
        h = jax.device_put(hidden, shd.batch_sharding(mesh, 3))
        (total, count), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(h, table)
    assert float(count) == float(ref_count)
    np.testing.assert_allclose(float(total), float(ref_total), rtol=1e-6)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_data_parallel_update_reduces_each_gradient_once():
    """All-reduced bytes of one update == fp32 bytes of every parameter (tied embedding counted once)."""
    torch_model = tiny.tiny_torch_model("qwen2", vocab_size=512)  # tied embeddings; 8 x 16 tokens < 512 rows
    mesh = jaxsft.make_mesh(8, 1, 1)
    model = jaxsft.from_pretrained(torch_model, mesh=mesh)
    cfg = jaxsft.TrainConfig(per_device_train_batch_size=1, max_length=16, length_buckets=(16,), scan_layers=False,
                             disable_tqdm=True, logging_steps=0)
    trainer = jaxsft.IterativeSFTTrainer(model, cfg, mesh=mesh)
    records = diagnostics.collectives(diagnostics.update_program_text(trainer, trainer.rows, 16))
    param_bytes = sum(4 * x.size for x in jax.tree.leaves(trainer.params))
    reduced = sum(r["bytes"] for r in records if r["op"] in ("all-reduce", "reduce-scatter"))
    assert not any(r["in_loop"] for r in records)  # unrolled: every collective is counted once
    # Each parameter once, plus a few scalars (loss sum, token count, their partial sums).
    assert param_bytes <= reduced <= param_bytes + 256, (reduced, param_bytes, diagnostics.summarize(records))
    assert any(r["op"] == "all-gather" for r in records)  # the embedding's token rows


HLO = """\
%body.1 (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ars = (bf16[10,4]{1,0}, bf16[10,4]{1,0}) all-reduce-start(%x), channel_id=1, metadata={op_name="jit(f)/dot"}
  %ard = bf16[10,4]{1,0} all-reduce-done(%ars)
}

ENTRY %main.2 (a: f32[8]) -> f32[16] {
  %w = (s32[], f32[4]) while(%t), condition=%cond.1, body=%body.1
  %ags = (f32[8]{0}, f32[16]{0}) all-gather-start(%a), dimensions={0}
  %ar = (f32[3]{0}, f32[5,2]{1,0}) all-reduce(%b, %c), to_apply=%add
  ROOT %agd = f32[16]{0} all-gather-done(%ags)
}
"""


def test_collectives_reader():
    records = {r["op"]: r for r in diagnostics.collectives(HLO) if r["op"] != "all-reduce" or r["in_loop"]}
    assert records["all-reduce"]["bytes"] == 10 * 4 * 2 and records["all-reduce"]["in_loop"]
    assert records["all-reduce"]["origin"] == "jit(f)/dot"
    assert records["all-gather"]["bytes"] == 16 * 4 and not records["all-gather"]["in_loop"]
    entry_reduce = [r for r in diagnostics.collectives(HLO) if r["op"] == "all-reduce" and not r["in_loop"]]
    assert entry_reduce[0]["bytes"] == (3 + 10) * 4 and entry_reduce[0]["shapes"] == ["f32[3]", "f32[5,2]"]
    assert "loop body" in diagnostics.summarize(diagnostics.collectives(HLO))


def _tiny_trainer(mesh, **overrides):
    model = jaxsft.from_pretrained(tiny.tiny_torch_model("llama", vocab_size=256, num_key_value_heads=4), mesh=mesh)
    cfg = jaxsft.TrainConfig(per_device_train_batch_size=1, max_length=16, length_buckets=(16,), disable_tqdm=True,
                             logging_steps=0, **overrides)
    return jaxsft.IterativeSFTTrainer(model, cfg, mesh=mesh)


@pytest.mark.slow
def test_bad_xla_options_fail_at_construction():
    mesh = jaxsft.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r"TrainConfig\.xla_options=.*xla_no_such_option.*refused by XLA"):
        _tiny_trainer(mesh, xla_options={"xla_no_such_option": True})
    with pytest.raises(ValueError, match=r"TrainConfig\.xla_options.*must be None or a dict"):
        jaxsft.TrainConfig(xla_options=["xla_gpu_enable_latency_hiding_scheduler"])
    trainer = _tiny_trainer(mesh, xla_options={"xla_backend_optimization_level": 2})
    stats = trainer.step(input_ids=[np.arange(3, 13)])
    assert np.isfinite(stats["loss"])


def test_xla_options_default_to_the_backends_measured_settings():
    """None: the backend's table (GPU: every matmul on cuBLAS, no Triton GEMM autotuning, for models at
    least CUBLAS_FROM_HIDDEN_SIZE wide; narrower ones and CPU/TPU: XLA's own); anything given, {} included,
    is used as is."""
    from jaxsft.infra import compile_options

    wide = compile_options.CUBLAS_FROM_HIDDEN_SIZE
    assert compile_options.resolve(None, backend="gpu", hidden_size=896) == {"xla_gpu_enable_triton_gemm": False}
    assert compile_options.resolve(None, backend="gpu", hidden_size=wide) == {"xla_gpu_enable_triton_gemm": False}
    assert compile_options.resolve(None, backend="gpu") == {"xla_gpu_enable_triton_gemm": False}  # width unknown
    assert compile_options.resolve(None, backend="gpu", hidden_size=576) == {}  # SmolLM2-135M: Triton measured faster
    assert compile_options.resolve(None, backend="gpu", hidden_size=wide - 1) == {}
    assert compile_options.resolve(None, backend="cpu", hidden_size=4096) == {} == compile_options.resolve(None, backend="tpu")
    assert compile_options.resolve({}, backend="gpu", hidden_size=4096) == {}
    given = {"xla_gpu_enable_triton_gemm": True}
    assert compile_options.resolve(given, backend="gpu", hidden_size=4096) == given
    assert compile_options.resolve(None) == compile_options.resolve(None, backend=jax.default_backend())


def test_trainer_compiles_with_the_defaults_for_its_models_width(monkeypatch):
    """The trainer passes its model's width: a table entry for this backend applies to a model as wide as
    its threshold and not to a narrower one (tiny_llama is 64 wide)."""
    from jaxsft.infra import compile_options

    mesh = jaxsft.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    option = {"xla_backend_optimization_level": 2}  # a real CPU option, so the trainer's check compiles it
    monkeypatch.setitem(compile_options.BACKEND_DEFAULTS, jax.default_backend(), (option, 64))
    assert _tiny_trainer(mesh).xla_options == option
    monkeypatch.setitem(compile_options.BACKEND_DEFAULTS, jax.default_backend(), (option, 65))
    assert _tiny_trainer(mesh).xla_options == {}


def test_scan_layers_automatic_choice():
    # Unrolled on every mesh for shallow models (measured faster on one GPU too since the split-based
    # unrolled loop; benchmarks/RESULTS.md), scanned beyond UNROLL_MAX_LAYERS, explicit choices kept.
    assert _tiny_trainer(jaxsft.make_mesh(8, 1, 1)).scan_layers is False
    assert _tiny_trainer(jaxsft.make_mesh(1, 8, 1)).scan_layers is False
    assert _tiny_trainer(jaxsft.make_mesh(2, 2, 2)).scan_layers is False
    assert _tiny_trainer(jaxsft.make_mesh(1, 8, 1), scan_layers=True).scan_layers is True
    from jaxsft.infra.config import UNROLL_MAX_LAYERS
    from jaxsft.models.options import RunOptions

    deep = jaxsft.TrainConfig().run_options(RunOptions(), num_layers=UNROLL_MAX_LAYERS + 1)
    assert deep.scan_layers is True
    with pytest.raises(ValueError, match=r"TrainConfig\.scan_layers"):
        jaxsft.TrainConfig(scan_layers="yes")
