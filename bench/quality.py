"""Does the PEG recipe work? Its three claims, at small scale, on real data, with seeds.

    python -m bench.quality [--out=runs/quality] [--tasks=scifact,medical_zh_e5,medical_zh] [--seeds=0,1,2]
                            [--groups=core,sweep,schedules] [--sweep=16,171] [--report_only]

For each task the same training budget (the same number of training queries seen) is spent on:

    inbatch    plain InfoNCE, in-batch negatives only (no hard negatives, beta = gamma = 0)
    hardneg    + 5 mined hard negatives per query (beta = gamma = 0)
    peg        + progressive weighting, the default schedules (beta 0 -> 2, gamma 1 -> 0)
    peg@B      the batch-size sweep of peg: other global batch sizes, the same number of epochs
    schedules  the other progressive settings tried (beta only, gamma only, other beta ends)

Tasks (see TASKS): SciFact (English, from all-MiniLM-L6-v2; train on the train split minus a
validation part; report the test split); medical_zh_e5 (Chinese, from multilingual-e5-small with e5
prompts, the Chinese recipe's starting model, negatives mined by it; report on a held-out part of
the train queries that nothing is tuned on, over the whole corpus); medical_zh (the same split, a
small BERT with the bert-base-chinese vocabulary from random init, negatives mined by pegjax's
BM25: cheap enough to sweep the batch past 1,024 passages a step).

Each task's mined file is audited for likely false negatives (``audit_mined``), and every run logs
where the loss's pull goes (effective negatives, the mined negatives' share, beta's weights on
them; ``pegjax.loss``); the report tabulates both.

Every run is ``pegjax.train.train_and_evaluate`` with a config built from ``configs/peg.py``, the
same code ``python -m pegjax.main`` runs. Runs already finished under ``--out`` are not repeated,
so an interrupted study resumes. At the end ``bench/quality_report.py`` writes the tables (the
quality section of bench/RESULTS.md) and the PNG plots (bench/quality/) from the runs' logged
metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import time

import numpy as np

from bench.common import REPO, SHARED_DATA, model_path


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    source: str  # the dataset under ../shared/data
    batch: int  # the reference global batch (queries per step)
    sweep: tuple[int, ...]  # the batch-size sweep of peg (includes ``batch``)
    queries_seen: int  # training budget of every run, in queries
    eval_every_queries: int  # validation cadence, in queries seen
    report_split: str  # the split reported (never tuned on)
    overrides: dict  # config keys (dotted) -> values; "model.path": "minilm", "e5" or "" (random init)
    hard_negatives: int = 5  # drawn per query per step by the variants with hard negatives
    mined: int = 5  # mined per query (ranks 10-100); ``hard_negatives`` of them drawn afresh each epoch

    @property
    def passages_per_query(self) -> int:
        return 1 + self.hard_negatives


TASKS = {
    "scifact": Task(
        name="scifact", source="scifact", batch=16, sweep=(8, 16, 32), queries_seen=320, eval_every_queries=80, report_split="test",
        overrides={
            "model.path": "minilm", "model.pooling": "mean", "model.dtype": "float32", "model.dropout": False,
            "data.query_length": 48, "data.passage_length": 128, "data.too_few_negatives": "fill",
            "loss.temperature": 0.05,
            "optimizer.learning_rate": dict(peak=2e-5, warmup_fraction=0.1, decay="linear", end_fraction=0.1),
        }),
    "medical_zh": Task(
        name="medical_zh", source="medical_zh", batch=32, sweep=(16, 32, 64, 171), queries_seen=2 * 5237,
        eval_every_queries=5237 // 2,
        report_split="heldout",
        overrides={
            "model.path": "", "model.pooling": "mean", "model.dtype": "float32", "model.dropout": False,
            "model.random_init.hidden_size": 128, "model.random_init.num_hidden_layers": 2,
            "model.random_init.num_attention_heads": 2, "model.random_init.intermediate_size": 512,
            "data.query_length": 48, "data.passage_length": 64, "data.too_few_negatives": "fill",
            "loss.temperature": 0.05,
            "optimizer.learning_rate": dict(peak=1e-3, warmup_fraction=0.1, decay="linear", end_fraction=0.0),
        }),
    # The Chinese recipe's starting model at a budget this CPU affords with seeds: 640 training
    # queries a run, 3 of 5 mined negatives drawn per query (128 passages a step at batch 32),
    # answers cut at 64 tokens. Validation ranks over its positives plus 1,000 other answers; the
    # held-out split over the whole 7,244-answer corpus.
    "medical_zh_e5": Task(
        name="medical_zh_e5", source="medical_zh", batch=32, sweep=(16, 32, 64), queries_seen=640,
        eval_every_queries=640, report_split="heldout", hard_negatives=3,
        overrides={
            "model.path": "e5", "model.pooling": "mean", "model.dtype": "float32", "model.dropout": False,
            "model.frozen": "embeddings/word_embeddings",
            "data.query_prompt": "query: ", "data.passage_prompt": "passage: ",
            "data.query_length": 32, "data.passage_length": 64, "data.too_few_negatives": "fill",
            "loss.temperature": 0.02,
            "optimizer.learning_rate": dict(peak=5e-5, warmup_fraction=0.1, decay="linear", end_fraction=0.0),
        }),
}

# name -> (with the task's hard negatives, beta schedule, gamma schedule); schedules run over the whole run.
VARIANTS = {
    "inbatch": (False, dict(start=0.0, end=0.0), dict(start=0.0, end=0.0)),
    "hardneg": (True, dict(start=0.0, end=0.0), dict(start=0.0, end=0.0)),
    "peg": (True, dict(start=0.0, end=2.0), dict(start=1.0, end=0.0)),
    # the other progressive settings tried
    "peg_beta_only": (True, dict(start=0.0, end=2.0), dict(start=0.0, end=0.0)),
    "peg_gamma_only": (True, dict(start=0.0, end=0.0), dict(start=1.0, end=0.0)),
    "peg_beta1": (True, dict(start=0.0, end=1.0), dict(start=1.0, end=0.0)),
    "peg_beta4": (True, dict(start=0.0, end=4.0), dict(start=1.0, end=0.0)),
}
GROUPS = {
    "core": ["inbatch", "hardneg", "peg"],
    "schedules": ["peg_beta_only", "peg_gamma_only", "peg_beta1", "peg_beta4"],
}
SEED_OF_SPLIT = 1234  # the fixed validation / held-out split of the train queries


def _load_recipe():
    spec = importlib.util.spec_from_file_location("peg_recipe", REPO / "configs" / "peg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Data: BEIR folders with fit / validation / report splits, and the mined training file.


def _read_qrels(path):
    """{query id: [(doc id, score), ...]} of a BEIR qrels file (checked line by line)."""
    from pegjax.data.retrieval import read_qrels_tsv

    rows = {}
    for query_id, doc_id, score in read_qrels_tsv(str(path)):
        rows.setdefault(query_id, []).append((doc_id, score))
    return rows


def _write_qrels(path, qrels, query_ids):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for query_id in query_ids:
            for doc_id, score in qrels[query_id]:
                f.write(f"{query_id}\t{doc_id}\t{score}\n")


def _link(source, target):
    if not os.path.exists(target):
        os.symlink(os.path.abspath(source), target)


def prepare(task: Task, data_root: str) -> dict:
    """Writes the task's BEIR folders and mined training file once; returns their paths."""
    folder = os.path.join(data_root, task.name)
    paths = {"folder": folder, "train": os.path.join(folder, "mined_train.jsonl")}
    source = SHARED_DATA / task.source
    if task.overrides["model.path"]:
        model_path(task.overrides["model.path"], check=True)
    os.makedirs(os.path.join(folder, "qrels"), exist_ok=True)
    _link(source / "corpus.jsonl", os.path.join(folder, "corpus.jsonl"))
    _link(source / "queries.jsonl", os.path.join(folder, "queries.jsonl"))
    train = _read_qrels(source / "qrels" / "train.tsv")
    ids = sorted(train)
    np.random.default_rng(SEED_OF_SPLIT).shuffle(ids)
    if task.source == "scifact":
        validation, fit = ids[:100], ids[100:]
        shutil.copyfile(source / "qrels" / "test.tsv", os.path.join(folder, "qrels", "test.tsv"))
        _write_qrels(os.path.join(folder, "qrels", "fit.tsv"), train, sorted(fit))
        # Validation ranks over its positives plus 1,000 other abstracts (a fifth of the cost of
        # the full corpus, evaluated several times a run); test uses the whole corpus.
        paths["validation"] = _sampled_corpus_folder(folder, source, train, sorted(validation), 1000)
        paths["report"] = f"{folder}:test"
    else:
        heldout, validation, fit = ids[:500], ids[500:1000], ids[1000:]
        _write_qrels(os.path.join(folder, "qrels", "fit.tsv"), train, sorted(fit))
        _write_qrels(os.path.join(folder, "qrels", "heldout.tsv"), train, sorted(heldout))
        if task.overrides["model.path"]:  # a 12-layer model: validation over a sample, as SciFact's
            paths["validation"] = _sampled_corpus_folder(folder, source, train, sorted(validation), 1000)
        else:
            _write_qrels(os.path.join(folder, "qrels", "validation.tsv"), train, sorted(validation))
            paths["validation"] = f"{folder}:validation"
        paths["report"] = f"{folder}:heldout"
    if not os.path.isfile(paths["train"]):
        _mine(task, folder, paths["train"])
    audit = os.path.join(folder, "false_negatives.json")
    if not os.path.isfile(audit):
        with open(audit, "w", encoding="utf-8") as f:
            json.dump(audit_mined(paths["train"], source), f, indent=2)
    return paths


