"""Residual add + RMSNorm in one pass: ``s = h + delta`` and ``rms_norm(s) * scale``, forward and backward.

Why: in a pre-norm block the residual add and the next norm read and write the residual stream in
separate passes (the add, the row reduction, the scaling), and the backward again (the norm's two
passes, then the add of the residual's cotangent). Here each direction is one Pallas Triton kernel
over blocks of rows: the forward reads ``h`` and ``delta`` once and writes ``s``, the normalised
output and one fp32 number per row; the backward reads ``s``, both cotangents and that number once and
writes the input cotangent and, per program, its block's share of the scale's gradient (fp32 sums over its
rows), which XLA adds up over the programs: a small array, so ``s`` and the norm's cotangent are not read a
second time for the scale's gradient.

Numerics are those of the XLA form (``reference``): the add rounded to the stream dtype, the norm in
fp32, the product with the scale formed in the stream dtype, the backward as
``jaxsft.models.layers.rms_norm``'s; with ``plus_one`` (Gemma's norm, ``layers.rms_norm_plus_one``) the
product with ``1 + scale`` is formed in fp32 and the backward is its autodiff's. Triton blocks must be powers
of two, so a row of ``H`` values (896 at Qwen2.5-0.5B) is loaded as ``next_power_of_2(H)`` lanes with the tail
masked.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "pallas", "xla")
MAX_HIDDEN = 16384  # one row per block; wider rows take the XLA form
_BLOCK_ELEMENTS = 4096  # rows x lanes per program


def reference(h: jax.Array, delta: jax.Array, scale: jax.Array, eps: float, plus_one: bool = False
              ) -> tuple[jax.Array, jax.Array]:
    """The XLA form: ``(h + delta, rms_norm(h + delta, scale))`` (``rms_norm_plus_one`` with ``plus_one``)."""
    # Imported here, not at the top: jaxsft.models' package imports the decoder, which imports this module,
    # so a top-level import made `import jaxsft.kernels.add_rms_norm` (before jaxsft.models) a cycle.
    from jaxsft.models import layers

    s = h + delta
    return s, (layers.rms_norm_plus_one if plus_one else layers.rms_norm)(s, scale, eps)


def kernel_applies(hidden_size: int, backend: Optional[str] = None) -> bool:
    """Whether ``implementation="auto"`` takes the kernel: a GPU and rows that fit one block."""
    return (backend or jax.default_backend()) == "gpu" and hidden_size <= MAX_HIDDEN


def add_rms_norm(
    h: jax.Array, delta: jax.Array, scale: jax.Array, eps: float, *, implementation: str = "auto",
    interpret: Optional[bool] = None, plus_one: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``(s, y)`` with ``s = h + delta`` (the new residual stream) and ``y = rms_norm(s) * scale``
    (``* (1 + scale)`` in fp32 with ``plus_one``: Gemma's norm).

    ``implementation``: "auto" (the kernel on GPU, the XLA form elsewhere), "xla", or "pallas" (the
    kernel). ``interpret``: run the kernel in Pallas interpret mode; None: off a GPU only (tests). False
    off a GPU still lowers for a GPU (``.lower(lowering_platforms=("cuda",))``), which checks the kernel's
    Triton lowering on any host.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: pick one of {IMPLEMENTATIONS}.")
    if h.shape != delta.shape or h.dtype != delta.dtype or scale.shape != h.shape[-1:]:
        raise ValueError(
            f"add_rms_norm expects h and delta of one shape and dtype and scale [H]; got {h.shape} {h.dtype}, "
            f"{delta.shape} {delta.dtype}, {scale.shape}."
        )
    use_kernel = implementation == "pallas" or (implementation == "auto" and kernel_applies(h.shape[-1]))
    if not use_kernel:
        return reference(h, delta, scale, eps, plus_one)
    interpret = jax.default_backend() != "gpu" if interpret is None else bool(interpret)
    shape = h.shape
    s, y = _fused(h.reshape(-1, shape[-1]), delta.reshape(-1, shape[-1]), scale, float(eps), interpret,
                  bool(plus_one))
    return s.reshape(shape), y.reshape(shape)


def _blocks(rows: int, hidden: int) -> tuple[int, int]:
    """(rows per program, lanes): lanes the next power of two >= hidden, rows filling _BLOCK_ELEMENTS."""
    from jax.experimental import pallas as pl

    lanes = pl.next_power_of_2(hidden)
    per_program = max(1, _BLOCK_ELEMENTS // lanes)
    return min(per_program, pl.next_power_of_2(rows)), lanes


def _call(kernel, out_shape, rows: int, hidden: int, interpret: bool, name: str):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    block_rows, lanes = _blocks(rows, hidden)
    return pl.pallas_call(
        functools.partial(kernel, block_rows=block_rows, lanes=lanes),
        out_shape=out_shape,
        grid=(pl.cdiv(rows, block_rows),),
        compiler_params=plgpu.CompilerParams(num_warps=4 if block_rows * lanes <= 2048 else 8),
        interpret=interpret,
        name=name,
    )


def _indices(rows: int, hidden: int, block_rows: int, lanes: int):
    """This program's row and lane indices, their masks and the 2-D index and mask of its block."""
    from jax.experimental import pallas as pl

    row = pl.program_id(0) * block_rows + jnp.arange(block_rows)
    lane = jnp.arange(lanes)
    row_ok, lane_ok = row < rows, lane < hidden
    return row, lane, row_ok, lane_ok, (row[:, None], lane[None, :]), row_ok[:, None] & lane_ok[None, :]


