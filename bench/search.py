"""Exact search: pegjax vs faiss-cpu IndexFlatIP on the same embeddings.

    python -m bench.search [--corpus 100000] [--queries 1000] [--dim 384] [--k 100] [--rounds 5]

Random unit vectors (the cost of exact search does not depend on their values). Both build their
index first (faiss: ``add``; pegjax: ``search.Index``, the corpus placed on the devices), then
search all queries, warm, the two taking turns for ``--rounds`` rounds (`bench.common.interleaved`:
a cloud CPU's speed drifts by more than the difference measured). Prints queries/s (median), the
ratio round by round, whether the top-k ids are identical, and the roofline: each side's GFLOP/s
beside this CPU's float32 product rate.
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
    ours = {}
    theirs = {}
    times = interleaved({"pegjax": lambda: ours.update(zip(("scores", "ids"), index.search(queries, args.k))),
                         "faiss": lambda: theirs.update(zip(("scores", "ids"), flat.search(queries, args.k)))},
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
    print(f"identical ids (same rank) {same_ids:.5f}; identical top-{args.k} sets {same_sets:.4f}; "
          f"max score diff {np.abs(ours['scores'] - theirs['scores']).max():.2e}")
    flops = 2.0 * args.queries * args.corpus * args.dim
    print("\n".join(roofline(flops, {"pegjax exact search": seconds["pegjax"], "faiss IndexFlatIP": seconds["faiss"]},
                             product_peak())))


if __name__ == "__main__":
    main()
