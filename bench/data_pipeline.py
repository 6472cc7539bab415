"""Inputs the size of the paper's: the training data cache of millions of lines, and whether the host
input pipeline keeps up with a paper-size step.

    python -m bench.data_pipeline [--lines 5000000] [--kill-halfway]

1. Synthesises ``--lines`` FlagEmbedding lines from the real STS-B triples (repeated, each query
   made unique), once, under runs/bench_data/.
2. Builds the ArrayRecord cache in a child process (pegjax.data.training.build_cache) and prints
   lines/s and the child's peak resident memory. With ``--kill-halfway`` the first build is
   SIGKILLed once half of its parts are done and the same build is run again: it resumes at its
   first unfinished part.
3. Runs the host input pipeline (grain, tokenization with the bert-base-chinese vocabulary at the
   paper recipe's 64 / 256 tokens, 5 hard negatives, then packing) and prints examples/s next to
   what one paper-size step consumes (13,334 examples) at a given step time.
"""

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time

from bench.common import REPO, SHARED_DATA, cpu_model

OUT = REPO / "runs" / "bench_data"


def synthesise(lines: int) -> str:
    path = OUT / f"stsb_x{lines}.jsonl"
    if path.exists():
        return str(path)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(SHARED_DATA / "stsb_zh_triples" / "bge_finetune_data.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as out:
        for i in range(lines):
            row = rows[i % len(rows)]
            out.write(json.dumps(dict(row, query=f"{row['query']} #{i}"), ensure_ascii=False) + "\n")
    os.replace(partial, path)
    return str(path)


def build(path: str, cache: str, kill_after_parts: int | None = None) -> tuple[float, bool]:
    """Builds the cache in a child process -> (seconds, finished)."""
    code = f"from pegjax.data import training; training.build_cache([{path!r}], {cache!r}, 'error')"
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    while kill_after_parts is not None and child.poll() is None:
        building = [d for d in os.listdir(cache) if d.endswith(".building")] if os.path.isdir(cache) else []
        done = [f for f in os.listdir(os.path.join(cache, building[0])) if f.endswith(".json")] if building else []
        if len(done) >= kill_after_parts:
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    child.wait()
    return time.perf_counter() - start, child.returncode == 0


def pipeline_rate(cache_files: list[str], batches: int, queries: int) -> tuple[float, float]:
    """(examples/s of grain + tokenization, examples/s of packing) for batches of ``queries``."""
    from configs.peg import get_config
    from pegjax.data import training
    from pegjax.data.tokenizer import load_tokenizer

    config = get_config("paper")
    config.unlock()
    config.train.queries_per_step = queries
    tokenizer = load_tokenizer(str(SHARED_DATA / "vocab" / "bert-base-chinese-vocab.txt"))
    iterator = iter(training.pipeline(cache_files, tokenizer, config, seed=0))
    geometries = training.row_geometries([cache_files], tokenizer, config, queries, training.sources_of(config, []))
    for _ in range(batches):  # past what the reader threads fetched ahead
        next(iterator)
    start = time.perf_counter()
    texts = [training.flatten_groups(next(iterator)) for _ in range(batches)]
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    for batch in texts:
        batch.pop("filled_negatives")
        training.pack_for_step(batch, 1, geometries, tokenizer.pad_token_id or 0)
    pack_s = time.perf_counter() - start
    return batches * queries / read_s, batches * queries / pack_s


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=5_000_000)
    parser.add_argument("--kill-halfway", action="store_true")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--queries", type=int, default=512, help="queries per batch in the pipeline measurement")
    parser.add_argument("--step-seconds", type=float, default=35.0, help="a paper-size step's time to compare with")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores")
    start = time.perf_counter()
    path = synthesise(args.lines)
    print(f"input: {path} ({os.path.getsize(path) / 2**30:.2f} GiB, {args.lines:,} lines; "
          f"{time.perf_counter() - start:.0f} s to have it)")
    cache = str(OUT / f"cache_{args.lines}")
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    parts = -(-args.lines // 1_000_000)
    done_before = 0
    if args.kill_halfway:
        seconds, finished = build(path, cache, kill_after_parts=max(parts // 2, 1))
        done_before = len([f for d in os.listdir(cache) for f in os.listdir(os.path.join(cache, d))
                           if f.startswith("part-") and f.endswith(".json")])
        print(f"first build SIGKILLed after {seconds:.0f} s with {done_before} of {parts} parts done (finished: {finished})")
    seconds, finished = build(path, cache)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    assert finished
    from pegjax.data import training

    files, stats = training.build_cache([path], cache, "error")  # the finished cache, found, not rebuilt
    assert stats["records"] == args.lines, stats
    built = args.lines - 1_000_000 * done_before
    print(f"cache build{f' (resumed: {done_before} parts reused)' if done_before else ''}: {stats['records']:,} records; "
          f"{built:,} lines checked and written in {seconds:.0f} s = {built / seconds:,.0f} lines/s; peak RSS of a "
          f"building process {peak:.2f} GiB")
    read_rate, pack_rate = pipeline_rate(files, args.batches, args.queries)
    need = 13334 / args.step_seconds
    print(f"host input pipeline, one process: {read_rate:,.0f} examples/s read + tokenized (1 query + 6 passages "
          f"each, 64/256 tokens), {pack_rate:,.0f} examples/s packed")
    print(f"a paper-size step consumes 13,334 examples; at {args.step_seconds:.0f} s a step that is {need:,.0f} "
          f"examples/s for the job, {need / read_rate:.2f} of this process's rate: "
          f"{'it keeps up' if read_rate >= need else f'needs {need / read_rate:.1f} processes or data.workers'}")


if __name__ == "__main__":
    main()
