"""Exported models load in sentence-transformers and transformers and embed as pegjax does."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

from pegjax import export
from pegjax.encode import Encoder


def moved(params, seed: int = 0):
    """Every tensor moved off the starting checkpoint by seeded noise of 5% of its own spread (so
    that an export of the untouched input folder could not pass). The weights a real step leaves
    are exported by the training tests (test_train.py, test_families.py)."""
    leaves, tree = jax.tree.flatten(jax.device_get(params))
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [p + 0.05 * (p.std() or 1.0) * rng.standard_normal(p.shape).astype(p.dtype)
                                     for p in leaves])


@pytest.fixture(scope="module")
def trained_params(minilm_path):
    """MiniLM's weights, moved (both exports use them)."""
    return moved(Encoder.from_pretrained(minilm_path, max_length=128).params)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_exported_model_embeds_identically_in_sentence_transformers_and_transformers(
        minilm_path, mixed_texts, trained_params, tmp_path, pooling):
    start = Encoder.from_pretrained(minilm_path, pooling=pooling, max_length=128)
    trained = Encoder(start.model, trained_params, start.tokenizer, start.max_length)
    folder = str(tmp_path / "exported")
    export.save(trained, folder, query_prompt="query: ", results={"scifact": {"ndcg@10": 0.5}})
    texts = mixed_texts[::7]  # 34 of every kind: abstracts (some truncated), claims, Chinese, "a"
    ours = trained.encode(texts)
    assert np.abs(ours - start.encode(texts)).max() > 1e-3  # the weights moved

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
