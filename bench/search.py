"""Exact search: pegjax vs faiss-cpu IndexFlatIP on the same embeddings.

    python -m bench.search [--corpus 100000] [--queries 1000] [--dim 384] [--k 100]

Random unit vectors (the cost of exact search does not depend on their values). Both build their
index first (faiss: ``add``; pegjax: ``search.Index``, the corpus placed on the devices), then
search all queries, timed warm, best of 3. Prints queries/s, the ratio, and whether the top-k ids
are identical.
"""

import argparse
import os

import numpy as np

from bench.common import best_time, cpu_model
from pegjax.distributed import use_cpu_cores


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=100)
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
    ours_s = best_time(lambda: ours.update(zip(("scores", "ids"), index.search(queries, args.k))))
    theirs_s = best_time(lambda: theirs.update(zip(("scores", "ids"), flat.search(queries, args.k))))
    same_ids = (ours["ids"] == theirs["ids"]).mean()
    same_sets = np.mean([set(a) == set(b) for a, b in zip(ours["ids"], theirs["ids"])])
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; pegjax on {jax.device_count()} CPU devices, "
          f"faiss threads {faiss.omp_get_max_threads()}")
    print(f"corpus {args.corpus} x {args.dim}, {args.queries} queries, k={args.k}")
    print(f"pegjax exact search   {args.queries / ours_s:9.1f} queries/s")
    print(f"faiss IndexFlatIP     {args.queries / theirs_s:9.1f} queries/s")
    print(f"ratio pegjax/faiss    {theirs_s / ours_s:9.2f}x")
    print(f"identical ids (same rank) {same_ids:.5f}; identical top-{args.k} sets {same_sets:.4f}; "
          f"max score diff {np.abs(ours['scores'] - theirs['scores']).max():.2e}")


if __name__ == "__main__":
    from pegjax.distributed import restart_with_tuned_malloc

    restart_with_tuned_malloc()
    main()
