"""Exact maximum-inner-product search, the one search function of evaluation and mining.

The corpus is split over all devices; each device scans its rows in blocks of ``block`` rows,
scoring a batch of queries against one block at a time and keeping a running top-k, so the full
[Q, N] score matrix never exists. The per-device top-k lists are then merged. A corpus larger than
device memory (or RAM, when it is a ``np.memmap``) is fed in slices of ``host_rows`` rows and the
slices' top-k merged on the host.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_AXIS = "shard"


# Columns per group of the two-stage top-k. With the candidates thresholded (see _block_top_k), 32
# ran the search 1.10x the unthresholded code side by side on the 2-core AMX Intel Xeon, 64 only
# 1.05x; identical top-k sets (bench/RESULTS.md). Unthresholded, 64 beat 32 on a 2-core AMD EPYC.
_GROUP = 32


def _block_top_k(scores, valid, k):
    """Exact top-k of [Q, B] scores over the columns where ``valid`` [B] bool is set (a prefix of
    the columns), B a multiple of _GROUP -> ([Q, k] f32, [Q, k] column i32).

    Two stages, both exact: the k groups of _GROUP columns with the largest maxima hold every top-k
    entry (an entry of the top k is at least the k-th largest group maximum), so a top-k over
    those k*_GROUP candidates gives the answer. XLA:CPU's top_k costs ~3x less this way than over B.
    The maxima are taken over the raw scores, with no pass over [Q, B] to mask the padding: groups
    of padding alone are masked out of the [Q, B / _GROUP] maxima, and the one group that mixes
    real rows and padding may carry a padding score as its maximum, so k + 1 groups are kept. That
    group can push at most one of the true k out of the top k, never out of the top k + 1.
    """
    rows, width = scores.shape
    if width <= 4 * k * _GROUP:
        return jax.lax.top_k(jnp.where(valid[None, :], scores, -jnp.inf), k)
    groups = scores.reshape(rows, width // _GROUP, _GROUP)
    valid_groups = valid.reshape(width // _GROUP, _GROUP)
    group_max = jnp.where(valid_groups[None, :, 0], groups.max(axis=-1), -jnp.inf)
    top_max, group_index = jax.lax.top_k(group_max, k + 1)
    candidates = jnp.take_along_axis(groups, group_index[..., None], axis=1)
    # The (k+1)-th largest group maximum is at most the k-th largest score (k of those k + 1
    # groups hold real rows only, so k real scores reach it): candidates below it cannot be in the
    # top k and are dropped before the second top-k. ~k of the (k+1)*_GROUP survive, and XLA:CPU's
    # top_k then costs ~2x less. The barrier keeps XLA from turning the first top_k into a full
    # sort, which it does when only one of its columns is read.
    threshold = jax.lax.optimization_barrier(top_max)[:, k, None, None]
    keep = valid_groups[group_index] & (candidates >= threshold)
    candidates = jnp.where(keep, candidates, -jnp.inf).reshape(rows, (k + 1) * _GROUP)
    top, position = jax.lax.top_k(candidates, k)
    column = jnp.take_along_axis(group_index, position // _GROUP, axis=1) * _GROUP + position % _GROUP
    return top, column


def _merge(scores_a, index_a, scores_b, index_b, k):
    scores = jnp.concatenate([scores_a, scores_b], axis=1)
    index = jnp.concatenate([index_a, index_b], axis=1)
    top, where = jax.lax.top_k(scores, k)
    return top, jnp.take_along_axis(index, where, axis=1)


@partial(jax.jit, static_argnames=("k", "block", "mesh"))
def _search_slice(query_batches, corpus, valid_rows, offset, *, k, block, mesh):
    """query_batches [n, b, D] replicated; corpus [S*B*block, D] split over devices -> top-k
    ([n, b, k] f32, [n, b, k] i32). The batches run one after another inside this one call."""

    def local(query_batches, corpus_shard, valid_rows, offset):
        return jax.lax.map(lambda queries: local_batch(queries, corpus_shard, valid_rows, offset), query_batches)

    def local_batch(queries, corpus_shard, valid_rows, offset):
        shard = jax.lax.axis_index(_AXIS)
        rows = corpus_shard.shape[0]
        blocks = corpus_shard.reshape(rows // block, block, -1)
        start = offset + shard * rows

        def block_top_k(block_rows, block_number):
            # HIGHEST: a TPU's default float32 product rounds its inputs to bf16, which would not be exact
            scores = jnp.einsum("qd,nd->qn", queries, block_rows, preferred_element_type=jnp.float32,
                                precision=jax.lax.Precision.HIGHEST)
            row_ids = start + block_number * block + jnp.arange(block, dtype=jnp.int32)
            top, where = _block_top_k(scores, row_ids < offset + valid_rows, min(k, block))
            return top, row_ids[where]

        def body(carry, inputs):
            return _merge(*carry, *block_top_k(*inputs), k), None

        # The first block's top-k starts the running top-k (a merge with an empty list would cost
        # one more top_k: ~2.4 ms for 256 queries on a 2-core AMD EPYC, a 50,000-row block ~60 ms).
        best, best_index = block_top_k(blocks[0], jnp.int32(0))
        if best.shape[1] < k:  # blocks narrower than k: the running list still holds k entries
            missing = k - best.shape[1]
            best = jnp.pad(best, ((0, 0), (0, missing)), constant_values=-jnp.inf)
            best_index = jnp.pad(best_index, ((0, 0), (0, missing)), constant_values=-1)
        if blocks.shape[0] > 1:
            (best, best_index), _ = jax.lax.scan(body, (best, best_index),
                                                 (blocks[1:], jnp.arange(1, blocks.shape[0], dtype=jnp.int32)))
        # Every device's candidates to every device, then one final top-k.
        all_best = jax.lax.all_gather(best, _AXIS, axis=1, tiled=True)
        all_index = jax.lax.all_gather(best_index, _AXIS, axis=1, tiled=True)
        top, where = jax.lax.top_k(all_best, k)
        return top, jnp.take_along_axis(all_index, where, axis=1)

    spec = PartitionSpec
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec(), spec(_AXIS), spec(), spec()),
        out_specs=(spec(), spec()),
        check_vma=False,
    )(query_batches, corpus, valid_rows, offset)


def search_mesh(devices=None) -> Mesh:
    """A 1-D mesh over this process's devices (or the given ones) for search: the corpus is host
    data of the process that searches, so no other process takes part."""
    devices = jax.local_devices() if devices is None else devices
    return Mesh(np.array(devices), (_AXIS,))


class Index:
    """A corpus laid out for exact search: on the devices when it fits ``host_rows`` rows, else
    read from the host array (a np.memmap works) ``host_rows`` rows at a time per search."""

    def __init__(self, corpus: np.ndarray, *, block: int = 65536, host_rows: int = 1 << 20, mesh: Mesh | None = None):
        self.corpus = corpus
        self.size = corpus.shape[0]
        self.mesh = mesh or search_mesh()
        devices = self.mesh.devices.size
        per_device = max(-(-min(host_rows, self.size) // devices), 1)
        blocks = -(-per_device // block)
        self.block = -(-per_device // blocks // _GROUP) * _GROUP  # equal blocks, multiples of _GROUP
        self.slice_rows = devices * blocks * self.block
        self._sharding = NamedSharding(self.mesh, PartitionSpec(_AXIS))
        self._resident = self._slice(0) if self.size <= self.slice_rows else None

    def _slice(self, start):
        rows = np.asarray(self.corpus[start : start + self.slice_rows], dtype=np.float32)
        valid = rows.shape[0]
        if valid < self.slice_rows:
            rows = np.concatenate([rows, np.zeros((self.slice_rows - valid, rows.shape[1]), np.float32)])
        return jax.device_put(rows, self._sharding), valid

    def search(self, queries: np.ndarray, k: int, query_batch: int = 256, progress: bool = False):
        """queries [Q, D] float32 -> (scores [Q, k'] float32 descending, corpus rows [Q, k'] int64),
        k' = min(k, corpus size)."""
        queries = np.asarray(queries, dtype=np.float32)
        num_queries = queries.shape[0]
        k = min(k, self.size)
        if num_queries == 0 or k == 0:
            return np.zeros((num_queries, k), np.float32), np.zeros((num_queries, k), np.int64)
        starts = range(0, self.size, self.slice_rows)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="search", unit="slice")
        padded = self._batched(queries, query_batch)
        for start in starts:
            rows, valid = self._resident if self._resident is not None else self._slice(start)
            scores, index = _search_slice(padded, rows, jnp.int32(valid), jnp.int32(start),
                                          k=min(k, valid), block=self.block, mesh=self.mesh)
            scores = np.array(scores).reshape(-1, scores.shape[-1])[:num_queries]
            index = np.array(index).reshape(-1, index.shape[-1])[:num_queries].astype(np.int64)
            if start == 0:  # the first slice's top-k is the running top-k
                best_scores, best_index = scores, index
            else:
                _merge_host(best_scores, best_index, scores, index)
        return best_scores, best_index


    def _batched(self, queries: np.ndarray, query_batch: int):
        """queries [Q, D] float32 -> [n, b, D] zero-padded batches, replicated over the mesh: what
        `_search_slice` takes (b = query_batch, or less for a few queries)."""
        num_queries = queries.shape[0]
        query_batch = min(query_batch, -(-num_queries // 8) * 8)
        batches = -(-num_queries // query_batch)
        padded = np.zeros((batches * query_batch, queries.shape[1]), np.float32)
        padded[:num_queries] = queries
        return jax.device_put(padded.reshape(batches, query_batch, -1), NamedSharding(self.mesh, PartitionSpec()))

    def lower(self, queries: np.ndarray, k: int, query_batch: int = 256):
        """The program `search` compiles for these queries, lowered on the first corpus slice
        (`bench.profile_step` reads its compiled text)."""
        queries = np.asarray(queries, dtype=np.float32)
        rows, valid = self._resident if self._resident is not None else self._slice(0)
        return _search_slice.lower(self._batched(queries, query_batch), rows, jnp.int32(valid), jnp.int32(0),
                                   k=min(k, self.size, valid), block=self.block, mesh=self.mesh)


def top_k(queries: np.ndarray, corpus: np.ndarray, k: int, **index_args) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product search of [Q, D] queries over a [N, D] corpus (see `Index`)."""
    progress = index_args.pop("progress", False)
    return Index(corpus, **index_args).search(queries, k, progress=progress)


def _merge_host(best_scores, best_index, scores, index):
    """Merges a slice's top-k into the running top-k, in place."""
    k = best_scores.shape[1]
    all_scores = np.concatenate([best_scores, scores], axis=1)
    all_index = np.concatenate([best_index, index], axis=1)
    order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    best_scores[:] = np.take_along_axis(all_scores, order, axis=1)
    best_index[:] = np.take_along_axis(all_index, order, axis=1)
