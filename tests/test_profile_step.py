"""bench.profile_step: a traced call's op time lands on the kinds of op it ran, with exact FLOPs."""

import jax
import jax.numpy as jnp

from bench.profile_step import module_name, op_table, profile, report, traced_op_seconds


def test_a_traced_call_is_attributed_to_its_products_with_their_flops():
    x = jnp.ones((256, 384), jnp.float32)
    w = jnp.ones((384, 512), jnp.float32)
    q = jnp.ones((4, 2, 64, 32), jnp.float32)

    @jax.jit
    def fn(x, w, q):
        dense = jnp.tanh(x @ w)
        scores = jnp.einsum("bhlk,bhmk->bhlm", q, q)
        return dense.sum() + jnp.exp(scores).sum()

    jax.block_until_ready(fn(x, w, q))
    text = fn.lower(x, w, q).compile().as_text()
    table = op_table(text)
    dense = [op for op in table.values() if op.kind == "dense products"]
    attention = [op for op in table.values() if op.kind == "attention products"]
    assert [op.flops for op in dense] == [2.0 * 256 * 384 * 512]
    assert [op.flops for op in attention] == [2.0 * 4 * 2 * 64 * 64 * 32]
    assert "f32[256,384] x f32[384,512]" in dense[0].describe

    result = profile(lambda: jax.block_until_ready(fn(x, w, q)), text)
    assert result["named"] == 1.0  # every traced op of the module is found in its compiled text
    seconds, share, count, flops = result["kinds"]["dense products"]
    assert count == 1 and flops == 2.0 * 256 * 384 * 512 and seconds > 0
    assert result["kinds"]["attention products"][2] == 1
    assert abs(sum(k[1] for k in result["kinds"].values()) - 1.0) < 1e-9
    assert any("dense products" in line for line in report(result, top=5))


def test_a_loop_is_counted_once_through_its_body(tmp_path):
    x = jnp.ones((128, 256), jnp.float32)
    w = jnp.ones((256, 256), jnp.float32)

    @jax.jit
    def fn(x, w):
        return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ w) * 0.5, x).sum()

    jax.block_until_ready(fn(x, w))
    text = fn.lower(x, w).compile().as_text()
    table = op_table(text)
    loops = [name for name, op in table.items() if op.kind == "control flow"]
    assert loops
    result = profile(lambda: jax.block_until_ready(fn(x, w)), text, trace_dir=str(tmp_path))
    seconds, _, count, flops = result["kinds"]["dense products"]
    assert count == 3 and flops == 3 * 2.0 * 128 * 256 * 256
    # The loop's own span, which holds the three products, is traced but left out of the total.
    traced, _ = traced_op_seconds(str(tmp_path), module_name(text))
    loop_seconds = sum(traced[name] for name in loops)
    assert loop_seconds >= seconds
    assert abs(result["total"] - (sum(traced.values()) - loop_seconds)) < 1e-9


def test_the_lowered_search_is_the_program_search_runs(tmp_path):
    """`Index.lower` (what `bench.profile_step --what search` reads) compiles the program `search`
    runs, batching included: with fewer queries than a batch, every traced op is found in its text
    and the scores' product counts the 40 queries against every corpus row, not a full batch's."""
    import numpy as np

    from pegjax.search import Index

    rng = np.random.default_rng(0)
    index = Index(rng.standard_normal((3000, 64), dtype=np.float32))
    queries = rng.standard_normal((40, 64), dtype=np.float32)
    index.search(queries, 10)
    result = profile(lambda: index.search(queries, 10), index.lower(queries, 10).compile().as_text(), str(tmp_path))
    assert result["total"] > 0 and result["named"] == 1.0
    assert result["kinds"]["dense products"][3] == 2.0 * 40 * index.slice_rows * 64
