"""A two-source mixture (medical_zh question-answer pairs + STS-B triples, ../shared/data): one
source per global batch, drawn by weight; row-by-row mixing in proportion; per-source prompts and
counts; bitwise resume after SIGKILL."""

import json
import signal
import subprocess

import numpy as np
import pytest

from configs.peg import get_config
from pegjax.data import training
from pegjax.data.tokenizer import load_tokenizer
from pegjax.errors import ConfigError

from test_train import REPO, exported, one_device_env, run, tiny_args, wait_for_checkpoint

STEPS = 12


@pytest.fixture(scope="module")
def source_files(shared_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    files = {}
    for name, path, count in (("medical_zh", shared_data / "medical_zh" / "train_pairs.jsonl", 60),
                              ("stsb_zh", shared_data / "stsb_zh_triples" / "bge_finetune_data.jsonl", 30)):
        files[name] = folder / f"{name}.jsonl"
        with open(path, encoding="utf-8") as src, open(files[name], "w", encoding="utf-8") as dst:
            for line, _ in zip(src, range(count)):
                dst.write(line)
    return files


def mixture_config(source_files, homogeneous: bool, steps: int = 300):
    config = get_config("mixture")
    with config.unlocked():
        config.data.sources.medical_zh.files = str(source_files["medical_zh"])
        config.data.sources.stsb_zh.files = str(source_files["stsb_zh"])
        config.data.homogeneous_batches = homogeneous
        config.data.query_length = config.data.passage_length = 32
        config.train.queries_per_step = 4
        config.train.steps = steps
    return config


def batches(config, shared_data, tmp_path, count):
    tokenizer = load_tokenizer(str(shared_data / "vocab" / "bert-base-chinese-vocab.txt"))
    sources = training.sources_of(config)
    record_files = [training.build_cache(list(s.files), str(tmp_path / "cache"), "error")[0] for s in sources]
    iterator = iter(training.pipeline(record_files, tokenizer, config, seed=0, sources=sources))
    return [next(iterator) for _ in range(count)], tokenizer


def test_homogeneous_batches_hold_one_source_each_drawn_by_weight(source_files, shared_data, tmp_path):
    config = mixture_config(source_files, homogeneous=True)
    drawn, tokenizer = batches(config, shared_data, tmp_path, 300)
    per_batch = [set(batch["source_index"].tolist()) for batch in drawn]
    assert all(len(sources) == 1 for sources in per_batch)
    medical = sum(sources == {0} for sources in per_batch) / len(per_batch)
    # Weights 2:1 -> 2/3 of the batches; 300 draws: 3 standard deviations are 0.082.
    assert abs(medical - 2 / 3) < 0.082
    # Each source's own prompts: e5's "passage: " on the medical answers, "query: " on both STS-B sides.
    decode = lambda ids, mask: tokenizer.decode(ids[mask > 0], skip_special_tokens=True).replace(" ", "")  # noqa: E731
    for batch, sources in zip(drawn[:20], per_batch):
        passage = decode(batch["passage_ids"][0, 0], batch["passage_mask"][0, 0])
        assert passage.startswith("passage:" if sources == {0} else "query:")


def test_mixed_batches_follow_the_weights_row_by_row(source_files, shared_data, tmp_path):
    config = mixture_config(source_files, homogeneous=False)
    drawn, _ = batches(config, shared_data, tmp_path, 60)
    rows = np.concatenate([batch["source_index"] for batch in drawn])
    assert abs((rows == 0).mean() - 2 / 3) < 0.01  # grain's mix interleaves in proportion
    assert any(len(set(batch["source_index"].tolist())) == 2 for batch in drawn)


def test_a_source_without_files_or_with_a_bad_key_is_named(source_files):
    config = mixture_config(source_files, homogeneous=True)
    with config.unlocked():
        config.data.sources.stsb_zh.files = ""
    with pytest.raises(ConfigError, match="config.data.sources.stsb_zh.files is empty"):
        training.sources_of(config)
    config = mixture_config(source_files, homogeneous=True)
    with config.unlocked():
        config.data.sources.stsb_zh.wieght = 1.0
    with pytest.raises(ConfigError, match=r"config.data.sources.stsb_zh: unknown key\(s\) \['wieght'\]"):
        training.sources_of(config)


def mixture_args(shared_data, workdir, source_files):
    args = tiny_args(shared_data, workdir, "", f"--config.train.steps={STEPS}")
    args[args.index("--config=configs/peg.py:paper")] = "--config=configs/peg.py:mixture"
    return args + [f"--config.data.sources.medical_zh.files={source_files['medical_zh']}",
                   f"--config.data.sources.stsb_zh.files={source_files['stsb_zh']}"]


def test_mixture_killed_and_rerun_gives_bitwise_the_same_weights(shared_data, source_files, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    env = one_device_env()
    # The uninterrupted run and the one to kill side by side: each is mostly single-threaded.
    reference = subprocess.Popen(mixture_args(shared_data, straight, source_files), cwd=REPO, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    args = mixture_args(shared_data, killed, source_files)
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_checkpoint(process, killed, 6)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "export").exists(), "the run finished before it could be killed"
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    report = json.load(open(straight / "report.json"))
    counts = report["source_queries"]
    assert set(counts) == {"medical_zh", "stsb_zh"} and sum(counts.values()) == 8 * STEPS
    assert all(n % 8 == 0 and n > 0 for n in counts.values())  # whole batches of one source
    lines = [json.loads(line) for line in open(straight / "metrics.jsonl")]
    assert "source_queries/medical_zh" in lines[-1]

    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.load(open(killed / "report.json"))["start_step"] >= 6
    want, got = exported(straight), exported(killed)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
