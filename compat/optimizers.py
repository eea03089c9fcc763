"""torch optimizers and LR schedulers → descriptions the core builds from, for ``optimizers=(optimizer, scheduler)``.

TRL users pass torch objects built for the torch model; jaxsft trains a JAX copy.
This module only *reads* them: the optimizer's hyperparameters (and HF's decay /
no-decay split) into a ``jaxsft.infra.config.OptimizerDescription``, and the scheduler's rule
(a sampled table, or a closed form's name and parameters) into a
``jaxsft.infra.config.ScheduleDescription``. It imports nothing of ``jaxsft.training.optim``: the
descriptions are plain data handed to the core trainer, which builds the chain and
the schedule, so no optimizer logic lives in the facade. The optimizer state starts fresh (a torch
optimizer that has already stepped is converted as if new). The learning rate is not
baked into the transformation: it comes from the scheduler, converted separately,
so both follow torch's step-for-step values.

Clipping is not part of the returned transformation; the core chains its
torch-exact clipping (``max_grad_norm``) in front of every optimizer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np
import torch

from jaxsft.infra.config import OptimizerDescription, ScheduleDescription, TrainConfig

from compat.torch_sync import hf_decay_table

# A function from the set of HF parameter names that get weight decay to the core's decay table
# (jaxsft parameter name -> decays), see compat.torch_sync.hf_decay_table.
DecayMaskFn = Callable[[frozenset[str]], Mapping[str, bool]]

# LambdaLR / MultiplicativeLR are sampled on the host into a table of this many
# steps, unless the lambda reveals a longer horizon (HF's num_training_steps).
DEFAULT_TABLE_HORIZON = 65_536

_SUPPORTED_OPTIMIZERS = "torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD, or an optax GradientTransformation"
_SUPPORTED_SCHEDULERS = (
    "None, LambdaLR (including every transformers.get_scheduler schedule except reduce_lr_on_plateau), "
    "MultiplicativeLR, StepLR, MultiStepLR, ExponentialLR, ConstantLR, LinearLR, PolynomialLR, CosineAnnealingLR"
)


def is_optax_transformation(value: Any) -> bool:
    """An optax ``GradientTransformation`` (passed through to the core as it is), told without importing optax."""
    return (type(value).__module__.split(".")[0] == "optax" or type(value).__name__ == "GradientTransformation") \
        and callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))


def _unwrap(obj: Any, attr: str) -> Any:
    """accelerate's AcceleratedOptimizer / AcceleratedScheduler hold the torch object in an attribute."""
    inner = getattr(obj, attr, None)
    while inner is not None and inner is not obj and type(obj).__module__.startswith("accelerate"):
        obj, inner = inner, getattr(inner, attr, None)
    return obj


