"""A user's mistake on any command line ends as exactly one `error:` line and a non-zero exit."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(module, *args):
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def truncated_model(minilm_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("truncated")
    for name in os.listdir(minilm_path):
        if os.path.isfile(os.path.join(minilm_path, name)):
            shutil.copy(os.path.join(minilm_path, name), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1 << 20])
    return folder


@pytest.fixture(scope="module")
def foreign_model(minilm_path, tmp_path_factory):
    """A folder whose config.json says DeBERTa-v2, a family pegjax does not read, while its tensors
    would match BERT's names and shapes."""
    folder = tmp_path_factory.mktemp("deberta")
    shutil.copytree(minilm_path, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="deberta-v2", architectures=["DebertaV2Model"])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


CASES = {
    "evaluate_missing_folder": ("pegjax.evaluate", ["--model=/no/such/folder", "--task=scifact"], "no config.json"),
    "evaluate_truncated_weights": ("pegjax.evaluate", ["--model={truncated}", "--task=scifact"], "truncated or not a safetensors"),
    "evaluate_bad_task": ("pegjax.evaluate", ["--model={minilm}", "--task=/no/such/task:test"], "no task could be evaluated"),
    "evaluate_bad_dtype": ("pegjax.evaluate", ["--model={minilm}", "--task=scifact", "--dtype=fp16"], "--dtype: encode dtype 'fp16'"),
    "evaluate_foreign_model_type": ("pegjax.evaluate", ["--model={foreign}", "--task=scifact"], "model_type='deberta-v2' is not supported"),
    "mine_missing_folder": ("pegjax.mine", ["--queries=/no/such/beir", "--out={tmp}/mined.jsonl"], "a BEIR folder holds"),
    "mine_truncated_weights": ("pegjax.mine", ["--model={truncated}", "--queries={scifact}", "--out={tmp}/mined.jsonl"], "truncated"),
    "export_missing_folder": ("pegjax.export", ["--model=/no/such/folder", "--out={tmp}/out"], "no config.json"),
    "export_missing_checkpoint": ("pegjax.export", ["--checkpoint={tmp}/nothing", "--out={tmp}/out"], "no checkpoints folder"),
    "main_missing_model": ("pegjax.main", ["--config=configs/peg.py:paper", "--workdir={tmp}/run", "--config.model.path=/no/such",
                                          "--config.data.train_files={scifact}/queries.jsonl"], "config.model.path"),
    "main_frozen_typo": ("pegjax.main", ["--config=configs/peg.py:demo", "--workdir={tmp}/run", "--config.model.frozen=embeddings/words"],
                         "config.model.frozen: embeddings/words names no parameter"),
    "main_bad_mining_window": ("pegjax.main", ["--config=configs/peg.py:demo", "--workdir={tmp}/run", "--config.data.mine_ranks=100:10"],
                               "config.data.mine_ranks='100:10'"),
    "main_bad_encode_dtype": ("pegjax.main", ["--config=configs/peg.py:demo", "--workdir={tmp}/run", "--config.model.encode_dtype=half"],
                              "config.model.encode_dtype: encode dtype 'half'"),
    "main_bad_model_dtype": ("pegjax.main", ["--config=configs/peg.py:demo", "--workdir={tmp}/run", "--config.model.dtype=fp16"],
                             "config.model.dtype='fp16': use float32, bfloat16 or auto"),
    "main_missing_data": ("pegjax.main", ["--config=configs/peg.py:paper", "--workdir={tmp}/run"], "config.data.train_files is empty"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_error_line_and_a_nonzero_exit(case, tmp_path, minilm_path, truncated_model, foreign_model, shared_data):
    module, args, message = CASES[case]
    names = dict(tmp=tmp_path, minilm=minilm_path, truncated=truncated_model, foreign=foreign_model,
                 scifact=shared_data / "scifact")
    done = run(module, *(a.format(**names) for a in args))
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    # No INFO line about accelerator plugins this machine does not have.
    assert "Unable to initialize backend" not in done.stderr, done.stderr[-3000:]
