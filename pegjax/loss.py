"""The global contrastive loss: scores, false-negative masks, progressive weights, in query blocks.

Batch layout. Q queries; query i owns the passages ``i*G .. i*G+G-1`` of the P = Q*G passages,
G = 1 + H: its positive first, then its H hard negatives. Every query is scored against all P
passages (and optionally the other Q-1 queries). With s_ij = cos(q_i, p_j) / tau::

    loss_i = -log( exp(s_i+) / ( exp(s_i+) + sum_j w_ij * exp(s_ij) ) )
    w_ij   = N_i * softmax_j( beta * s_ij )          over the unmasked negatives j, stop-gradient
    loss   = sum_i v_i * loss_i / sum_i v_i,         v_i = stop_gradient( query_weight(loss_i, gamma) )

N_i is the number of unmasked negatives of query i. beta = 0 gives w_ij = 1 (plain InfoNCE); a
larger beta moves the weight onto the hardest negatives. gamma = 0 gives v_i = 1.

Padding queries (``valid`` false: rows that only make the global batch split over the devices)
are invisible: no loss, no weight in the statistics of v, no gradient; their passages are never
candidates and never counted in N_i; the metrics leave them out.

A negative j of query i is masked (left out of the sum) when it is i's positive, when its text hash
equals that of i's positive or of another listed positive of i, when it is the positive of another
row with i's query text (a duplicated query, or one query split over several lines), when it is
another row's query with i's query text (query negatives), or (optional margin guard) when it
scores above i's positive by more than ``margin`` in cosine. A hash of 0 means "unknown" and never
matches. A query whose negatives are all masked has loss_i = 0.

The [Q, P] score matrix never exists whole: queries are taken in blocks of at most ``query_block``
rows per batch shard (equal blocks; rows that do not fill the last one are padding), each block
scored against all passages and checkpointed, so the forward and backward pass hold
O(shards * query_block * P) scores at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax


def outlier_downweight(losses, gamma, valid=None):
    """v_i = exp(-gamma * max(0, z_i)), z_i the loss standardised over the global batch.

    Down-weights queries with outlying (likely mislabelled) loss; gamma = 0 weighs all alike.
    losses [Q] float32, valid [Q] bool (None: all) -> [Q] float32 in (0, 1], 0 where not valid;
    the mean and std are those of the valid queries.
    """
    valid = jnp.ones(losses.shape, bool) if valid is None else valid
    count = jnp.maximum(valid.sum(), 1)
    mean = jnp.where(valid, losses, 0.0).sum() / count
    std = jnp.sqrt(jnp.where(valid, (losses - mean) ** 2, 0.0).sum() / count)
    z = (losses - mean) / jnp.maximum(std, 1e-6)
    return jnp.where(valid, jnp.exp(-gamma * jnp.maximum(z, 0.0)), 0.0)


def focal(losses, gamma, valid=None):
    """v_i = (1 - exp(-loss_i)) ** gamma: emphasises queries the model still gets wrong.

    losses [Q] float32, valid [Q] bool (None: all) -> [Q] float32 in [0, 1], 0 where not valid.
    """
    valid = jnp.ones(losses.shape, bool) if valid is None else valid
    return jnp.where(valid, (-jnp.expm1(-losses)) ** gamma, 0.0)


QUERY_WEIGHTS: dict[str, Callable] = {"outlier_downweight": outlier_downweight, "focal": focal}


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static settings of the loss (the progressive knobs beta, gamma are traced values)."""

    group_size: int  # G = 1 + hard negatives per query
    temperature: float = 0.02
    query_block: int = 64  # query rows per batch shard scored at once
    query_negatives: bool = False  # also score each query against the other queries
    margin: float | None = None  # mask negatives above positive + margin (cosine); None: off
    query_weight: str = "outlier_downweight"
    teacher_weight: float = 0.0  # weight of the distillation term (`distillation`); 0: off
    teacher_temperature: float = 1.0

    def __post_init__(self):
        if self.query_weight not in QUERY_WEIGHTS:
            raise ValueError(
                f"config.progressive.query_weight={self.query_weight!r}: use one of {sorted(QUERY_WEIGHTS)}"
            )


