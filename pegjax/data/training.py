"""Training data: FlagEmbedding JSONL -> checked records in an ArrayRecord cache -> grain batches.

Input: one JSON object a line, ``{"query": str, "pos": [str, ...], "neg": [str, ...]}`` with
optional ``prompt`` (prepended to the query; lines without one get the source's query prompt), and
``pos_scores`` / ``neg_scores`` (one number per positive / negative: a teacher's scores, written by
``pegjax.mine`` or any reranker; used by the distillation term); one file or many, plain or ``.gz``. Every line is checked (valid UTF-8, valid JSON, non-empty
query, non-empty list of non-empty positive strings, negatives strings). A bad line is an error
naming file and line, or with ``on_bad_line="skip"`` it is left out and counted by reason; the
counts are reported and stored with the cache.

Checked records are written once, streaming (memory does not grow with the input), as a TFDS
dataset (`pegjax.data.tfds_format`: ArrayRecord shards of serialized examples, ``features.json``,
``dataset_info.json``) in a cache folder keyed by the input's content; a second run reads the
cache, and ``config.data.tfds_dir`` reads a prepared one in place of the JSONL. The grain pipeline then: shuffles with a seed (a fresh order each
epoch), gives each process its share, and per example and epoch picks a positive and H hard
negatives with a seeded generator, tokenizes to fixed shapes, and hashes texts for false-negative
masking. Its iterator state is saved in checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import sys
from typing import Iterator

import numpy as np

from pegjax.data.jsonl import DataError, decode_object, lines
from pegjax.data import tfds_format
from pegjax.data.packing import DoesNotFit, RowGeometry, attention_length, chunked_rows, estimate_geometry, pack_shards

FORMAT_VERSION = "6"


def text_hash(text: str) -> int:
    """A non-zero int32 hash of a text (0 means "unknown" to the loss)."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:4], "little") & 0x7FFFFFFF or 1


def _scores(item: dict, key: str, texts: list, where: str):
    scores = item.get(key)
    if scores is None:
        return None
    if (not isinstance(scores, list) or len(scores) != len(texts)
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in scores)):
        raise DataError(f"{where}: '{key}' must be a list of {len(texts)} finite numbers, one per "
                        f"'{key.split('_')[0]}' entry (bad_scores)")
    return [float(x) for x in scores]


def parse_line(raw: bytes, where: str) -> dict:
    """One input line -> {"query", "prompt", "pos", "neg", "pos_scores", "neg_scores", "source"};
    DataError naming ``where``."""
    item = decode_object(raw, where)
    query = item.get("query")
    if not isinstance(query, str) or not query.strip():
        raise DataError(f"{where}: 'query' must be a non-empty string (bad_query)")
    positives = item.get("pos")
    if not isinstance(positives, list) or not positives:
        raise DataError(f"{where}: 'pos' must be a non-empty list of strings (bad_pos)")
    if not all(isinstance(p, str) and p.strip() for p in positives):
        raise DataError(f"{where}: every 'pos' entry must be a non-empty string (bad_pos)")
    negatives = item.get("neg", [])
    if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
        raise DataError(f"{where}: 'neg' must be a list of non-empty strings (bad_neg)")
    prompt = item.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise DataError(f"{where}: 'prompt' must be a string (bad_prompt)")
    pos_scores, neg_scores = _scores(item, "pos_scores", positives, where), _scores(item, "neg_scores", negatives, where)
    if (pos_scores is None) != (neg_scores is None) and negatives:
        raise DataError(f"{where}: give both 'pos_scores' and 'neg_scores', or neither (bad_scores)")
    return {"query": query, "prompt": prompt, "pos": positives, "neg": negatives, "pos_scores": pos_scores,
            "neg_scores": neg_scores, "source": where}


