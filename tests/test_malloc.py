"""Commands restart once with glibc's malloc tuned (and the system's tcmalloc preloaded where there is
one), so XLA's large buffers stop faulting in afresh."""

import os
import platform
import subprocess
import sys

import pytest

from pegjax.distributed import MALLOC_TUNABLES, find_tcmalloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="glibc Linux only")

# Prints its pid, GLIBC_TUNABLES and LD_PRELOAD, restarts, then mallocs, fills and frees 64 MiB 20
# times (the size of an XLA temporary that glibc maps afresh each time by default) through the
# process's own malloc, as XLA calls it, and prints the page faults of all 20 blocks and of the last 19.
PROGRAM = """
import ctypes, os, resource, sys
from pegjax.distributed import restart_with_tuned_malloc
print(os.getpid(), repr(os.environ.get("GLIBC_TUNABLES")), repr(os.environ.get("LD_PRELOAD")), flush=True)
restart_with_tuned_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(20):
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    block = libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)
    libc.free(block)
faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
print("faults", faults[-1] - faults[0], faults[-1] - faults[1])
"""

def run(**env):
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "PEGJAX_TCMALLOC")}
    done = subprocess.run([sys.executable, "-c", PROGRAM], cwd=REPO, env=dict(base, **env), capture_output=True,
                          text=True, timeout=120, check=True)
    return done.stdout.splitlines()


def test_a_command_restarts_once_with_the_tunables_in_the_same_process():
    first, second, faults = run()
    pid, seen = first.split(" ", 1)
    assert seen == "None None"
    # exec: same pid, same command line, tunables set, the system's tcmalloc (if any) preloaded
    assert second == f"{pid} {MALLOC_TUNABLES!r} {find_tcmalloc()!r}"
    assert faults.startswith("faults ")


@pytest.mark.parametrize("command", ["pegjax.export", "bench.search"])
def test_a_command_restarts_before_it_imports_jax(command, tmp_path):
    """The restart comes from the package, before the command's module runs its imports: jax is
    imported once, by the restarted process (twice cost every command ~5 s of its start). (The
    benchmark's --help imports no jax at all.)"""
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "PEGJAX_TCMALLOC")}
    args = ["--model=/no/such/folder", f"--out={tmp_path / 'out'}"] if command == "pegjax.export" else ["--help"]
    done = subprocess.run([sys.executable, "-m", command, *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(base, PYTHONPROFILEIMPORTTIME="1", PYTHONDONTWRITEBYTECODE="1"))
    # Each process prints its own table of imports, headed by the same line.
    tables = done.stderr.split("import time: self [us] | cumulative | imported package")[1:]
    before, after = ([line.rsplit("|", 1)[1].strip() for line in table.splitlines() if line.startswith("import time:")]
                     for table in tables)  # exactly two processes: the command and its restart
    assert "jax" not in before and "pegjax.distributed" in before, done.stderr[-2000:]
    # export reads the folder after importing jax, then fails; --help stops before any jax
    assert ("jax" in after) == (command == "pegjax.export"), done.stderr[-2000:]


def test_a_users_own_setting_wins_and_an_empty_one_opts_out():
    first, faults = run(GLIBC_TUNABLES="")
    assert first.endswith(" '' None")
    first, second, faults = run(LD_PRELOAD="libc.so.6")
    assert second.endswith(f" {MALLOC_TUNABLES!r} 'libc.so.6'")
    first, second, faults = run(PEGJAX_TCMALLOC="0")
    assert second.endswith(f" {MALLOC_TUNABLES!r} None")


def transparent_huge_pages() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return "never"


@pytest.mark.skipif(transparent_huge_pages() == "never", reason="the kernel has transparent huge pages off")
def test_tuned_malloc_faults_far_fewer_pages():
    tuned = int(run(PEGJAX_TCMALLOC="0")[-1].split()[1])
    default = int(run(GLIBC_TUNABLES="")[-1].split()[1])
    # Default glibc maps each 64 MiB block afresh: ~16k page faults per block, 20 blocks.
    assert default > 20 * 16000 * 0.9
    assert tuned < default / 10, (tuned, default)


@pytest.mark.skipif(find_tcmalloc() is None, reason="no tcmalloc on this system (Debian/Ubuntu: libtcmalloc-minimal4)")
def test_with_tcmalloc_a_freed_block_is_reused_without_faulting():
    _, _, with_tcmalloc = run()
    _, _, glibc = run(PEGJAX_TCMALLOC="0")
    reused, glibc_reused = int(with_tcmalloc.split()[2]), int(glibc.split()[2])
    # glibc maps each of the last 19 blocks afresh: at least one fault per 2 MiB huge page of each
    assert glibc_reused >= 19 * 32 * 0.9, glibc
    assert reused < 100, with_tcmalloc
