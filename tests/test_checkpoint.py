"""Checkpoints on disk stay bounded: the last N, plus the best by a metric when one is named."""

import os

import jax.numpy as jnp

from pegjax.checkpoint import Checkpoints


def test_twelve_saves_keep_the_last_two_and_the_best(tmp_path):
    checkpoints = Checkpoints(str(tmp_path), keep=2, best_metric="scifact/ndcg@10", async_save=False)
    scores = {3: 0.61, 6: 0.66, 9: 0.63, 12: 0.62}  # evals every third save; the best at step 6
    for step in range(1, 13):
        metrics = {"scifact/ndcg@10": scores[step]} if step in scores else None
        checkpoints.save(step, {"weights": jnp.full(4, float(step))}, {"epoch": 0}, {"config": 1}, metrics)
    checkpoints.close()
    kept = sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit())
    assert kept == [6, 11, 12]
