"""The model's opt-in fused residual add + RMSNorm (``norm_implementation``): wired in, and equal to the XLA form.

``norm_implementation="pallas"`` runs jaxsft.kernels.add_rms_norm (in Pallas interpret mode on this CPU) at
both of every layer's residual adds with the norm after each (the MLP output's add carried into the next layer's
attention norm); "xla" (the default) runs the plain adds and RMSNorms. Equal within
1e-5 of the largest magnitude in fp32 (the same formulas; only summation order differs), logits and every
parameter's gradient, scanned and unrolled layers, on one device and per device under data and FSDP meshes; a
trainer step's loss and greedy generation too; Gemma 2 and 3 (``1 + w`` norms between sandwich norms) as well as
Qwen2. The jaxpr shows the kernel is really there (and absent for GPT-2's LayerNorm, which the kernel does not
compute, and under tensor parallelism). ``tests/mutation_check.py fused_norm_wrong_weight`` and ``fused_norm_pending_dropped`` show
these tests catch a wrong wiring at either site.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsft
from jaxsft.models.options import RunOptions, with_options
from tiny import load_tokenizer, tokenizer_dir, tiny_torch_model

TOLERANCE = 1e-5


def _view(model, norm_implementation: str, scan_layers: bool):
    options = RunOptions.of(model)
    return with_options(model, RunOptions(**{**options.as_kwargs(), "norm_implementation": norm_implementation,
                                             "scan_layers": scan_layers}))


def _loss_and_grads(model, ids):
    from flax import nnx

    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        logits = nnx.merge(graphdef, params)(ids)
        return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0]), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, logits, grads


def _close(a, b, what):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
    assert err <= TOLERANCE, f"{what}: {err:.2e} of the largest magnitude"


def _all_close(fused, base):
    """Loss, logits and every parameter's gradient (``_loss_and_grads``'s triple) within TOLERANCE."""
    _close(fused[0], base[0], "loss")
    _close(fused[1], base[1], "logits")
    flat_base = dict(jax.tree_util.tree_leaves_with_path(base[2]))
    for path, g in jax.tree_util.tree_leaves_with_path(fused[2]):
        _close(g, flat_base[path], jax.tree_util.keystr(path))


@pytest.mark.parametrize("family,scan_layers", [("qwen2", True), ("qwen2", False), ("gemma2", False), ("gemma3", True)])
def test_fused_norm_equals_the_xla_form_in_logits_and_every_gradient(family, scan_layers):
    """Llama's RMSNorm (Qwen2) and Gemma's ``1 + w`` form, the latter between Gemma's sandwich norms."""
    model = jaxsft.from_pretrained(tiny_torch_model(family), dtype=jnp.float32)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 300, (2, 12)), jnp.int32)
    base = _loss_and_grads(_view(model, "xla", scan_layers), ids)
    fused = _loss_and_grads(_view(model, "pallas", scan_layers), ids)
    _all_close(fused, base)


def _calls_the_kernel(model) -> bool:
    ids = jnp.zeros((1, 8), jnp.int32)
    return "pallas_call" in str(jax.make_jaxpr(lambda: model(ids))())


def test_the_kernel_is_in_the_program_only_where_asked_and_applicable():
    qwen = jaxsft.from_pretrained(tiny_torch_model("qwen2"), dtype=jnp.float32)
    assert _calls_the_kernel(_view(qwen, "pallas", True))
    assert not _calls_the_kernel(_view(qwen, "xla", True))
    assert not _calls_the_kernel(_view(qwen, "auto", True))  # auto: the kernel on a GPU only
    gemma = jaxsft.from_pretrained(tiny_torch_model("gemma2"), dtype=jnp.float32)
    assert _calls_the_kernel(_view(gemma, "pallas", True))  # (1 + w) RMSNorm: the kernel's plus_one form
    gpt2 = jaxsft.from_pretrained(tiny_torch_model("gpt2"), dtype=jnp.float32)
    assert not _calls_the_kernel(_view(gpt2, "pallas", True))  # LayerNorm: not the kernel's formula


@pytest.mark.parametrize("devices", [1, 8])
def test_a_trainer_step_gives_the_same_loss_with_the_fused_norm(devices):
    """On one device and under data parallelism over 8 (where each device's rows take the kernel)."""
    mesh = jaxsft.make_mesh(devices=jax.devices()[:devices])
    losses = []
    for implementation in ("xla", "pallas"):
        model = jaxsft.from_pretrained(tiny_torch_model("qwen2"), dtype=jnp.float32, mesh=mesh,
                                       norm_implementation=implementation)
        trainer = jaxsft.IterativeSFTTrainer(model, mesh=mesh, config=jaxsft.TrainConfig(
            learning_rate=1e-3, lr_scheduler_type="constant", per_device_train_batch_size=2, max_length=32, seed=0))
        assert trainer.run_options.norm_implementation == implementation  # the config keeps the model's choice
        ids = [np.random.default_rng(i).integers(3, 300, 10 + i) for i in range(4)]
        losses.append([trainer.step(input_ids=ids)["loss"] for _ in range(2)])
    np.testing.assert_allclose(losses[1], losses[0], rtol=TOLERANCE)


