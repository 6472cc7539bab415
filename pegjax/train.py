"""The training loop: ``train_and_evaluate(config, workdir)``.

Builds the model (a Hugging Face folder or a random init), the data pipeline, the mesh and the
jitted step; resumes from the workdir's last checkpoint if there is one; then steps, logging every
``train.log_steps`` (TensorBoard, ``metrics.jsonl``, a progress bar), checkpointing every
``train.checkpoint_steps`` and on SIGTERM, running ``config.evals`` at their cadence, and at the
end writes a checkpoint, an exported model folder and ``report.json``. Only this file knows about
time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time

import jax
from flax import linen as nn
import numpy as np

from pegjax import distributed, evaluate, export, geometry, mine, sharding
from pegjax.checkpoint import Checkpoints
from pegjax.data import training
from pegjax.data.packing import RowGeometry, chunked_rows
from pegjax.encode import Encoder, encode_dtype
from pegjax.errors import ConfigError
from pegjax.loss import LossConfig
from pegjax.metric_log import MetricLog
from pegjax.models.build import architecture, build_model, check_attention, compute_dtype, embedding_model
from pegjax.step import (BATCH_KEYS, StepConfig, abstract_batch, batch_shardings, create_state, jit_train_step,
                         abstract_params, frozen_of, optimizer_and_schedules, state_layout, unmatched_frozen)


def check(config, need_data: bool = True) -> None:
    """Fails before any work on a config that cannot run (see also `plan`)."""
    if (need_data and not config.data.train_files and not config.data.get("mine_from") and not config.data.sources
            and not config.data.tfds_dir):
        raise ConfigError("config.data.train_files is empty: set it to your FlagEmbedding JSONL, e.g. "
                          "--config.data.train_files=/path/train.jsonl")
    if not config.model.path and not config.model.random_init.vocab_file:
        raise ConfigError("set config.model.path (a Hugging Face BERT / RoBERTa / XLM-R folder) or, for a random init, "
                          "config.model.random_init.vocab_file")
    for path in filter(None, config.data.train_files.split(",")):
        if not os.path.isfile(path):
            raise ConfigError(f"config.data.train_files: {path} does not exist")
    compute_dtype(config)
    check_attention(config)
    if config.train.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"config.train.on_nonfinite={config.train.on_nonfinite!r}: use 'stop' or 'skip'")
    if need_data:
        training.sources_of(config, [] if config.data.get("mine_from") else None)
    if config.data.get("mine_from"):
        mining_config_of(config)  # a bad rank window fails now, not after the model is loaded
    if config.loss.teacher_weight < 0 or config.loss.teacher_temperature <= 0:
        raise ConfigError(f"config.loss.teacher_weight={config.loss.teacher_weight} / teacher_temperature="
                          f"{config.loss.teacher_temperature}: the weight must be >= 0 and the temperature > 0")


def plan(config, need_data: bool = True) -> geometry.Geometry:
    """The run's geometry on this job's devices (`pegjax.geometry`); fails, naming the key, when it
    cannot be laid out or (where the device reports its memory) does not fit."""
    check(config, need_data)
    planned = geometry.plan(config, jax.device_count(), jax.process_count(), architecture(config))
    available = config.train.device_memory_gib * geometry.GIB or (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    geometry.check_memory(planned, int(available) if available else None)
    return planned


class _Preemption:
    """SIGTERM sets a flag; at the next step boundary every process learns whether any process got
    one (`distributed.any_process`), and all of them save the same step and exit cleanly. A second
    SIGTERM ends the process at once: a run stuck before a step boundary stays stoppable."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting "
                        "(a second SIGTERM exits at once)")
        self.requested = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def loss_config_of(config) -> LossConfig:
    return LossConfig(
        group_size=1 + config.data.hard_negatives, temperature=config.loss.temperature,
        query_block=config.loss.query_block, query_negatives=config.loss.query_negatives,
        margin=config.loss.margin if config.loss.margin >= 0 else None, query_weight=config.progressive.query_weight,
        teacher_weight=config.loss.teacher_weight, teacher_temperature=config.loss.teacher_temperature,
    )


