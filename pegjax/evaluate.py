"""Retrieval evaluation: encode corpus and queries, exact top-k search, metrics.

    python -m pegjax.evaluate --model=DIR --task=T2Retrieval --task=path/to/scifact:test \\
        [--data_dir=...] [--output=results.json] [--query_instruction=...]

Tasks are registered names or folders (`pegjax.tasks`); a task whose data is missing is reported
and the others go on. Results are printed as a table and written as JSON (per task and the mean).
The same functions serve training's ``config.evals``.
"""

from __future__ import annotations

import json
import logging
from typing import Iterable, Mapping, Sequence

import numpy as np

from pegjax import distributed, metrics, search, tasks
from pegjax.data.retrieval import RetrievalData
from pegjax.errors import UserError

TABLE_METRICS = ("ndcg@10", "mrr@10", "recall@100", "map@10")


def retrieve(encoder, data: RetrievalData, k: int, query_prompt: str | None = None, passage_prompt: str | None = None,
             batch_size: int = 64, query_max_length: int | None = None, passage_max_length: int | None = None,
             progress: bool | None = None, corpus_cache_dir: str | None = None) -> dict[str, dict[str, float]]:
    """The top-k corpus documents of every query: {query_id: {doc_id: score}}.

    ``query_prompt`` / ``passage_prompt``: prepended to every query / passage; None takes the
    encoder's own (``encoder.prompts``, e.g. e5's "query: " / "passage: "), else none.
    ``corpus_cache_dir``: reuse (or write) the corpus embeddings cached by model and texts, as
    mining does; used when the passage length is the encoder's own.
    """
    import jax

    query_prompt = getattr(encoder, "prompts", {}).get("query", "") if query_prompt is None else query_prompt
    passage_prompt = getattr(encoder, "prompts", {}).get("document", "") if passage_prompt is None else passage_prompt
    corpus_texts = [passage_prompt + t for t in data.corpus_texts] if passage_prompt else data.corpus_texts

    if corpus_cache_dir and passage_max_length in (None, encoder.max_length) and jax.process_count() == 1:
        from pegjax.encode import encoded_corpus

        corpus = encoded_corpus(encoder, corpus_texts, corpus_cache_dir, batch_size)
    else:  # with several processes, each encodes its block of the texts and all gather the rows
        corpus = _encode_shared(encoder, corpus_texts, batch_size=batch_size, max_length=passage_max_length,
                                show_progress=progress)
    queries = _encode_shared(encoder, [query_prompt + q for q in data.query_texts], batch_size=batch_size,
                             max_length=query_max_length, show_progress=progress)
    scores, index = search.top_k(queries, corpus, k)
    return {
        query_id: {data.corpus_ids[j]: float(s) for s, j in zip(row_scores, row_index)}
        for query_id, row_scores, row_index in zip(data.query_ids, scores, index)
    }


def _encode_shared(encoder, texts, **encode_args) -> np.ndarray:
    share = distributed.process_share(len(texts))
    return distributed.gather_rows(encoder.encode(texts[share], **encode_args), len(texts))


def evaluate_data(encoder, data: RetrievalData, k_values: Sequence[int] = metrics.DEFAULT_K, **retrieve_args) -> dict:
    run = retrieve(encoder, data, max(k_values), **retrieve_args)
    mean, _, skipped = metrics.evaluate(data.qrels, run, k_values)
    warnings = dict(data.warnings, **({"queries_without_relevant": skipped} if skipped else {}))
    return {"metrics": mean, "queries": len(data.query_ids), "corpus": len(data.corpus_ids), "warnings": warnings}


def evaluate_tasks(encoder, specs: Iterable[str], data_dir: str | None = None,
                   k_values: Sequence[int] = metrics.DEFAULT_K, **retrieve_args) -> dict:
    """Evaluates each task; missing tasks are listed under "missing" and skipped.

    Returns {"tasks": {name: result}, "missing": {spec: message}, "mean": {metric: value}}.
    """
    results, missing = {}, {}
    for spec in specs:
        try:
            task, data = tasks.load(spec, data_dir)
        except tasks.MissingTask as err:
            logging.warning("skipping task: %s", err)
            missing[spec] = str(err)
            continue
        args = dict(retrieve_args)
        if args.get("query_prompt") is None and "query" not in getattr(encoder, "prompts", {}):
            args["query_prompt"] = task.query_instruction  # a model's own prompt comes first
        result = evaluate_data(encoder, data, k_values, **args)
        result["split"] = task.split
        for name, count in result["warnings"].items():
            logging.warning("%s: %d %s", task.name, count, name.replace("_", " "))
        results[task.name] = result
    names = [f"{m}@{k}" for m in metrics.METRICS for k in k_values]
    mean = {n: float(np.mean([r["metrics"][n] for r in results.values()])) for n in names} if results else {}
    return {"tasks": results, "missing": missing, "mean": mean}