def contrastive_loss(
    queries,
    passages,
    passage_hashes,
    positive_hashes,
    beta,
    gamma,
    config: LossConfig,
    shards: int = 1,
    gather=None,
    split=None,
    valid=None,
    query_hashes=None,
):
    """The progressive global InfoNCE loss and its diagnostics.

    Args:
      queries: [Q, D] float32 query embeddings, L2-normalised.
      passages: [P, D] float32 passage embeddings, P = Q * group_size, layout in the module doc.
      passage_hashes: [P] int32 text hashes (0 = unknown).
      positive_hashes: [Q, M] int32 hashes of further known positives of each query (0 = none).
      beta, gamma: scalar float32 progressive knobs at this step.
      config: static settings.
      shards: how many ways Q is split across devices; each block takes ``query_block`` rows from
        every shard, so no query rows move between devices to form a block.
      gather: optional function applied to the [P (+Q), D] candidate embeddings and their hashes
        and masks before scoring (the step passes a replicating sharding constraint, so they are
        all-gathered once).
      split: optional function that splits an array's leading axis of size ``shards`` over the
        batch shards (the step passes a sharding constraint). Each shard then scores its query rows
        against its own copy of the candidates, so the backward pass sums the candidates' gradient
        over shards once, after all blocks, rather than once per block.
      valid: [Q] bool, false for padding queries (None: every query is real).
      query_hashes: [Q] int32 text hashes of the queries (0 = unknown; None: all unknown).

    Returns:
      (loss scalar float32, metrics dict of scalars).
    """
    num_queries = queries.shape[0]
    num_passages = passages.shape[0]
    group = config.group_size
    if num_passages != num_queries * group:
        raise ValueError(f"{num_passages} passages for {num_queries} queries x group {group}")
    if num_queries % shards:
        raise ValueError(f"{num_queries} queries do not split over {shards} shards; pad the batch (pegjax.geometry)")
    valid = jnp.ones((num_queries,), bool) if valid is None else valid.astype(bool)
    query_hashes = jnp.zeros((num_queries,), jnp.int32) if query_hashes is None else query_hashes
    rows = num_queries // shards
    blocks = -(-rows // config.query_block)
    block = -(-rows // blocks)  # equal blocks of at most query_block rows; the last rows pad them
    tau = config.temperature

    candidates, candidate_hashes = passages, passage_hashes
    candidate_valid = jnp.repeat(valid, group)
    # The query text a candidate must not be a negative for: a passage's own query's when it is
    # that query's positive, a query column's own (query negatives); 0 otherwise.
    is_row_positive = jnp.arange(num_passages) % group == 0
    candidate_query = jnp.where(is_row_positive, jnp.repeat(query_hashes, group), 0)
    if config.query_negatives:
        candidates = jnp.concatenate([passages, queries], axis=0)
        candidate_hashes = jnp.concatenate([passage_hashes, jnp.zeros((num_queries,), passage_hashes.dtype)])
        candidate_valid = jnp.concatenate([candidate_valid, valid])
        candidate_query = jnp.concatenate([candidate_query, query_hashes])
    if gather is not None:
        candidates, candidate_hashes, candidate_valid, candidate_query = (
            gather(x) for x in (candidates, candidate_hashes, candidate_valid, candidate_query))
    num_candidates = candidates.shape[0]
    shard_candidates = None
    if split is not None:
        # [S, P (+Q), D]: one copy per batch shard, each device holding its shard's (no more than
        # the replicated array). The scan's backward pass accumulates each shard's candidate
        # gradient locally; the sum over shards happens once, after the scan.
        shard_candidates = split(jnp.broadcast_to(candidates[None], (shards, *candidates.shape)))

    query_index = jnp.arange(num_queries, dtype=jnp.int32)
    positive_column = query_index * group
    own_positive_hash = passage_hashes[positive_column]

    def to_blocks(x):
        # [Q, ...] -> [blocks, shards, block, ...]: step b takes rows b*block.. of every shard.
        x = x.reshape(shards, rows, *x.shape[1:])
        x = jnp.pad(x, [(0, 0), (0, blocks * block - rows)] + [(0, 0)] * (x.ndim - 2))
        return jnp.swapaxes(x.reshape(shards, blocks, block, *x.shape[2:]), 0, 1)

    def from_blocks(x):  # [blocks, shards, block] -> [Q], padding rows of the blocks dropped
        return jnp.swapaxes(x, 0, 1).reshape(shards, blocks * block)[:, :rows].reshape(num_queries)

    def score_block(carry, inputs):
        query, index, column, own_hash, more_hashes, real, own_query = inputs  # [S, b, ...]
        if shard_candidates is None:
            scores = jnp.einsum("sbd,pd->sbp", query, candidates, preferred_element_type=jnp.float32) / tau
        else:
            scores = jnp.einsum("sbd,spd->sbp", query, shard_candidates, preferred_element_type=jnp.float32) / tau
        columns = jnp.arange(num_candidates, dtype=jnp.int32)
        is_positive = columns == column[..., None]
        same_text = (candidate_hashes == own_hash[..., None]) & (own_hash[..., None] != 0)
        listed = (
            (candidate_hashes[None, None, :, None] == more_hashes[..., None, :])
            & (more_hashes[..., None, :] != 0)
        ).any(-1)
        same_query = (candidate_query == own_query[..., None]) & (own_query[..., None] != 0)
        negative = ~is_positive & ~same_text & ~listed & ~same_query & candidate_valid & real[..., None]
        if config.query_negatives:
            negative &= columns != (num_passages + index)[..., None]
        positive_score = jnp.take_along_axis(scores, column[..., None], axis=-1)[..., 0]
        fixed = lax.stop_gradient(scores)
        if config.margin is not None:
            negative &= fixed * tau <= lax.stop_gradient(positive_score)[..., None] * tau + config.margin
        # Computed once and kept: otherwise XLA recomputes the comparisons and hash lookups inside
        # every pass below that reads the mask.
        negative = lax.optimization_barrier(negative)
        count = negative.sum(-1)
        has = count > 0
        # Every term below is relative to the hardest negative's score m (a stop-gradient value):
        # with d = s - m <= 0 over the negatives, no exponential overflows and the largest is 1.
        hardest = jnp.where(has, jnp.where(negative, fixed, -jnp.inf).max(-1), 0.0)
        below = jnp.where(negative, fixed - hardest[..., None], 0.0)  # d, 0 off the negatives
        # Progressive weights w_ij = N_i * softmax_j(beta * s_ij) = N_i * e_ij / Z_i, e_ij = exp(beta * d_ij).
        beta_terms = jnp.where(negative, jnp.exp(beta * below), 0.0)
        beta_norm = beta_terms.sum(-1)
        # sum_j w_ij exp(s_ij) = N_i exp(m_i) / Z_i * sum_j exp(d_ij + beta * d_ij), the weights
        # held fixed: the gradient flows through the scores' own d_ij only.
        exponent = jnp.where(negative, scores - fixed + below * (1 + beta), 0.0)
        terms = jnp.where(negative, jnp.exp(exponent), 0.0)
        terms_sum = terms.sum(-1)
        tiny = jnp.finfo(jnp.float32).tiny
        log_negatives = (hardest + jnp.log(jnp.maximum(count, 1).astype(jnp.float32))
                         - jnp.log(jnp.maximum(beta_norm, tiny)) + jnp.log(jnp.maximum(terms_sum, tiny)))
        total = jnp.logaddexp(positive_score, jnp.where(has, log_negatives, -jnp.inf))
        loss = jnp.where(real, total - positive_score, 0.0)
        others = jnp.maximum(candidate_valid.sum() - 1, 1)  # the real candidates besides the positive
        # Where the negatives' pull goes: their share of the denominator, q_ij = w_ij exp(s_ij) / sum
        # = terms_ij / sum_j terms_ij; its entropy is log sum - sum_j q_ij log terms_ij.
        fixed_terms, fixed_sum = lax.stop_gradient(terms), jnp.maximum(lax.stop_gradient(terms_sum), tiny)
        entropy = jnp.log(fixed_sum) - (fixed_terms * lax.stop_gradient(exponent)).sum(-1) / fixed_sum
        own = negative & (columns // group == index[..., None]) & (columns < num_passages)
        stats = (
            positive_score * tau,
            hardest * tau,
            (others - count) / others,
            has.astype(jnp.float32),
            jnp.where(has, jnp.exp(entropy), 0.0),
            jnp.where(own, fixed_terms, 0.0).sum(-1) / fixed_sum,
            # w_ij / N_i summed over the own hard negatives: e_ij / Z_i.
            jnp.where(own, beta_terms, 0.0).sum(-1) / jnp.maximum(beta_norm, tiny),
        )
        return carry, (loss, stats)

    # Only the block's inputs are kept for the backward pass; its scores are recomputed there.
    score_block = jax.checkpoint(score_block, policy=jax.checkpoint_policies.nothing_saveable)
    _, (losses, stats) = lax.scan(
        score_block,
        None,
        (
            to_blocks(queries),
            to_blocks(query_index),
            to_blocks(positive_column),
            to_blocks(own_positive_hash),
            to_blocks(positive_hashes),
            to_blocks(valid),
            to_blocks(query_hashes),
        ),
    )
    losses = from_blocks(losses)
    positive_cos, hardest_cos, masked, has_negative, effective, own_share, own_weight = (from_blocks(s) for s in stats)
    weights = lax.stop_gradient(QUERY_WEIGHTS[config.query_weight](lax.stop_gradient(losses), gamma, valid))
    loss = (weights * losses).sum() / jnp.maximum(weights.sum(), 1e-12)
    real = valid.astype(jnp.float32)
    count = jnp.maximum(real.sum(), 1.0)
    mean = lambda x: (x * real).sum() / count  # noqa: E731
    with_negative = lambda x: (x * has_negative * real).sum() / jnp.maximum((has_negative * real).sum(), 1.0)  # noqa: E731
    metrics = {
        "loss": loss,
        "unweighted_loss": mean(losses),
        "positive_cosine": mean(positive_cos),
        "hardest_negative_cosine": with_negative(hardest_cos),
        "masked_fraction": mean(masked),
        # Over the queries with a negative: exp(entropy) of the negatives' share of the softmax
        # denominator (how many negatives the gradient really pushes against), the share that is
        # the query's own mined hard negatives, and the share of beta's weights w_ij / N_i on them
        # (at beta = 0: their count over N_i).
        "effective_negatives": with_negative(effective),
        "hard_negative_share": with_negative(own_share),
        "hard_negative_weight": with_negative(own_weight),
        "query_weight_min": jnp.where(valid, weights, jnp.inf).min(),
    }
    return loss, metrics


def distillation(queries, passages, teacher_scores, temperature: float, teacher_temperature: float, valid=None):
    """KL(teacher || student) over each query's own group, averaged over the real queries.

    The teacher's distribution is softmax(teacher_scores / teacher_temperature) over the query's
    1 + H passages (its positive and its hard negatives), the student's softmax(cos / temperature)
    over the same passages, as FlagEmbedding distils reranker scores (there as the cross entropy,
    which differs from the KL by the teacher's entropy, a constant: same gradient).

    Args:
      queries: [Q, D] float32, L2-normalised; passages: [Q * G, D], query i's group at rows
        i*G .. i*G + G - 1.
      teacher_scores: [Q, G] float32.
      valid: [Q] bool, false for padding queries.
    Returns: scalar float32.
    """
    num_queries, group = teacher_scores.shape
    groups = passages.reshape(num_queries, group, -1)
    student = jax.nn.log_softmax(jnp.einsum("qd,qgd->qg", queries, groups, preferred_element_type=jnp.float32)
                                 / temperature, axis=-1)
    teacher = jax.nn.log_softmax(teacher_scores.astype(jnp.float32) / teacher_temperature, axis=-1)
    kl = (jnp.exp(teacher) * (teacher - student)).sum(-1)
    real = jnp.ones((num_queries,), bool) if valid is None else valid.astype(bool)
    return jnp.where(real, kl, 0.0).sum() / jnp.maximum(real.sum(), 1)
