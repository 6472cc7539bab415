"""Packing's first-fit decreasing, and row geometry on real length distributions: rows longer than
the texts where that costs less."""

import json

import numpy as np
import pytest

from pegjax.data import packing
from pegjax.data.tokenizer import load_tokenizer, tokenize

MINILM_ATTENTION = packing.attention_length(384, 1536)  # all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return load_tokenizer(minilm_path)


def token_lengths(tokenizer, texts, length):
    return np.asarray([len(ids) for ids in tokenize(tokenizer, texts, length)])


@pytest.fixture(scope="module")
def answer_lengths(tokenizer, shared_data):
    """Token counts of 1,200 medical_zh answers at 256 tokens (most 120-220: one a row wastes a third)."""
    with open(shared_data / "medical_zh" / "train_pairs.jsonl", encoding="utf-8") as f:
        answers = [json.loads(line)["pos"][0] for line in f]
    picks = np.random.default_rng(0).choice(len(answers), 1200, replace=False)
    return token_lengths(tokenizer, [answers[i] for i in picks], 256)


@pytest.fixture(scope="module")
def abstract_lengths(tokenizer, shared_data):
    """Token counts of 600 SciFact abstracts at 256 tokens (most fill the row)."""
    with open(shared_data / "scifact" / "corpus.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(600), f)]
    return token_lengths(tokenizer, [f"{r['title']} {r['text']}" for r in rows], 256)


def real_fraction(lengths, geometry, shards=4, seed=1):
    """Packs ``shards`` shards of real lengths drawn fresh into ``geometry`` -> real-token fraction."""
    rng = np.random.default_rng(seed)
    real = 0
    for _ in range(shards):
        batch = rng.choice(lengths, geometry.texts)
        mask = (np.arange(256)[None, :] < batch[:, None]).astype(np.int32)
        _, segments, slots = packing.pack(mask, mask, geometry)  # raises DoesNotFit if short of rows
        assert len(np.unique(slots)) == geometry.texts  # every text has its own slot
        assert (segments > 0).sum() == batch.sum()  # and all its tokens
        real += int(batch.sum())
    return real / (shards * geometry.rows * geometry.length)


def test_medium_texts_get_longer_rows_that_cost_less(answer_lengths):
    narrow = packing.estimate_geometry([answer_lengths], 192, 256, 16)
    wide = packing.estimate_geometry([answer_lengths], 192, 256, 16, attention=MINILM_ATTENTION, longest_row=512)
    assert narrow.length == 256 and narrow.max_chunk == 16
    assert 256 < wide.length <= 512 and wide.slots >= 2
    # A chunk holds no more tokens, nor attention scores, than 16 rows of 256.
    assert wide.chunk * wide.length <= 16 * 256 and wide.chunk * wide.length ** 2 <= 16 * 256 ** 2
    assert (packing.row_cost(wide.rows, wide.length, MINILM_ATTENTION)
            < 0.9 * packing.row_cost(narrow.rows, narrow.length, MINILM_ATTENTION))
    narrow_fraction, wide_fraction = real_fraction(answer_lengths, narrow), real_fraction(answer_lengths, wide)
    assert narrow_fraction < 0.7 and wide_fraction > narrow_fraction + 0.1


def test_texts_that_fill_their_rows_keep_them(abstract_lengths):
    geometry = packing.estimate_geometry([abstract_lengths], 192, 256, 16, attention=MINILM_ATTENTION, longest_row=512)
    assert geometry.length == 256 and geometry.max_chunk == 16
    real_fraction(abstract_lengths, geometry)


def test_rows_are_capped_by_the_models_positions(answer_lengths):
    geometry = packing.estimate_geometry([answer_lengths], 192, 256, 16, attention=MINILM_ATTENTION, longest_row=256)
    assert geometry.length == 256
    assert packing.row_lengths(256, MINILM_ATTENTION, 384) == [256, 320, 384]
    assert packing.row_lengths(64, None, 512) == [64]


def test_rows_hold_a_batch_of_any_source(answer_lengths, abstract_lengths):
    """Two sources, one geometry: a batch drawn from either packs without spilling."""
    both = packing.estimate_geometry([abstract_lengths, answer_lengths], 96, 256, 16,
                                     attention=MINILM_ATTENTION, longest_row=512)
    answers = packing.estimate_geometry([answer_lengths], 96, 256, 16, attention=MINILM_ATTENTION, longest_row=512)
    assert both.rows > answers.rows  # the abstracts need more rows than the answers alone
    for lengths in (abstract_lengths, answer_lengths):
        real_fraction(lengths, both, shards=8)


def first_fit_decreasing(lengths, rows, length, slots):
    """The plain algorithm, one text at a time: each text, longest first (ties in input order), in
    the first row with room for its tokens and a free slot -> (row, offset, segment), or None."""
    free, used = [length] * rows, [0] * rows
    placed = [None] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r in range(rows) if free[r] >= lengths[i] and used[r] < slots), None)
        if r is None:
            return None
        placed[i] = (r, length - free[r], used[r] + 1)
        free[r] -= lengths[i]
        used[r] += 1
    return placed


def test_assign_places_every_text_where_first_fit_decreasing_does():
    rng = np.random.default_rng(0)
    outcomes = {True: 0, False: 0}
    for case in range(400):
        count, length, slots = int(rng.integers(0, 50)), int(rng.integers(4, 40)), int(rng.integers(1, 6))
        lengths = rng.integers(0 if case % 3 == 0 else 1, length + 1, count)  # empty texts too
        rows = int(rng.integers(1, count + 2))
        want = first_fit_decreasing(lengths.tolist(), rows, length, slots)
        outcomes[want is not None] += 1
        if want is None:
            with pytest.raises(packing.DoesNotFit):
                packing.assign(lengths, rows, length, slots)
        else:
            got = packing.assign(lengths, rows, length, slots)
            assert list(zip(*(a.tolist() for a in got))) == want
    assert min(outcomes.values()) > 100  # both outcomes well covered
