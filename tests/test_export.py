"""Exported models load in sentence-transformers and transformers and embed as pegjax does."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

from pegjax import export, sharding
from pegjax.data import packing
from pegjax.data.tokenizer import pad_batch, tokenize
from pegjax.encode import Encoder
from pegjax.loss import LossConfig
from pegjax.step import StepConfig, create_state, jit_train_step, make_optimizer


def train_a_few_steps(encoder: Encoder, texts, steps=2):
    """Moves the weights off the starting checkpoint with the real step (so that an export of the
    untouched input folder could not pass)."""
    queries, passages = texts[:4], texts[4:16]
    q_ids, q_mask = pad_batch(tokenize(encoder.tokenizer, queries, 32), 32, 4)
    p_ids, p_mask = pad_batch(tokenize(encoder.tokenizer, passages, 64), 64, 12)
    texts = {"query_ids": q_ids, "query_mask": q_mask, "passage_ids": p_ids, "passage_mask": p_mask,
             "passage_hashes": np.zeros(12, np.int32), "positive_hashes": np.zeros((4, 1), np.int32)}
    geometries = [packing.fitted_geometry(texts[f"{kind}_mask"], 1, 4) for kind in ("query", "passage")]
    batch = packing.step_batch(texts, 1, *geometries)
    mesh = sharding.make_mesh({"data": -1}, devices=jax.devices()[:1])
    tx = make_optimizer(optax.constant_schedule(1e-3))
    state, shardings = create_state(encoder.model, tx, mesh, seed=0, params=jax.device_get(encoder.params))
    schedules = {"beta": optax.constant_schedule(1.0), "gamma": optax.constant_schedule(0.5),
                 "learning_rate": optax.constant_schedule(1e-3)}
    config = StepConfig(encoder.model, LossConfig(group_size=3, query_block=4), encode_chunk=4,
                        query_slots=geometries[0].slots, passage_slots=geometries[1].slots)
    step = jit_train_step(config, tx, schedules, mesh, shardings)
    for _ in range(steps):
        state, _ = step(state, batch)
    return Encoder(encoder.model, jax.device_get(state.params), encoder.tokenizer, encoder.max_length)


@pytest.fixture(scope="module")
def trained_params(minilm_path, mixed_texts):
    """MiniLM's weights after two real steps (trained once, mean-pooled; both exports use them)."""
    return train_a_few_steps(Encoder.from_pretrained(minilm_path, max_length=128), mixed_texts).params


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_exported_model_embeds_identically_in_sentence_transformers_and_transformers(
        minilm_path, mixed_texts, trained_params, tmp_path, pooling):
    start = Encoder.from_pretrained(minilm_path, pooling=pooling, max_length=128)
    trained = Encoder(start.model, trained_params, start.tokenizer, start.max_length)
    folder = str(tmp_path / "exported")
    export.save(trained, folder, query_prompt="query: ", results={"scifact": {"ndcg@10": 0.5}})
    texts = mixed_texts[::7]  # 34 of every kind: abstracts (some truncated), claims, Chinese, "a"
    ours = trained.encode(texts)
    assert np.abs(ours - start.encode(texts)).max() > 1e-3  # training moved the weights

    with open(os.path.join(folder, "1_Pooling", "config.json")) as f:
        pool_config = json.load(f)
    assert pool_config["pooling_mode_cls_token"] is (pooling == "cls")
    assert pool_config["pooling_mode_mean_tokens"] is (pooling == "mean")

    reference = SentenceTransformer(folder, device="cpu")
    assert reference.max_seq_length == 128
    assert np.abs(reference.encode(texts, batch_size=16) - ours).max() <= 1e-5
    assert np.abs(reference.encode(texts[:5], prompt_name="query") - trained.encode(["query: " + t for t in texts[:5]])).max() <= 1e-5

    model = AutoModel.from_pretrained(folder).eval()
    batch = AutoTokenizer.from_pretrained(folder)(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = batch["attention_mask"][..., None].float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
    pooled = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    assert np.abs(pooled - ours).max() <= 1e-5

    reloaded = Encoder.from_pretrained(folder)
    assert (reloaded.model.pooling, reloaded.model.normalize, reloaded.max_length) == (pooling, True, 128)
    assert "| scifact | ndcg@10 | 0.5000 |" in open(os.path.join(folder, "README.md")).read()


def test_export_command_rewrites_pooling(minilm_path, tmp_path):
    out = tmp_path / "cls"
    done = subprocess.run([sys.executable, "-m", "pegjax.export", f"--model={minilm_path}", f"--out={out}",
                           "--pooling=cls"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"] is True
    assert Encoder.from_pretrained(str(out)).model.pooling == "cls"
