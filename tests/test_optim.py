"""jaxsft.training.optim against transformers' schedulers and torch's optimizers and clipping.

Tolerances: schedules rtol 1e-7 (fp32 holds HF's float64 value to 6e-8);
optimizer trajectories rtol 1e-6 over 10 steps in fp32, with atol 1e-6 for
parameters that pass near zero (parameters are O(1), so that is a few fp32 ulps
of their scale; every update, decay term and bias correction is >= 1e-4).
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from transformers import get_scheduler
from transformers.optimization import Adafactor

from jaxsft.infra.config import TrainConfig
from jaxsft.training.optim import clip_by_global_norm_torch, decay_mask, global_norm, make_optimizer, make_schedule

# --- schedules ----------------------------------------------------------------



def _hf_scheduler(config, opt):
    """transformers' scheduler for ``config`` on a torch optimizer (the reference for every schedule test)."""
    return get_scheduler(
        config.lr_scheduler_type,
        opt,
        num_warmup_steps=config.num_warmup_steps(),
        num_training_steps=config.max_steps,
        scheduler_specific_kwargs=dict(config.lr_scheduler_kwargs),
    )

def _hf_rates(config: TrainConfig, steps: int) -> list[float]:
    """lr used by update s (s = 0, 1, ...) under HF's get_scheduler + LambdaLR."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=config.learning_rate)
    sched = _hf_scheduler(config, opt)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


SCHEDULE_CASES = [
    (kind, kwargs, warm)
    for kind, kwargs in [
        ("linear", {}),
        ("cosine", {}),
        ("cosine", {"num_cycles": 1.5}),
        ("constant", {}),
        ("constant_with_warmup", {}),
    ]
    for warm in [{"warmup_steps": 7}, {"warmup_ratio": 0.1}, {}]
]


@pytest.mark.parametrize("kind, kwargs, warm", SCHEDULE_CASES)
def test_schedule_matches_transformers(kind, kwargs, warm):
    config = TrainConfig(learning_rate=3e-4, max_steps=37, lr_scheduler_type=kind, lr_scheduler_kwargs=kwargs, **warm)
    if "warmup_ratio" in warm:
        assert config.num_warmup_steps() == math.ceil(0.1 * 37) == 4
    schedule = make_schedule(config)
    expected = _hf_rates(config, 48)  # up to and past the horizon
    inside = np.array([float(schedule(s)) for s in range(38)])
    np.testing.assert_allclose(inside, expected[:38], rtol=1e-7, atol=0)
    jitted = jax.jit(schedule)
    np.testing.assert_allclose([float(jitted(jnp.int32(s))) for s in range(38)], inside, rtol=0, atol=0)
    # past max_steps HF keeps evaluating its formula (linear: 0, cosine rises again); fp32 there
    past = np.array([float(schedule(s)) for s in range(38, 48)])
    np.testing.assert_allclose(past, expected[38:], rtol=1e-5, atol=1e-7 * config.learning_rate)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_no_horizon_warns_and_keeps_a_positive_constant_rate(kind):
    config = TrainConfig(learning_rate=2e-5, max_steps=-1, warmup_steps=4, lr_scheduler_type=kind)
    with pytest.warns(UserWarning, match=r"max_steps=-1 gives no horizon.*Set max_steps"):
        schedule = make_schedule(config)
    rates = [float(schedule(s)) for s in range(200)]
    np.testing.assert_allclose(rates[:4], [0.0, 0.5e-5, 1e-5, 1.5e-5], rtol=1e-7)
    assert all(r == np.float32(2e-5) for r in rates[4:])


def test_constant_with_warmup_without_horizon_does_not_warn():
    config = TrainConfig(max_steps=-1, warmup_steps=2, lr_scheduler_type="constant_with_warmup")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_schedule(config)


def test_unknown_scheduler_kwargs_are_rejected():
    with pytest.raises(ValueError, match="num_cycles"):
        make_schedule(TrainConfig(max_steps=10, lr_scheduler_type="linear", lr_scheduler_kwargs={"num_cycles": 2}))


# --- decay mask -------------------------------------------------------------------


def _params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    return {
        "embed": {"embedding": arr(7, 4)},
        "layers": {
            "attn": {"q_proj": {"kernel": arr(4, 4), "bias": arr(4)}},
            "input_norm": {"scale": arr(4)},
        },
        "final_norm": {"scale": arr(4)},
        "lm_head": {"kernel": arr(4, 7)},
    }


ATOL = 1e-6
DECAYED = {"embed/embedding", "layers/attn/q_proj/kernel", "lm_head/kernel"}


def _by_name(tree) -> dict:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def test_decay_mask_excludes_norms_and_biases_only():
    mask = _by_name(decay_mask(_params()))
    assert mask == {name: name in DECAYED for name in _by_name(_params())}


def test_decay_mask_on_nnx_state_and_optimizer_accepts_it():
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(11, 4, rngs=rngs)
            self.q_proj = nnx.Linear(4, 4, use_bias=True, rngs=rngs)
            self.post_attention_LayerNorm = nnx.LayerNorm(4, rngs=rngs)

    state = nnx.state(Block(nnx.Rngs(0)), nnx.Param)
    flat, _ = jax.tree_util.tree_flatten_with_path(decay_mask(state))
    mask = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p): bool(v) for p, v in flat}
    assert mask == {
        "embed/embedding/value": True,
        "q_proj/kernel/value": True,
        "q_proj/bias/value": False,
        "post_attention_LayerNorm/scale/value": False,
        "post_attention_LayerNorm/bias/value": False,
    }
    tx = make_optimizer(TrainConfig(weight_decay=0.1, max_steps=5))
    grads = jax.tree_util.tree_map(jnp.ones_like, state)
    updates, _ = jax.jit(tx.update)(grads, tx.init(state), state)
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(state)


# --- clipping ------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.5, 1.0, 4.0])  # below, exactly at, above the threshold
def test_clip_matches_torch_clip_grad_norm(scale):
    rng = np.random.default_rng(1)
    grads = {"a": rng.normal(size=(5, 3)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
    grads = {k: (v / norm * scale).astype(np.float32) for k, v in grads.items()}
    tensors = [torch.nn.Parameter(torch.zeros(v.shape)) for v in grads.values()]
    for t, v in zip(tensors, grads.values()):
        t.grad = torch.tensor(v)
    torch.nn.utils.clip_grad_norm_(tensors, max_norm=1.0)
    clipped, _ = clip_by_global_norm_torch(1.0).update(jax.tree_util.tree_map(jnp.asarray, grads), optax.EmptyState())
    for t, key in zip(tensors, grads):
        np.testing.assert_allclose(np.asarray(clipped[key]), t.grad.numpy(), rtol=1e-7, atol=0)
    if scale == 1.0:  # torch's 1e-6 shrinks even a gradient sitting on the threshold
        assert not np.array_equal(np.asarray(clipped["a"]), grads["a"])


def test_global_norm_is_fp32_for_bf16_grads():
    grads = {"a": jnp.full((300,), 3.0, jnp.bfloat16), "b": jnp.full((100,), 4.0, jnp.bfloat16)}
    norm = global_norm(grads)
    assert norm.dtype == jnp.float32
    np.testing.assert_allclose(float(norm), math.sqrt(300 * 9 + 100 * 16), rtol=1e-7)


# --- optimizers against torch -----------------------------------------------------------


def _grad_sequence(params: dict, steps: int, seed: int = 2) -> list[dict]:
    """Random gradients alternating between small (unclipped) and large (clipped) norms."""
    rng = np.random.default_rng(seed)
    scales = [0.05 if s % 2 else 3.0 for s in range(steps)]
    return [
        jax.tree_util.tree_map(lambda p: (rng.normal(size=p.shape) * scale).astype(np.float32), params)
        for scale in scales
    ]


def _run_jax(config: TrainConfig, params: dict, grads: list[dict]) -> list[dict]:
    tx = make_optimizer(config)
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for g in grads:
        updates, state = update(jax.tree_util.tree_map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)
        history.append(_by_name(params))
    return history


def _run_torch(config: TrainConfig, params: dict, grads: list[dict], make_torch_opt) -> list[dict]:
    named = {k: torch.nn.Parameter(torch.tensor(np.asarray(v))) for k, v in _by_name(params).items()}
    groups = [
        {"params": [p for k, p in named.items() if k in DECAYED], "weight_decay": config.weight_decay},
        {"params": [p for k, p in named.items() if k not in DECAYED], "weight_decay": 0.0},
    ]
    opt = make_torch_opt(groups)
    sched = _hf_scheduler(config, opt)
    history = []
    for g in grads:
        for k, v in _by_name(g).items():
            named[k].grad = torch.tensor(v)
        if config.clipping_enabled:
            torch.nn.utils.clip_grad_norm_(list(named.values()), config.max_grad_norm)
        opt.step()
        sched.step()
        history.append({k: p.detach().numpy().copy() for k, p in named.items()})
    return history


def _assert_same_trajectory(config, make_torch_opt, rtol=1e-6):
    params = _params()
    grads = _grad_sequence(params, 10)
    norms = [float(global_norm(g)) for g in grads]
    if config.clipping_enabled:  # the sequence exercises both sides of the threshold
        assert min(norms) < config.max_grad_norm < max(norms)
    ours, theirs = _run_jax(config, params, grads), _run_torch(config, params, grads, make_torch_opt)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for name in b:
            np.testing.assert_allclose(np.asarray(a[name]), b[name], rtol=rtol, atol=ATOL, err_msg=f"{name} @ {step}")
    moved = {k: not np.allclose(theirs[-1][k], np.asarray(v)) for k, v in _by_name(params).items()}
    assert all(moved.values())


@pytest.mark.parametrize(
    "overrides",
    [
        dict(max_grad_norm=1.0, weight_decay=0.1, lr_scheduler_type="linear", warmup_steps=3),
        dict(max_grad_norm=0.0, weight_decay=0.05, lr_scheduler_type="cosine", adam_epsilon=1e-3),
        dict(max_grad_norm=None, weight_decay=0.0, lr_scheduler_type="constant", adam_beta1=0.8, adam_beta2=0.95),
    ],
)
def test_adamw_matches_torch(overrides):
    config = TrainConfig(learning_rate=1e-2, max_steps=10, **overrides)
    _assert_same_trajectory(
        config,
        lambda groups: torch.optim.AdamW(
            groups,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            foreach=False,
        ),
    )


def test_clipping_off_is_not_zeroing():
    """max_grad_norm=0 means no clipping (HF), not zero gradients (TRL 0.23.1)."""
    config = TrainConfig(learning_rate=1e-2, max_steps=10, max_grad_norm=0.0, lr_scheduler_type="constant")
    params = _params()
    history = _run_jax(config, params, _grad_sequence(params, 1))
    assert not np.allclose(history[0]["embed/embedding"], np.asarray(params["embed"]["embedding"]))


@pytest.mark.parametrize("momentum, weight_decay", [(0.9, 0.01), (0.0, 0.1), (0.5, 0.0)])
def test_sgd_matches_torch(momentum, weight_decay):
    config = TrainConfig(
        optim="sgd",
        learning_rate=0.05,
        max_steps=10,
        warmup_steps=2,
        lr_scheduler_type="constant_with_warmup",
        sgd_momentum=momentum,
        weight_decay=weight_decay,
    )
    _assert_same_trajectory(
        config, lambda groups: torch.optim.SGD(groups, lr=config.learning_rate, momentum=momentum, foreach=False)
    )


def test_adafactor_matches_hf_adafactor_where_both_factor_alike():
    """On 1-D tensors and matrices with both dims >= 128 the two factor the same way."""
    rng = np.random.default_rng(3)
    params = {
        "w": {"kernel": jnp.asarray(rng.normal(size=(128, 144)), jnp.float32)},
        "b": {"bias": jnp.asarray(rng.normal(size=(160,)), jnp.float32)},
        "v": {"kernel": jnp.asarray(rng.normal(size=(130,)), jnp.float32)},
    }
    config = TrainConfig(optim="adafactor", learning_rate=1e-2, max_steps=6, warmup_steps=2, weight_decay=0.1)
    grads = [jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(6)]
    ours = _run_jax(config, params, grads)

    named = {k: torch.nn.Parameter(torch.tensor(np.asarray(v))) for k, v in _by_name(params).items()}
    decayed = {"w/kernel", "v/kernel"}
    opt = Adafactor(
        [
            {"params": [p for k, p in named.items() if k in decayed], "weight_decay": 0.1},
            {"params": [p for k, p in named.items() if k not in decayed], "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        scale_parameter=False,
        relative_step=False,
        warmup_init=False,
    )
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=6)
    for step, g in enumerate(grads):
        for k, v in _by_name(g).items():
            named[k].grad = torch.tensor(v)
        torch.nn.utils.clip_grad_norm_(list(named.values()), 1.0)
        opt.step()
        sched.step()
        for k, p in named.items():
            np.testing.assert_allclose(
                np.asarray(ours[step][k]), p.detach().numpy(), rtol=1e-6, atol=ATOL, err_msg=f"{k} @ {step}"
            )


def test_adamw_bias_correction_matches_torch_over_a_long_run():
    """optax's fp32 ``1 - b**t`` drifts from torch's float64 correction; jaxsft's must not."""
    import torch

    from jaxsft.training.optim import adamw_torch

    rng = np.random.default_rng(0)
    steps, lr = 3000, 1e-3
    grads = rng.standard_normal((steps, 64)).astype(np.float32)
    start = rng.standard_normal(64).astype(np.float32)

    p = torch.nn.Parameter(torch.tensor(start))
    opt = torch.optim.AdamW([p], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    expected = p.detach().numpy()

    def run(tx):
        params = jnp.asarray(start)
        state = tx.init(params)

        def body(carry, g):
            params, state = carry
            updates, state = tx.update(g, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(body, (params, state), jnp.asarray(grads))
        return np.asarray(params)

    ours = run(adamw_torch(lr, 0.9, 0.999, 1e-8, 0.0, None))
    stock = run(optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))
    ours_err = np.max(np.abs(ours - expected) / (np.abs(expected - start) + 1e-12))
    stock_err = np.max(np.abs(stock - expected) / (np.abs(expected - start) + 1e-12))
    print(f"relative to the distance moved: jaxsft {ours_err:.2e}, optax {stock_err:.2e}")
    # What remains is fp32 rounding of the parameters themselves (a random walk over 3000 steps);
    # the bias-correction drift that optax adds on top of it is gone.
    assert ours_err < stock_err / 2
    assert ours_err < 5e-4
