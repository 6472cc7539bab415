"""Mining throughput on this machine: corpus docs/s (encoding) and queries/s (encode + search + select).

    python -m bench.mine [--docs 2000] [--queries 809]

all-MiniLM-L6-v2 (max length 256), SciFact train queries over the first ``--docs`` abstracts plus
every positive, 5 negatives from ranks 10-100. Encoding is timed warm (a first pass compiles).
"""

import argparse
import time

from bench.common import SHARED_DATA, minilm_path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=809)
    args = parser.parse_args()
    from pegjax import mine
    from pegjax.encode import Encoder

    data = mine.from_beir(str(SHARED_DATA / "scifact"), "train")
    wanted = sorted({r for p in data.positives[: args.queries] for r in p})
    keep = sorted(set(wanted) | set(range(min(args.docs, len(data.corpus_texts)))))
    row = {old: new for new, old in enumerate(keep)}
    subset = mine.MiningInput(data.query_texts[: args.queries], [[row[r] for r in p] for p in data.positives[: args.queries]],
                              [data.corpus_texts[r] for r in keep])
    encoder = Encoder.from_pretrained(minilm_path())
    encoder.encode(subset.corpus_texts[:256])  # compile the common shapes
    start = time.perf_counter()
    encoder.encode(subset.corpus_texts)
    corpus_s = time.perf_counter() - start
    start = time.perf_counter()
    records, summary = mine.mine(subset, mine.MiningConfig(), encoder)
    total_s = time.perf_counter() - start
    query_s = total_s - corpus_s  # mine() encodes the corpus once more
    print(f"corpus {len(subset.corpus_texts)} docs, {len(subset.query_texts)} queries, all-MiniLM-L6-v2, max length 256")
    print(f"corpus encoding      {len(subset.corpus_texts) / corpus_s:8.1f} docs/s")
    print(f"queries (encode + search + select) {len(subset.query_texts) / max(query_s, 1e-9):8.1f} queries/s")
    print(f"whole mining run     {total_s:8.1f} s; queries short of 5 negatives: {summary['queries_with_too_few_negatives']}")


if __name__ == "__main__":
    main()