def _bigrams(text: str) -> set:
    return {text[i:i + 2] for i in range(len(text) - 1)}


def audit_mined(mined_path: str, source) -> dict:
    """How many mined negatives are likely right answers: the labelled answer of another train
    question, and of those, how many belong to a question that asks nearly the same (character
    bigram Jaccard >= 0.5 between the two questions' titles, or their texts where there is no
    title). The labels hold one answer per question, so these are false negatives the mining could
    not see."""
    from pegjax.data.retrieval import load_beir

    data = load_beir(str(source), "train")
    titles = {}
    with open(source / "queries.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                titles[row["_id"]] = (row.get("metadata") or {}).get("title") or row["text"]
    doc_text = dict(zip(data.corpus_ids, data.corpus_texts))
    asked_by = {}  # answer text -> the train questions it is labelled for
    for query_id, labelled in data.qrels.items():
        for doc_id, relevance in labelled.items():
            if relevance > 0:
                asked_by.setdefault(doc_text[doc_id], []).append(query_id)
    id_of = dict(zip(data.query_texts, data.query_ids))
    queries = {q: (None, titles.get(q, text)) for q, text in zip(data.query_ids, data.query_texts)}
    negatives = labelled = near = queries_with_near = 0
    with open(mined_path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    for record in records:
        own = id_of.get(record["query"])
        own_title = _bigrams(queries[own][1]) if own else set()
        found = False
        for text in record["neg"]:
            negatives += 1
            others = [q for q in asked_by.get(text, []) if q != own]
            if not others:
                continue
            labelled += 1
            similar = max(len(own_title & _bigrams(queries[q][1])) / max(len(own_title | _bigrams(queries[q][1])), 1)
                          for q in others)
            if similar >= 0.5:
                near += 1
                found = True
        queries_with_near += found
    return {"queries": len(records), "negatives": negatives, "labelled_for_another_question": labelled,
            "of_a_near_duplicate_question": near, "queries_with_one": queries_with_near}


def _sampled_corpus_folder(folder, source, qrels, query_ids, others):
    target = folder + "_validation"
    os.makedirs(os.path.join(target, "qrels"), exist_ok=True)
    _link(source / "queries.jsonl", os.path.join(target, "queries.jsonl"))
    _write_qrels(os.path.join(target, "qrels", "validation.tsv"), qrels, query_ids)
    keep = {doc_id for q in query_ids for doc_id, _ in qrels[q]}
    with open(source / "corpus.jsonl", encoding="utf-8") as f:
        rows = [line if line.endswith("\n") else line + "\n" for line in f if line.strip()]
    kept = [json.loads(line)["_id"] in keep for line in rows]
    rest = [i for i, is_kept in enumerate(kept) if not is_kept]
    chosen = set(np.random.default_rng(SEED_OF_SPLIT).choice(rest, others, replace=False).tolist())
    with open(os.path.join(target, "corpus.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(line for i, line in enumerate(rows) if kept[i] or i in chosen)
    return f"{target}:validation"


def starting_encoder(task: Task):
    """The task's pretrained starting model, with its prompts, at the task's passage length."""
    from pegjax.encode import Encoder

    encoder = Encoder.from_pretrained(model_path(task.overrides["model.path"]), max_length=task.overrides["data.passage_length"])
    for role, key in (("query", "data.query_prompt"), ("document", "data.passage_prompt")):
        if task.overrides.get(key):
            encoder.prompts[role] = task.overrides[key]
    return encoder


def _mine(task: Task, folder: str, out: str) -> None:
    """``task.mined`` hard negatives per fit query: dense with the starting model (none scoring
    above the positive), or BM25 for a model that starts from random weights and cannot rank yet."""
    from pegjax import mine

    data = mine.from_beir(folder, "fit")
    config = mine.MiningConfig(negatives=task.mined, seed=0)
    if task.overrides["model.path"]:
        records, summary = mine.mine(data, config, starting_encoder(task))
    else:
        # BM25 scores say nothing about relevance beyond the ranking: keep the rank window only.
        config = dataclasses.replace(config, drop_above_positive=False)
        records, summary = mine.mine(data, config, candidates="bm25")
    mine.write(records, summary, out)
    print(f"{task.name}: mined {len(records)} queries -> {out}: {json.dumps(summary)}", flush=True)


# ---------------------------------------------------------------------------------------------
# Runs.


@dataclasses.dataclass(frozen=True)
class Run:
    task: Task
    variant: str
    batch: int
    seed: int

    @property
    def name(self) -> str:
        suffix = "" if self.batch == self.task.batch else f"@{self.batch}"
        return f"{self.variant}{suffix}"

    @property
    def steps(self) -> int:
        return max(self.task.queries_seen // self.batch, 1)


def plan(tasks, seeds, groups, sweep=None) -> list[Run]:
    """Core variants first (all seeds), then the sweep (``sweep``: these batches instead of each
    task's), then the other schedules."""
    runs = []
    for group in groups:
        for seed in seeds:
            for name in tasks:
                task = TASKS[name]
                if group == "sweep":
                    runs += [Run(task, "peg", b, seed) for b in (sweep or task.sweep) if b != task.batch]
                else:
                    runs += [Run(task, v, task.batch, seed) for v in GROUPS[group]]
    return runs


def config_of(run: Run, paths: dict):
    import ml_collections

    c = _load_recipe().base_config()
    for key, value in run.task.overrides.items():
        if key == "optimizer.learning_rate":
            continue  # set below, its warmup in steps
        section, _, field = key.rpartition(".")
        node = c
        for part in section.split("."):
            node = node[part]
        if key == "model.path" and value:
            value = value if value == "minilm" else model_path(value)  # pegjax resolves "minilm" itself
        node[field] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    if not run.task.overrides["model.path"]:
        c.model.random_init.vocab_file = str(SHARED_DATA / "vocab" / "bert-base-chinese-vocab.txt")
    with_hard, beta, gamma = VARIANTS[run.variant]
    steps = run.steps
    learning_rate = dict(run.task.overrides["optimizer.learning_rate"])
    learning_rate["warmup_steps"] = max(int(round(learning_rate.pop("warmup_fraction") * steps)), 1)
    c.optimizer.learning_rate = ml_collections.ConfigDict(learning_rate)
    c.seed = run.seed
    c.data.train_files = paths["train"]
    c.data.cache_dir = os.path.join(os.path.dirname(paths["train"]), "cache")
    c.data.hard_negatives = run.task.hard_negatives if with_hard else 0
    c.train.queries_per_step = run.batch
    c.train.steps = steps
    c.train.encode_chunk = 32
    c.train.log_steps = 1
    c.train.checkpoint_steps = steps
    c.train.keep_checkpoints = 1
    c.train.async_checkpoints = False
    c.train.export = False
    c.loss.query_block = min(16, run.batch)
    c.progressive.beta = ml_collections.ConfigDict(dict(beta, steps=steps, shape="linear"))
    c.progressive.gamma = ml_collections.ConfigDict(dict(gamma, steps=steps, shape="linear"))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    every = max(run.task.eval_every_queries // run.batch, 1)
    c.evals = ml_collections.ConfigDict({
        "validation": dict(task=paths["validation"], log_steps=every, k=[10, 100], batch_size=64),
        run.task.report_split: dict(task=paths["report"], log_steps=0, k=[10, 100], batch_size=64),
    })
    c.lock()
    return c


def execute(run: Run, paths: dict, out: str) -> dict:
    """Trains one run (unless its report exists) and returns its report."""
    from pegjax import train

    workdir = os.path.join(out, "runs", run.task.name, run.name, f"seed{run.seed}")
    report_path = os.path.join(workdir, "report.json")
    if os.path.isfile(report_path):
        with open(report_path, encoding="utf-8") as f:
            return json.load(f)
    shutil.rmtree(workdir, ignore_errors=True)  # a run cut short starts over: its curve stays whole
    config = config_of(run, paths)
    begin = time.perf_counter()
    report = train.train_and_evaluate(config, workdir)
    if "preempted_at" in report:  # SIGTERM: not a finished run; the study stops, a rerun resumes
        raise SystemExit(f"{workdir}: stopped by SIGTERM at step {report['preempted_at']}; run the same command to resume")
    report["wall_seconds"] = round(time.perf_counter() - begin, 1)
    with open(report_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    for bulky in ("checkpoints", "embedding_cache"):  # the study keeps metrics and reports only
        shutil.rmtree(os.path.join(workdir, bulky), ignore_errors=True)
    return report


def starting_point(task: Task, paths: dict, out: str) -> dict:
    """Validation and report metrics of the starting model (pretrained tasks only; shared by all runs)."""
    path = os.path.join(out, "runs", task.name, "start.json")
    if not task.overrides["model.path"]:
        return {}  # a random init: nothing to compare against
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    from pegjax import evaluate

    encoder = starting_encoder(task)
    results = {}
    for name, spec in (("validation", paths["validation"]), (task.report_split, paths["report"])):
        report = evaluate.evaluate_tasks(encoder, [spec], k_values=(10, 100), batch_size=64)
        results.update({f"{name}/{k}": v for k, v in next(iter(report["tasks"].values()))["metrics"].items()})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "runs" / "quality"), help="Run folders and prepared data.")
    parser.add_argument("--tasks", default="scifact,medical_zh_e5,medical_zh")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--groups", default="core,sweep,schedules")
    parser.add_argument("--sweep", default="", help="Batches (queries a step) of the sweep, e.g. 16,171; default: each task's.")
    parser.add_argument("--report_only", action="store_true", help="Only write the tables and plots.")
    parser.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"), help="Page whose quality section is rewritten.")
    parser.add_argument("--plots", default=str(REPO / "bench" / "quality"), help="Folder of the PNG plots.")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.WARNING)
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(args.out, "jax_cache"))  # same shapes, other seeds
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    tasks = [t for t in args.tasks.split(",") if t]
    for name in tasks:
        if name not in TASKS:
            raise SystemExit(f"--tasks: unknown task {name!r}; known: {', '.join(TASKS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    groups = [g for g in args.groups.split(",") if g]
    for group in groups:
        if group not in (*GROUPS, "sweep"):
            raise SystemExit(f"--groups: unknown group {group!r}; known: core, sweep, schedules")
    begin = time.perf_counter()
    paths = {name: prepare(TASKS[name], os.path.join(args.out, "data")) for name in tasks}
    if not args.report_only:
        for name in tasks:
            starting_point(TASKS[name], paths[name], args.out)
        runs = plan(tasks, seeds, groups, [int(b) for b in args.sweep.split(",") if b])
        for i, run in enumerate(runs):
            report = execute(run, paths[run.task.name], args.out)
            after = report.get("after", {})
            shown = {k: round(v, 4) for k, v in after.items() if k.endswith("ndcg@10")}
            print(f"[{i + 1}/{len(runs)}] {run.task.name} {run.name} seed {run.seed}: {shown} "
                  f"({report.get('wall_seconds', 'done before')} s)", flush=True)
    from bench import quality_report

    quality_report.write(args.out, [TASKS[name] for name in tasks], args.results, args.plots)
    print(f"quality study: {time.perf_counter() - begin:.0f} s; tables in {args.results}, plots in {args.plots}")


if __name__ == "__main__":
    main()
