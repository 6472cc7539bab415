"""The paper recipe runs as shipped on any device and process count: `configs/peg.py:paper` with
only the model shrunk trains a real step of 13,334 queries x 6 passages on 6 devices and on 2 processes
x 3 devices, and the launchers' defaults dry-run at their own device counts."""

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every run here sets XLA_FLAGS to its device count alone, so it keeps XLA's full optimization
# (not conftest's TEST_XLA_FLAGS): the recipe's loss scores 13,334 x 80,004 pairs, elementwise work
# that LLVM's vectorized code runs far faster (the one-step fixture: 123 s, 331 s at level 0).


def shrunk(shared_data, *extra):
    """The paper recipe, the model shrunk to 1 layer x 32 wide and the lengths to 16 / 24."""
    return ["--config=configs/peg.py:paper",
            f"--config.model.random_init.vocab_file={shared_data / 'vocab' / 'bert-base-chinese-vocab.txt'}",
            "--config.model.random_init.hidden_size=32", "--config.model.random_init.num_hidden_layers=1",
            "--config.model.random_init.num_attention_heads=2", "--config.model.random_init.intermediate_size=64",
            "--config.data.query_length=16", "--config.data.passage_length=24", *extra]


def run(args, devices, **env):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONUNBUFFERED="1", **env)
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def first_step(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return json.loads(f.readline())


@pytest.fixture(scope="module")
def one_step_runs(shared_data, tmp_path_factory):
    """One real step of the recipe on 6 devices in one process and on 2 processes x 3 devices, run
    side by side (much of a run is single-threaded host work)."""
    data = shared_data / "stsb_zh_triples" / "bge_finetune_data.jsonl"
    common = shrunk(shared_data, f"--config.data.train_files={data}", "--config.train.steps=1",
                    "--config.train.export=false")
    workdirs = {name: tmp_path_factory.mktemp(f"paper{name}") for name in ("6", "2x3")}
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=6", PYTHONUNBUFFERED="1")
    started = {
        "6": subprocess.Popen([sys.executable, "-m", "pegjax.main", f"--workdir={workdirs['6']}", *common],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "2x3": subprocess.Popen(["bash", "launch/local.sh", f"--workdir={workdirs['2x3']}", *common], cwd=REPO,
                                env=dict(env, NUM_PROCESSES="2", DEVICES_PER_PROCESS="3", PYTHON=sys.executable),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    }
    for name, process in started.items():
        out, err = process.communicate(timeout=900)
        assert process.returncode == 0, f"{name}: {err[-4000:]}"
        # 13,334 is not a multiple of 6: the step pads with rows that carry no tokens.
        assert "13,334 real + 4 padding" in out, f"{name}: {out[-2000:]}"
    return {name: first_step(workdir) for name, workdir in workdirs.items()}


def test_the_recipe_trains_its_own_batch_on_6_and_2x3_devices(one_step_runs):
    steps = one_step_runs
    for metrics in steps.values():
        assert metrics["step"] == 1 and metrics["nonfinite"] == 0 and 0 < metrics["loss"] < 20
    # The same 13,334 real queries and their 80,004 passages, token for token.
    assert steps["6"]["real_tokens"] == steps["2x3"]["real_tokens"]
    # 2 processes x 3 devices is the 6-device mesh: the same step, dropout masks included.
    assert abs(steps["2x3"]["loss"] - steps["6"]["loss"]) <= 1e-5 * steps["6"]["loss"]
    assert abs(steps["2x3"]["grad_norm"] - steps["6"]["grad_norm"]) <= 1e-4 * steps["6"]["grad_norm"]


def launcher_defaults():
    """(launcher, config, devices) as each launcher's defaults give them."""
    slurm = open(os.path.join(REPO, "launch", "slurm_gpu.sbatch")).read()
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", slurm).group(1))
    per_node = int(re.search(r"#SBATCH --ntasks-per-node=(\d+)", slurm).group(1))
    slurm_config = re.search(r"CONFIG=\$\{CONFIG:-([^}]+)\}", slurm).group(1)
    tpu = open(os.path.join(REPO, "launch", "tpu_pod.sh")).read()
    accelerator = re.search(r"ACCELERATOR=\$\{ACCELERATOR:-([^}]+)\}", tpu).group(1)
    generation, cores = accelerator.split("-")
    # v4 and v5p count TensorCores, two per chip, and JAX sees one device per chip; v5e counts chips.
    tpu_devices = int(cores) // 2 if generation in ("v4", "v5p") else int(cores)
    tpu_config = re.search(r"CONFIG=\$\{CONFIG:-([^}]+)\}", tpu).group(1)
    return [("slurm_gpu.sbatch", slurm_config, nodes * per_node), ("tpu_pod.sh", tpu_config, tpu_devices)]


@pytest.mark.parametrize("launcher, config, devices", launcher_defaults(), ids=lambda x: str(x))
def test_launcher_defaults_dry_run_at_their_device_counts(shared_data, tmp_path, launcher, config, devices):
    """BERT-base (random init, bert-base-chinese's 21,128-row vocabulary) in the launcher's
    default recipe on its default device count: the geometry table prints and the step lowers."""
    args = [sys.executable, "-m", "pegjax.main", f"--config={config}", f"--workdir={tmp_path / 'run'}", "--dry_run",
            f"--config.model.random_init.vocab_file={shared_data / 'vocab' / 'bert-base-chinese-vocab.txt'}"]
    out = run(args, devices).stdout
    assert f"devices / processes  {devices} / 1" in out
    assert "13,334 real" in out and "memory per device" in out
    assert "dry run: lowered the step" in out
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("overrides, message", [
    (["--config.train.queries_per_step=4"], r"config.train.queries_per_step=4 is smaller than the 8 batch shards .* use at least 8"),
    (["--config.train.encode_chunk=0"], r"config.train.encode_chunk=0: use a positive number"),
    # BERT-base at 256 tokens, 256 rows a chunk, on 16 GiB devices.
    (["--config.model.random_init.hidden_size=768", "--config.model.random_init.num_hidden_layers=12",
      "--config.model.random_init.num_attention_heads=12", "--config.model.random_init.intermediate_size=3072",
      "--config.data.passage_length=256", "--config.train.encode_chunk=256", "--config.train.device_memory_gib=16"],
     r"config.train.encode_chunk=256: a device needs ~\d+\.\d GiB \(estimate\), more than its 16.0 GiB; "
     r"config.train.encode_chunk=\d+ needs"),
    # The same model keeping every chunk's dense outputs (12 layers x 6,912 bf16 values a token).
    (["--config.model.random_init.hidden_size=768", "--config.model.random_init.num_hidden_layers=12",
      "--config.model.random_init.num_attention_heads=12", "--config.model.random_init.intermediate_size=3072",
      "--config.train.keep_dense_outputs=true", "--config.train.device_memory_gib=16"],
     r"config.train.keep_dense_outputs=True: a device needs ~\d+\.\d GiB \(estimate; 41.\d GiB of them the kept "
     r"outputs\), more than its 16.0 GiB; set it False \(~\d+\.\d GiB\)"),
], ids=["queries", "chunk", "memory", "kept_outputs"])
def test_configs_that_cannot_be_laid_out_fail_before_any_work(shared_data, tmp_path, overrides, message):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    done = subprocess.run([sys.executable, "-m", "pegjax.main", f"--workdir={tmp_path / 'run'}", *shrunk(shared_data),
                           f"--config.data.train_files={shared_data / 'stsb_zh_triples' / 'bge_finetune_data.jsonl'}",
                           *overrides], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(message, errors[0]), done.stderr[-2000:]
    assert not os.path.exists(tmp_path / "run")
