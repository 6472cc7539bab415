"""Packing texts into fixed-length rows: compute follows real tokens, shapes stay fixed for jit.

A batch shard's texts (token id sequences of different lengths) are placed into ``rows`` rows of
``length`` tokens, at most ``slots`` texts a row, first-fit by decreasing length. Each row carries
its segment ids (0 = padding, k = the k-th text of the row); each text gets a *slot*, the index of
its pooled vector in the shard's ``[rows * slots]`` output: ``row * slots + (segment - 1)``. The
encoder attends within segments, restarts positions per segment and pools per segment
(`pegjax.models.bert`), so a packed row gives the same embeddings as one text a row.

The row count and row length per shard are fixed for a run (a `RowGeometry`, chosen before
training from a sample of the data; a row may be longer than the longest text where that costs
less, `estimate_geometry`). A batch whose texts do not fit is packed with one row per text instead (`RowGeometry.one_per_row`);
that shape compiles once more and is counted, never truncated or dropped.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


class DoesNotFit(ValueError):
    """The texts need more rows than the geometry has."""


@dataclasses.dataclass(frozen=True)
class RowGeometry:
    """How one kind of text (queries or passages) is laid out per batch shard."""

    texts: int  # texts per shard
    rows: int  # packed rows per shard, equal chunks of at most ``max_chunk`` (`chunked_rows`)
    length: int  # tokens per row
    slots: int  # at most this many texts per row
    max_chunk: int  # config.train.encode_chunk: rows per shard encoded at once, at most

    @property
    def chunk(self) -> int:
        return chunked_rows(self.rows, self.max_chunk)[1]

    @property
    def chunks(self) -> int:
        return self.rows // self.chunk

    def one_per_row(self) -> "RowGeometry":
        """Enough rows for one text a row: every batch fits."""
        return dataclasses.replace(self, rows=chunked_rows(self.texts, self.max_chunk)[0])


def chunked_rows(needed: int, max_chunk: int) -> tuple[int, int]:
    """(rows, chunk): the fewest rows >= ``needed`` that split into equal chunks of at most
    ``max_chunk`` rows; at most ``chunks - 1`` rows are added."""
    needed = max(needed, 1)
    chunks = math.ceil(needed / max_chunk)
    chunk = math.ceil(needed / chunks)
    return chunks * chunk, chunk


def assign(lengths: np.ndarray, rows: int, length: int, slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First-fit decreasing: lengths [N] int -> (row [N], offset [N], segment [N]) int32, segment
    1-based. Raises DoesNotFit when ``rows`` rows are not enough.

    Texts of equal length are placed a run at a time: first-fit puts each in the first row with
    room, and a row that has no room for one has none for the next, so the run fills the rows in
    order, each to what it holds -- one vectorised step per distinct length, not one per text."""
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and lengths.max() > length:
        raise ValueError(f"a text of {lengths.max()} tokens does not fit a row of {length}")
    free = np.full(rows, length, np.int64)
    used = np.zeros(rows, np.int64)
    row = np.empty(len(lengths), np.int32)
    offset = np.empty(len(lengths), np.int32)
    segment = np.empty(len(lengths), np.int32)
    order = np.argsort(-lengths, kind="stable")
    runs = np.flatnonzero(np.diff(lengths[order], prepend=-1, append=-1))
    for start, end in zip(runs[:-1], runs[1:]):
        texts, size = order[start:end], int(lengths[order[start]])
        room = slots - used if size == 0 else np.minimum(free // size, slots - used)
        before = np.cumsum(room) - room  # texts the rows before each one hold
        take = np.clip(len(texts) - before, 0, room)
        if take.sum() < len(texts):
            raise DoesNotFit(f"{len(lengths)} texts need more than {rows} rows of {length} tokens")
        into = np.repeat(np.arange(rows), take)
        nth = np.arange(len(texts)) - np.repeat(np.cumsum(take) - take, take)  # place within its row
        row[texts], offset[texts], segment[texts] = into, length - free[into] + nth * size, used[into] + nth + 1
        free -= take * size
        used += take
    return row, offset, segment


def pack(ids: np.ndarray, mask: np.ndarray, geometry: RowGeometry, pad_id: int = 0):
    """Texts of one shard, padded one a row -> packed rows.

    ids, mask: [N, L] int32 (L <= geometry.length; real tokens first). Returns (tokens [rows,
    length] int32, segments [rows, length] int32, slots [N] int32). A text with no tokens (a
    padding row of the batch) takes no place: its slot is ``rows * slots``, which the encoder maps to
    a zero vector. Raises DoesNotFit.
    """
    lengths = mask.sum(axis=1).astype(np.int64)
    present = np.flatnonzero(lengths)
    row, offset, segment = assign(lengths[present], geometry.rows, geometry.length, geometry.slots)
    tokens = np.full((geometry.rows, geometry.length), pad_id, np.int32)
    segments = np.zeros((geometry.rows, geometry.length), np.int32)
    slots = np.full(len(lengths), geometry.rows * geometry.slots, np.int32)
    for j, i in enumerate(present):
        start, end = offset[j], offset[j] + lengths[i]
        tokens[row[j], start:end] = ids[i, : lengths[i]]
        segments[row[j], start:end] = segment[j]
        slots[i] = row[j] * geometry.slots + segment[j] - 1
    return tokens, segments, slots


def pack_shards(ids: np.ndarray, mask: np.ndarray, shards: int, geometry: RowGeometry, pad_id: int = 0):
    """A process's texts, ``shards`` contiguous equal groups (its batch shards), each packed by
    `pack` -> (tokens [shards*rows, length], segments, slots [N] indexing within its own shard)."""
    per = len(ids) // shards
    parts = [pack(ids[s * per:(s + 1) * per], mask[s * per:(s + 1) * per], geometry, pad_id) for s in range(shards)]
    return tuple(np.concatenate(arrays) for arrays in zip(*parts))


def rows_needed(lengths: np.ndarray, length: int, slots: int) -> int:
    """The rows first-fit decreasing uses for these lengths (texts of length 0 take none)."""
    lengths = np.asarray(lengths)[np.asarray(lengths) > 0]
    return int(assign(lengths, len(lengths), length, slots)[0].max()) + 1 if len(lengths) else 0


def attention_length(hidden: int, intermediate: int) -> int:
    """The row length at which a row's attention costs what its dense layers cost, per token.

    A layer's dense products take 2 * (4 * hidden + 2 * intermediate) * hidden FLOPs a token, its
    attention's two products 4 * row length * hidden; those run at about half the dense products'
    rate on CPU (bench/RESULTS.md), so they count double."""
    return (2 * hidden + intermediate) // 2


def row_cost(rows: int, length: int, attention: int | None) -> float:
    """Relative compute of encoding ``rows`` rows of ``length`` tokens: the dense layers follow the
    positions, the attention the positions times the row length (``attention``:
    `attention_length`; None counts positions only)."""
    return rows * length * (1 + length / attention) if attention else float(rows * length)


def row_lengths(length: int, attention: int | None = None, longest_row: int | None = None) -> list[int]:
    """The row lengths worth pricing for texts of at most ``length`` tokens: ``length`` itself,
    then (given ``attention``) longer by quarters of it up to twice it, at most ``longest_row``."""
    if not attention:
        return [length]
    return list(range(length, min(2 * length, longest_row or 2 * length) + 1, max(length // 4, 8)))


def estimate_geometry(samples: list[np.ndarray], texts: int, length: int, max_chunk: int, *, seed: int = 0,
                      trials: int = 16, max_slots: int = 16, attention: int | None = None,
                      longest_row: int | None = None) -> RowGeometry:
    """Rows per shard for ``texts`` texts a shard whose lengths follow any one of ``samples``
    (token counts of real texts, one array per data source, already truncated to ``length``).

    For each source, packs ``trials`` shards drawn from its sample and keeps their largest row
    count, plus 3% and two rows for what the sample did not show, rounded up to equal chunks; the
    rows are the most any source needs (a batch is drawn from one source at a time, or mixes them
    and needs no more than its longest), the slots the most its shortest texts could need, at most
    ``max_slots``.

    With ``attention`` (`attention_length` of the model) the rows may also be longer than the
    longest text (`row_lengths`; ``longest_row`` is the model's position count): texts that fill
    two thirds of a row waste a third of it at one a row, and two of them fit a row of 1.25x. The
    row length of least `row_cost` wins. A chunk of rows r times longer holds ``max_chunk / r**2``
    of them, so neither its tokens nor its attention scores outgrow ``max_chunk`` rows of
    ``length``: activation memory never grows.
    """
    samples = [np.minimum(np.asarray(sample, np.int64), length) for sample in samples]
    best = None
    for width in row_lengths(length, attention, longest_row):
        chunk = max(1, max_chunk * length * length // (width * width))
        per_source = [_estimate_rows(sample, texts, width, chunk, seed, trials, max_slots) for sample in samples]
        geometry = RowGeometry(texts, max(g.rows for g in per_source), width, max(g.slots for g in per_source), chunk)
        cost = row_cost(geometry.rows, width, attention)
        if best is None or cost < best[0]:
            best = (cost, geometry)
    return best[1]


def _estimate_rows(sample_lengths, texts, length, max_chunk, seed, trials, max_slots) -> RowGeometry:
    slots = int(min(max_slots, max(1, length // max(int(np.percentile(sample_lengths, 5)), 1))))
    if slots == 1:
        return RowGeometry(texts, chunked_rows(texts, max_chunk)[0], length, 1, max_chunk)
    rng = np.random.default_rng(seed)
    worst = max(rows_needed(rng.choice(sample_lengths, texts), length, slots) for _ in range(trials))
    rows = min(texts, int(math.ceil(worst * 1.03)) + 2)
    return RowGeometry(texts, chunked_rows(rows, max_chunk)[0], length, slots, max_chunk)


def fitted_geometry(mask: np.ndarray, shards: int, max_chunk: int, max_slots: int = 16,
                    length: int | None = None) -> RowGeometry:
    """The geometry that holds exactly these texts (mask [N, L], ``shards`` equal groups): the most
    rows any shard needs, rows of ``length`` tokens (default L). ``max_slots=1`` gives one text a row."""
    lengths = mask.sum(axis=1)
    per = len(lengths) // shards
    length = length or mask.shape[1]
    slots = max(1, min(max_slots, length // max(int(lengths[lengths > 0].min()), 1)))
    rows = max(rows_needed(lengths[s * per:(s + 1) * per], length, slots) for s in range(shards))
    return RowGeometry(per, chunked_rows(rows, max_chunk)[0], length, slots, max_chunk)


def step_batch(texts: dict, shards: int, queries: RowGeometry, passages: RowGeometry, pad_id: int = 0) -> dict:
    """One text a row -> the step's packed batch (`pegjax.step`).

    texts: query_ids / query_mask [Q, Lq], passage_ids / passage_mask [P, Lp] int32 (P = Q * G,
    query i's passages contiguous), passage_hashes [P], positive_hashes [Q, M], optionally
    query_hashes [Q], query_valid [Q] (0: a padding query, no tokens) and teacher_scores [Q, G];
    the rows of ``shards`` batch shards in order.
    Raises DoesNotFit when a shard's texts need more rows.
    """
    query_tokens, query_segments, query_slots = pack_shards(texts["query_ids"], texts["query_mask"], shards, queries, pad_id)
    passage_tokens, passage_segments, passage_slots = pack_shards(
        texts["passage_ids"], texts["passage_mask"], shards, passages, pad_id)
    return {
        "query_tokens": query_tokens, "query_segments": query_segments, "query_slots": query_slots,
        "passage_tokens": passage_tokens, "passage_segments": passage_segments, "passage_slots": passage_slots,
        "passage_hashes": np.asarray(texts["passage_hashes"], np.int32).reshape(-1),
        "positive_hashes": np.asarray(texts["positive_hashes"], np.int32),
        "query_hashes": np.asarray(texts.get("query_hashes", np.zeros(len(texts["query_ids"]))), np.int32),
        "query_valid": np.asarray(texts.get("query_valid", np.ones(len(texts["query_ids"]))), np.int32),
        "teacher_scores": np.asarray(texts.get("teacher_scores", np.zeros(
            (len(texts["query_ids"]), len(texts["passage_ids"]) // max(len(texts["query_ids"]), 1)))), np.float32),
    }
