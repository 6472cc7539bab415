"""Exact search returns what brute force returns, on 1 and 8 devices, in slices and blocks."""

import jax
import numpy as np
import pytest

from pegjax import search


def brute_force(queries, corpus, k):
    scores = queries @ corpus.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("corpus_size, block, host_rows", [
    (10_007, 512, 1 << 20),   # not a multiple of the block; many blocks per device
    (10_007, 65536, 3_001),   # streamed from the host in slices, merged
    (150, 64, 1 << 20),       # fewer rows than k on some devices
    (120_013, 65536, 1 << 20),  # wide blocks: the two-stage (group maxima) selection
])
def test_top_100_ids_equal_brute_force(devices, corpus_size, block, host_rows):
    rng = np.random.default_rng(corpus_size)
    corpus = rng.standard_normal((corpus_size, 48)).astype(np.float32)
    queries = rng.standard_normal((37, 48)).astype(np.float32)
    mesh = search.search_mesh(jax.devices()[:devices])
    scores, ids = search.top_k(queries, corpus, 100, block=block, host_rows=host_rows, mesh=mesh)
    want_scores, want_ids = brute_force(queries, corpus, 100)
    assert ids.shape == (37, min(100, corpus_size))
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_memmapped_corpus_and_empty_queries(tmp_path):
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((5_000, 16)).astype(np.float32)
    path = tmp_path / "corpus.f32"
    corpus.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=corpus.shape)
    queries = rng.standard_normal((5, 16)).astype(np.float32)
    _, ids = search.top_k(queries, mapped, 10, host_rows=1_000)
    np.testing.assert_array_equal(ids, brute_force(queries, corpus, 10)[1])
    scores, ids = search.top_k(np.zeros((0, 16), np.float32), corpus, 10)
    assert scores.shape == ids.shape == (0, 10)


@pytest.mark.parametrize("devices, corpus_size", [(1, 20_013), (8, 80_013)])
def test_padding_rows_never_displace_real_rows_when_every_score_is_negative(devices, corpus_size):
    # Padding rows score 0, above every real row here: they must be kept out of the two-stage
    # selection, including the group of rows that holds the last real row (k = 10 of ~300-600
    # groups a block: most queries' top 10 lie in 10 different groups, so a group slot lost to
    # padding loses a real row).
    rng = np.random.default_rng(1)
    corpus = -np.abs(rng.standard_normal((corpus_size, 48))).astype(np.float32)
    queries = np.abs(rng.standard_normal((37, 48))).astype(np.float32)
    mesh = search.search_mesh(jax.devices()[:devices])
    index = search.Index(corpus, mesh=mesh)
    assert index.block > 4 * 10 * search._GROUP and index.slice_rows > corpus_size  # the two-stage selection, with padding
    _, ids = index.search(queries, 10)
    np.testing.assert_array_equal(ids, brute_force(queries, corpus, 10)[1])
