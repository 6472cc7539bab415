"""Joining JAX's multi-controller runtime, and moving arrays between processes and the host.

``initialize`` is called by every entry point: with ``--coordinator/--num_processes/--process_id``
flags, under SLURM with several tasks, or on a TPU pod it calls ``jax.distributed.initialize()``;
for a single process it does nothing. ``PEGJAX_CPU_COLLECTIVES=gloo`` (set by launch/local.sh)
lets CPU processes run collectives over TCP.
"""

from __future__ import annotations

import itertools
import os
import sys

import numpy as np

_ROUNDS = itertools.count()

_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


# glibc keeps XLA's large temporary buffers in its heap (and backs them with transparent huge
# pages) instead of mapping and faulting them in afresh on every use: 12.6M -> 0.5M page faults in a
# medical_zh step, ~8% of a training step and ~13% of encoding on a 2-core CPU (bench/RESULTS.md).
MALLOC_TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"

# glibc still maps every block over 32 MiB (its highest mmap threshold) afresh, and a training
# step's temporaries are one such block of ~2 GiB per device: the first pass of each step over it
# faults it in again. gperftools' tcmalloc keeps freed blocks for reuse; where the system has it
# (Debian/Ubuntu: libtcmalloc-minimal4) the restart preloads it: a SciFact step 47.7 -> 42.8 s on a
# 2-core CPU (bench/RESULTS.md). tcmalloc reports each allocation over 1 GiB on stderr unless told
# otherwise; a step's temporaries are that large by design.
TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")
TCMALLOC_ENV = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 50)}


def find_tcmalloc() -> str | None:
    """The file name of the system's tcmalloc (as the dynamic linker finds it), or None."""
    import ctypes.util

    for name in TCMALLOC_LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def restart_with_tuned_malloc() -> None:
    """Re-executes this command once with a faster allocator setting (glibc reads its tunables and
    the dynamic linker ``LD_PRELOAD`` only at start): ``MALLOC_TUNABLES`` always, and the system's
    tcmalloc preloaded where there is one (`find_tcmalloc`).

    Called for the command-line entry points (`restart_if_command`), never from a library call. Does nothing
    when ``GLIBC_TUNABLES`` is already set (a user's own setting wins; ``GLIBC_TUNABLES=`` opts out of
    both) or off glibc Linux; leaves ``LD_PRELOAD`` alone when it is set, and
    ``PEGJAX_TCMALLOC=0`` keeps glibc's malloc.
    """
    if "GLIBC_TUNABLES" in os.environ or not sys.platform.startswith("linux") or not hasattr(sys, "orig_argv"):
        return
    import platform

    if platform.libc_ver()[0] != "glibc":
        return
    os.environ["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    tcmalloc = None if os.environ.get("LD_PRELOAD") or os.environ.get("PEGJAX_TCMALLOC") == "0" else find_tcmalloc()
    if tcmalloc:
        os.environ["LD_PRELOAD"] = tcmalloc
        for key, value in TCMALLOC_ENV.items():
            os.environ.setdefault(key, value)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


def restart_if_command(package: str) -> None:
    """`restart_with_tuned_malloc` when this process is ``python -m PACKAGE.MODULE`` (one of the
    package's commands), called from the package's ``__init__``: Python imports the package before
    it runs the command's module, so the restart comes before the module's own imports. (From the
    module's ``__main__`` block it came after them: jax imported twice, ~5 s of every command's
    start on a 2-core CPU, an `error:` line included.) While ``-m`` locates its module,
    ``sys.argv[0]`` is ``"-m"``; an import of the package from anywhere else changes nothing."""
    argv = getattr(sys, "orig_argv", [])
    if sys.argv[:1] != ["-m"] or "-m" not in argv[1:]:
        return
    module = argv[argv.index("-m", 1) + 1] if argv.index("-m", 1) + 1 < len(argv) else ""
    if module.startswith(package + "."):
        restart_with_tuned_malloc()


def use_cpu_cores() -> None:
    """Makes each CPU core a JAX CPU device (before jax is imported), unless XLA_FLAGS already sets
    a count: XLA:CPU keeps more of the cores busy running a data-parallel step on one device per
    core than one step on one device. Accelerators are unaffected."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cores}".strip()
    # JAX reports each accelerator plugin it does not find ("Unable to initialize backend 'tpu'")
    # at INFO on every start; only a real problem is worth a user's attention.
    import logging

    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               heartbeat_timeout: int = 100) -> None:
    """A process that stops answering for ``heartbeat_timeout`` seconds makes every other process
    exit with "the JAX distributed service detected fatal errors ... another task died"."""
    import jax

    if os.environ.get("PEGJAX_CPU_COLLECTIVES"):
        jax.config.update("jax_cpu_collectives_implementation", os.environ["PEGJAX_CPU_COLLECTIVES"])
    if coordinator:
        host = coordinator.rsplit(":", 1)[0]
        jax.distributed.initialize(
            coordinator, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_timeout,
            # a loopback coordinator listens on loopback only
            coordinator_bind_address=coordinator if host in ("127.0.0.1", "localhost") else None,
        )
    elif os.environ.get("SLURM_NTASKS", "1") != "1" or any(os.environ.get(k) for k in _CLUSTER_ENV):
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout)


def to_host(tree):
    """Global arrays (sharded over any processes) -> the same tree of full numpy arrays, on every
    process."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return jax.device_get(tree)
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def gather_rows(local: np.ndarray, total: int) -> np.ndarray:
    """Each process's contiguous block of rows (``process_share``) -> all ``total`` rows, on every
    process."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return local
    per = -(-total // jax.process_count())
    padded = np.zeros((per, *local.shape[1:]), local.dtype)
    padded[: len(local)] = local
    gathered = np.asarray(multihost_utils.process_allgather(padded))  # [processes, per, ...]
    return gathered.reshape(-1, *local.shape[1:])[:total]


def process_share(total: int) -> slice:
    """This process's contiguous block of ``total`` rows."""
    import jax

    per = -(-total // jax.process_count())
    start = min(jax.process_index() * per, total)
    return slice(start, min(start + per, total))


def any_process(flags: dict[str, bool], timeout_s: int = 3600) -> dict[str, bool]:
    """{name: flag} -> {name: the flag of any process}, exchanged through the distributed runtime's
    key-value store (host to coordinator, no device work). Every process calls it the same number
    of times; a single process gets its own flags back."""
    import jax

    if jax.process_count() == 1:
        return dict(flags)
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    round_, me = next(_ROUNDS), jax.process_index()
    names = sorted(flags)
    client.key_value_set(f"pegjax/any/{round_}/{me}", "".join("1" if flags[n] else "0" for n in names))
    merged = dict(flags)
    for process in range(jax.process_count()):
        theirs = client.blocking_key_value_get(f"pegjax/any/{round_}/{process}", timeout_s * 1000)
        merged.update({n: merged[n] or bit == "1" for n, bit in zip(names, theirs)})
    if round_ >= 2:  # every process has read round - 2 before writing round - 1
        client.key_value_delete(f"pegjax/any/{round_ - 2}/{me}")
    return merged


def barrier(name: str, timeout_s: int = 24 * 3600) -> None:
    """Waits until every process reaches the barrier ``name`` (a no-op for a single process)."""
    import jax

    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    jax_distributed.global_state.client.wait_at_barrier(f"pegjax/{name}", timeout_s * 1000)
