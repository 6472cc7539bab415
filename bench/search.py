"""Exact search: pegjax vs faiss-cpu IndexFlatIP on the same embeddings.

    python -m bench.search [--corpus 100000] [--queries 1000] [--dim 384] [--k 100] [--rounds 5]

Random unit vectors (the cost of exact search does not depend on their values). Both build their
index first (faiss: ``add``; pegjax: ``search.Index``, the corpus placed on the devices), then
search all queries, warm, the two taking turns for ``--rounds`` rounds (`bench.common.interleaved`:
a cloud CPU's speed drifts by more than the difference measured). Prints queries/s (median), the
ratio round by round, whether the top-k ids are identical, and the roofline: each side's GFLOP/s
beside this CPU's float32 product rate.

A third side, taking its turn in the same rounds, is pegjax's product pass alone: the same query
batches against the same corpus on the same devices, scores and their group maxima (what the
search's selection starts from) and no top-k. Its ratio to faiss bounds what any selection could
bring the search to on this machine.
"""

import argparse
import os
import statistics

import numpy as np

from bench.common import cpu_model, interleaved, product_peak, ratios, roofline
from pegjax.distributed import use_cpu_cores


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    use_cpu_cores()
    import faiss
    import jax

    from pegjax import search

    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    corpus = unit(rng.standard_normal((args.corpus, args.dim)).astype(np.float32))
    queries = unit(rng.standard_normal((args.queries, args.dim)).astype(np.float32))

    index = search.Index(corpus)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(corpus)
    products = product_pass(index, queries)
    ours = {}
    theirs = {}
    times = interleaved({"pegjax": lambda: ours.update(zip(("scores", "ids"), index.search(queries, args.k))),
                         "faiss": lambda: theirs.update(zip(("scores", "ids"), flat.search(queries, args.k))),
                         "products": products},
                        args.rounds)
    same_ids = (ours["ids"] == theirs["ids"]).mean()
    same_sets = np.mean([set(a) == set(b) for a, b in zip(ours["ids"], theirs["ids"])])
    seconds = {name: statistics.median(t) for name, t in times.items()}
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; pegjax on {jax.device_count()} CPU devices, "
          f"faiss threads {faiss.omp_get_max_threads()}")
    print(f"corpus {args.corpus} x {args.dim}, {args.queries} queries, k={args.k}")
    print(f"pegjax exact search   {args.queries / seconds['pegjax']:9.1f} queries/s (median of {args.rounds})")
    print(f"faiss IndexFlatIP     {args.queries / seconds['faiss']:9.1f} queries/s")
    print(f"ratio pegjax/faiss    {ratios(times['pegjax'], times['faiss'])}")
    print(f"pegjax's product pass alone (no top-k) / faiss {ratios(times['products'], times['faiss'])}")
    print(f"identical ids (same rank) {same_ids:.5f}; identical top-{args.k} sets {same_sets:.4f}; "
          f"max score diff {np.abs(ours['scores'] - theirs['scores']).max():.2e}")
    flops = 2.0 * args.queries * args.corpus * args.dim
    print("\n".join(roofline(flops, {"pegjax exact search": seconds["pegjax"], "faiss IndexFlatIP": seconds["faiss"]},
                             product_peak())))


def product_pass(index, queries, query_batch: int = 256):
    """A callable that runs the search's products alone: ``queries`` in batches of ``query_batch``
    against ``index``'s corpus where it lies, each [batch, rows] score block reduced to its maxima
    over groups of ``search._GROUP`` columns, with no top-k."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from pegjax import search

    corpus, _ = index._resident
    batches = -(-queries.shape[0] // query_batch)
    padded = np.zeros((batches * query_batch, queries.shape[1]), np.float32)
    padded[: queries.shape[0]] = queries
    padded = jax.device_put(padded.reshape(batches, query_batch, -1), NamedSharding(index.mesh, PartitionSpec()))

    def local(query_batches, corpus_shard):
        def group_maxima(batch):
            scores = jnp.einsum("qd,nd->qn", batch, corpus_shard, precision=jax.lax.Precision.HIGHEST)
            return scores.reshape(query_batch, -1, search._GROUP).max(axis=-1)

        return jax.lax.map(group_maxima, query_batches)

    run = jax.jit(jax.shard_map(local, mesh=index.mesh, in_specs=(PartitionSpec(), PartitionSpec(search._AXIS)),
                                out_specs=PartitionSpec(None, None, search._AXIS)))
    return lambda: run(padded, corpus).block_until_ready()


if __name__ == "__main__":
    main()