def _weight(w_ref, lane, lane_ok, dtype, plus_one: bool):
    """The scale as the norm multiplies by it, in fp32: ``1 + w`` (Gemma), or ``w`` rounded to the stream dtype."""
    from jax.experimental.pallas import triton as plgpu

    w = plgpu.load(w_ref.at[lane], mask=lane_ok, other=0.0)
    return 1.0 + w.astype(jnp.float32) if plus_one else w.astype(dtype).astype(jnp.float32)


def _forward_kernel(h_ref, d_ref, w_ref, s_ref, y_ref, rstd_ref, *, eps: float, block_rows: int, lanes: int,
                    plus_one: bool):
    from jax.experimental.pallas import triton as plgpu

    rows, hidden = h_ref.shape
    row, lane, row_ok, lane_ok, at, ok = _indices(rows, hidden, block_rows, lanes)
    dtype = s_ref.dtype
    h = plgpu.load(h_ref.at[at], mask=ok, other=0.0).astype(jnp.float32)
    d = plgpu.load(d_ref.at[at], mask=ok, other=0.0).astype(jnp.float32)
    s = (h + d).astype(dtype)  # the residual stream, rounded as the XLA add rounds it
    s32 = s.astype(jnp.float32)
    rstd = 1.0 / jnp.sqrt(jnp.sum(s32 * s32, axis=1) / hidden + eps)
    w = _weight(w_ref, lane, lane_ok, dtype, plus_one)
    normed = s32 * rstd[:, None]
    if not plus_one:  # Llama's norm rounds the normalised values before the product; Gemma's stays in fp32
        normed = normed.astype(dtype).astype(jnp.float32)
    plgpu.store(s_ref.at[at], s, mask=ok)
    plgpu.store(y_ref.at[at], (w[None, :] * normed).astype(dtype), mask=ok)
    plgpu.store(rstd_ref.at[row], rstd, mask=row_ok)