def _lowered_gradient(model) -> str:
    from flax import nnx

    graphdef, params = nnx.split(model, nnx.Param)
    ids = jnp.zeros((2, 16), jnp.int32)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(ids).astype(jnp.float32))  # noqa: E731
    text = jax.jit(jax.grad(loss)).lower(params).as_text()
    return "\n".join(line.split(" loc(")[0] for line in text.splitlines() if not line.startswith("#loc"))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="off a GPU only: there 'auto' takes the kernel")
@pytest.mark.parametrize("scan_layers", [True, False])
def test_auto_off_a_gpu_lowers_to_the_xla_forms_program(scan_layers):
    """Off a GPU "auto" must not change the program at all (no carried residual, no add of zeros), so CPU and TPU
    results stay those of "xla" whatever a user picks."""
    model = jaxsft.from_pretrained(tiny_torch_model("qwen2"), dtype=jnp.bfloat16)
    assert _lowered_gradient(_view(model, "auto", scan_layers)) == _lowered_gradient(_view(model, "xla", scan_layers))
    assert _lowered_gradient(_view(model, "pallas", scan_layers)) != _lowered_gradient(_view(model, "xla", scan_layers))


def _calls_the_kernel_on(model, batch: int) -> bool:
    ids = jnp.zeros((batch, 8), jnp.int32)
    return "pallas_call" in str(jax.make_jaxpr(lambda: model(ids))())


def test_the_kernel_runs_per_device_where_the_mesh_splits_rows_alone():
    """The Pallas call has no sharding rule, so it runs inside shard_map on each device's own rows: under data or
    FSDP parallelism when the rows divide over them; under tensor parallelism (or rows that do not divide) the XLA
    form runs, since XLA would gather the kernel's operands (this suite runs 8 simulated CPU devices)."""
    qwen = _view(jaxsft.from_pretrained(tiny_torch_model("qwen2"), dtype=jnp.float32), "pallas", True)
    assert len(jax.devices()) == 8
    with jax.set_mesh(jaxsft.make_mesh()):  # data = 8
        assert _calls_the_kernel_on(qwen, 8) and not _calls_the_kernel_on(qwen, 1)
    with jax.set_mesh(jaxsft.make_mesh(data=2, fsdp=4)):
        assert _calls_the_kernel_on(qwen, 8)
    with jax.set_mesh(jaxsft.make_mesh(data=4, tensor=2)):
        assert not _calls_the_kernel_on(qwen, 8)
    with jax.set_mesh(jaxsft.make_mesh(devices=jax.devices()[:1])):
        assert _calls_the_kernel_on(qwen, 1)


@pytest.mark.parametrize("axes", [dict(data=8), dict(data=2, fsdp=4)])
def test_per_device_fused_norm_equals_the_xla_form_under_a_mesh(axes):
    """Each device normalises its own rows and the scales' gradients are summed over the row axes: logits and
    every gradient equal the XLA form's under the same mesh (fp32, 1e-5 of the largest magnitude)."""
    mesh = jaxsft.make_mesh(**axes)
    model = jaxsft.from_pretrained(tiny_torch_model("qwen2"), dtype=jnp.float32, mesh=mesh)
    ids = jnp.asarray(np.random.default_rng(3).integers(3, 300, (8, 12)), jnp.int32)
    with jax.set_mesh(mesh):
        base = _loss_and_grads(_view(model, "xla", False), ids)
        fused = _loss_and_grads(_view(model, "pallas", False), ids)
    _all_close(fused, base)


def test_an_unknown_norm_implementation_is_refused_by_name():
    with pytest.raises(ValueError, match="norm_implementation='fast'.*pick one"):
        RunOptions(norm_implementation="fast")


@pytest.mark.parametrize("devices", [1, 8])
def test_greedy_generation_gives_the_same_tokens_with_the_fused_norm(tmp_path, devices):
    """The decode step takes the kernel too (one token per row; per device under a data mesh of 8); greedy tokens
    equal the XLA form's. The lm_head is scaled up so that the next token follows the hidden state closely (a tiny
    random model's greedy rows otherwise repeat one token whatever the norm computes)."""
    import torch

    one_device = jaxsft.make_mesh(devices=jax.devices()[:devices])
    tok = load_tokenizer(tokenizer_dir(str(tmp_path)))
    torch_model = tiny_torch_model("llama", seed=1)
    with torch.no_grad():
        torch_model.lm_head.weight.mul_(40.0)
    prompts = [list(np.random.default_rng(i).integers(3, 300, 5 + i)) for i in range(8)]  # 8 rows: one per device
    tokens = []
    for implementation in ("xla", "pallas"):
        model = jaxsft.from_pretrained(torch_model, dtype=jnp.float32, mesh=one_device,
                                       norm_implementation=implementation)
        result = jaxsft.generate(model, tok, prompts, max_new_tokens=12, temperature=0.0, return_tokens=True)
        tokens.append([list(map(int, row)) for row in result.tokens])
    assert tokens[1] == tokens[0]
    assert len({t for row in tokens[0] for t in row}) > 8  # rows that follow the model, not one repeated token
