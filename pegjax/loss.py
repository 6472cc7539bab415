"""The global contrastive loss: scores, false-negative masks, progressive weights, in query blocks.

Batch layout. Q queries; query i owns the passages ``i*G .. i*G+G-1`` of the P = Q*G passages,
G = 1 + H: its positive first, then its H hard negatives. Every query is scored against all P
passages (and optionally the other Q-1 queries). With s_ij = cos(q_i, p_j) / tau::

    loss_i = -log( exp(s_i+) / ( exp(s_i+) + sum_j w_ij * exp(s_ij) ) )
    w_ij   = N_i * softmax_j( beta * s_ij )          over the unmasked negatives j, stop-gradient
    loss   = sum_i v_i * loss_i / sum_i v_i,         v_i = stop_gradient( query_weight(loss_i, gamma) )

N_i is the number of unmasked negatives of query i. beta = 0 gives w_ij = 1 (plain InfoNCE); a
larger beta moves the weight onto the hardest negatives. gamma = 0 gives v_i = 1.

A negative j of query i is masked (left out of the sum) when it is i's positive, when its text hash
equals that of i's positive or of another listed positive of i, or (optional margin guard) when it
scores above i's positive by more than ``margin`` in cosine. A hash of 0 means "unknown" and never
matches. A query whose negatives are all masked has loss_i = 0.

The [Q, P] score matrix never exists whole: queries are taken in blocks of ``query_block`` rows per
batch shard, each block scored against all passages and checkpointed, so the forward and backward
pass hold O(shards * query_block * P) scores at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax


def outlier_downweight(losses, gamma):
    """v_i = exp(-gamma * max(0, z_i)), z_i the loss standardised over the global batch.

    Down-weights queries with outlying (likely mislabelled) loss; gamma = 0 weighs all alike.
    losses [Q] float32 -> [Q] float32 in (0, 1].
    """
    mean = losses.mean()
    std = jnp.sqrt(jnp.maximum(((losses - mean) ** 2).mean(), 0.0))
    z = (losses - mean) / jnp.maximum(std, 1e-6)
    return jnp.exp(-gamma * jnp.maximum(z, 0.0))


def focal(losses, gamma):
    """v_i = (1 - exp(-loss_i)) ** gamma: emphasises queries the model still gets wrong.

    losses [Q] float32 -> [Q] float32 in [0, 1].
    """
    return (-jnp.expm1(-losses)) ** gamma


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
      gather: optional function applied to the [P (+Q), D] candidate embeddings before scoring
        (the step passes a replicating sharding constraint, so they are all-gathered once).

    Returns:
      (loss scalar float32, metrics dict of scalars).
    """
    num_queries = queries.shape[0]
    num_passages = passages.shape[0]
    group = config.group_size
    if num_passages != num_queries * group:
        raise ValueError(f"{num_passages} passages for {num_queries} queries x group {group}")
    rows = num_queries // shards
    block = min(config.query_block, rows)
    if num_queries % shards or rows % block:
        raise ValueError(
            f"config.loss.query_block={config.query_block}: the {rows} query rows per shard "
            f"({num_queries} queries / {shards} shards) must be a multiple of it"
        )
    blocks = rows // block
    tau = config.temperature

    candidates, candidate_hashes = passages, passage_hashes
    if config.query_negatives:
        candidates = jnp.concatenate([passages, queries], axis=0)
        candidate_hashes = jnp.concatenate([passage_hashes, jnp.zeros((num_queries,), passage_hashes.dtype)])
    if gather is not None:
        candidates = gather(candidates)
    num_candidates = candidates.shape[0]

    query_index = jnp.arange(num_queries, dtype=jnp.int32)
    positive_column = query_index * group
    own_positive_hash = passage_hashes[positive_column]

    def to_blocks(x):
        # [Q, ...] -> [blocks, shards, block, ...]: step b takes rows b*block.. of every shard.
        x = x.reshape(shards, blocks, block, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    def score_block(carry, inputs):
        query, index, column, own_hash, more_hashes = inputs  # [S, b, ...]
        scores = jnp.einsum("sbd,pd->sbp", query, candidates, preferred_element_type=jnp.float32) / tau
        columns = jnp.arange(num_candidates, dtype=jnp.int32)
        is_positive = columns == column[..., None]
        same_text = (candidate_hashes == own_hash[..., None]) & (own_hash[..., None] != 0)
        listed = (
            (candidate_hashes[None, None, :, None] == more_hashes[..., None, :])
            & (more_hashes[..., None, :] != 0)
        ).any(-1)
        negative = ~is_positive & ~same_text & ~listed
        if config.query_negatives:
            negative &= columns != (num_passages + index)[..., None]
        positive_score = jnp.take_along_axis(scores, column[..., None], axis=-1)[..., 0]
        if config.margin is not None:
            fixed = lax.stop_gradient(scores)
            negative &= fixed * tau <= lax.stop_gradient(positive_score)[..., None] * tau + config.margin
        count = negative.sum(-1)
        # Progressive negative weights, in log space: log w_ij = log N_i + log softmax_j(beta*s_ij).
        fixed = lax.stop_gradient(scores)
        beta_logits = jnp.where(negative, beta * fixed, -jnp.inf)
        log_norm = jax.nn.logsumexp(beta_logits, axis=-1, keepdims=True)
        log_norm = jnp.where(count[..., None] > 0, log_norm, 0.0)
        log_weight = jnp.where(
            negative, jnp.log(jnp.maximum(count, 1).astype(jnp.float32))[..., None] + beta * fixed - log_norm, 0.0
        )
        weighted = jnp.where(negative, scores + log_weight, -jnp.inf)
        total = jnp.logaddexp(positive_score, jax.nn.logsumexp(weighted, axis=-1))
        loss = total - positive_score
        hardest = jnp.where(count > 0, jnp.where(negative, fixed, -jnp.inf).max(-1), 0.0)
        stats = (
            positive_score * tau,
            hardest * tau,
            (num_candidates - 1 - count) / (num_candidates - 1),
            (count > 0).astype(jnp.float32),
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
        ),
    )
    from_blocks = lambda x: jnp.swapaxes(x, 0, 1).reshape(num_queries)  # noqa: E731
    losses = from_blocks(losses)
    positive_cos, hardest_cos, masked, has_negative = (from_blocks(s) for s in stats)
    weights = lax.stop_gradient(QUERY_WEIGHTS[config.query_weight](lax.stop_gradient(losses), gamma))
    loss = (weights * losses).sum() / jnp.maximum(weights.sum(), 1e-12)
    metrics = {
        "loss": loss,
        "unweighted_loss": losses.mean(),
        "positive_cosine": positive_cos.mean(),
        "hardest_negative_cosine": (hardest_cos * has_negative).sum() / jnp.maximum(has_negative.sum(), 1.0),
        "masked_fraction": masked.mean(),
        "query_weight_min": weights.min(),
    }
    return loss, metrics
