"""compat.optimizers: torch optimizers and schedulers reproduced step for step with optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from compat.optimizers import DEFAULT_TABLE_HORIZON, describe_optimizer, describe_scheduler, is_optax_transformation
from jaxsft.training.optim import build_optimizer, build_schedule

S = torch.optim.lr_scheduler


class Tiny(torch.nn.Module):
    """Weights that decay and a bias / norm that do not, as HF splits them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)


def hf_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if "bias" not in n and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if "bias" in n or "norm" in n]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def mask_by_name(names: frozenset[str]) -> dict[str, bool]:
    """What the facade supplies: HF names → the core's decay table over the (here: name-keyed) JAX params."""
    return {name: name in names for name, _ in Tiny().named_parameters()}


def schedule_of(*args, **kwargs):
    """The schedule the core builds from the facade's description of a torch scheduler."""
    return build_schedule(describe_scheduler(*args, **kwargs))


def run_both(model, optimizer, scheduler, steps=6, **convert_kwargs):
    """Step torch with fixed pseudo-random grads; replay the same grads through optax. Return both params."""
    description = describe_optimizer(optimizer, model=model, decay_mask_fn=mask_by_name, **convert_kwargs)
    schedule = schedule_of(scheduler, description.learning_rate if scheduler is None else None)
    tx = build_optimizer(description, schedule)
    params = {n: jnp.asarray(p.detach().numpy()) for n, p in model.named_parameters()}
    state = tx.init(params)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        grads = {n: rng.normal(size=p.shape).astype(np.float32) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = torch.from_numpy(grads[n].copy())
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        updates, state = tx.update({n: jnp.asarray(g) for n, g in grads.items()}, state, params)
        params = optax.apply_updates(params, updates)
    return {n: p.detach().numpy() for n, p in model.named_parameters()}, {n: np.asarray(p) for n, p in params.items()}


def assert_params_close(torch_params, jax_params, atol=2e-6):
    for name in torch_params:
        np.testing.assert_allclose(jax_params[name], torch_params[name], atol=atol, rtol=1e-5, err_msg=name)


# --- optimizers -------------------------------------------------------------------------------


def test_adamw_with_hf_decay_split_and_hf_scheduler():
    model = Tiny()
    optimizer = torch.optim.AdamW(hf_groups(model, 0.1), lr=1e-2, betas=(0.8, 0.95), eps=1e-6)
    scheduler = transformers.get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=10)
    torch_params, jax_params = run_both(model, optimizer, scheduler)
    assert_params_close(torch_params, jax_params)


def test_adamw_factory_metadata():
    model = Tiny()
    description = describe_optimizer(torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05))
    assert description.kind == "adamw" and description.learning_rate == 3e-4
    assert description.weight_decay == 0.05 and description.decay is None
    assert isinstance(build_optimizer(description, 1e-3), optax.GradientTransformation)


def test_adam_couples_l2_decay_into_the_gradient():
    model = Tiny()
    optimizer = torch.optim.Adam(hf_groups(model, 0.2), lr=5e-3)
    torch_params, jax_params = run_both(model, optimizer, None)
    assert_params_close(torch_params, jax_params)


def test_adam_with_decoupled_decay_is_adamw():
    model = Tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3, weight_decay=0.1, decoupled_weight_decay=True)
    assert describe_optimizer(optimizer).kind == "adamw"
    torch_params, jax_params = run_both(model, optimizer, S.StepLR(optimizer, 2, 0.5))
    assert_params_close(torch_params, jax_params)


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd(momentum, nesterov):
    model = Tiny()
    optimizer = torch.optim.SGD(hf_groups(model, 0.01), lr=0.05, momentum=momentum, nesterov=nesterov)
    torch_params, jax_params = run_both(model, optimizer, S.CosineAnnealingLR(optimizer, T_max=5))
    assert_params_close(torch_params, jax_params)


def test_uniform_decay_needs_no_model():
    model = Tiny()
    description = describe_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1))
    params = {n: jnp.ones(p.shape) for n, p in model.named_parameters()}
    tx = build_optimizer(description, 0.0)  # lr 0: Adam and decay both vanish, so params stay
    updates, _ = tx.update(jax.tree_util.tree_map(jnp.ones_like, params), tx.init(params), params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree_util.tree_leaves(updates))