def _checked(read, on_bad_line: str, stats: dict, min_negatives: int = 0) -> Iterator[dict]:
    """Checked records of (``file:line``, raw bytes) lines, in order; ``stats`` counts lines,
    records and skips. A line with fewer than ``min_negatives`` negatives is a bad line
    (too_few_negatives)."""
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f"config.data.on_bad_line={on_bad_line!r}: use 'error' or 'skip'")
    for where, raw in read:
        stats["lines"] += 1
        try:
            record = parse_line(raw, where)
            if len(record["neg"]) < min_negatives:
                raise DataError(
                    f"{where}: {len(record['neg'])} negatives, {min_negatives} needed (config.data.hard_negatives; "
                    "mine more with python -m pegjax.mine, or set config.data.too_few_negatives=fill) "
                    "(too_few_negatives)")
        except DataError as err:
            if on_bad_line == "error":
                raise DataError(f"{err} -- fix the line, or set config.data.on_bad_line=skip") from None
            reason = str(err).rsplit("(", 1)[-1].split(")")[0]
            stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1
            continue
        stats["records"] += 1
        stats["most_positives"] = max(stats.get("most_positives", 0), len(record["pos"]))
        yield record


def build_cache(paths: list[str], cache_dir: str, on_bad_line: str, min_negatives: int = 0,
                part_lines: int = 1_000_000) -> tuple[list[str], dict]:
    """Writes (once) the checked records as ArrayRecord parts -> (record files, stats).

    ``min_negatives``: lines with fewer negatives are bad lines (an error naming file:line, or
    skipped and counted): config.data.hard_negatives under too_few_negatives=error, else 0.

    The cache is built in parts of ``part_lines`` input lines, each renamed into place when
    complete, in a ``.building`` folder that becomes the cache only once every part is there. A
    build that is killed resumes at its first unfinished part (the lines before it are read, not
    parsed again); a partial cache is never taken for a complete one. Memory does not grow with
    the input.
    """
    digest = hashlib.sha1(f"{FORMAT_VERSION}:{on_bad_line}:{min_negatives}:{part_lines}".encode())
    for path in paths:
        digest.update(path.encode() + b"\0")
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except FileNotFoundError:
            raise DataError(f"{path}: no such training file (config.data.train_files)") from None
    name = tfds_format.dataset_name(digest.hexdigest()[:24])
    folder = os.path.join(cache_dir, name, tfds_format.VERSION)
    stats_path = os.path.join(folder, "stats.json")
    if os.path.isfile(stats_path):
        with open(stats_path, encoding="utf-8") as f:
            stats = json.load(f)
        return [os.path.join(folder, part) for part in stats["parts"]], stats
    building = os.path.join(cache_dir, name + ".building")
    os.makedirs(building, exist_ok=True)
    parts = []
    read = ((where, raw) for path in paths for where, raw in lines(path))
    for number in itertools.count():
        done = os.path.join(building, f"part-{number:05d}.json")
        if os.path.isfile(done):  # finished by an earlier run: skip its lines unparsed
            with open(done, encoding="utf-8") as f:
                part = json.load(f)
            if sum(1 for _ in itertools.islice(read, part["lines"])) != part["lines"]:
                raise DataError(f"{building}: part {number} covers more lines than the input has; delete the folder")
        else:
            first = next(read, None)
            if first is None:
                break
            lines_of_part = itertools.chain([first], itertools.islice(read, part_lines - 1))
            part = _write_part(lines_of_part, building, number, paths, on_bad_line, min_negatives)
        parts.append(part)
        if part["lines"] < part_lines:
            break
    written = [p for p in parts if p["records"]]
    stats = {"lines": sum(p["lines"] for p in parts), "records": sum(p["records"] for p in parts), "skipped": {},
             "files": paths, "most_positives": max((p["most_positives"] for p in parts), default=0),
             "parts": [tfds_format.shard_name(name, i, len(written)) for i in range(len(written))]}
    for part in parts:
        for reason, count in part["skipped"].items():
            stats["skipped"][reason] = stats["skipped"].get(reason, 0) + count
    if stats["records"] == 0:
        shutil.rmtree(building, ignore_errors=True)
        raise DataError(f"{', '.join(paths)}: no usable training line ({stats['lines']} lines read)")
    for part, shard in zip(written, stats["parts"]):  # the TFDS dataset's shards, in order
        if os.path.isfile(os.path.join(building, part["file"])):
            os.replace(os.path.join(building, part["file"]), os.path.join(building, shard))
    tfds_format.write_metadata(building, name, [p["records"] for p in written],
                               f"pegjax training records of {', '.join(paths)}")
    _write_json(os.path.join(building, "stats.json"), stats)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    try:
        os.replace(building, folder)  # only now is it a cache
    except OSError:  # another process finished the same cache first: theirs is identical
        if not os.path.isfile(stats_path):
            raise
    return [os.path.join(folder, name) for name in stats["parts"]], stats


