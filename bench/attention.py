"""The attention core's backward on one CPU core: pegjax's written-out products against XLA's own
autodiff of the same math.

    python -m bench.attention [--rows=16] [--length=256]

`pegjax.models.bert.dot_attention` (scores, softmax, weighted sum of the values; no dropout) on
MiniLM-shaped random inputs (12 heads of 32), forward + backward for the query, key and value, jitted on
one device, against the same computation written with `jnp.matmul` and differentiated by JAX.
Both gradients are checked to agree first; the two sides then alternate, 15 times each, and the
best and median times are printed with the CPU model. The process is pinned to one core.
"""

from __future__ import annotations

import argparse
import os
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1").strip()
    import jax
    import jax.numpy as jnp
    from jax import lax

    from bench.common import cpu_model
    from pegjax.models.bert import attention_bias, dot_attention

    heads, width = 12, 32
    keys = jax.random.split(jax.random.key(0), 4)
    query, key, value, cotangent = (jax.random.normal(k, (args.rows, args.length, heads, width)) for k in keys)
    bias = attention_bias(jnp.ones((args.rows, args.length), jnp.int32), packed=False)

    def autodiff_form(q, k, v):
        heads_major = lambda t: t.transpose(0, 2, 1, 3)  # noqa: E731
        q = q * (1 / width**0.5)
        scores = jnp.matmul(heads_major(q), heads_major(k).transpose(0, 1, 3, 2)) + bias
        weights = jnp.exp(scores - lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
        context = jnp.matmul(weights, heads_major(v)) / jnp.sum(weights, axis=-1, keepdims=True)
        return context.transpose(0, 2, 1, 3)

    def ours_form(q, k, v):
        return dot_attention(q, k, v, bias, dropout_rate=0.0, seed=None, site=0, implementation="xla")

    def backward(form):
        return jax.jit(lambda q, k, v: jax.vjp(form, q, k, v)[1](cotangent))

    sides = {"pegjax": backward(ours_form), "autodiff": backward(autodiff_form)}
    for name, a, b in zip("qkv", *(side(query, key, value) for side in sides.values())):
        error = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        if error > 1e-5:
            raise SystemExit(f"the gradients of {name} differ: relative {error:.2e}")
    times = {name: [] for name in sides}
    for _ in range(15):
        for name, side in sides.items():
            start = time.perf_counter()
            jax.block_until_ready(side(query, key, value))
            times[name].append((time.perf_counter() - start) * 1e3)
    print(f"CPU: {cpu_model()}, one core; attention {args.rows} rows x {args.length} tokens, {heads} heads x {width}, "
          "float32, forward + backward")
    for name, ms in times.items():
        print(f"  {name:9s} best {min(ms):7.1f} ms   median {sorted(ms)[len(ms) // 2]:7.1f} ms")
    print(f"  ratio autodiff/pegjax  best {min(times['autodiff']) / min(times['pegjax']):.2f}x")


if __name__ == "__main__":
    main()