def test_decay_mask_fn_receives_the_decayed_hf_names():
    model = Tiny()
    seen = []
    describe_optimizer(
        torch.optim.AdamW(hf_groups(model, 0.1), lr=1e-3), model=model,
        decay_mask_fn=lambda names: seen.append(names) or None,
    )
    assert seen == [frozenset({"proj.weight"})]


def test_optax_transformation_passes_through():
    tx = optax.sgd(0.1)
    assert is_optax_transformation(tx)  # the facade hands it to the core as it is
    assert not is_optax_transformation(torch.optim.SGD(Tiny().parameters(), lr=0.1))


def test_accelerate_style_wrapper_is_unwrapped():
    inner = torch.optim.SGD(Tiny().parameters(), lr=0.1)
    wrapper = type("AcceleratedOptimizer", (), {"__module__": "accelerate.optimizer", "optimizer": inner})()
    assert describe_optimizer(wrapper).kind == "sgd"


@pytest.mark.parametrize(
    "make,error,pattern",
    [
        (lambda m: torch.optim.RMSprop(m.parameters()), TypeError, r"optimizer must be torch.optim.AdamW.*RMSprop"),
        (lambda m: "adamw", TypeError, r"optimizer must be .*got <class 'str'>"),
        (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, dampening=0.1), ValueError,
         r"SGD\(dampening=0.1\) is not supported.*dampening=0"),
        (lambda m: torch.optim.AdamW(m.parameters(), amsgrad=True), ValueError, r"AdamW\(amsgrad=True\) is not supported"),
        (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, maximize=True), ValueError,
         r"SGD\(maximize=True\) is not supported"),
        (lambda m: torch.optim.AdamW([{"params": [m.proj.weight], "weight_decay": 0.1},
                                      {"params": [m.proj.bias], "weight_decay": 0.2},
                                      {"params": list(m.norm.parameters()), "weight_decay": 0.0}]),
         ValueError, r"weight decays \[0.0, 0.1, 0.2\].*one non-zero decay"),
        (lambda m: torch.optim.AdamW([{"params": [m.proj.weight], "lr": 1e-3},
                                      {"params": [m.proj.bias, *m.norm.parameters()], "lr": 1e-4}]),
         ValueError, r"different learning rates"),
        (lambda m: torch.optim.AdamW([{"params": [m.proj.weight], "betas": (0.9, 0.99)},
                                      {"params": [m.proj.bias, *m.norm.parameters()]}]),
         ValueError, r"disagree on 'betas'"),
        (lambda m: torch.optim.AdamW([m.proj.weight]), ValueError,
         r"does not update 3 trainable parameter\(s\) of model.*proj.bias"),
        (lambda m: torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2)), *m.parameters()]), ValueError,
         r"param group 0 holds a tensor of shape \(2,\) that is not a trainable parameter of model"),
    ],
)
def test_optimizer_errors(make, error, pattern):
    model = Tiny()
    with pytest.raises(error, match=pattern):
        describe_optimizer(make(model), model=model, decay_mask_fn=mask_by_name)


def test_split_decay_without_model_is_explained():
    model = Tiny()
    with pytest.raises(ValueError, match=r"split weight decay.*pass model="):
        describe_optimizer(torch.optim.AdamW(hf_groups(model, 0.1)))


# --- schedulers ---------------------------------------------------------------------------------


def one_param_sgd(lr=0.1):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


SCHEDULERS = {
    "lambda": lambda o: S.LambdaLR(o, lambda s: 1.0 / (1.0 + s)),
    "multiplicative": lambda o: S.MultiplicativeLR(o, lambda s: 0.97),
    "step": lambda o: S.StepLR(o, step_size=7, gamma=0.5),
    "multistep": lambda o: S.MultiStepLR(o, milestones=[3, 10, 10], gamma=0.3),
    "exponential": lambda o: S.ExponentialLR(o, gamma=0.95),
    "constant": lambda o: S.ConstantLR(o, factor=0.3, total_iters=5),
    "linear": lambda o: S.LinearLR(o, start_factor=0.2, end_factor=1.0, total_iters=9),
    "polynomial": lambda o: S.PolynomialLR(o, total_iters=12, power=2.0),
    "cosine_annealing": lambda o: S.CosineAnnealingLR(o, T_max=13, eta_min=1e-3),
    **{
        f"hf_{name}": (lambda name: lambda o: transformers.get_scheduler(
            name, o, num_warmup_steps=3, num_training_steps=30))(name)
        for name in ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup",
                     "inverse_sqrt", "constant")
    },
}


