"""Commands restart once with glibc's malloc tuned, so XLA's large buffers stop faulting in afresh."""

import os
import platform
import subprocess
import sys

import pytest

from pegjax.distributed import MALLOC_TUNABLES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="glibc Linux only")

# Prints its pid and GLIBC_TUNABLES, restarts, then mallocs, fills and frees 64 MiB 20 times (the
# size of an XLA temporary that glibc maps afresh each time by default) and prints the page faults.
PROGRAM = """
import ctypes, os, resource, sys
from pegjax.distributed import restart_with_tuned_malloc
print(os.getpid(), repr(os.environ.get("GLIBC_TUNABLES")), flush=True)
restart_with_tuned_malloc()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    block = libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)
    libc.free(block)
print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run(**env):
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", PROGRAM], cwd=REPO, env=dict(base, **env), capture_output=True,
                          text=True, timeout=120, check=True)
    return done.stdout.splitlines()


def test_a_command_restarts_once_with_the_tunables_in_the_same_process():
    first, second, faults = run()
    pid, seen = first.split(" ", 1)
    assert seen == "None"
    assert second == f"{pid} {MALLOC_TUNABLES!r}"  # exec: same pid, same command line, tunables set
    assert faults.startswith("faults ")


def test_a_users_own_setting_wins_and_an_empty_one_opts_out():
    first, faults = run(GLIBC_TUNABLES="")
    assert first.endswith(" ''")


def transparent_huge_pages() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return "never"


@pytest.mark.skipif(transparent_huge_pages() == "never", reason="the kernel has transparent huge pages off")
def test_tuned_malloc_faults_far_fewer_pages():
    tuned = int(run()[-1].split()[1])
    default = int(run(GLIBC_TUNABLES="")[-1].split()[1])
    # Default glibc maps each 64 MiB block afresh: ~16k page faults per block, 20 blocks.
    assert default > 20 * 16000 * 0.9
    assert tuned < default / 10, (tuned, default)
