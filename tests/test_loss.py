"""The blocked loss equals dense references: sentence-transformers' MNRL and a plain computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_step import dense_reference_loss

from pegjax.loss import LossConfig, contrastive_loss, focal, outlier_downweight


def random_embeddings(rng, rows, dim=32):
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_plain_infonce_equals_multiple_negatives_ranking_loss():
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    rng = np.random.default_rng(0)
    queries_count, hard, tau = 12, 5, 0.05
    group = 1 + hard
    queries = random_embeddings(rng, queries_count)
    passages = random_embeddings(rng, queries_count * group)
    config = LossConfig(group_size=group, temperature=tau, query_block=4)

    def ours(q, p):
        # MNRL scores by cosine, i.e. normalises inside the loss; our model normalises before it.
        unit = lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
        q, p = unit(q), unit(p)
        return contrastive_loss(q, p, jnp.zeros(len(p), jnp.int32), jnp.zeros((len(q), 1), jnp.int32),
                                0.0, 0.0, config)[0]

    loss, (grad_q, grad_p) = jax.value_and_grad(ours, argnums=(0, 1))(queries, passages)

    # sentence-transformers' layout: [anchors, positives, negatives_1, ..., negatives_H], each [Q, D].
    reference = MultipleNegativesRankingLoss(model=None, scale=1.0 / tau)
    q_t = torch.tensor(queries, requires_grad=True)
    p_t = torch.tensor(passages, requires_grad=True)
    by_role = p_t.reshape(queries_count, group, -1)
    columns = [q_t] + [by_role[:, h] for h in range(group)]
    expected = reference.compute_loss_from_embeddings(columns, labels=None)
    expected.backward()
    assert abs(float(loss) - expected.item()) <= 1e-5
    np.testing.assert_allclose(grad_q, q_t.grad.numpy(), atol=1e-6)
    np.testing.assert_allclose(grad_p, p_t.grad.numpy(), atol=1e-6)


@pytest.mark.parametrize("margin", [None, 0.05])
@pytest.mark.parametrize("query_negatives", [False, True])
@pytest.mark.parametrize("block", [1, 3])
def test_blocked_equals_dense_with_masks_and_weights(margin, query_negatives, block):
    rng = np.random.default_rng(1)
    queries_count, group, tau, beta, gamma = 6, 4, 0.1, 3.0, 2.0
    queries = random_embeddings(rng, queries_count, dim=16)
    passages = random_embeddings(rng, queries_count * group, dim=16)
    hashes = rng.integers(1, 1000000, size=queries_count * group).astype(np.int32)
    # Query 0 lists every other passage as a known positive: all its passage negatives are masked.
    positive_hashes = np.zeros((queries_count, len(hashes)), np.int32)
    positive_hashes[0, 1:] = hashes[1:]
    positive_hashes[4, 0] = hashes[5 * group + 2]  # query 4 lists one more positive
    hashes[2 * group + 1] = hashes[3 * group]  # query 3's positive text is also query 2's negative
    config = LossConfig(group_size=group, temperature=tau, query_block=block,
                        query_negatives=query_negatives, margin=margin)
    shards = 2

    def blocked(q, p):
        return contrastive_loss(q, p, hashes, positive_hashes, beta, gamma, config, shards=shards)

    def dense(q, p):
        return dense_reference_loss(q, p, hashes, positive_hashes, beta, gamma, group, tau, margin, query_negatives)

    (loss, metrics), grads = jax.value_and_grad(blocked, argnums=(0, 1), has_aux=True)(queries, passages)
    want, want_grads = jax.value_and_grad(dense, argnums=(0, 1))(queries, passages)
    assert np.isfinite(float(loss)) and abs(float(loss) - float(want)) <= 1e-5 * abs(float(want))
    for got, expected in zip(grads, want_grads):
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.isfinite(np.asarray(grads[0])).all()
    if not query_negatives:
        # Query 0 has no negative left: its loss is 0 and its embedding gets no gradient.
        np.testing.assert_allclose(grads[0][0], 0.0, atol=1e-7)
    assert float(metrics["masked_fraction"]) > 0.1


def test_beta_moves_weight_to_hard_negatives_and_gamma_downweights_outliers():
    rng = np.random.default_rng(2)
    queries = random_embeddings(rng, 8)
    passages = random_embeddings(rng, 8 * 3)
    config = LossConfig(group_size=3, temperature=0.05, query_block=8)
    no_hash, no_extra = np.zeros(24, np.int32), np.zeros((8, 1), np.int32)
    plain = contrastive_loss(queries, passages, no_hash, no_extra, 0.0, 0.0, config)[0]
    hard = contrastive_loss(queries, passages, no_hash, no_extra, 5.0, 0.0, config)[0]
    # Weighting towards high-scoring negatives raises the loss (Jensen: the weighted mean of
    # exp(s) with weights increasing in s exceeds the plain mean).
    assert float(hard) > float(plain)
    losses = jnp.array([0.5, 0.6, 0.55, 5.0])
    v = outlier_downweight(losses, 2.0)
    assert float(v[3]) < 0.2 and float(v[:3].min()) > 0.5
    np.testing.assert_allclose(outlier_downweight(losses, 0.0), 1.0)
    np.testing.assert_allclose(focal(losses, 0.0), 1.0)
    assert float(focal(losses, 2.0)[3]) > float(focal(losses, 2.0)[0])


def test_a_block_that_does_not_divide_the_rows_is_padded_not_an_error():
    """5 query rows per shard in blocks of at most 3: two blocks of 3, one row of padding; the
    loss and gradient are those of one query a block."""
    rng = np.random.default_rng(3)
    queries, passages = random_embeddings(rng, 10), random_embeddings(rng, 20)
    hashes = rng.integers(1, 1000, size=20).astype(np.int32)

    def loss(block, q, p):
        config = LossConfig(group_size=2, query_block=block)
        return contrastive_loss(q, p, hashes, np.zeros((10, 1), np.int32), 2.0, 1.0, config, shards=2)[0]

    want, want_grad = jax.value_and_grad(lambda q: loss(1, q, passages))(queries)
    got, got_grad = jax.value_and_grad(lambda q: loss(3, q, passages))(queries)
    assert abs(float(got) - float(want)) <= 1e-6 * abs(float(want))
    np.testing.assert_allclose(got_grad, want_grad, atol=1e-6)


def test_a_query_on_two_rows_masks_each_rows_positive_for_the_other():
    """Rows 0 and 5 hold the same query text with different positives (one query split over two
    lines, or a duplicated query): each row's positive is masked for the other, exactly as if each
    listed the other's positive; with query negatives, their query columns are masked too."""
    rng = np.random.default_rng(4)
    count, group = 8, 3
    queries, passages = random_embeddings(rng, count), random_embeddings(rng, count * group)
    queries[5] = queries[0]
    hashes = rng.integers(1, 1000000, size=count * group).astype(np.int32)
    query_hashes = rng.integers(1, 1000000, size=count).astype(np.int32)
    query_hashes[5] = query_hashes[0]
    none = np.zeros((count, 1), np.int32)
    listed = none.copy()
    listed[0, 0], listed[5, 0] = hashes[5 * group], hashes[0]

    def loss(q, p, extra, by_query, query_negatives=False):
        cfg = LossConfig(group_size=group, temperature=0.05, query_block=2, query_negatives=query_negatives)
        return contrastive_loss(q, p, hashes, extra, 2.0, 1.0, cfg, query_hashes=query_hashes if by_query else None)

    (want, _), want_grad = jax.value_and_grad(lambda q: loss(q, passages, listed, False), has_aux=True)(queries)
    (got, _), got_grad = jax.value_and_grad(lambda q: loss(q, passages, none, True), has_aux=True)(queries)
    unmasked, _ = loss(queries, passages, none, False)
    assert abs(float(got) - float(want)) <= 1e-6 * abs(float(want)) and abs(float(unmasked) - float(want)) > 1e-3
    np.testing.assert_allclose(got_grad, want_grad, atol=1e-6)
    _, plain = loss(queries, passages, none, False, query_negatives=True)
    _, masked = loss(queries, passages, none, True, query_negatives=True)
    others = count * group + count - 1
    # Two rows each lose the other's positive and the other's query column.
    assert float(masked["masked_fraction"]) - float(plain["masked_fraction"]) == pytest.approx(2 * 2 / others / count)


