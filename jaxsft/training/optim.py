"""TrainConfig → optax: Hugging Face learning-rate schedules, decay mask, torch-exact clipping.

The aim is that a run configured like ``transformers.Trainer`` takes the same
steps: schedules reproduce ``transformers.get_scheduler`` + ``LambdaLR``,
clipping reproduces ``torch.nn.utils.clip_grad_norm_``, and AdamW / SGD
reproduce ``torch.optim.AdamW`` / ``torch.optim.SGD`` with HF's parameter groups.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsft.infra.config import TORCH_OPTIMIZERS, OptimizerDescription, ScheduleDescription, TrainConfig
from jaxsft.infra.paths import key_name

# ---------------------------------------------------------------------------
# schedules


def _hf_lambda(config: TrainConfig) -> tuple[Callable[[int], float], int]:
    """HF's lr multiplier as a float64 Python function, and the last step the lookup table must cover.

    Past that step the multiplier is constant, except for cosine, where
    :func:`make_schedule` falls back to an fp32 formula.
    """
    kind = config.lr_scheduler_type
    warmup = config.num_warmup_steps()
    total = config.max_steps
    kwargs = dict(config.lr_scheduler_kwargs or {})
    if kind == "cosine":
        num_cycles = float(kwargs.pop("num_cycles", 0.5))
    if kwargs and kind != "constant":  # HF passes these on and the schedule function rejects them
        raise ValueError(
            f"TrainConfig.lr_scheduler_kwargs={config.lr_scheduler_kwargs!r}: {sorted(kwargs)} not understood by "
            f"the {kind!r} schedule; only cosine takes 'num_cycles'."
        )

    def warm(step: int) -> float:
        return float(step) / float(max(1, warmup))

    if kind == "constant":
        return (lambda step: 1.0), 0
    if kind == "constant_with_warmup" or total <= 0:
        return (lambda step: warm(step) if step < warmup else 1.0), warmup
    if kind == "linear":

        def linear(step: int) -> float:
            if step < warmup:
                return warm(step)
            return max(0.0, float(total - step) / float(max(1, total - warmup)))

        return linear, total

    def cosine(step: int) -> float:
        if step < warmup:
            return warm(step)
        progress = float(step - warmup) / float(max(1, total - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress)))

    return cosine, total


class TableSchedule:
    """A learning-rate schedule computed on the host in float64 and looked up on device.

    Calling it with an update count (a traced or concrete integer) gives the fp32 rate
    under jit: ``values[count]``, each value rounded to fp32 exactly once; past the table,
    ``tail(count, jnp)`` when given (an array-API formula, so one expression serves numpy
    and jax) else the last value. :meth:`host_value` gives the float64 rate for logs, which
    is what torch's ``get_last_lr()`` and HF Trainer report.
    """

    def __init__(
        self,
        values: Any,
        tail: Optional[Callable[[Any, Any], Any]] = None,
        host: Optional[Callable[[int], float]] = None,
    ):
        self._host_table = np.asarray(values, dtype=np.float64)
        if self._host_table.ndim != 1 or self._host_table.size == 0:
            raise ValueError(f"TableSchedule values must be a non-empty 1-D sequence, got shape {self._host_table.shape}.")
        self._table = self._host_table.astype(np.float32)
        self._last = len(self._table) - 1
        self._tail = tail
        self._host = host

    def __call__(self, count: Any) -> jax.Array:
        count = jnp.asarray(count)
        value = jnp.asarray(self._table)[jnp.clip(count, 0, self._last)]
        if self._tail is not None:
            value = jnp.where(count > self._last, jnp.asarray(self._tail(count.astype(jnp.float32), jnp), jnp.float32), value)
        return value

    def host_value(self, count: int) -> float:
        """The rate after ``count`` updates in float64 (fp32 past a table whose tail is a device formula)."""
        count = int(count)
        if self._host is not None:
            return float(self._host(count))
        if count > self._last and self._tail is not None:
            return float(self(count))
        return float(self._host_table[min(max(count, 0), self._last)])


def constant_schedule(rate: float) -> TableSchedule:
    """One rate for every update (exact on the host)."""
    return TableSchedule([float(rate)])


def host_learning_rate_fn(schedule: Optional[Callable[[Any], Any]]) -> Optional[Callable[[int], float]]:
    """``count -> float`` for logging: a :class:`TableSchedule`'s float64 value, else ``float(schedule(count))``."""
    if schedule is None:
        return None
    if isinstance(schedule, TableSchedule):
        return schedule.host_value
    return lambda count: float(schedule(int(count)))