def _write_part(read, building: str, number: int, paths, on_bad_line: str, min_negatives: int) -> dict:
    """Checks and writes one part's lines; its stats file, written last, marks it complete."""
    from array_record.python.array_record_module import ArrayRecordWriter

    name = f"part-{number:05d}.array_record"
    stats = {"lines": 0, "records": 0, "skipped": {}, "most_positives": 0, "file": name}
    partial = os.path.join(building, f"{name}.partial-{os.getpid()}")
    writer = ArrayRecordWriter(partial, "group_size:1")
    codec = tfds_format.Codec()
    try:
        for record in _checked(read, on_bad_line, stats, min_negatives):
            writer.write(codec.encode(record))
    finally:
        writer.close()
    if stats["records"]:
        os.replace(partial, os.path.join(building, name))
    else:
        os.remove(partial)
    _write_json(os.path.join(building, f"part-{number:05d}.json"), stats)
    return stats


def _write_json(path: str, value) -> None:
    partial = f"{path}.partial-{os.getpid()}"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
    os.replace(partial, path)


class ExampleMaker:
    """Record + rng -> fixed-shape arrays of one query and its G = 1 + H passages."""

    def __init__(self, tokenizer, source, hard_negatives: int, query_length: int, passage_length: int,
                 max_extra_positives: int, too_few_negatives: str, query_prompt: str = "", passage_prompt: str = "",
                 source_index: int = 0, teacher: bool = False):
        if too_few_negatives not in ("error", "fill"):
            raise ValueError(f"config.data.too_few_negatives={too_few_negatives!r}: use 'error' or 'fill'")
        self.tokenizer = tokenizer
        self.source = source
        self.hard = hard_negatives
        self.query_length = query_length
        self.passage_length = passage_length
        self.extra = max_extra_positives
        self.too_few = too_few_negatives
        self.query_prompt = query_prompt
        self.passage_prompt = passage_prompt
        self.source_index = source_index
        self.teacher = teacher  # teacher scores are required (the distillation term is on)
        self.codec = tfds_format.Codec()

    def _ids(self, query: str, passages: list[str]):
        """(query ids [1, Lq], mask, passage ids [G, Lp], mask) from one tokenizer call: each call
        costs ~100 us besides its texts, a third of the paper recipe's tokenizing."""
        from pegjax.data.tokenizer import pad_batch, truncate

        lengths = self.query_length, self.passage_length
        ids = self.tokenizer.encode([query, *passages])
        pad = self.tokenizer.pad_token_id or 0
        return (*pad_batch([truncate(ids[0], lengths[0])], lengths[0], 1, pad),
                *pad_batch([truncate(i, lengths[1]) for i in ids[1:]], lengths[1], len(passages), pad))

    def __call__(self, raw: bytes, rng: np.random.Generator) -> dict:
        record = self.codec.decode(raw)
        positives = record["pos"]
        drawn = int(rng.integers(len(positives)))
        positive = positives[drawn]
        negatives = record["neg"]
        filled = 0
        if self.teacher and (record.get("pos_scores") is None or len(negatives) < self.hard):
            raise DataError(
                f"{record['source']}: config.loss.teacher_weight > 0 needs 'pos_scores' / 'neg_scores' and "
                f"{self.hard} scored negatives on every line: score the lines (python -m pegjax.mine writes them) "
                "or set config.loss.teacher_weight=0")
        teacher_scores = np.zeros(1 + self.hard, np.float32)
        if len(negatives) >= self.hard:
            picks = rng.choice(len(negatives), self.hard, replace=False)
            chosen = [negatives[i] for i in picks]
            if record.get("pos_scores") is not None:
                teacher_scores[:] = [record["pos_scores"][drawn]] + [record["neg_scores"][i] for i in picks]
        elif self.too_few == "error":
            raise DataError(
                f"{record['source']}: {len(negatives)} negatives, {self.hard} needed (config.data.hard_negatives): "
                "mine more (python -m pegjax.mine) or set config.data.too_few_negatives=fill"
            )
        else:
            chosen = list(negatives)
            own = {text_hash(p) for p in positives}
            # Bounded: a file where no other record has a positive of its own must fail, not spin.
            for _ in range(64 * self.hard):
                if len(chosen) == self.hard:
                    break
                other = self.codec.decode(self.source[int(rng.integers(len(self.source)))])
                candidate = other["pos"][0]
                if text_hash(candidate) not in own:
                    chosen.append(candidate)
                    filled += 1
            else:
                raise DataError(
                    f"{record['source']}: {len(negatives)} negatives, {self.hard} needed, and no other record offers a "
                    f"positive to fill with (config.data.too_few_negatives=fill, {len(self.source)} records): add "
                    "negatives (python -m pegjax.mine) or more records")
        passages = [positive] + chosen
        prompt = record["prompt"] if record["prompt"] is not None else self.query_prompt
        query = prompt + record["query"]
        query_ids, query_mask, passage_ids, passage_mask = self._ids(query, [self.passage_prompt + p for p in passages])
        extra = [text_hash(p) for p in positives if p != positive][: self.extra]
        return {
            "query_ids": query_ids[0],
            "query_mask": query_mask[0],
            "passage_ids": passage_ids,
            "passage_mask": passage_mask,
            "passage_hashes": np.array([text_hash(p) for p in passages], np.int32),
            "positive_hashes": np.array((extra + [0] * self.extra)[: self.extra] or [0], np.int32),
            "filled_negatives": np.int32(filled),
            "query_hashes": np.int32(text_hash(query)),
            "query_valid": np.int32(1),
            "teacher_scores": teacher_scores,
            "source_index": np.int32(self.source_index),
        }

    def padding(self) -> dict:
        """A padding row: no tokens, no hashes, not valid (invisible to the loss)."""
        group = 1 + self.hard
        return {
            "query_ids": np.zeros(self.query_length, np.int32),
            "query_mask": np.zeros(self.query_length, np.int32),
            "passage_ids": np.zeros((group, self.passage_length), np.int32),
            "passage_mask": np.zeros((group, self.passage_length), np.int32),
            "passage_hashes": np.zeros(group, np.int32),
            "positive_hashes": np.zeros(max(self.extra, 1), np.int32),
            "filled_negatives": np.int32(0),
            "query_hashes": np.int32(0),
            "query_valid": np.int32(0),
            "teacher_scores": np.zeros(group, np.float32),
            "source_index": np.int32(-1),
        }