def _as_float(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _group_lr(group: Mapping[str, Any]) -> float:
    """The schedule's base rate for a group: ``initial_lr`` once a scheduler is attached, else ``lr``."""
    return _as_float(group.get("initial_lr", group["lr"]))


def _shared(groups: list[dict], key: str, default: Any = None) -> Any:
    """One hyperparameter that every param group must agree on (a single optax chain has one value)."""
    values = [g.get(key, default) for g in groups]
    plain = [tuple(_as_float(x) for x in v) if isinstance(v, (tuple, list)) else v for v in values]
    plain = [_as_float(v) if isinstance(v, torch.Tensor) else v for v in plain]
    if any(v != plain[0] for v in plain[1:]):
        raise ValueError(
            f"optimizer param groups disagree on {key!r} ({plain}); jaxsft applies one value to every "
            f"parameter. Build the optimizer with a single {key!r} for all groups."
        )
    return plain[0]


def _decay_plan(
    groups: list[dict],
    model: Optional[torch.nn.Module],
    decay_mask_fn: Optional[DecayMaskFn],
) -> tuple[float, Any]:
    """(weight_decay, optax mask or None) for the groups, which may only be HF's decay / no-decay split."""
    decays = sorted({_as_float(g.get("weight_decay", 0.0)) for g in groups})
    if model is not None:
        _check_coverage(groups, model)
    if len(decays) == 1:
        return decays[0], None  # uniform: every parameter (or none) decays, no mask needed
    if len(decays) > 2 or decays[0] != 0.0:
        raise ValueError(
            f"optimizer param groups use weight decays {decays}; jaxsft can express one non-zero decay applied to "
            "a subset of parameters (HF's decay / no-decay split). Use a single decay value, or 0 for the "
            "excluded group."
        )
    if model is None or decay_mask_fn is None:
        raise ValueError(
            "optimizer param groups split weight decay between parameters; pass model= (the torch model the "
            "optimizer was built for) and decay_mask_fn= so the groups can be matched to parameter names."
        )
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = frozenset(names[id(p)] for g in groups if _as_float(g.get("weight_decay", 0.0)) > 0 for p in g["params"])
    return decays[1], decay_mask_fn(decayed)


def _check_coverage(groups: list[dict], model: torch.nn.Module) -> None:
    """jaxsft updates every trainable parameter, so the optimizer must hold exactly those."""
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    held: dict[int, int] = {}
    for index, group in enumerate(groups):
        for p in group["params"]:
            if id(p) not in trainable:
                raise ValueError(
                    f"optimizer param group {index} holds a tensor of shape {tuple(p.shape)} that is not a trainable "
                    "parameter of model; build the optimizer from model.parameters() of the model you pass."
                )
            held[id(p)] = index
    missing = sorted(n for i, n in trainable.items() if i not in held)
    if missing:
        raise ValueError(
            f"optimizer does not update {len(missing)} trainable parameter(s) of model (e.g. {missing[:3]}); jaxsft "
            "updates every parameter. Add them to the optimizer, or set requires_grad=False on them."
        )


def _reject_flags(groups: list[dict], name: str, flags: Iterable[str]) -> None:
    for flag in flags:
        if any(bool(g.get(flag, False)) for g in groups):
            raise ValueError(
                f"{name}({flag}=True) is not supported by jaxsft; build it with {flag}=False "
                f"(or pass an optax GradientTransformation instead)."
            )


def describe_optimizer(
    optimizer: Any,
    *,
    decay_mask_fn: Optional[DecayMaskFn] = None,
    model: Optional[torch.nn.Module] = None,
) -> OptimizerDescription:
    """Read a torch AdamW / Adam / SGD into a ``jaxsft.infra.config.OptimizerDescription``.

    The core builds the chain from it (``jaxsft.training.optim.build_optimizer``):

    * AdamW (or Adam with ``decoupled_weight_decay=True``): ``p -= lr*wd*p`` as torch, then Adam.
    * Adam: L2 decay coupled into the gradient before the Adam moments.
    * SGD: L2 decay, then momentum (optionally Nesterov); dampening must be 0.

    Param groups must agree on everything except ``weight_decay``, which may be
    split HF-style into one decayed and one undecayed group. That split is
    matched to parameter names through ``model.named_parameters()`` (by tensor
    identity) and handed to ``decay_mask_fn(names)``, which returns the decay table
    over jaxsft's parameter names. Anything else raises ValueError.
    """
    optimizer = _unwrap(optimizer, "optimizer")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be {_SUPPORTED_OPTIMIZERS} - got {type(optimizer)}.")
    groups = [g for g in optimizer.param_groups if len(g["params"]) > 0]
    if not groups:
        raise ValueError("optimizer has no parameters; build it from model.parameters().")
    name = type(optimizer).__name__
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)):
        raise TypeError(f"optimizer must be {_SUPPORTED_OPTIMIZERS} - got {type(optimizer)}.")

    base_lrs = {_group_lr(g) for g in groups}
    if len(base_lrs) > 1:
        raise ValueError(
            f"optimizer param groups use different learning rates {sorted(base_lrs)}; jaxsft uses one schedule "
            "for every parameter. Give all groups the same lr."
        )
    lr = _as_float(groups[0]["lr"])
    _reject_flags(groups, name, ("maximize",))
    weight_decay, mask = _decay_plan(groups, model, decay_mask_fn)

    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        _reject_flags(groups, name, ("amsgrad",))
        b1, b2 = _shared(groups, "betas")
        eps = _shared(groups, "eps")
        decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(_shared(groups, "decoupled_weight_decay", False))
        return OptimizerDescription(
            "adamw" if decoupled else "adam", lr, b1=float(b1), b2=float(b2), eps=float(eps), weight_decay=weight_decay,
            decay=mask,
        )

    momentum = _as_float(_shared(groups, "momentum", 0.0))
    dampening = _as_float(_shared(groups, "dampening", 0.0))
    nesterov = bool(_shared(groups, "nesterov", False))
    if dampening != 0.0:
        raise ValueError(f"SGD(dampening={dampening}) is not supported by jaxsft; build it with dampening=0.")
    return OptimizerDescription(
        "sgd", lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, decay=mask,
    )


