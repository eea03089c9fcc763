"""Can a decode step overlap its memory-bound attention with its compute-bound GEMMs? (issue 22)

Why: at batch 512 the decode step runs its GEMMs, then its attention, one kernel after the other; the
twelfth session's profiles put the 1.5B goal (100k new tok/s) past the serial roof of that order. XLA
on GPU runs a call annotated ``compute_on("gpu_stream:N")`` on another stream, asynchronously. This
measures a stack of simplified decode layers (joined q/k/v GEMM, the engine's shared-prefix attention
with its cache write, o_proj, SwiGLU MLP; no norms, no RoPE) on two halves of the batch, which are
independent chains, in four forms inside one ``fori_loop`` of steps (the cache carried, so in-place
updates count):

* ``whole``: one batch, as the engine runs today;
* ``halves``: the two halves one after the other, no annotation (what splitting alone costs);
* ``stream``: the halves, each attention on stream 1, XLA's scheduler free to overlap it with the other
  half's GEMMs;
* ``grouped``: as ``stream``, and each attention put in one scheduling group with the other half's MLP.

Prints ms per step and µs per layer for each, the outputs' largest difference against ``whole``, and the
attention-only and GEMM-only steps (the overlap's ceiling is ``max`` of those, its floor their sum).
On a CPU the annotations are ignored: a smoke test only (``BENCH_FORCE_STREAMS=1`` traces them anyway).

Found on one H200 with jax 0.11.2 (benchmarks/RESULTS.md, fifteenth session): splitting the batch alone costs
16-31 % per step, and XLA refuses the annotated attention ("No ExecutionStreamId found for call-start"), inside
the ``while`` loop and unrolled alike, because the call holds nested calls. So the engine keeps one stream.

    python benchmarks/bench_stream_overlap.py --shape qwen15 --batch 512
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import jax
import jax.numpy as jnp
from jax.experimental.compute_on import compute_on

from jaxsft.generation import kv_cache

try:  # the scheduling-group metadata moved between jax versions
    from jax.experimental.xla_metadata import set_xla_metadata
except ImportError:  # pragma: no cover
    set_xla_metadata = None

FORCE_STREAMS = os.environ.get("BENCH_FORCE_STREAMS") == "1"  # annotate off a GPU too (a CPU smoke test, float32)
SHAPES = {  # hidden, intermediate, heads, kv heads, head dim, layers (a slice of the model's)
    "qwen05": (896, 4864, 14, 2, 64, 8),
    "qwen15": (1536, 8960, 12, 2, 128, 8),
    "tiny": (64, 128, 4, 2, 16, 2),
}


def make_weights(shape, key, dtype=jnp.bfloat16):
    hidden, inter, heads, kv, d, layers = shape
    out = []
    for k in jax.random.split(key, layers):
        k1, k2, k3, k4 = jax.random.split(k, 4)
        s = hidden ** -0.5
        out.append(dict(
            qkv=(jax.random.normal(k1, (hidden, (heads + 2 * kv) * d)) * s).astype(dtype),
            o=(jax.random.normal(k2, (heads * d, hidden)) * s).astype(dtype),
            gu=(jax.random.normal(k3, (hidden, 2 * inter)) * s).astype(dtype),
            down=(jax.random.normal(k4, (inter, hidden)) * inter ** -0.5).astype(dtype),
        ))
    return out


def make_cache(shape, groups, prompt_slots, new_slots, key, dtype=jnp.bfloat16):
    hidden, inter, heads, kv, d, layers = shape
    out = []
    for k in jax.random.split(key, layers):
        k1, k2 = jax.random.split(k)
        pre = jax.random.normal(k1, (2, groups, kv, prompt_slots, d)).astype(dtype)
        suf = jax.random.normal(k2, (2, groups, kv, new_slots, d)).astype(dtype)
        out.append(kv_cache.LayerKV(pre[0], pre[1], suf[0], suf[1]))
    return out


def attention(x, w, layer, rows, shape):
    hidden, inter, heads, kv, d, layers = shape
    b = x.shape[0]
    qkv = (x @ w["qkv"]).reshape(b, 1, heads + 2 * kv, d)
    q, k, v = qkv[:, :, :heads], qkv[:, :, heads:heads + kv], qkv[:, :, heads + kv:]
    out, layer = kv_cache.shared_prefix_attention((q, k, v), layer, rows, None)
    return out.reshape(b, heads * d), layer


def mlp(x, w):
    gu = x @ w["gu"]
    g, u = jnp.split(gu, 2, axis=-1)
    return (jax.nn.silu(g) * u) @ w["down"]


def on_stream(fn, stream: int):
    """``fn`` as a call XLA runs on GPU stream ``stream`` (the API changed between jax 0.10 and 0.11)."""
    try:
        return compute_on(f"gpu_stream:{stream}")(fn)
    except TypeError:  # jax >= 0.11: compute_on(f, *, compute_type, out_memory_spaces)
        return compute_on(fn, compute_type=f"gpu_stream:{stream}", out_memory_spaces=jax.memory.Space.Device)


def step_fn(form: str, shape, weights, rows):
    """One decode step over all layers for both halves (or the whole batch) in ``form``; ``rows``: every piece's
    :class:`~jaxsft.generation.kv_cache.RowView` (the pieces' rows look alike)."""
    def attention_here(x, w, layer, rows):  # the shape closed over: compute_on traces every argument
        return attention(x, w, layer, rows, shape)

    streamed = attention_here
    if form in ("stream", "grouped") and (jax.default_backend() == "gpu" or FORCE_STREAMS):
        streamed = on_stream(attention_here, 1)

    def part(parts, what):
        xs, caches = parts
        out_x, out_c = [], []
        for x, cache in zip(xs, caches):
            new_cache = []
            for w, layer in zip(weights, cache):
                if what == "gemm":  # the GEMMs alone: q's share of the joined projection stands in for attention
                    a = (x @ w["qkv"])[:, : shape[2] * shape[4]]
                else:
                    a, layer = attention(x, w, layer, rows, shape)
                new_cache.append(layer)
                if what == "attn":  # attention alone (heads * head_dim == hidden for the shapes here)
                    x = x + a
                    continue
                x = x + a @ w["o"]
                x = x + mlp(x, w)
            out_x.append(x)
            out_c.append(new_cache)
        return out_x, out_c

    def overlapped(parts, grouped: bool):
        def group(number: int):  # one XLA scheduling group: an attention and the other half's MLP beside it
            if grouped and set_xla_metadata is not None:
                return set_xla_metadata(_scheduling_group_id=str(number))
            return contextlib.nullcontext()

        (xa, xb), (ca, cb) = parts
        new_a, new_b = [], []
        # B runs half a layer behind A: A's attention of layer l beside B's MLP of layer l - 1, B's attention of
        # layer l beside A's MLP of layer l.
        pending_b = None
        for li, w in enumerate(weights):
            with group(2 * li):
                att_a, la = streamed(xa, w, ca[li], rows)
                if pending_b is not None:
                    xb = xb + mlp(xb, pending_b)
            xa = xa + att_a @ w["o"]
            with group(2 * li + 1):
                att_b, lb = streamed(xb, w, cb[li], rows)
                xa = xa + mlp(xa, w)
            xb = xb + att_b @ w["o"]
            pending_b = w
            new_a.append(la)
            new_b.append(lb)
        xb = xb + mlp(xb, pending_b)
        return [xa, xb], [new_a, new_b]

    def run(parts):
        if form in ("whole", "halves"):
            return part(parts, "all")
        if form in ("attn", "gemm"):
            return part(parts, form)
        return overlapped(parts, grouped=form == "grouped")

    return run


def split_cache(cache, pieces):
    """The cache's rows cut into ``pieces`` equal halves (or one whole), layer by layer."""
    size = cache[0].prefix_k.shape[0] // pieces
    return [[kv_cache.LayerKV(*(t[i * size:(i + 1) * size] for t in layer)) for layer in cache] for i in range(pieces)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="qwen15", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--prompt-slots", type=int, default=128)
    p.add_argument("--new-slots", type=int, default=256)
    p.add_argument("--filled", type=int, default=128, help="continuation tokens already in each row")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--no-loop", action="store_true", help="unroll the steps (no while loop)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU, float32 elsewhere (XLA:CPU refuses some bf16 dots)")
    p.add_argument("--forms", default="whole,halves,stream,grouped,attn,gemm")
    args = p.parse_args()
    shape = SHAPES[args.shape]
    hidden, layers = shape[0], shape[5]
    b = args.batch
    key = jax.random.PRNGKey(0)
    dtype = jnp.dtype(args.dtype if args.dtype != "auto" else
                      ("bfloat16" if jax.default_backend() == "gpu" else "float32"))
    weights = make_weights(shape, key, dtype)
    cache = make_cache(shape, b, args.prompt_slots, args.new_slots, jax.random.PRNGKey(1), dtype)
    x0 = (jax.random.normal(jax.random.PRNGKey(2), (b, hidden)) * 0.1).astype(dtype)
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, shape {args.shape} {shape}, batch {b}, "
          f"{args.steps} steps, continuation {args.filled}/{args.new_slots}, prompt {args.prompt_slots}")

    def rows_for(pieces):  # each piece's rows: every prompt whole, every continuation filled to --filled
        size = b // pieces
        pos = jnp.broadcast_to(jnp.arange(args.prompt_slots, dtype=jnp.int32), (size, args.prompt_slots))
        return kv_cache.RowView(jnp.full((size,), args.filled, jnp.int32), jnp.ones((size, args.prompt_slots), bool),
                                jnp.full((size,), args.prompt_slots + args.filled, jnp.int32), pos)

    results = {}
    for form in args.forms.split(","):
        pieces = 1 if form == "whole" else 2
        fn = step_fn(form, shape, weights, rows_for(pieces))
        xs = list(jnp.array_split(x0, pieces))
        cs = split_cache(cache, pieces)

        @jax.jit
        def many(xs, cs):
            def body(_, carry):
                xs, cs = carry
                nx, nc = fn((xs, cs))
                return [x * 0.5 for x in nx], nc
            if args.no_loop:  # straight-line steps: XLA refuses stream annotations inside a while loop's body
                carry = (xs, cs)
                for i in range(args.steps):
                    carry = body(i, carry)
                return carry
            return jax.lax.fori_loop(0, args.steps, body, (xs, cs))

        t0 = time.perf_counter()
        compiled = many.lower(xs, cs).compile()
        compile_s = time.perf_counter() - t0
        out = jax.block_until_ready(compiled(xs, cs))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(xs, cs))
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times) / args.steps * 1e3
        results[form] = (ms, jnp.concatenate(out[0]).astype(jnp.float32))
        text = compiled.as_text() or ""
        print(f"{form:8s} {ms:8.3f} ms/step {ms / layers * 1e3:8.1f} us/layer  compile {compile_s:5.1f} s  "
              f"call-start in HLO: {text.count('call-start')}")
    if "whole" in results:
        ref = results["whole"][1]
        for form, (ms, out) in results.items():
            if form in ("attn", "gemm"):
                continue
            print(f"{form:8s} max |out - whole| = {float(jnp.max(jnp.abs(out - ref))):.3g}  "
                  f"speed-up vs whole {results['whole'][0] / ms:.3f}x")
    if "attn" in results and "gemm" in results:
        a, g = results["attn"][0], results["gemm"][0]
        print(f"attention-only {a:.3f} ms, GEMM-only {g:.3f} ms: serial {a + g:.3f}, perfect overlap {max(a, g):.3f}")


if __name__ == "__main__":
    main()