@dataclasses.dataclass(frozen=True)
class Source:
    """One training source of a mixture (``config.data.sources``)."""

    name: str
    files: tuple[str, ...]
    weight: float = 1.0
    query_prompt: str = ""
    passage_prompt: str = ""
    tfds_dir: str = ""  # a TFDS dataset folder pegjax wrote (its cache), read in place of ``files``


_SOURCE_KEYS = ("files", "tfds_dir", "weight", "query_prompt", "passage_prompt")


def sources_of(config, train_files: list[str] | None = None) -> list[Source]:
    """The sources of a config: ``config.data.sources`` (name -> files, weight, prompts), or
    ``train_files`` (default: ``config.data.train_files``) as the one source "train". Prompts
    default to ``config.data.query_prompt`` / ``passage_prompt``. ConfigError naming the key."""
    from pegjax.errors import ConfigError

    data = config.data
    if data.tfds_dir and (data.train_files or data.get("mine_from") or data.sources):
        raise ConfigError("config.data.tfds_dir is set together with train_files / mine_from / sources: give one")
    if not data.sources:
        files = train_files if train_files is not None else [p for p in data.train_files.split(",") if p]
        return [Source("train", tuple(files), 1.0, data.query_prompt, data.passage_prompt, data.tfds_dir)]
    if data.train_files or data.get("mine_from"):
        raise ConfigError("config.data.sources is set together with config.data.train_files / mine_from: give the "
                          "files as one more source instead")
    sources = []
    for name, spec in data.sources.items():
        unknown = sorted(set(spec) - set(_SOURCE_KEYS))
        if unknown:
            raise ConfigError(f"config.data.sources.{name}: unknown key(s) {unknown}; a source has {list(_SOURCE_KEYS)}")
        files = tuple(p for p in str(spec.get("files", "")).split(",") if p)
        tfds_dir = str(spec.get("tfds_dir", ""))
        if not files and not tfds_dir:
            raise ConfigError(f"config.data.sources.{name}.files is empty: set it to the source's JSONL file(s) "
                              "(or tfds_dir to a prepared TFDS dataset)")
        for path in files:
            if not os.path.isfile(path):
                raise ConfigError(f"config.data.sources.{name}.files: {path} does not exist")
        weight = float(spec.get("weight", 1.0))
        if not weight > 0:
            raise ConfigError(f"config.data.sources.{name}.weight={weight}: a sampling weight must be > 0")
        sources.append(Source(name, files, weight, spec.get("query_prompt", data.query_prompt),
                              spec.get("passage_prompt", data.passage_prompt), tfds_dir))
    return sources