def dry_run(config, planned: geometry.Geometry):
    """Lowers the step of ``config`` on this job's mesh without data or weights (one text a row,
    the layout that needs the most rows) -> the ``jax.stages.Lowered`` step."""
    model = embedding_model(config, architecture(config))
    mesh = sharding.make_mesh(config.mesh)
    tx, knobs = optimizer_and_schedules(config)
    abstract, state_sharding = state_layout(model, tx, mesh)
    rows = {kind: RowGeometry(texts, chunked_rows(texts, config.train.encode_chunk)[0], length, 1, config.train.encode_chunk)
            for kind, texts, length in (("query", planned.queries_per_shard, config.data.query_length),
                                        ("passage", planned.passages_per_shard, config.data.passage_length))}
    step_config = StepConfig(model, loss_config_of(config), encode_chunk=config.train.encode_chunk, dropout=config.model.dropout,
                             keep_dense_outputs=config.train.keep_dense_outputs)
    batch = abstract_batch(mesh, rows["query"], rows["passage"], planned.group, max(config.data.max_extra_positives, 1))
    return jit_train_step(step_config, tx, knobs, mesh, state_sharding).lower(abstract, batch)


def train_and_evaluate(config, workdir: str) -> dict:
    planned = plan(config)
    workdir = os.path.abspath(workdir)  # Orbax writes only to absolute paths
    os.makedirs(workdir, exist_ok=True)
    lead = jax.process_index() == 0
    if lead:
        logging.info("geometry of the run:\n%s", geometry.table(planned))
    mesh = sharding.make_mesh(config.mesh)
    model, params, tokenizer = build_model(config)
    unknown = unmatched_frozen(nn.unbox(abstract_params(model)), frozen_of(config))
    if unknown:
        raise ConfigError(f"config.model.frozen: {', '.join(unknown)} names no parameter of the model; use paths like "
                          "embeddings/word_embeddings (the layout is in pegjax/models/bert.py)")
    max_length = config.data.passage_length

    prompts = {"query": config.data.query_prompt, "document": config.data.passage_prompt}

    try:
        encoding_model = dataclasses.replace(model, dtype=encode_dtype(config.model.get("encode_dtype", ""), model.dtype))
    except ValueError as err:
        raise ConfigError(f"config.model.encode_dtype: {err}") from None

    def encoder_of(params_now):
        return Encoder(encoding_model, params_now, tokenizer, max_length, prompts={k: v for k, v in prompts.items() if v})

    tx, knobs = optimizer_and_schedules(config)
    state, state_sharding = create_state(model, tx, mesh, config.seed, params)
    corpus_cache = os.path.join(workdir, "embedding_cache")
    train_files = [p for p in config.data.train_files.split(",") if p]
    if config.data.get("mine_from") and not train_files:
        # The starting model mines: the folder's weights, or the random init (gathered from the
        # devices by every process).
        starting = (lambda: params) if params is not None else (lambda: distributed.to_host(state.params))
        train_files = [_mine_training_data(config, lambda weights: encoder_of(weights), starting, workdir, corpus_cache)]

    sources = training.sources_of(config, train_files)

    def build():
        built = [training.open_source(source, config.data.cache_dir or os.path.join(workdir, "data_cache"),
                                      config.data.on_bad_line, min_negatives=min_negatives) for source in sources]
        return [files for files, _ in built], [stats for _, stats in built]

    min_negatives = config.data.hard_negatives if config.data.too_few_negatives == "error" else 0
    if lead:  # process 0 builds the cache, the others then find it
        record_files, per_source = build()
    distributed.barrier("training_data_cache")
    if not lead:
        record_files, per_source = build()
    stats = _merged(per_source)
    for source, counts in zip(sources, per_source):
        logging.info("training data %s (weight %g): %d records from %d lines; skipped: %s", source.name, source.weight,
                     counts["records"], counts["lines"], counts["skipped"] or "none")
    if stats["skipped"]:
        print(f"skipped {sum(stats['skipped'].values())} bad line(s): {stats['skipped']}")
    if stats.get("most_positives", 0) > config.data.max_extra_positives + 1:
        logging.warning("a line has %d positives; only %d besides the one drawn are masked as false negatives: raise "
                        "config.data.max_extra_positives", stats["most_positives"], config.data.max_extra_positives)
    dataset = training.pipeline(record_files, tokenizer, config, config.seed, jax.process_index(), jax.process_count(),
                                global_rows=planned.padded_queries, sources=sources)
    iterator = iter(dataset)

    steps = config.train.steps
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints, config.train.best_metric,
                              async_save=config.train.async_checkpoints)
    start = checkpoints.latest_step()
    if start is not None:
        abstract, _ = state_layout(model, tx, mesh)
        state, data_state = checkpoints.restore(start, abstract)
        iterator.set_state(data_state)
        logging.info("resumed from %s at step %d", workdir, start)
    start = int(start or 0)

    shards = sharding.batch_shards(mesh)
    geometries = training.row_geometries(record_files, tokenizer, config, planned.queries_per_shard, sources,
                                         model=model.config)
    for kind, rows in geometries.items():
        logging.info("%s rows per batch shard: %s", kind, rows)
    step_config = StepConfig(model, loss_config_of(config), encode_chunk=config.train.encode_chunk, dropout=config.model.dropout,
                             frozen=frozen_of(config), query_slots=geometries["query"].slots, passage_slots=geometries["passage"].slots,
                             query_chunk=geometries["query"].max_chunk, passage_chunk=geometries["passage"].max_chunk,
                             keep_dense_outputs=config.train.keep_dense_outputs)
    step_fn = jit_train_step(step_config, tx, knobs, mesh, state_sharding)
    shardings = batch_shardings(mesh)
    log = MetricLog(workdir, enabled=lead)
    preemption = _Preemption()
    config_json = json.loads(config.to_json_best_effort())
    evals = {name: dict(spec) for name, spec in config.evals.items()}

    def run_evals(at_step, final=False):
        # Parameters leave the devices only when an eval is due at this step.
        if not evaluate.due(evals, at_step, final):
            return {}
        # Only the starting model's corpus embeddings are worth keeping (mining shares them); a
        # cache of every later eval's would grow without bound and never be read again.
        results = evaluate.run_evals(encoder_of(distributed.to_host(state.params)), evals, at_step, final=final,
                                     data_dir=config.eval_data_dir or None,
                                     corpus_cache_dir=corpus_cache if at_step == 0 else None)
        flat = {f"{name}/{metric}": value for name, values in results.items() for metric, value in values.items()}
        if flat:
            log.write(at_step, flat)
            logging.info("step %d evals: %s", at_step, flat)
        return flat

    report = {"start_step": start, "encode_dtype": encoding_model.dtype}
    if config.eval_at_start and start == 0:
        report["before"] = run_evals(0, final=True)

    progress = None
    if lead:
        from tqdm.auto import tqdm

        progress = tqdm(total=steps, initial=start, desc="train", unit="step")
    window = _MetricWindow(config.train.queries_per_step, config.train.on_nonfinite, [s.name for s in sources])
    local_shards = shards // jax.process_count()
    pad_id = tokenizer.pad_token_id or 0
    spills = {kind: 0 for kind in geometries}
    owed = None  # a log line is owed for the window that ended at this step
    begin = time.perf_counter()

    def write_log(upto):
        values = window.close(upto)
        log.write(upto, values)
        if progress:
            progress.set_postfix(loss=f"{values['loss']:.4f}", beta=f"{values['beta']:.2f}", gamma=f"{values['gamma']:.2f}")

    def agree(spilled):
        # One exchange per step: the packing spills and whether any process got a SIGTERM.
        return distributed.any_process(dict(spilled, stop=preemption.requested))

    step = start
    try:
        for step in range(start + 1, steps + 1):
            data_state = iterator.get_state()  # before this step's batch: where a stop resumes
            texts = training.flatten_groups(next(iterator))
            filled = int(texts.pop("filled_negatives").sum())
            window.count_sources(texts.pop("source_index"))
            local, flags = training.pack_for_step(texts, local_shards, geometries, pad_id, agree=agree)
            if flags.pop("stop"):
                # Every process stops here: the state after step - 1, the data before step.
                if window.pending:
                    write_log(step - 1)
                if checkpoints.latest_step() != step - 1:
                    checkpoints.save(step - 1, state, data_state, config_json, None, force=True)
                checkpoints.close()
                logging.warning("stopped at step %d after SIGTERM; the same command resumes", step - 1)
                report["preempted_at"] = step - 1
                return report
            window.filled += filled
            for kind in (k for k, v in flags.items() if v):
                spills[kind] += 1
                logging.warning("step %d: the %s texts did not fit %d packed rows per shard; this step lays them "
                                "out one a row (%d so far)", step, kind, geometries[kind].rows, spills[kind])
            batch = {k: jax.make_array_from_process_local_data(shardings[k], local[k]) for k in BATCH_KEYS}
            state, metrics = step_fn(state, batch)
            window.add(step, metrics)  # its host copy starts behind the step
            if owed is not None:
                # The previous step closed a log window; read it now that this step is queued, so
                # the device never waits for the host.
                write_log(owed)
                owed = None
            if progress:
                progress.update(1)
            if step % config.train.log_steps == 0 or step == steps:
                owed = step
            eval_due = step < steps and evaluate.due(evals, step)
            checkpoint_due = step % config.train.checkpoint_steps == 0 and step < steps
            if owed is not None and (eval_due or step == steps):
                write_log(owed)
                owed = None
            eval_metrics = run_evals(step) if eval_due else {}
            if checkpoint_due:
                checkpoints.save(step, state, iterator.get_state(), config_json, eval_metrics or None)
    finally:
        if progress:
            progress.close()
    train_seconds = time.perf_counter() - begin
    final = run_evals(steps, final=True)
    if checkpoints.latest_step() != steps:
        checkpoints.save(steps, state, iterator.get_state(), config_json, final or None, force=True)
    checkpoints.close()
    log.close()
    report.update(after=final, steps=steps, train_seconds=round(train_seconds, 1), data=stats,
                  filled_negatives=window.filled, unpacked_steps=spills, source_queries=window.source_counts())
    final_params = distributed.to_host(state.params) if config.train.export else None  # every process takes part
    if config.train.export and lead:
        export_dir = os.path.join(workdir, "export")
        export.save(encoder_of(final_params), export_dir, training=config_json, results=_nest(final))
        report["export"] = export_dir
    if lead:
        with open(os.path.join(workdir, "report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return report


def _merged(per_source: list[dict]) -> dict:
    """The cache stats of every source added up (with the per-source stats under "sources")."""
    merged = {"lines": 0, "records": 0, "skipped": {}, "most_positives": 0, "sources": per_source}
    for stats in per_source:
        merged["lines"] += stats["lines"]
        merged["records"] += stats["records"]
        merged["most_positives"] = max(merged["most_positives"], stats.get("most_positives", 0))
        for reason, count in stats["skipped"].items():
            merged["skipped"][reason] = merged["skipped"].get(reason, 0) + count
    return merged


def _nest(flat: dict) -> dict:
    nested = {}
    for key, value in flat.items():
        name, _, metric = key.partition("/")
        nested.setdefault(name, {})[metric] = value
    return nested


class _MetricWindow:
    """The steps since the last log line: their metrics are copied to the host behind the step
    (``copy_to_host_async``) and read only when the window closes."""

    def __init__(self, queries_per_step: int, on_nonfinite: str, source_names: list[str]):
        self.queries_per_step = queries_per_step
        self.on_nonfinite = on_nonfinite
        self.source_names = source_names
        self.sources = np.zeros(len(source_names), np.int64)  # real queries of this process, per source
        self.pending: list[tuple[int, dict]] = []
        self.filled = 0
        self.opened = time.perf_counter()

    def count_sources(self, source_index) -> None:
        index = np.asarray(source_index)
        self.sources += np.bincount(index[index >= 0], minlength=len(self.sources))

    def source_counts(self) -> dict:
        return {name: int(count) for name, count in zip(self.source_names, self.sources)}

    def add(self, step: int, metrics: dict) -> None:
        for value in metrics.values():
            value.copy_to_host_async()
        self.pending.append((step, metrics))

    def close(self, upto: int) -> dict:
        """Reads the window's steps up to ``upto``; stops at the first non-finite step unless
        skipping. Returns the last step's metrics with timings and counts."""
        closing = [(s, m) for s, m in self.pending if s <= upto]
        self.pending = [(s, m) for s, m in self.pending if s > upto]
        fetched = jax.device_get([m for _, m in closing])
        for (step, _), values in zip(closing, fetched):
            if values["nonfinite"] and self.on_nonfinite == "stop":
                raise FloatingPointError(
                    f"non-finite loss or gradient at step {step} (loss={float(values['loss'])}); the update was not "
                    "applied. Lower the learning rate, check the data, or set config.train.on_nonfinite=skip")
        now = time.perf_counter()
        elapsed, self.opened = now - self.opened, now
        count = len(closing)
        last = {k: float(v) for k, v in fetched[-1].items()}
        last.update(
            skipped_updates=float(sum(v["nonfinite"] for v in fetched)),
            step_time=elapsed / count,
            pairs_per_second=count * self.queries_per_step / elapsed,
            tokens_per_second=sum(v["real_tokens"] for v in fetched) / elapsed,  # real tokens, not padding
            filled_negatives=self.filled,
        )
        if len(self.source_names) > 1:  # this process's share of the batches, per source
            last.update({f"source_queries/{name}": float(n) for name, n in self.source_counts().items()})
        return last


def mining_config_of(config) -> mine.MiningConfig:
    """config.data.mine_* -> the miner's settings (errors name the key)."""
    ranks = config.data.get("mine_ranks", "10:100")
    try:
        start, end = (int(x) for x in ranks.split(":"))
        margin = config.data.get("mine_margin", -1.0)
        return mine.MiningConfig(negatives=config.data.mine_negatives or config.data.hard_negatives, rank_start=start,
                                 rank_end=end, relative_margin=margin if margin >= 0 else None, seed=config.seed)
    except ValueError as err:
        raise ConfigError(f"config.data.mine_ranks={ranks!r} / mine_negatives: {err} (mine_ranks is START:END, e.g. 10:100)") from None


def _mine_training_data(config, encoder_of, starting_params, workdir, cache_dir) -> str:
    """Mines hard negatives with the starting model (config.data.mine_from = BEIR folder:split).

    Process 0 mines, the others wait for it; the file is written atomically, so one that exists
    is complete (a run killed while mining mines again). ``starting_params()`` is called by every
    process (it may gather from the devices)."""
    folder, _, split = config.data.mine_from.rpartition(":")
    out = os.path.join(workdir, "mined_train.jsonl")
    if not os.path.isfile(out):
        weights = starting_params()
        if jax.process_index() == 0:
            data = mine.from_beir(folder, split)
            records, summary = mine.mine(data, mining_config_of(config), encoder_of(weights), cache_dir=cache_dir)
            mine.write(records, summary, out)
            logging.warning("mined hard negatives for %d queries into %s", len(records), out)
    distributed.barrier("mined_training_data")
    return out
