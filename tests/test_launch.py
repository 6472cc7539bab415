"""The launch scripts parse, and pass shellcheck where it is installed."""

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