# ---------------------------------------------------------------------------------------------
# schedulers


def _lambda_horizon(fn: Any, horizon: Optional[int]) -> int:
    """Table length: explicit, else max(DEFAULT_TABLE_HORIZON, HF's num_training_steps + 1)."""
    if horizon is not None:
        return horizon
    hint = getattr(fn, "keywords", None) or {}
    total = hint.get("num_training_steps")
    return max(DEFAULT_TABLE_HORIZON, int(total) + 1) if isinstance(total, int) else DEFAULT_TABLE_HORIZON


def _sample(fn: Callable[[int], Any], start: int, length: int) -> np.ndarray:
    try:
        return np.asarray([float(fn(step)) for step in range(start, start + length)], dtype=np.float64)
    except Exception as err:  # a user lambda: say which step broke it
        raise ValueError(
            f"scheduler lr_lambda raised {type(err).__name__}: {err} while being sampled on steps "
            f"{start}..{start + length - 1}; it must be a pure function of the integer step."
        ) from err


def _lambda_multipliers(lambdas: list[Any], start: int, length: int) -> np.ndarray:
    """One multiplier table; per-group lambdas must agree, since jaxsft has a single schedule."""
    first = _sample(lambdas[0], start, length)
    for other in lambdas[1:]:
        if other is not lambdas[0] and not np.array_equal(_sample(other, start, length), first):
            raise ValueError(
                "scheduler has a different lr_lambda per param group; jaxsft uses one schedule for every "
                "parameter. Pass a single lr_lambda."
            )
    return first


def describe_scheduler(
    scheduler: Any, base_lr: Optional[float] = None, *, horizon: Optional[int] = None
) -> ScheduleDescription:
    """A schedule description giving, for ``count`` updates applied, the rate torch would use for the next one.

    Torch's position carries over: a scheduler already stepped k times
    (``last_epoch == k``) continues from step k. ``base_lr`` defaults to the
    scheduler's ``base_lrs[0]``; with ``scheduler=None`` it is required and the
    rate is constant (pass the optimizer's current lr, ``description.learning_rate``).

    LambdaLR and MultiplicativeLR call their lambdas on the host, in float64,
    for ``horizon`` steps (default max(65536, HF's num_training_steps + 1)),
    into a table (the core looks it up in fp32 under jit, float64 for logs); past
    the table the last value is held. HF's linear and constant schedules are flat there, so this is exact;
    HF's cosine rises again past num_training_steps in torch but is held here.
    Closed forms (StepLR, MultiStepLR, ExponentialLR, ConstantLR, LinearLR,
    PolynomialLR, CosineAnnealingLR) are described by name and parameters
    (``jaxsft.training.optim.SCHEDULE_RULES``): the core tabulates them in float64 and
    continues past the table with the fp32 formula, so they hold for every count.
    """
    if horizon is not None and (isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1):
        raise ValueError(f"horizon={horizon!r}: must be an integer >= 1; pass the number of updates you will run.")
    if scheduler is None:
        if base_lr is None:
            raise ValueError(
                "scheduler=None needs base_lr (the optimizer's lr); pass base_lr=factory.lr (the description's "
                "learning_rate)."
            )
        return ScheduleDescription(table=(float(base_lr),))
    scheduler = _unwrap(scheduler, "scheduler")
    if _supported_class(scheduler) is None:
        raise TypeError(f"scheduler must be one of: {_SUPPORTED_SCHEDULERS} - got {type(scheduler)}.")
    sched = torch.optim.lr_scheduler
    base_lrs = sorted({float(b) for b in scheduler.base_lrs})
    if len(base_lrs) > 1:
        raise ValueError(f"scheduler has different base learning rates per group {base_lrs}; use one lr.")
    base = float(base_lr) if base_lr is not None else base_lrs[0]
    start = int(scheduler.last_epoch)

    if isinstance(scheduler, sched.LambdaLR):
        length = _lambda_horizon(scheduler.lr_lambdas[0], horizon)
        return ScheduleDescription(table=tuple(base * _lambda_multipliers(scheduler.lr_lambdas, start, length)))
    if isinstance(scheduler, sched.MultiplicativeLR):
        length = _lambda_horizon(scheduler.lr_lambdas[0], horizon)
        factors = _lambda_multipliers(scheduler.lr_lambdas, start + 1, length - 1)
        current = float(scheduler.get_last_lr()[0]) if start > 0 else base
        return ScheduleDescription(table=tuple(current * np.concatenate([[1.0], np.cumprod(factors)])))

    # Closed forms: the core tabulates the rule in float64 (precision near zero: cosine's 1 + cos), fp32 past it.
    rule, parameters = _closed_form(scheduler, base)
    return ScheduleDescription(
        rule=rule, parameters=parameters, start=start, length=horizon or DEFAULT_TABLE_HORIZON
    )