def open_source(source: Source, cache_dir: str, on_bad_line: str, min_negatives: int = 0) -> tuple[list[str], dict]:
    """(record files, stats) of a source: its TFDS dataset (``tfds_dir``), or the cache of its
    JSONL files (built once, `build_cache`)."""
    if not source.tfds_dir:
        return build_cache(list(source.files), cache_dir, on_bad_line, min_negatives)
    from etils import epath

    files = tfds_format.shard_paths(source.tfds_dir)
    stats_path = epath.Path(source.tfds_dir) / "stats.json"
    if stats_path.exists():
        return files, json.loads(stats_path.read_text())
    import grain

    records = len(grain.sources.ArrayRecordDataSource(files))
    return files, {"lines": records, "records": records, "skipped": {}, "most_positives": 0, "files": [source.tfds_dir]}


def homogeneous_schedule(weights, seed: int, length: int):
    """step -> (source, how many batches that source gave before): one source per global batch,
    drawn by weight with a seeded generator over a cycle of ``length`` steps that then repeats.
    Every process computes the same schedule."""
    weights = np.asarray(weights, np.float64)
    picks = np.random.default_rng([seed, 0x50C]).choice(len(weights), size=max(length, 1), p=weights / weights.sum())
    earlier = np.zeros(len(picks), np.int64)
    for k in range(len(weights)):
        chosen = picks == k
        earlier[chosen] = np.arange(chosen.sum())
    per_cycle = np.bincount(picks, minlength=len(weights))

    def at(step: int) -> tuple[int, int]:
        cycle, within = divmod(step, len(picks))
        source = int(picks[within])
        return source, int(cycle * per_cycle[source] + earlier[within])

    return at