def torch_lrs(optimizer, scheduler, steps):
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.asarray(lrs)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("prestepped", [0, 2])
def test_scheduler_matches_torch_under_jit(name, prestepped):
    optimizer = one_param_sgd()
    scheduler = SCHEDULERS[name](optimizer)
    torch_lrs(optimizer, scheduler, prestepped)  # torch's position carries over
    schedule = schedule_of(scheduler)
    expected = torch_lrs(optimizer, scheduler, 28)  # within HF's num_training_steps
    got = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(28)))
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["step", "exponential", "cosine_annealing", "polynomial"])
def test_closed_forms_continue_past_the_table(name):
    optimizer = one_param_sgd()
    scheduler = SCHEDULERS[name](optimizer)
    schedule = schedule_of(scheduler, horizon=10)
    expected = torch_lrs(optimizer, scheduler, 40)
    got = np.asarray([schedule(t) for t in range(40)])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-8)


def test_lambda_table_holds_its_last_value_past_the_horizon():
    optimizer = one_param_sgd(lr=1.0)
    schedule = schedule_of(S.LambdaLR(optimizer, lambda s: float(s)), horizon=10)
    assert float(schedule(9)) == 9.0 and float(schedule(10)) == 9.0 and float(schedule(10**6)) == 9.0


def test_lambda_horizon_defaults_and_follows_hf_num_training_steps():
    optimizer = one_param_sgd(lr=1.0)
    assert float(schedule_of(S.LambdaLR(optimizer, float))(10**7)) == DEFAULT_TABLE_HORIZON - 1
    long = transformers.get_scheduler("linear", one_param_sgd(lr=1.0), num_warmup_steps=0,
                                      num_training_steps=DEFAULT_TABLE_HORIZON + 50)
    schedule = schedule_of(long)
    assert float(schedule(DEFAULT_TABLE_HORIZON + 40)) == pytest.approx(10 / (DEFAULT_TABLE_HORIZON + 50))
    assert float(schedule(DEFAULT_TABLE_HORIZON + 50)) == 0.0


def test_base_lr_override():
    optimizer = one_param_sgd(lr=0.1)
    schedule = schedule_of(S.LambdaLR(optimizer, lambda s: 0.5), 2.0)
    assert float(schedule(3)) == 1.0


def test_no_scheduler_is_constant():
    schedule = schedule_of(None, 3e-4)
    assert float(schedule(0)) == pytest.approx(3e-4) and float(schedule(1000)) == pytest.approx(3e-4)
    with pytest.raises(ValueError, match=r"scheduler=None needs base_lr.*factory.lr"):
        schedule_of(None)


@pytest.mark.parametrize(
    "make",
    [
        lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=10),
        lambda o: S.ReduceLROnPlateau(o),
        lambda o: S.SequentialLR(o, [S.ConstantLR(o), S.ExponentialLR(o, 0.9)], milestones=[2]),
        lambda o: S.CosineAnnealingWarmRestarts(o, T_0=3),
        lambda o: "linear",
    ],
)
def test_unsupported_schedulers_say_what_is_supported(make):
    with pytest.raises(TypeError, match=r"scheduler must be one of: None, LambdaLR .*CosineAnnealingLR - got"):
        schedule_of(make(one_param_sgd()))


def test_per_group_lambdas_must_agree():
    optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]},
                                 {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=0.1)
    same = S.LambdaLR(optimizer, [lambda s: 1.0, lambda s: 1.0])
    assert float(schedule_of(same, horizon=5)(2)) == pytest.approx(0.1)
    different = S.LambdaLR(optimizer, [lambda s: 1.0, lambda s: 0.5])
    with pytest.raises(ValueError, match=r"different lr_lambda per param group"):
        schedule_of(different, horizon=5)


def test_failing_lambda_is_reported():
    scheduler = S.LambdaLR(one_param_sgd(), lambda s: 1.0 / (5 - s))
    with pytest.raises(ValueError, match=r"lr_lambda raised ZeroDivisionError.*pure function of the integer step"):
        schedule_of(scheduler, horizon=10)


def test_bad_horizon():
    with pytest.raises(ValueError, match=r"horizon=0: must be an integer >= 1"):
        schedule_of(S.StepLR(one_param_sgd(), 2), horizon=0)
