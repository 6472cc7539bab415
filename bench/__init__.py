"""pegjax's benchmarks. Run as ``python -m bench.NAME``, the process restarts here once with the
allocator pegjax's own commands use (`pegjax.distributed.restart_if_command`), before any
benchmark imports jax or torch."""

from pegjax.distributed import restart_if_command as _restart_if_command

_restart_if_command(__name__)