def pipeline(record_files: list[str] | list[list[str]], tokenizer, config, seed: int, process_index: int = 0,
             process_count: int = 1, global_rows: int | None = None, sources: list[Source] | None = None):
    """A grain IterDataset of host-local batches (dict of numpy arrays, leading dim = this
    process's rows per step); its iterator state is checkpointable.

    ``record_files``: the cache files of the one source, or a list of them per source of
    ``sources`` (`sources_of`). Sources are mixed by weight row by row, or with
    ``config.data.homogeneous_batches`` every global batch comes from one source drawn by weight
    (`homogeneous_schedule`). ``global_rows`` (default: the queries per step) is the global
    batch's row count, at least ``config.train.queries_per_step`` real queries: the rows beyond
    them are padding (``query_valid`` 0), so that the batch splits over every device
    (`pegjax.geometry`).
    """
    import grain

    data = config.data
    queries = config.train.queries_per_step
    global_rows = global_rows or queries
    if global_rows % process_count or global_rows < queries:
        raise ValueError(f"{global_rows} rows per step (config.train.queries_per_step={queries}, padded) do not split "
                         f"over {process_count} processes")
    if sources is None:
        sources = sources_of(config, [])
        record_files = [record_files]
    teacher = config.loss.get("teacher_weight", 0.0) > 0
    streams, makers = [], []
    for k, (source, files) in enumerate(zip(sources, record_files)):
        records = grain.sources.ArrayRecordDataSource(list(files))
        maker = ExampleMaker(tokenizer, records, data.hard_negatives, data.query_length, data.passage_length,
                             data.max_extra_positives, data.too_few_negatives, source.query_prompt,
                             source.passage_prompt, source_index=k, teacher=teacher)
        makers.append(maker)
        streams.append(
            grain.MapDataset.source(records)
            .seed(seed + 7919 * k)
            .shuffle()
            .repeat()  # a fresh order every epoch
            .random_map(maker)  # each element's randomness follows from its index in the stream
        )
    # Process p builds rows [p*b, (p+1)*b) of every global batch of ``global_rows`` rows, b its
    # share; rows past the real queries are padding. The global batch is the same, row for row,
    # whatever the process count.
    share = global_rows // process_count
    padding = makers[0].padding()
    weights = [source.weight for source in sources]
    if len(streams) == 1:
        mixed = streams[0]
    elif not data.homogeneous_batches:
        mixed = grain.MapDataset.mix(streams, weights)  # every source in proportion, row by row
    if len(streams) > 1 and data.homogeneous_batches:
        schedule = homogeneous_schedule(weights, seed, config.train.steps)

        def example(step, index):
            source, earlier = schedule(step)
            return streams[source][earlier * queries + index]
    else:
        def example(step, index):
            return mixed[step * queries + index]

    def row(j):
        step, index = divmod(j, share)
        index += process_index * share
        return example(step, index) if index < queries else padding

    smallest = min(len(grain.sources.ArrayRecordDataSource(list(files))) for files in record_files)
    steps = min(max(smallest * len(streams) // queries, 1) * 10**6, sys.maxsize // share)  # practically endless
    local = grain.MapDataset.range(steps * share).map(row)
    iterable = local.to_iter_dataset().batch(share, drop_remainder=True)
    if data.workers > 0:
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.workers))
    return iterable