def due(evals: Mapping[str, Mapping], step: int, final: bool = False) -> list[str]:
    """Names of the evals to run at ``step``: every ``log_steps`` steps, and at the end."""
    return [name for name, spec in evals.items()
            if final or (spec.get("log_steps") and step % int(spec["log_steps"]) == 0)]


def run_evals(encoder, evals: Mapping[str, Mapping], step: int, final: bool = False,
              data_dir: str | None = None, corpus_cache_dir: str | None = None) -> dict[str, dict]:
    """Runs the evals of ``config.evals`` due at ``step`` (big_vision style: each a named dict
    ``{task, log_steps, k, query_prompt, passage_prompt, query_max_length, passage_max_length,
    batch_size}``).

    Returns {name: {metric: value}} for the evals run; a missing task is logged and skipped.
    """
    results = {}
    for name in due(evals, step, final):
        spec = dict(evals[name])
        k_values = tuple(spec.pop("k", metrics.DEFAULT_K))
        task = spec.pop("task")
        spec.pop("log_steps", None)
        if corpus_cache_dir:
            spec["corpus_cache_dir"] = corpus_cache_dir
        report = evaluate_tasks(encoder, [task], data_dir=data_dir, k_values=k_values, **spec)
        if report["tasks"]:
            results[name] = next(iter(report["tasks"].values()))["metrics"]
    return results


def format_table(report: dict, columns: Sequence[str] = TABLE_METRICS) -> str:
    columns = [c for c in columns if not report["tasks"] or c in next(iter(report["tasks"].values()))["metrics"]]
    lines = ["| task | split | queries | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for name, result in report["tasks"].items():
        values = " | ".join(f"{result['metrics'][c]:.4f}" for c in columns)
        lines.append(f"| {name} | {result['split']} | {result['queries']} | {values} |")
    if len(report["tasks"]) > 1:
        lines.append("| mean | | | " + " | ".join(f"{report['mean'][c]:.4f}" for c in columns) + " |")
    for spec, message in report["missing"].items():
        lines.append(f"missing: {message}")
    return "\n".join(lines)


def main(argv):
    del argv
    from absl import flags

    from pegjax.encode import Encoder, encode_dtype

    import jax

    FLAGS = flags.FLAGS
    distributed.use_cpu_cores()
    distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id, FLAGS.heartbeat_timeout)
    lead = jax.process_index() == 0
    try:
        dtype = encode_dtype(FLAGS.dtype, "float32")
    except ValueError as err:
        raise UserError(f"--dtype: {err}") from None
    encoder = Encoder.from_pretrained(FLAGS.model, dtype=dtype)
    report = evaluate_tasks(
        encoder, FLAGS.task, data_dir=FLAGS.data_dir, k_values=[int(k) for k in FLAGS.k],
        batch_size=FLAGS.batch_size, query_max_length=FLAGS.query_max_length,
        passage_max_length=FLAGS.passage_max_length, progress=lead,
        query_prompt=FLAGS.query_prompt, passage_prompt=FLAGS.passage_prompt,
    )
    if not report["tasks"]:
        raise tasks.MissingTask("no task could be evaluated: " + "; ".join(report["missing"].values()))
    if not lead:
        return
    print(format_table(report))
    if FLAGS.output:
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
        print(f"wrote {FLAGS.output}")


def _define_flags():
    from absl import flags

    flags.DEFINE_string("model", None, "Hugging Face / pegjax model folder.", required=True)
    flags.DEFINE_multi_string("task", None, "Registered task name or folder[:split].", required=True)
    flags.DEFINE_string("data_dir", None, f"Folder of registered tasks (default ${tasks.DATA_ENV}).")
    flags.DEFINE_list("k", [str(k) for k in metrics.DEFAULT_K], "Cut-offs.")
    flags.DEFINE_integer("batch_size", 64, "Encoding batch size.")
    flags.DEFINE_integer("query_max_length", None, "Query max tokens (default: the model's).")
    flags.DEFINE_integer("passage_max_length", None, "Passage max tokens (default: the model's).")
    flags.DEFINE_string("query_prompt", None, "Prepended to every query (default: the model's query prompt, "
                        "else the task's instruction, else none), e.g. 'query: ' for e5.")
    flags.DEFINE_string("passage_prompt", None, "Prepended to every passage (default: the model's document "
                        "prompt, else none), e.g. 'passage: ' for e5.")
    flags.DEFINE_string("dtype", "float32", "Compute dtype: float32, bfloat16, or auto (bfloat16 where the "
                        "hardware runs it fast: GPU, TPU, a CPU with AVX512-BF16 or AMX).")
    flags.DEFINE_string("output", None, "Write the results JSON here.")
    flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs without SLURM/TPU).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator).")
    flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).")
    flags.DEFINE_integer("heartbeat_timeout", 100, "Seconds before the other processes give up on a silent one.")


if __name__ == "__main__":
    from absl import app

    from pegjax.errors import guarded

    _define_flags()
    app.run(guarded(main))
