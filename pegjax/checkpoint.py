"""Checkpoints: Orbax CheckpointManager over (train state, data iterator state, config).

Async saves (training goes on while the arrays are written), keep the last N and, with a named
eval metric, the best one too (so at most N + 1 on disk), atomic (a step counts only once Orbax
committed it). Every process takes part; Orbax writes each array's shards from the processes that
hold them.
"""

from __future__ import annotations

import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation


def _save_whole_shards_on_cpu() -> None:
    """On CPU devices each array shard is saved whole by its first replica. Orbax's default splits
    every replicated shard into one slice per replica, which on CPU devices (one memory) copies
    the data once more and compiles a slice program per array shape and device: 88 programs,
    ~5 s of a tiny 8-device run's first save on a 2-core CPU. GPUs and TPUs keep Orbax's choice."""
    import jax
    from absl import logging as absl_logging

    if jax.default_backend() != "cpu":
        return
    # Orbax warns on every override of its default handler: the choice is deliberate, so quiet.
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
    finally:
        absl_logging.set_verbosity(verbosity)


class Checkpoints:
    def __init__(self, directory: str, keep: int, best_metric: str = "", async_save: bool = True):
        _save_whole_shards_on_cpu()
        policies = [preservation.LatestN(n=keep)]
        if best_metric:
            # Ascending by the metric, the last one kept: the best. Saves without the metric are
            # kept only as the latest N.
            policies.append(preservation.BestN(get_metric_fn=lambda metrics: metrics[best_metric], n=1,
                                               keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            preservation_policy=preservation.AnyPreservationPolicy(policies),
            create=True,
        )
        self.manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, config: dict, metrics: dict | None = None, force: bool = False) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ),
            metrics=metrics,
            force=force,
        )

    def restore(self, step: int, abstract_state):
        """-> (state laid out like ``abstract_state``, data iterator state)."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        )
        return restored.state, restored.data

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_model(checkpoint: str):
    """``WORKDIR`` (latest step) or ``WORKDIR/checkpoints/STEP`` or ``WORKDIR/STEP`` ->
    (config, step, EmbeddingModel, params as numpy, tokenizer)."""
    import os

    import jax
    import ml_collections

    from pegjax import sharding
    from pegjax.errors import ConfigError
    from pegjax.models.build import build_model
    from pegjax.step import optimizer_and_schedules, state_layout

    path = os.path.abspath(checkpoint.rstrip("/"))
    step = None
    if os.path.basename(path).isdigit():
        step, path = int(os.path.basename(path)), os.path.dirname(path)
    directory = path if os.path.basename(path) == "checkpoints" else os.path.join(path, "checkpoints")
    if not os.path.isdir(directory):
        raise ConfigError(f"{checkpoint}: no checkpoints folder; pass a training workdir or WORKDIR/STEP")
    checkpoints = Checkpoints(directory, keep=1_000_000, async_save=False)
    step = checkpoints.latest_step() if step is None else step
    if step is None or step not in checkpoints.manager.all_steps():
        raise ConfigError(f"{checkpoint}: no checkpoint at step {step}; have {checkpoints.manager.all_steps()}")
    config = ml_collections.ConfigDict(checkpoints.restore_config(step))
    # How the run computed attention is not what it learned: this machine picks its own kernel
    # (a GPU run's "cudnn" restores on a CPU; configs saved before the key existed have none).
    config.model.attention = "auto"
    config.model.attention_dropout = config.model.get("attention_dropout", -1.0)
    model, _, tokenizer = build_model(config)
    tx, _ = optimizer_and_schedules(config)
    abstract, _ = state_layout(model, tx, sharding.make_mesh({"data": -1}))
    state, _ = checkpoints.restore(step, abstract)
    checkpoints.close()
    return config, step, model, jax.device_get(state.params), tokenizer