def sample_lengths(record_files: list[str], tokenizer, config, count: int = 2048, seed: int = 0,
                   query_prompt: str = "", passage_prompt: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Token counts of ``count`` random records' queries (prompt included) and of their passages
    (every positive and negative), truncated as training truncates them -> ([n] int, [m] int)."""
    import grain

    from pegjax.data.tokenizer import tokenize

    source = grain.sources.ArrayRecordDataSource(record_files)
    picks = np.random.default_rng(seed).choice(len(source), min(count, len(source)), replace=False)
    codec = tfds_format.Codec()
    records = [codec.decode(source[int(i)]) for i in sorted(picks)]
    queries = [(r["prompt"] if r["prompt"] is not None else query_prompt) + r["query"] for r in records]
    passages = [passage_prompt + p for r in records for p in r["pos"] + r["neg"]]
    query_lengths = [len(ids) for ids in tokenize(tokenizer, queries, config.data.query_length)]
    passage_lengths = [len(ids) for ids in tokenize(tokenizer, passages, config.data.passage_length)]
    return np.asarray(query_lengths), np.asarray(passage_lengths)


def row_geometries(record_files: list[list[str]], tokenizer, config, queries: int,
                   sources: list[Source], model=None) -> dict[str, RowGeometry]:
    """{"query": ..., "passage": ...}: rows per batch shard for ``queries`` queries a shard of this
    data (`pegjax.data.packing`; lengths sampled from every source, so the rows hold a batch of any
    of them), or one text a row with ``config.data.packing=False``. Given ``model`` (its
    `BertConfig`) and ``config.data.wide_rows``, rows may be longer than the texts where that
    costs less."""
    texts = {"query": queries, "passage": queries * (1 + config.data.hard_negatives)}
    lengths_of = {"query": config.data.query_length, "passage": config.data.passage_length}
    chunk = config.train.encode_chunk
    if not config.data.packing:
        return {kind: RowGeometry(texts[kind], chunked_rows(texts[kind], chunk)[0], lengths_of[kind], 1, chunk)
                for kind in texts}
    samples = {"query": [], "passage": []}
    for files, source in zip(record_files, sources):
        lengths = sample_lengths(files, tokenizer, config, seed=config.seed, query_prompt=source.query_prompt,
                                 passage_prompt=source.passage_prompt)
        for kind, sample in zip(("query", "passage"), lengths):
            samples[kind].append(sample)
    wide = model is not None and config.data.wide_rows
    attention = attention_length(model.hidden_size, model.intermediate_size) if wide else None
    return {kind: estimate_geometry(samples[kind], texts[kind], lengths_of[kind], chunk, seed=config.seed,
                                    attention=attention, longest_row=model.max_length if wide else None)
            for kind in texts}


def pack_for_step(texts: dict, shards: int, geometries: dict[str, RowGeometry], pad_id: int,
                  agree=lambda spilled: spilled) -> tuple[dict, dict[str, bool]]:
    """This process's batch, one text a row (``flatten_groups``) -> (the step's packed batch,
    ``agree``'s answer: {kind: spilled, ...}). A kind whose texts do not fit its rows -- here, or
    in any process as ``agree`` (an OR over processes, which may add flags of its own) reports --
    is laid out one text a row instead."""
    layout, spilled = {}, {}
    for kind, geometry in geometries.items():
        try:
            layout[kind] = pack_shards(texts[f"{kind}_ids"], texts[f"{kind}_mask"], shards, geometry, pad_id)
            spilled[kind] = False
        except DoesNotFit:
            spilled[kind] = True
    spilled = agree(spilled)
    for kind, geometry in geometries.items():
        if spilled[kind]:
            layout[kind] = pack_shards(texts[f"{kind}_ids"], texts[f"{kind}_mask"], shards, geometry.one_per_row(), pad_id)
    batch = {f"{kind}_{name}": array for kind, arrays in layout.items()
             for name, array in zip(("tokens", "segments", "slots"), arrays)}
    batch.update({key: texts[key] for key in ("passage_hashes", "positive_hashes", "query_hashes", "query_valid",
                                              "teacher_scores")})
    return batch, spilled


def flatten_groups(batch: dict) -> dict:
    """[B, G, L] passages -> [B*G, L] rows (query i's group contiguous, positive first)."""
    out = dict(batch)
    for key in ("passage_ids", "passage_mask"):
        value = batch[key]
        out[key] = value.reshape(-1, value.shape[-1])
    out["passage_hashes"] = batch["passage_hashes"].reshape(-1)
    return out