def make_schedule(config: TrainConfig) -> TableSchedule:
    """``transformers.get_scheduler`` as a schedule; the argument is the number of updates already applied.

    HF evaluates its multiplier in float64; an fp32 formula loses relative
    precision where the rate approaches 0 (1 + cos near -1). So the rate for
    every step up to the horizon is computed once in float64 on the host and
    looked up, which rounds each value to fp32 exactly once. Past the horizon
    the multiplier is constant (linear: 0, warmup types: 1), except cosine,
    which HF lets rise again; that tail uses the fp32 formula. The host value
    (:meth:`TableSchedule.host_value`, used for logs) is HF's float64 value for every count.

    Linear or cosine without a horizon (``max_steps <= 0``) warm up and then
    stay constant, with a warning, rather than silently training at lr 0.
    """
    if config.lr_scheduler_type in ("linear", "cosine") and config.max_steps <= 0:
        warnings.warn(
            f"lr_scheduler_type={config.lr_scheduler_type!r} decays towards max_steps, but max_steps="
            f"{config.max_steps} gives no horizon; the learning rate will warm up and then stay constant at "
            f"{config.learning_rate}. Set max_steps to the number of optimizer updates you will run "
            f"(or use lr_scheduler_type='constant_with_warmup' to silence this).",
            UserWarning,
            stacklevel=2,
        )
    multiplier, horizon = _hf_lambda(config)
    base = float(config.learning_rate)
    values = [base * multiplier(s) for s in range(horizon + 1)]
    tail = None
    if config.lr_scheduler_type == "cosine" and config.max_steps > 0:
        warmup, total = config.num_warmup_steps(), config.max_steps
        num_cycles = float((config.lr_scheduler_kwargs or {}).get("num_cycles", 0.5))

        def tail(count: Any, xp: Any) -> Any:
            progress = (count - warmup) / float(max(1, total - warmup))
            return base * xp.maximum(0.0, 0.5 * (1.0 + xp.cos(math.pi * num_cycles * 2.0 * progress)))

    return TableSchedule(values, tail=tail, host=lambda count: base * multiplier(int(count)))