@pytest.mark.parametrize("beta", [0.0, 4.0])
def test_negative_diagnostics_equal_a_dense_computation(beta):
    """effective_negatives, hard_negative_share and hard_negative_weight are what a user reads to
    see where the loss pushes: checked against numpy over the whole score matrix."""
    rng = np.random.default_rng(4)
    queries_count, group, tau = 10, 3, 0.1
    queries = random_embeddings(rng, queries_count, dim=16)
    passages = random_embeddings(rng, queries_count * group, dim=16)
    config = LossConfig(group_size=group, temperature=tau, query_block=3)
    _, got = contrastive_loss(queries, passages, np.zeros(len(passages), np.int32),
                              np.zeros((queries_count, 1), np.int32), beta, 0.0, config, shards=2)

    scores = queries.astype(np.float64) @ passages.T.astype(np.float64) / tau
    effective, share, weight = [], [], []
    for i in range(queries_count):
        negative = np.arange(len(passages)) != i * group
        s = scores[i, negative]
        w = np.exp(beta * s) / np.exp(beta * s).sum() * len(s)
        q = w * np.exp(s) / (w * np.exp(s)).sum()
        own = (np.arange(len(passages))[negative] // group) == i
        effective.append(np.exp(-(q * np.log(q)).sum()))
        share.append(q[own].sum())
        weight.append(w[own].sum() / len(s))
    np.testing.assert_allclose(float(got["effective_negatives"]), np.mean(effective), rtol=1e-4)
    np.testing.assert_allclose(float(got["hard_negative_share"]), np.mean(share), rtol=1e-4)
    np.testing.assert_allclose(float(got["hard_negative_weight"]), np.mean(weight), rtol=1e-4)
    if beta == 0.0:  # uniform weights: the own negatives' count over all negatives
        np.testing.assert_allclose(float(got["hard_negative_weight"]), (group - 1) / (len(passages) - 1), rtol=1e-5)