def _backward_kernel(s_ref, w_ref, rstd_ref, dy_ref, ds_ref, dx_ref, dw_ref, *, block_rows: int, lanes: int,
                     plus_one: bool):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    rows, hidden = s_ref.shape
    row, lane, row_ok, lane_ok, at, ok = _indices(rows, hidden, block_rows, lanes)
    dtype = dx_ref.dtype
    s = plgpu.load(s_ref.at[at], mask=ok, other=0.0).astype(jnp.float32)
    dy = plgpu.load(dy_ref.at[at], mask=ok, other=0.0).astype(jnp.float32)
    ds = plgpu.load(ds_ref.at[at], mask=ok, other=0.0).astype(jnp.float32)
    rstd = plgpu.load(rstd_ref.at[row], mask=row_ok, other=0.0)
    w = _weight(w_ref, lane, lane_ok, dtype, plus_one)
    normed = s * rstd[:, None]
    d_normed = dy * w[None, :]
    if not plus_one:
        d_normed = d_normed.astype(dtype).astype(jnp.float32)  # formed in the stream dtype, as autodiff does
    mean = jnp.sum(d_normed * normed, axis=1) / hidden
    dx = (rstd[:, None] * (d_normed - normed * mean[:, None])).astype(dtype).astype(jnp.float32)
    plgpu.store(dx_ref.at[at], (dx + ds).astype(dtype), mask=ok)  # + the residual's own cotangent
    # This block's share of the scale's gradient, with the normalised values rounded to the stream dtype as
    # layers.rms_norm's backward rounds them (Gemma's: fp32); masked rows and lanes load as zeros and add nothing.
    share = jnp.sum(dy * (normed if plus_one else normed.astype(dtype).astype(jnp.float32)), axis=0)
    plgpu.store(dw_ref.at[pl.program_id(0) * lanes + lane], share)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused(h, delta, scale, eps: float, interpret: bool, plus_one: bool):
    return _fused_fwd(h, delta, scale, eps, interpret, plus_one)[0]


def _fused_fwd(h, delta, scale, eps: float, interpret: bool, plus_one: bool):
    rows, hidden = h.shape
    s, y, rstd = _forward_program(rows, hidden, h.dtype, eps, plus_one, interpret)(h, delta, scale)
    return (s, y), (s, scale, rstd)


# One jitted program per static form (shape, dtype and flags), built once per process. Why: a fresh pallas_call at
# each site was traced and lowered to Triton at each site: seven kernel lowerings and nine kernel traces in each
# 0.5B training program (a first ragged call's three GPU programs lowered in 2.26-2.40 s before, 1.81-2.15 s after,
# on this repository's CPU: benchmarks/RESULTS.md, nineteenth session). One jitted function is traced once per form,
# and within one program jax lowers it once and calls it from every site (XLA inlines the calls, so the compiled
# program is the same).
@functools.lru_cache(maxsize=256)
def _forward_program(rows: int, hidden: int, dtype: jnp.dtype, eps: float, plus_one: bool, interpret: bool):
    out_shape = (
        jax.ShapeDtypeStruct((rows, hidden), dtype),
        jax.ShapeDtypeStruct((rows, hidden), dtype),
        jax.ShapeDtypeStruct((rows,), jnp.float32),
    )
    return jax.jit(_call(functools.partial(_forward_kernel, eps=eps, plus_one=plus_one), out_shape, rows, hidden,
                         interpret, "add_rms_norm_fwd"))


@functools.lru_cache(maxsize=256)
def _backward_program(rows: int, hidden: int, dtype: jnp.dtype, plus_one: bool, interpret: bool):
    block_rows, lanes = _blocks(rows, hidden)
    shares = jax.ShapeDtypeStruct((-(-rows // block_rows) * lanes,), jnp.float32)  # each program's share of dw
    out_shape = (jax.ShapeDtypeStruct((rows, hidden), dtype), shares)
    return jax.jit(_call(functools.partial(_backward_kernel, plus_one=plus_one), out_shape, rows, hidden, interpret,
                         "add_rms_norm_bwd"))


def _fused_bwd(eps: float, interpret: bool, plus_one: bool, residuals, cotangents):
    del eps
    s, scale, rstd = residuals
    ds, dy = cotangents
    rows, hidden = s.shape
    call = _backward_program(rows, hidden, s.dtype, plus_one, interpret)
    dx, shares = call(s, scale, rstd, dy.astype(s.dtype), ds.astype(s.dtype))
    lanes = _blocks(rows, hidden)[1]  # one row of shares per kernel program
    d_scale = jnp.sum(shares.reshape(-1, lanes)[:, :hidden], axis=0)  # fp32, as layers.rms_norm's backward
    return dx, dx, d_scale.astype(scale.dtype)


_fused.defvjp(_fused_fwd, _fused_bwd)
