"""The model's fused residual add + RMSNorm (``norm_implementation``, "auto" by default: the kernel on GPUs): wired
in, and equal to the XLA form.

``norm_implementation="pallas"`` runs jaxsft.kernels.add_rms_norm (in Pallas interpret mode on this CPU) at
both of every layer's residual adds with the norm after each (the MLP output's add carried into the next layer's
attention norm); "xla" (and "auto" off a GPU) runs the plain adds and RMSNorms. Equal within
1e-5 of the largest magnitude in fp32 (the same formulas; only summation order differs), logits and every
parameter's gradient, scanned and unrolled layers, on one device and per device under data and FSDP meshes; a
trainer step's loss and greedy generation too; Gemma 2 and 3 (``1 + w`` norms between sandwich norms) as well as
Qwen2. The jaxpr shows the kernel is really there (and absent for GPT-2's LayerNorm, which the kernel does not
compute, and under tensor parallelism). ``tests/mutation_check.py fused_norm_wrong_weight`` and ``fused_norm_pending_dropped`` show
these tests catch a wrong wiring at either site. In bf16 the kernel is held to adding no error beyond bf16's
own (against the fp32 model; ``fused_backward_residual_dropped_bf16`` shows that bound bites).
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


BF16_EXCESS = 1.5  # in bf16, the fused form's error against fp32 may be at most half again XLA's own


def _rel_l2(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def bf16_errors(family: str, implementation: str, seed: int = 0) -> dict[str, tuple[float, float]]:
    """For the logits and every gradient of a tiny bf16 model: (XLA's form's, the fused form's) relative L2 error
    against the same model's fp32 values (matmuls at full precision).

    Why against fp32 and not against each other: the two bf16 forms round at different points (XLA may keep an
    add in fp32 where the kernel rounds it, as the written program says), so each is ~1 % from fp32 and they can be
    ~2 % from each other in a gradient's largest entry (Gemma 2's ``q_proj`` on an H100). What a kernel must not do
    is add error beyond bf16's own; a wrong formula or a dropped term is off by O(1)."""
    path = tiny_torch_model(family)
    ids = jnp.asarray(np.random.default_rng(seed).integers(3, 300, (2, 24)), jnp.int32)
    with jax.default_matmul_precision("highest"):
        truth = _loss_and_grads(_view(jaxsft.from_pretrained(path, dtype=jnp.float32), "xla", False), ids)
    bf16 = jaxsft.from_pretrained(path, dtype=jnp.bfloat16)
    xla = _loss_and_grads(_view(bf16, "xla", False), ids)
    fused = _loss_and_grads(_view(bf16, implementation, False), ids)
    errors = {"logits": (_rel_l2(xla[1], truth[1]), _rel_l2(fused[1], truth[1]))}
    flat_truth, flat_xla = (dict(jax.tree_util.tree_leaves_with_path(t[2])) for t in (truth, xla))
    for path_, g in jax.tree_util.tree_leaves_with_path(fused[2]):
        errors[jax.tree_util.keystr(path_)] = (_rel_l2(flat_xla[path_], flat_truth[path_]),
                                               _rel_l2(g, flat_truth[path_]))
    return errors


def assert_within_bf16_rounding(errors: dict[str, tuple[float, float]]) -> None:
    for name, (xla, fused) in errors.items():
        assert fused <= BF16_EXCESS * xla + 1e-3, (
            f"{name}: the fused bf16 form is {fused:.2e} from fp32 (relative L2), XLA's bf16 form {xla:.2e}")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_in_bf16_the_fused_norm_adds_no_error_beyond_xlas_own_rounding(family):
    """The kernel in bf16 (interpret mode here; tests/test_gpu_tier.py compiles it on a GPU): logits and every
    gradient no further from the fp32 model's than XLA's bf16 form is, within half again (measured here: 1.12 at
    most, over Qwen2, Gemma 2 and 3 and two inputs each)."""
    errors = bf16_errors(family, "pallas")
    assert max(xla for xla, _ in errors.values()) > 1e-3  # bf16 really rounds here: the bound is not a free pass
    assert_within_bf16_rounding(errors)


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


def test_auto_is_the_default_and_fuses_the_layer_stack_but_not_the_decode_step(monkeypatch):
    """As on a GPU (``kernel_applies`` patched to say yes; the calls are counted while tracing): the default "auto"
    fuses the layer stack (training, evaluation, prefill) and leaves the one-token decode step to XLA's form, where
    the kernel measured slower (decoder.decode_norm_implementation); "pallas" fuses both, "xla" neither."""
    from jaxsft.models import decoder

    calls = []
    real = decoder.add_rms_norm
    monkeypatch.setattr(decoder, "kernel_applies", lambda hidden_size, backend=None: True)
    monkeypatch.setattr(decoder, "add_rms_norm", lambda *a, **k: calls.append(k["implementation"]) or real(*a, **k))
    model = jaxsft.from_pretrained(tiny_torch_model("qwen2"), dtype=jnp.float32)
    assert RunOptions.of(model).norm_implementation == "auto"
    spec = model.spec

    def attend(qkv, layer_cache, *, window, scale, softcap):
        return jnp.zeros((2, 1, spec.num_heads, spec.head_dim)), layer_cache

    def fused_calls(run) -> int:
        calls.clear()
        jax.make_jaxpr(run)()
        return len(calls)

    def decode(m):
        ids = jnp.zeros((2, 1), jnp.int32)
        return lambda: m.decode_step(ids, ids, [None] * spec.num_layers, attend, m.decode_params())

    def stack(m):
        return lambda: m(jnp.zeros((2, 8), jnp.int32))

    assert fused_calls(stack(model)) > 0 and fused_calls(decode(model)) == 0
    pallas, xla = _view(model, "pallas", True), _view(model, "xla", True)
    assert fused_calls(decode(pallas)) == 2 * spec.num_layers  # both sites of every layer
    assert fused_calls(stack(xla)) == 0 and fused_calls(decode(xla)) == 0


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

    mesh = jaxsft.make_mesh(devices=jax.devices()[:devices])
    tok = load_tokenizer(tokenizer_dir(str(tmp_path)))
    torch_model = tiny_torch_model("llama", seed=1)
    with torch.no_grad():
        torch_model.lm_head.weight.mul_(40.0)
    prompts = [list(np.random.default_rng(i).integers(3, 300, 5 + i)) for i in range(8)]  # 8 rows: one per device
    tokens = []
    for implementation in ("xla", "pallas"):
        model = jaxsft.from_pretrained(torch_model, dtype=jnp.float32, mesh=mesh,
                                       norm_implementation=implementation)
        result = jaxsft.generate(model, tok, prompts, max_new_tokens=12, temperature=0.0, return_tokens=True)
        tokens.append([list(map(int, row)) for row in result.tokens])
    assert tokens[1] == tokens[0]
    assert len({t for row in tokens[0] for t in row}) > 8  # rows that follow the model, not one repeated token
