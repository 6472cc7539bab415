"""The launch scripts parse, pass shellcheck where it is installed, and hand each process what it
needs."""

import glob
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*"))) + [os.path.join(REPO, ".ci", "run"),
                                                                    os.path.join(REPO, "bench", "gpu.sh")]


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_parses(script):
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)")
def test_scripts_pass_shellcheck():
    done = subprocess.run(["shellcheck", *SCRIPTS], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_tpu_launcher_names_what_is_missing():
    env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE")}
    done = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "train"], capture_output=True, text=True, env=env)
    assert done.returncode != 0 and "set TPU_NAME" in done.stderr


def test_local_launcher_sets_each_process_device_count_and_keeps_the_other_xla_flags(tmp_path):
    """What launch/local.sh hands each process: its own device count in place of the caller's, the
    caller's other XLA flags, and the coordinator arguments (a stand-in interpreter prints them)."""
    echo = tmp_path / "python"
    echo.write_text('#!/usr/bin/env bash\necho "XLA_FLAGS=[$XLA_FLAGS] $*"\n')
    echo.chmod(0o755)
    env = dict(os.environ, PYTHON=str(echo), NUM_PROCESSES="2", DEVICES_PER_PROCESS="3", PORT="29999",
               XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    done = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), "--workdir=w"], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr
    lines = sorted(done.stdout.splitlines())
    assert len(lines) == 2
    for index, line in enumerate(lines):
        flags, args = line.split("] ")
        assert sorted(flags.removeprefix("XLA_FLAGS=[").split()) == [
            "--xla_backend_optimization_level=0", "--xla_force_host_platform_device_count=3"]
        assert args == (f"-m pegjax.main --coordinator=127.0.0.1:29999 --num_processes=2 --process_id={index} "
                        "--workdir=w")
