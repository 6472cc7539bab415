"""Training end to end through `python -m pegjax.main`: exact resume after SIGKILL, SIGTERM
checkpoints, bad input, TensorBoard events, config errors."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from pegjax.data import training
from pegjax.data.retrieval import DataError

from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12


def tiny_args(shared_data, workdir, train_file, *extra):
    """A tiny random-init Chinese BERT on real STS-B triples: seconds per step on a laptop CPU."""
    return [
        sys.executable, "-m", "pegjax.main", "--config=configs/peg.py:paper", f"--workdir={workdir}",
        "--config.model.path=", f"--config.model.random_init.vocab_file={shared_data / 'vocab' / 'bert-base-chinese-vocab.txt'}",
        "--config.model.random_init.hidden_size=32", "--config.model.random_init.num_hidden_layers=1",
        "--config.model.random_init.num_attention_heads=2", "--config.model.random_init.intermediate_size=64",
        "--config.model.dtype=float32", "--config.model.dropout=true", "--config.mesh.fsdp=1", "--config.mesh.data=-1",
        f"--config.data.train_files={train_file}", "--config.data.query_length=16", "--config.data.passage_length=24",
        "--config.train.queries_per_step=8", f"--config.train.steps={STEPS}", "--config.train.checkpoint_steps=3",
        "--config.train.log_steps=2", "--config.train.encode_chunk=8", "--config.loss.query_block=8",
        "--config.progressive.beta.steps=12", "--config.progressive.gamma.steps=12",
        "--config.optimizer.learning_rate.warmup_steps=2", "--config.optimizer.learning_rate.peak=1e-3",
        *extra,
    ]


def one_device_env():
    """The environment of a training run the tests start: one CPU device, output unbuffered."""
    return dict(os.environ, XLA_FLAGS=xla_flags(1), PYTHONUNBUFFERED="1")


def run(args, **kwargs):
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=one_device_env(), timeout=600, **kwargs)


@pytest.fixture(scope="module")
def train_file(shared_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "triples.jsonl"
    with open(shared_data / "stsb_zh_triples" / "bge_finetune_data.jsonl", encoding="utf-8") as src, open(path, "w", encoding="utf-8") as dst:
        for line, _ in zip(src, range(40)):  # 40 records, 8 a step: several epochs, reshuffled
            dst.write(line)
    return path


@pytest.fixture(scope="module")
def uninterrupted(shared_data, train_file, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    done = run(tiny_args(shared_data, workdir, train_file))
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def wait_for_checkpoint(process, workdir, at_least: int, timeout: float = 300) -> None:
    """Returns once a checkpoint of step >= ``at_least`` has committed (or the process ended)."""
    checkpoints = workdir / "checkpoints"
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if checkpoints.is_dir() and any(d.isdigit() and int(d) >= at_least and (checkpoints / d / "commit_success.txt").exists()
                                        for d in os.listdir(checkpoints)):
            return
        time.sleep(0.02)


def exported(workdir):
    return load_file(os.path.join(workdir, "export", "model.safetensors"))


def test_run_logs_tensorboard_events_and_jsonl(uninterrupted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(uninterrupted / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "beta", "gamma", "learning_rate", "grad_norm", "positive_cosine", "hardest_negative_cosine",
            "masked_fraction", "step_time", "pairs_per_second", "tokens_per_second"} <= tags
    assert [e.step for e in events.Scalars("loss")] == [2, 4, 6, 8, 10, 12]
    betas = [e.value for e in events.Scalars("beta")]
    assert betas == sorted(betas) and betas[-1] > betas[0]  # the progressive schedule moves
    lines = [json.loads(line) for line in open(uninterrupted / "metrics.jsonl")]
    assert lines[-1]["step"] == STEPS and np.isfinite(lines[-1]["loss"])
    report = json.load(open(uninterrupted / "report.json"))
    assert report["steps"] == STEPS and report["data"]["records"] == 40


def test_sigkill_then_same_command_resumes_to_identical_weights(shared_data, train_file, uninterrupted, tmp_path):
    args = tiny_args(shared_data, tmp_path, train_file)
    env = one_device_env()
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = random.Random().choice([3, 6, 9])  # kill after a random checkpoint has committed
    wait_for_checkpoint(process, tmp_path, target)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "export").exists(), "the run finished before it could be killed"
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.load(open(tmp_path / "report.json"))
    assert report["start_step"] >= target
    want, got = exported(uninterrupted), exported(tmp_path)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_sigterm_saves_a_checkpoint_where_it_stopped(shared_data, train_file, tmp_path):
    args = tiny_args(shared_data, tmp_path, train_file, "--config.train.checkpoint_steps=100")
    env = one_device_env()
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0
    stopped = json.loads(out[out.index("{"):])["preempted_at"]
    assert 2 <= stopped < STEPS
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [stopped]


BAD_LINES = [
    b'{"query": "q1", "pos": ["p1"], "neg": ["n1", "n2", "n3", "n4", "n5"]}',
    b'{"query": "q2", "pos": ["p2"], "neg": ["n1", "n2", "n3", "n4", "n5"]',   # malformed JSON
    b'{"query": "q3", "neg": ["n1", "n2", "n3", "n4", "n5"]}',                 # missing pos
    b'{"query": "", "pos": ["p4"], "neg": ["n1", "n2", "n3", "n4", "n5"]}',    # empty query
    b'{"query": "q5", "pos": ["p5"], "neg": ["n1", 7, "n3", "n4", "n5"]}',     # non-string negative
    b'{"query": "q6 \xff", "pos": ["p6"], "neg": ["n1", "n2", "n3", "n4", "n5"]}',  # invalid UTF-8
    b'{"query": "q7", "pos": ["p7"], "neg": ["n1", "n2", "n3", "n4", "n5"]}',
]


@pytest.mark.parametrize("line, message", [
    (2, "not valid JSON"), (3, "'pos' must be a non-empty list"), (4, "'query' must be a non-empty string"),
    (5, "'neg' must be a list of non-empty strings"), (6, "invalid UTF-8"),
])
def test_each_bad_line_is_an_error_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(BAD_LINES[:1] + BAD_LINES[line - 1 : line]) + b"\n")
    with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{message}.*config.data.on_bad_line=skip"):
        training.build_cache([str(path)], str(tmp_path / "cache"), "error")


def test_skipping_bad_lines_trains_on_the_good_ones_and_reports_counts(shared_data, train_file, tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = open(train_file, "rb").read().splitlines()
    path.write_bytes(b"\n".join(good[:16] + BAD_LINES[1:6] + good[16:24]) + b"\n")
    failed = run(tiny_args(shared_data, tmp_path / "strict", path, "--config.train.steps=2"))
    assert failed.returncode != 0 and "mixed.jsonl:17: not valid JSON" in failed.stderr
    done = run(tiny_args(shared_data, tmp_path / "skip", path, "--config.train.steps=2", "--config.data.on_bad_line=skip"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped 5 bad line(s)" in done.stdout
    report = json.load(open(tmp_path / "skip" / "report.json"))
    assert report["data"]["records"] == 24 and report["data"]["lines"] == 29
    assert report["data"]["skipped"] == {"bad_json": 1, "bad_pos": 1, "bad_query": 1, "bad_neg": 1, "bad_utf8": 1}


def test_too_few_negatives_errors_or_fills(tmp_path, shared_data):
    from pegjax.data.tokenizer import load_tokenizer

    path = tmp_path / "few.jsonl"
    lines = [{"query": f"q{i}", "pos": [f"p{i}"], "neg": [f"n{j}" for j in range(i % 3 if i < 8 else 5)]} for i in range(12)]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    # too_few_negatives=error: the cache build, before any step, names the first short line ...
    with pytest.raises(DataError, match=r"few.jsonl:1: 0 negatives, 5 needed .*too_few_negatives=fill"):
        training.build_cache([str(path)], str(tmp_path / "cache"), "error", min_negatives=5)
    # ... or, skipping bad lines, leaves them out and counts them.
    _, stats = training.build_cache([str(path)], str(tmp_path / "cache"), "skip", min_negatives=5)
    assert stats["records"] == 4 and stats["skipped"] == {"too_few_negatives": 8}
    record_files, _ = training.build_cache([str(path)], str(tmp_path / "cache"), "error")
    tokenizer = load_tokenizer(str(shared_data / "vocab" / "bert-base-chinese-vocab.txt"))
    import ml_collections

    from configs.peg import base_config

    config = base_config()
    config.train.queries_per_step = 4
    config.data.query_length = config.data.passage_length = 8
    config.data.too_few_negatives = "fill"
    batch = next(iter(training.pipeline(record_files, tokenizer, config, seed=0)))
    assert batch["passage_ids"].shape == (4, 6, 8) and batch["filled_negatives"].sum() > 0
    assert isinstance(config, ml_collections.ConfigDict)


def test_fill_with_nothing_to_fill_from_is_an_error_not_a_hang(tmp_path, shared_data):
    from configs.peg import base_config
    from pegjax.data.tokenizer import load_tokenizer

    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"query": "q", "pos": ["p"], "neg": ["n"]}) + "\n")
    record_files, _ = training.build_cache([str(path)], str(tmp_path / "cache"), "error")
    config = base_config()
    config.train.queries_per_step = 1
    config.data.query_length = config.data.passage_length = 8
    config.data.too_few_negatives = "fill"
    tokenizer = load_tokenizer(str(shared_data / "vocab" / "bert-base-chinese-vocab.txt"))
    start = time.time()
    with pytest.raises(DataError, match=r"one.jsonl:1: 1 negatives, 5 needed, and no other record offers a positive"):
        next(iter(training.pipeline(record_files, tokenizer, config, seed=0)))
    assert time.time() - start < 60


def test_paper_config_without_data_fails_at_once_naming_the_key(tmp_path):
    start = time.time()
    done = run([sys.executable, "-m", "pegjax.main", "--config=configs/peg.py:paper", f"--workdir={tmp_path}"])
    assert done.returncode != 0
    assert "config.data.train_files is empty" in done.stderr + done.stdout
    assert not os.listdir(tmp_path)  # no work done
    assert time.time() - start < 60


def test_misspelled_config_key_fails_before_any_work(tmp_path):
    done = run([sys.executable, "-m", "pegjax.main", "--config=configs/peg.py:demo", f"--workdir={tmp_path}",
                "--config.train.stepz=3"])
    assert done.returncode != 0 and 'Did you mean "steps"' in done.stderr
    assert not os.listdir(tmp_path)


def test_line_prompt_or_config_prompts_are_prepended(tmp_path, shared_data):
    from configs.peg import base_config
    from pegjax.data.tokenizer import load_tokenizer

    path = tmp_path / "prompts.jsonl"
    negatives = [f"负例{i}" for i in range(5)]
    path.write_text(json.dumps({"query": "高血压", "pos": ["正例"], "neg": negatives, "prompt": "问："}, ensure_ascii=False) + "\n"
                    + json.dumps({"query": "高血压", "pos": ["正例"], "neg": negatives}, ensure_ascii=False) + "\n")
    record_files, _ = training.build_cache([str(path)], str(tmp_path / "cache"), "error")
    tokenizer = load_tokenizer(str(shared_data / "vocab" / "bert-base-chinese-vocab.txt"))
    config = base_config()
    config.train.queries_per_step = 2
    config.data.query_length = config.data.passage_length = 12
    config.data.query_prompt = "查询："
    config.data.passage_prompt = "段落："
    batch = next(iter(training.pipeline(record_files, tokenizer, config, seed=0)))
    decode = lambda ids, mask: tokenizer.decode(ids[mask > 0], skip_special_tokens=True).replace(" ", "")  # noqa: E731
    queries = sorted(decode(ids, mask) for ids, mask in zip(batch["query_ids"], batch["query_mask"]))
    assert queries == sorted(["问：高血压", "查询：高血压"])
    passages = {decode(ids, mask) for ids, mask in zip(batch["passage_ids"].reshape(-1, 12), batch["passage_mask"].reshape(-1, 12))}
    assert passages == {"段落：正例"} | {f"段落：{n}" for n in negatives}
    # The hashes that mask false negatives are of the texts themselves, prompt or not.
    assert training.text_hash("正例") in batch["passage_hashes"][:, 0]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_stops_naming_the_step_or_is_skipped(shared_data, train_file, tmp_path, policy):
    # A learning rate of 1e38 overflows the weights on the first update that goes through.
    done = run(tiny_args(shared_data, tmp_path, train_file, "--config.optimizer.learning_rate.peak=1e38",
                         "--config.optimizer.clip_norm=0", "--config.train.steps=6", "--config.optimizer.learning_rate.warmup_steps=0",
                         f"--config.train.on_nonfinite={policy}"))
    if policy == "stop":
        assert done.returncode != 0
        assert "non-finite loss or gradient at step" in done.stderr and "on_nonfinite=skip" in done.stderr
    else:
        assert done.returncode == 0, done.stderr[-3000:]
        lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
        assert sum(line["skipped_updates"] for line in lines) > 0
        # The schedules follow the updates actually applied: the first overflowed the weights, every
        # later one was skipped, so the learning rate (decaying over the 6 steps) stays where it was.
        rates = [line["learning_rate"] for line in lines]
        assert len(rates) == 3 and rates[0] == rates[1] == rates[2] > 0


def test_export_from_checkpoint_equals_the_runs_own_export(uninterrupted, tmp_path):
    out = tmp_path / "from_checkpoint"
    done = run([sys.executable, "-m", "pegjax.export", f"--checkpoint={uninterrupted}", f"--out={out}"])
    assert done.returncode == 0, done.stderr[-3000:]
    want, got = exported(uninterrupted), load_file(str(out / "model.safetensors"))
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_cls_token"] is True  # the paper recipe pools CLS
    card = (out / "README.md").read_text()
    assert '"exported_step": 12' in card
    earlier = tmp_path / "step9"
    done = run([sys.executable, "-m", "pegjax.export", f"--checkpoint={uninterrupted}/checkpoints/9", f"--out={earlier}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert any(not np.array_equal(load_file(str(earlier / "model.safetensors"))[k], want[k]) for k in want)
    missing = run([sys.executable, "-m", "pegjax.export", f"--checkpoint={uninterrupted}/checkpoints/4", f"--out={tmp_path / 'x'}"])
    assert missing.returncode != 0 and "no checkpoint at step 4" in missing.stderr


def tiny_config(shared_data, train_file, **train):
    """The config of ``tiny_args`` as a ConfigDict, for runs inside the test process."""
    from configs.peg import get_config

    config = get_config("paper")
    config.unlock()
    config.model.path = ""
    config.model.random_init.update(vocab_file=str(shared_data / "vocab" / "bert-base-chinese-vocab.txt"), hidden_size=32,
                                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config.model.dtype = "float32"
    config.mesh.update(fsdp=1, data=-1)
    config.data.update(train_files=str(train_file), query_length=16, passage_length=24)
    config.train.update(dict(dict(queries_per_step=8, steps=STEPS, checkpoint_steps=3, log_steps=2, encode_chunk=8), **train))
    config.loss.query_block = 8
    config.lock()
    return config


def test_no_step_waits_for_the_host_unless_something_is_due(shared_data, train_file, tmp_path, monkeypatch):
    """Every device-to-host read goes through jax.Array._value: record which step had just been
    dispatched when each read happened. Only a closed log window (read one step late, once the next
    step is queued) and the final step may read; the steps in between never do."""
    from jax._src import array as jax_array

    from pegjax import train

    dispatched = {"step": 0}
    reads = []
    value = jax_array.ArrayImpl._value

    def recording_value(self):
        reads.append(dispatched["step"])
        return value.fget(self)

    monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(recording_value))
    jit_train_step = train.jit_train_step

    def counting_jit_train_step(*args, **kwargs):
        step_fn = jit_train_step(*args, **kwargs)

        def step(state, batch):
            out = step_fn(state, batch)
            dispatched["step"] += 1
            return out
        return step

    monkeypatch.setattr(train, "jit_train_step", counting_jit_train_step)
    config = tiny_config(shared_data, train_file, steps=8, log_steps=4, checkpoint_steps=100, export=False)
    config.unlock()
    config.evals = {"tiny": {"task": f"{tiny_beir_folder(tmp_path / 'task')}:test", "log_steps": 0}}  # at the end only
    config.lock()
    train.train_and_evaluate(config, str(tmp_path / "run"))
    during = sorted(set(step for step in reads if 0 < step))
    assert during == [5, 8], f"host reads after dispatching steps {during}; only 5 (the window of 1-4) and 8 (the end) may read"
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [line["step"] for line in lines if "loss" in line] == [4, 8]
    assert "tiny/ndcg@10" in lines[-1]


def tiny_beir_folder(folder):
    """A 6-document BEIR folder (test split of 3 queries) for evals inside a training run."""
    os.makedirs(folder / "qrels")
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i in range(6):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": f"文档 {i} 高血压"}) + "\n")
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as f:
        for i in range(3):
            f.write(json.dumps({"_id": f"q{i}", "text": f"问题 {i}"}) + "\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(3)))
    return folder


def test_disk_use_stays_bounded_over_ten_evals(shared_data, train_file, tmp_path):
    """An eval every step for 10 steps (and at the start): one corpus-embedding cache, the starting
    model's, and no more checkpoints than kept."""
    from pegjax import train

    config = tiny_config(shared_data, train_file, steps=10, log_steps=5, checkpoint_steps=1, keep_checkpoints=2,
                         export=False)
    config.unlock()
    config.evals = {"tiny": {"task": f"{tiny_beir_folder(tmp_path / 'task')}:test", "log_steps": 1}}
    config.eval_at_start = True
    config.model.encode_dtype = "bfloat16"  # the evals' encodes in bf16, training in float32
    config.lock()
    workdir = tmp_path / "run"
    report = train.train_and_evaluate(config, str(workdir))
    assert report["encode_dtype"] == "bfloat16"
    evals = [line for line in map(json.loads, open(workdir / "metrics.jsonl")) if "tiny/ndcg@10" in line]
    assert len(evals) == 11
    assert len(os.listdir(workdir / "embedding_cache")) == 1
    assert len([d for d in os.listdir(workdir / "checkpoints") if d.isdigit()]) <= 2
