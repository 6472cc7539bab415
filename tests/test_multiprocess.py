"""Two processes x 4 CPU devices on 127.0.0.1 (JAX's distributed runtime, gloo collectives) train
exactly what one process x 8 devices trains, and resume from their own checkpoints (a lost process
ends the other with a clear error; a SIGTERM to one host stops both at the same step)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file
from test_train import REPO, tiny_args, wait_for_checkpoint


def local_run(args, workdir, processes, devices, env_extra=None):
    """launch/local.sh with the tiny config; returns the finished process."""
    env = dict(os.environ, PYTHON=sys.executable, NUM_PROCESSES=str(processes), DEVICES_PER_PROCESS=str(devices),
               PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.Popen(["bash", "launch/local.sh", *args[3:]], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def process_pid(process, index: int, timeout: float = 120) -> int:
    """The pid of launch/local.sh's process ``index`` (looked up before it is needed, so that a
    signal lands the moment the test sends it)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = subprocess.run(["pgrep", "-g", str(process.pid), "-f", f"process_id={index}"], capture_output=True, text=True).stdout.split()
        if found:
            return int(found[0])
        time.sleep(0.05)
    raise AssertionError(f"process {index} of launch/local.sh did not start within {timeout} s")


def losses(workdir):
    return [json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl")) if "loss" in json.loads(line)]


def assert_same_weights(workdir, reference):
    want = load_file(str(reference / "export" / "model.safetensors"))
    got = load_file(str(workdir / "export" / "model.safetensors"))
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)


def resume_and_match(args, workdir, reference, at_least):
    """The same 2-process command again: it resumes from step >= ``at_least`` and ends on the
    reference weights."""
    resumed = local_run(args, workdir, processes=2, devices=4)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert json.load(open(workdir / "report.json"))["start_step"] >= at_least
    assert_same_weights(workdir, reference)


@pytest.fixture(scope="module")
def one_process(shared_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one")
    data = tmp_path_factory.mktemp("data") / "triples.jsonl"
    with open(shared_data / "stsb_zh_triples" / "bge_finetune_data.jsonl", encoding="utf-8") as src, open(data, "w", encoding="utf-8") as dst:
        for line, _ in zip(src, range(40)):
            dst.write(line)
    process = local_run(tiny_args(shared_data, workdir, data), workdir, processes=1, devices=8)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return workdir, data


def test_two_processes_train_what_one_process_trains(shared_data, one_process, tmp_path):
    reference, data = one_process
    process = local_run(tiny_args(shared_data, tmp_path, data), tmp_path, processes=2, devices=4)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    np.testing.assert_allclose(losses(tmp_path), losses(reference), rtol=1e-5)
    assert_same_weights(tmp_path, reference)


def test_evaluation_with_two_processes_gives_the_metrics_of_one(minilm_path, shared_data, tmp_path):
    from test_evaluate import first_queries, subset, write_beir

    from pegjax.data.retrieval import load_beir

    data = subset(first_queries(load_beir(str(shared_data / "scifact"), "test"), 100), extra_docs=100)
    folder = tmp_path / "scifact_small"
    write_beir(folder, [json.dumps({"_id": i, "text": t}).encode() for i, t in zip(data.corpus_ids, data.corpus_texts)],
               [json.dumps({"_id": i, "text": t}).encode() for i, t in zip(data.query_ids, data.query_texts)],
               [f"{q}\t{d}\t{s}" for q, rel in data.qrels.items() for d, s in rel.items()])
    reports = {}
    for processes in (1, 2):
        out = tmp_path / f"results{processes}.json"
        process = local_run(["", "", "", f"--model={minilm_path}", f"--task={folder}", "--k=10,100",
                             "--passage_max_length=128", f"--output={out}"], tmp_path, processes=processes, devices=2,
                            env_extra={"MODULE": "pegjax.evaluate"})
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        reports[processes] = json.loads(out.read_text())["tasks"]["scifact_small"]
    assert reports[1]["queries"] == reports[2]["queries"] == 100
    for name, value in reports[1]["metrics"].items():
        assert reports[2]["metrics"][name] == pytest.approx(value, abs=1e-4), name


def test_a_killed_process_ends_the_other_a_sigterm_stops_both_at_one_step_and_each_run_resumes(
        shared_data, one_process, tmp_path):
    """One 2-process run through both ways a host goes away, each followed by the same command:
    a SIGKILL to one process ends the other with a clear error, the rerun resumes from the last
    checkpoint; a SIGTERM to one process (a scheduler's) makes both save the same step and exit 0;
    the last rerun resumes from there and ends on the uninterrupted weights."""
    reference, data = one_process
    # The kill must land while steps remain (CI once killed process 1 only after process 0 had run
    # all 12): with synchronous saves step 3's checkpoint has committed before step 4 starts, and
    # the pid is looked up beforehand, so the kill follows the commit with no pgrep in between.
    args = tiny_args(shared_data, tmp_path, data, "--heartbeat_timeout=10", "--config.train.async_checkpoints=false")
    process = local_run(args, tmp_path, processes=2, devices=4)
    second = process_pid(process, 1)
    wait_for_checkpoint(process, tmp_path, 3)
    os.kill(second, signal.SIGKILL)
    killed_at = time.time()
    _, err = process.communicate(timeout=240)
    assert not (tmp_path / "export").exists(), "the run finished before process 1 was killed"
    assert process.returncode != 0
    assert time.time() - killed_at < 120
    assert "another task died" in err
    killed_with = checkpoint_steps(tmp_path)
    assert killed_with and killed_with[-1] >= 3

    # The same command resumes; a SIGTERM to process 1 once it has logged a step of its own.
    metrics = tmp_path / "metrics.jsonl"
    logged = len(metrics.read_text().splitlines())
    process = local_run(args, tmp_path, processes=2, devices=4)
    second = process_pid(process, 1)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and len(metrics.read_text().splitlines()) <= logged:
        time.sleep(0.05)
    os.kill(second, signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert not (tmp_path / "export").exists(), "the run finished before process 1 got its SIGTERM"
    # The run's report (process 0 prints it): where it resumed and where it stopped.
    assert int(re.search(r'"start_step": (\d+)', out).group(1)) == killed_with[-1], out[-2000:]
    # Both processes stopped after the same step and saved it (a save needs both): the latest
    # checkpoint is that step.
    stopped = int(re.search(r'"preempted_at": (\d+)', out).group(1))
    assert killed_with[-1] < stopped < 12 and checkpoint_steps(tmp_path)[-1] == stopped
    resume_and_match(args, tmp_path, reference, at_least=stopped)


def checkpoint_steps(workdir):
    return sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())


def test_with_two_processes_exactly_one_mines_and_the_other_waits(shared_data, tmp_path):
    data = tmp_path / "unused.jsonl"
    args = tiny_args(shared_data, tmp_path / "run", data, "--config.data.train_files=",
                     f"--config.data.mine_from={shared_data / 'scifact'}:train", "--config.data.too_few_negatives=fill",
                     "--config.train.steps=2", "--config.train.export=false")
    process = local_run(args, tmp_path, processes=2, devices=2)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert err.count("mined hard negatives for 809 queries") == 1, err[-3000:]
    assert sum(1 for _ in open(tmp_path / "run" / "mined_train.jsonl")) == 809
