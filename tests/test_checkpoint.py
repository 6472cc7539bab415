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


def test_a_state_replicated_over_cpu_devices_saves_without_compiling_and_restores(tmp_path, caplog):
    """Orbax's default cuts each replicated array into one slice per device and compiles a slice
    program for each: on CPU devices every shard is written whole instead, with no compilation."""
    import logging

    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    assert jax.device_count() == 8
    replicated = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec())
    state = {"kernel": jax.device_put(jnp.arange(96.0).reshape(12, 8), replicated),
             "bias": jax.device_put(jnp.arange(5.0), replicated)}
    with caplog.at_level(logging.WARNING):
        checkpoints = Checkpoints(str(tmp_path), keep=1, async_save=False)
    assert not [r for r in caplog.records if "overriding" in r.getMessage()]  # no warning for a user to read
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            checkpoints.save(1, state, {"epoch": 0}, {"config": 1})
    finally:
        jax.config.update("jax_log_compiles", False)
    compiled = [r.getMessage().split(" with ")[0] for r in caplog.records if r.getMessage().startswith("Compiling")]
    assert not compiled, compiled
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, data = checkpoints.restore(1, abstract)
    checkpoints.close()
    assert data == {"epoch": 0}
    for name in state:
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(state[name]))
        assert restored[name].sharding == replicated