# ---------------------------------------------------------------------------
# weight decay mask


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: every leaf whose path mentions neither "norm" nor "bias".

    Mirrors HF Trainer's ``get_decay_parameter_names`` for Llama/Qwen/GPT-2
    (norm scales and biases excluded, embeddings decayed) on nnx States and dicts.
    """

    def decays(path: tuple, _leaf: Any) -> bool:
        name = "/".join(key_name(k) for k in path).lower()
        return "norm" not in name and "bias" not in name

    return jax.tree_util.tree_map_with_path(decays, params)


# ---------------------------------------------------------------------------
# clipping


def global_norm(grads: Any) -> jax.Array:
    """fp32 L2 norm over every leaf, whatever the gradient dtype."""
    leaves = jax.tree_util.tree_leaves(grads)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_``: scale by ``min(1, max_norm / (norm + 1e-6))``.

    optax.clip_by_global_norm uses ``max_norm / norm`` without the 1e-6 and so
    differs from torch right at the threshold.
    """

    def init(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        del params
        coef = jnp.minimum(max_norm / (global_norm(updates) + 1e-6), 1.0)
        return jax.tree_util.tree_map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------------------
# optimizers


def _adafactor(config: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Adafactor as HF Trainer's ``optim="adafactor"`` runs it.

    HF uses ``Adafactor(lr=..., scale_parameter=False, relative_step=False)``:
    second-moment decay ``1 - t**-0.8``, eps 1e-30 on g², update RMS clipped
    at 1.0, no momentum, no parameter-scale multiplier, and weight decay
    ``p -= lr * wd * p``. ``optax.adafactor`` adds its decay *after* the lr
    scaling (``p -= wd * p``), so the chain is built here with the decay before
    the lr. Remaining difference: optax factors the second moment only when a
    tensor's two largest dims are both >= 128, while HF factors every >= 2-D
    tensor over its last two dims; small matrices keep a full second moment here.
    """
    parts = [
        optax.scale_by_factored_rms(decay_rate=0.8, min_dim_size_to_factor=128, epsilon=1e-30),
        optax.clip_by_block_rms(1.0),
    ]
    if config.weight_decay > 0:
        parts.append(optax.add_decayed_weights(config.weight_decay, mask=decay_mask))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)


def _sgd(config: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """torch SGD: weight decay is L2 added to the gradient *before* momentum, then ``p -= lr * buf``."""
    parts = []
    if config.weight_decay > 0:
        parts.append(optax.add_decayed_weights(config.weight_decay, mask=decay_mask))
    parts.append(optax.sgd(learning_rate=schedule, momentum=config.sgd_momentum or None))
    return optax.chain(*parts)


def scale_by_adam_torch(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's scaling exactly as ``torch.optim.Adam(W)`` computes it.

    optax forms the bias corrections ``1 - b**t`` from fp32 powers, which drift
    about 1e-5 relative from torch's float64 ones over thousands of steps; here
    they are ``-expm1(t * log(b))`` with the logarithm taken in float64 on the
    host, and the moments use torch's lerp/addcmul forms.
    """
    log_b1, log_b2 = float(np.log(b1)), float(np.log(b2))

    def init(params: Any) -> optax.ScaleByAdamState:
        zeros = lambda p: jnp.zeros_like(p, jnp.float32)  # noqa: E731
        return optax.ScaleByAdamState(
            count=jnp.zeros((), jnp.int32), mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params)
        )

    def update(updates: Any, state: optax.ScaleByAdamState, params: Any = None):
        del params
        count = state.count + 1
        t = count.astype(jnp.float32)
        correction1 = -jnp.expm1(t * log_b1)
        correction2_sqrt = jnp.sqrt(-jnp.expm1(t * log_b2))
        mu = jax.tree.map(lambda m, g: m + (1.0 - b1) * (g.astype(jnp.float32) - m), state.mu, updates)
        nu = jax.tree.map(lambda v, g: v * b2 + (1.0 - b2) * jnp.square(g.astype(jnp.float32)), state.nu, updates)
        steps = jax.tree.map(
            lambda m, v, g: ((m / correction1) / (jnp.sqrt(v) / correction2_sqrt + eps)).astype(g.dtype), mu, nu, updates
        )
        return steps, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def adamw_torch(
    learning_rate: optax.ScalarOrSchedule, b1: float, b2: float, eps: float, weight_decay: float, mask: Any
) -> optax.GradientTransformation:
    """``torch.optim.AdamW``: decoupled decay ``p -= lr*wd*p`` on masked leaves, then the Adam step."""
    return optax.chain(
        scale_by_adam_torch(b1, b2, eps),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def torch_optimizer(
    kind: str,
    learning_rate: Any,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any = None,
    momentum: float = 0.0,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """The optax twin of ``torch.optim.AdamW`` / ``Adam`` / ``SGD`` (no clipping; see :func:`with_clipping`).

    * ``"adamw"``: decoupled decay ``p -= lr*wd*p`` on ``mask``ed leaves, then torch's Adam step.
    * ``"adam"``: L2 decay added to the gradient before the Adam moments, as ``torch.optim.Adam``.
    * ``"sgd"``: L2 decay added to the gradient, then momentum (optionally Nesterov), ``p -= lr * buf``.

    ``learning_rate`` is a float or a schedule (count -> rate). The TRL facade describes a torch
    optimizer with these hyperparameters and the core builds the chain here, so one module owns it.
    """
    if kind not in TORCH_OPTIMIZERS:
        raise ValueError(f"torch_optimizer kind={kind!r}: not supported; pick one of {', '.join(TORCH_OPTIMIZERS)}.")
    if kind == "adamw":
        return adamw_torch(learning_rate, b1, b2, eps, weight_decay, mask)
    coupled = [optax.add_decayed_weights(weight_decay, mask)] if weight_decay else []
    if kind == "adam":
        return optax.chain(*coupled, scale_by_adam_torch(b1, b2, eps), optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*coupled, optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))


def is_transformation(value: Any) -> bool:
    """Whether ``value`` is an optax ``GradientTransformation`` (lets callers check without importing optax)."""
    return isinstance(value, optax.GradientTransformation)


def with_clipping(tx: optax.GradientTransformation, config: TrainConfig) -> optax.GradientTransformation:
    """``tx`` preceded by torch-exact global-norm clipping when ``config.clipping_enabled``.

    The trainer applies this to every optimizer, its own or one passed in, so clipping is always part
    of the one chain the trainer runs (``max_grad_norm`` None or <= 0 turns it off, as in HF).
    """
    if config.clipping_enabled:
        return optax.chain(clip_by_global_norm_torch(float(config.max_grad_norm)), tx)
    return tx


def make_optimizer(config: TrainConfig, schedule: Optional[optax.Schedule] = None) -> optax.GradientTransformation:
    """Clipping (when enabled) followed by the configured optimizer at ``schedule``.

    AdamW matches ``torch.optim.AdamW``: ``p *= 1 - lr*wd`` on decayed leaves,
    then the bias-corrected Adam step, with the same scheduled lr for both.
    """
    if schedule is None:
        schedule = make_schedule(config)
    if config.optim == "adamw":
        opt = adamw_torch(
            schedule, config.adam_beta1, config.adam_beta2, config.adam_epsilon, config.weight_decay, decay_mask
        )
    elif config.optim == "adafactor":
        opt = _adafactor(config, schedule)
    elif config.optim == "sgd":
        opt = _sgd(config, schedule)
    else:  # TrainConfig already rejects this; kept so a new name cannot fall through silently
        raise ValueError(f"TrainConfig.optim={config.optim!r} is not supported.")
    return with_clipping(opt, config)


# ---------------------------------------------------------------------------
# descriptions: what the TRL facade reads from torch objects, as data; the core builds from them


def decay_mask_from_names(decay: Mapping[str, bool]) -> Callable[[Any], Any]:
    """``params -> bool tree`` from a name table: each leaf takes the entry of its longest named path prefix."""
    table = {tuple(name.split("/")): bool(flag) for name, flag in decay.items()}

    def mask(params: Any) -> Any:
        def leaf(path: tuple, _value: Any) -> bool:
            names = tuple(key_name(k) for k in path)
            for n in range(len(names), 0, -1):
                if names[:n] in table:
                    return table[names[:n]]
            raise ValueError(f"decay mask: parameter {'/'.join(names)} has no entry in the optimizer's decay table.")

        return jax.tree_util.tree_map_with_path(leaf, params)

    return mask


def build_optimizer(description: OptimizerDescription, learning_rate: Any) -> optax.GradientTransformation:
    """The chain ``description`` describes, at ``learning_rate`` (a float or a schedule count -> rate)."""
    d = description
    mask = None if d.decay is None else decay_mask_from_names(d.decay)
    return torch_optimizer(
        d.kind, learning_rate, b1=d.b1, b2=d.b2, eps=d.eps, weight_decay=d.weight_decay, mask=mask,
        momentum=d.momentum, nesterov=d.nesterov,
    )


# torch's closed-form schedules as functions of the epoch t, in any array namespace xp (numpy on the host
# for the float64 table, jax.numpy under jit past it). Parameters are plain floats / tuples.
def _step_rule(t, xp, *, base, gamma, step_size):
    return base * gamma ** xp.floor(t / step_size)


def _multistep_rule(t, xp, *, base, gamma, milestones):  # torch: gamma ** bisect_right(sorted milestones, t)
    return base * gamma ** xp.sum(t[..., None] >= np.asarray(sorted(milestones), dtype=np.float64), axis=-1)


def _exponential_rule(t, xp, *, base, gamma):
    return base * gamma ** t


def _constant_rule(t, xp, *, base, factor, total_iters):
    return base * xp.where(t < total_iters, factor, 1.0)


def _linear_rule(t, xp, *, base, start_factor, end_factor, total_iters):
    return base * (start_factor + (end_factor - start_factor) * (xp.minimum(t, total_iters) / total_iters))


def _polynomial_rule(t, xp, *, base, total_iters, power):
    return base * (1.0 - xp.minimum(t, total_iters) / total_iters) ** power


def _cosine_annealing_rule(t, xp, *, base, eta_min, T_max):
    return eta_min + (base - eta_min) * (1.0 + xp.cos(math.pi * t / T_max)) / 2.0


SCHEDULE_RULES = {  # the names are ScheduleDescription's (jaxsft.infra.config.SCHEDULE_RULE_NAMES)
    "step": _step_rule, "multistep": _multistep_rule, "exponential": _exponential_rule,
    "constant": _constant_rule, "linear": _linear_rule, "polynomial": _polynomial_rule,
    "cosine_annealing": _cosine_annealing_rule,
}


def build_schedule(description: ScheduleDescription) -> TableSchedule:
    """The schedule ``description`` describes."""
    d = description
    if d.rule is None:
        return TableSchedule(np.asarray(d.table, dtype=np.float64))
    rule, parameters, start = SCHEDULE_RULES[d.rule], dict(d.parameters), int(d.start)
    values = rule(np.arange(start, start + d.length, dtype=np.float64), np, **parameters)
    return TableSchedule(values, tail=lambda count, xp: rule(count + start, xp, **parameters))


def check_optimizer_arguments(optimizer: Any, schedule: Any) -> None:
    """The trainer's ``optimizer=`` / ``schedule=`` arguments: types only (a clear error before any state)."""
    if optimizer is not None and not (
        isinstance(optimizer, (optax.GradientTransformation, OptimizerDescription)) or callable(optimizer)
    ):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation, a jaxsft.infra.config.OptimizerDescription or a "
            f"function schedule -> GradientTransformation, got {type(optimizer).__name__}."
        )
    if schedule is not None and not (callable(schedule) or isinstance(schedule, ScheduleDescription)):
        raise TypeError(
            f"schedule must be an optax schedule (step -> learning rate) or a jaxsft.infra.config.ScheduleDescription, "
            f"got {type(schedule).__name__}."
        )


def optimizer_and_schedule(
    config: TrainConfig, optimizer: Any = None, schedule: Any = None, *, check_built: Callable[[Any], Any] = lambda tx: tx,
) -> tuple[Any, Any]:
    """(the chain the trainer runs, clipping in front; the schedule its rate is logged from, or None).

    ``optimizer``: None (AdamW / Adafactor / SGD from ``config``), an optax transformation, a factory
    ``schedule -> transformation`` or an :class:`OptimizerDescription` (both built at ``schedule``, default
    ``config``'s HF schedule). ``schedule``: an optax schedule or a :class:`ScheduleDescription`.
    ``check_built`` checks what a factory returned (the trainer's clear error for a wrong type).
    """
    if isinstance(schedule, ScheduleDescription):  # e.g. a torch scheduler, read by the facade
        schedule = build_schedule(schedule)
    if isinstance(optimizer, OptimizerDescription):  # e.g. a torch optimizer, read by the facade
        description = optimizer
        optimizer = lambda rate: build_optimizer(description, rate)  # noqa: E731 (a factory, built below)
    if optimizer is None:
        schedule = make_schedule(config)
        return make_optimizer(config, schedule), schedule  # clipping included
    if not isinstance(optimizer, optax.GradientTransformation):  # a factory: built at the config's schedule
        schedule = make_schedule(config) if schedule is None else schedule
        optimizer = check_built(optimizer(schedule))
    return with_clipping(optimizer, config), schedule
