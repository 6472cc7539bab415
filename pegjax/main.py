"""Entry point: ``python -m pegjax.main --config=configs/peg.py[:VARIANT] --workdir=DIR [--config.KEY=VALUE]``.

Kept short on purpose: flags, ``jax.distributed.initialize()`` when the environment describes
several processes, a log line saying which process and devices this is, then
``train.train_and_evaluate(config, workdir)``. Running the same command again resumes.
"""

import json
import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/peg.py:demo.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and the exported model go.", required=True)
flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs without SLURM/TPU).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).")
flags.DEFINE_integer("heartbeat_timeout", 100, "Seconds before the other processes give up on a silent one.")
flags.DEFINE_boolean("dry_run", False, "Print the run's geometry, lower the step without data or weights, and exit.")
FLAGS = flags.FLAGS

def main(argv):
    if not FLAGS["verbosity"].present:  # Orbax logs every save at INFO; keep the console readable
        absl_logging.set_verbosity(absl_logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/peg.py:demo")
    from pegjax import distributed, train

    distributed.use_cpu_cores()
    train.check(FLAGS.config, need_data=not FLAGS.dry_run)  # a config that cannot run fails before any work
    distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id, FLAGS.heartbeat_timeout)
    import jax

    if jax.process_index() == 0:
        print(f"pegjax: process {jax.process_index()} of {jax.process_count()}; {jax.local_device_count()} local / "
              f"{jax.device_count()} global {jax.devices()[0].platform} devices; workdir {FLAGS.workdir}", flush=True)
    logging.info("config:\n%s", FLAGS.config)
    planned = train.plan(FLAGS.config, need_data=not FLAGS.dry_run)  # a run that cannot be laid out fails here
    if jax.process_index() == 0:
        from pegjax import geometry

        print(geometry.table(planned), flush=True)
    if FLAGS.dry_run:
        import time

        start = time.perf_counter()
        lowered = train.dry_run(FLAGS.config, planned)
        if jax.process_index() == 0:
            print(f"dry run: lowered the step in {time.perf_counter() - start:.1f} s "
                  f"({len(lowered.as_text()):,} characters of StableHLO); no data read, nothing written")
        return
    report = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in report.items() if k != "data"}, indent=2))


if __name__ == "__main__":
    from pegjax.errors import guarded

    app.run(guarded(main))