def _supported_class(scheduler: Any) -> Optional[type]:
    """The torch class whose rule we reproduce; a subclass only counts if it keeps that class's get_lr."""
    sched = torch.optim.lr_scheduler
    for cls in (sched.LambdaLR, sched.MultiplicativeLR, sched.StepLR, sched.MultiStepLR, sched.ExponentialLR,
                sched.ConstantLR, sched.LinearLR, sched.PolynomialLR, sched.CosineAnnealingLR):
        if isinstance(scheduler, cls) and type(scheduler).get_lr is cls.get_lr:
            return cls
    return None


def _closed_form(s: Any, base: float) -> tuple[str, dict[str, Any]]:
    """torch's documented closed forms as (rule name, parameters) of ``jaxsft.training.optim.SCHEDULE_RULES``."""
    sched = torch.optim.lr_scheduler
    if isinstance(s, sched.StepLR):
        return "step", {"base": base, "gamma": float(s.gamma), "step_size": float(s.step_size)}
    if isinstance(s, sched.MultiStepLR):
        return "multistep", {"base": base, "gamma": float(s.gamma),
                             "milestones": tuple(float(m) for m in sorted(s.milestones.elements()))}
    if isinstance(s, sched.ExponentialLR):
        return "exponential", {"base": base, "gamma": float(s.gamma)}
    if isinstance(s, sched.ConstantLR):
        return "constant", {"base": base, "factor": float(s.factor), "total_iters": float(s.total_iters)}
    if isinstance(s, sched.LinearLR):
        return "linear", {"base": base, "start_factor": float(s.start_factor), "end_factor": float(s.end_factor),
                          "total_iters": float(s.total_iters)}
    if isinstance(s, sched.PolynomialLR):
        return "polynomial", {"base": base, "total_iters": float(s.total_iters), "power": float(s.power)}
    if isinstance(s, sched.CosineAnnealingLR):
        return "cosine_annealing", {"base": base, "eta_min": float(s.eta_min), "T_max": float(s.T_max)}
    raise TypeError(f"scheduler must be one of: {_SUPPORTED_SCHEDULERS} - got {type(s)}.")


def optimizer_and_schedule(opt: Any, sched: Any, config: TrainConfig, torch_model: Any, spec: Any):
    """``optimizers=(opt, sched)`` -> (config, optimizer or its description or None, schedule or its description or
    None) for the core.

    The core builds every chain and schedule (and puts clipping in front); this only reads the torch objects.
    """
    if opt is None:  # the core builds AdamW + clipping + schedule from config
        return config, None, None
    if is_optax_transformation(opt):
        if isinstance(sched, torch.optim.lr_scheduler.LRScheduler):
            raise TypeError(
                "a torch LR scheduler cannot drive an optax optimizer; pass an optax schedule (and build the optax "
                "optimizer with it), or a torch optimizer with its scheduler."
            )
        if sched is not None and not callable(sched):
            raise TypeError(
                f"with an optax optimizer, the scheduler must be None or an optax schedule (count -> rate), "
                f"used to log the learning rate - got {type(sched)}."
            )
        return config, opt, sched
    description = describe_optimizer(opt, decay_mask_fn=hf_decay_table(spec), model=torch_model)
    if sched is None:  # HF Trainer.create_scheduler: args' schedule type on the user's optimizer
        return dataclasses.replace(config, learning_rate=float(description.learning_rate)), description, None
    return config, description, describe_scheduler(sched)
