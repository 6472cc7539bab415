"""Model families: RoBERTa and XLM-R folders (positions after the padding index, SentencePiece /
byte-level BPE tokenizers), sharded safetensors, and the multilingual-e5-small folder embed in
pegjax as transformers and sentence-transformers embed them."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import (AutoModel, PreTrainedTokenizerFast, RobertaConfig, RobertaModel, XLMRobertaConfig,
                          XLMRobertaModel)

from pegjax import export
from pegjax.encode import Encoder
from pegjax.models import hf

from conftest import xla_flags


def transformers_embeddings(folder, texts, pooling, max_length=128):
    model = AutoModel.from_pretrained(folder, add_pooling_layer=False).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.fixture(scope="module")
def roberta_folder(tmp_path_factory, shared_data, mixed_texts):
    """A random-init RobertaModel saved by transformers, with a byte-level BPE tokenizer trained
    on real SciFact and medical_zh text (pad id 1, positions from 2, one token type)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    folder = tmp_path_factory.mktemp("roberta")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(mixed_texts, vocab_size=2000, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))
    tokenizer = RobertaTokenizerFast(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"))
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=130, type_vocab_size=1, pad_token_id=1)
    RobertaModel(config, add_pooling_layer=False).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def xlmr_folder(tmp_path_factory, e5_path):
    """A random-init XLMRobertaModel saved by transformers with the real XLM-R SentencePiece
    tokenizer (tokenizer.json, 250k entries, pad id 1)."""
    folder = tmp_path_factory.mktemp("xlmr")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(e5_path, name), folder / name)
    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=250037, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)
    XLMRobertaModel(config, add_pooling_layer=False).save_pretrained(str(folder))
    return str(folder)


@pytest.mark.parametrize("family", ["roberta", "xlmr"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_family_folder_embeds_as_transformers_does(family, pooling, roberta_folder, xlmr_folder, mixed_texts):
    folder = {"roberta": roberta_folder, "xlmr": xlmr_folder}[family]
    texts = [t for t in mixed_texts if t][::3]
    encoder = Encoder.from_pretrained(folder, pooling=pooling, normalize=True, max_length=128)
    assert encoder.model.config.model_type == {"roberta": "roberta", "xlmr": "xlm-roberta"}[family]
    assert encoder.model.config.position_offset == 2
    got = encoder.encode(texts)
    want = transformers_embeddings(folder, texts, pooling)
    assert np.abs(got - want).max() <= 1e-5


def test_family_round_trip_keeps_its_model_type_and_shards_load_in_transformers(roberta_folder, tmp_path, mixed_texts):
    encoder = Encoder.from_pretrained(roberta_folder, pooling="mean", max_length=128)
    out = tmp_path / "sharded"
    export.save(encoder, str(out), max_shard_bytes=200_000)  # 200 kB a shard
    index = json.loads((out / hf.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and not (out / hf.WEIGHTS_NAME).exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "roberta" and config["architectures"] == ["RobertaModel"]
    texts = [t for t in mixed_texts if t][:40]
    np.testing.assert_array_equal(Encoder.from_pretrained(str(out)).encode(texts), encoder.encode(texts))
    assert np.abs(transformers_embeddings(str(out), texts, "mean") - encoder.encode(texts)).max() <= 1e-5


def test_a_shard_missing_from_the_index_is_named(roberta_folder, tmp_path):
    out = tmp_path / "sharded"
    export.save(Encoder.from_pretrained(roberta_folder, max_length=128), str(out), max_shard_bytes=200_000)
    index = json.loads((out / hf.INDEX_NAME).read_text())
    missing = sorted(set(index["weight_map"].values()))[1]
    os.remove(out / missing)
    with pytest.raises(hf.CheckpointError, match=f"{missing}: listed in {hf.INDEX_NAME} but missing"):
        hf.load(str(out))


def test_multilingual_e5_small_embeds_as_sentence_transformers_does_with_its_prompts(e5_path, shared_data):
    from sentence_transformers import SentenceTransformer

    from conftest import read_jsonl

    chinese = read_jsonl(shared_data / "medical_zh" / "queries.jsonl", "text", 24)
    english = read_jsonl(shared_data / "scifact" / "corpus.jsonl", "text", 16)
    encoder = Encoder.from_pretrained(e5_path, max_length=256)
    reference = SentenceTransformer(e5_path, device="cpu")
    reference.max_seq_length = 256
    for texts, prompt in ((chinese, "query: "), (english, "passage: ")):
        got = encoder.encode(texts, prompt=prompt)
        want = reference.encode(texts, prompt=prompt, batch_size=16)
        assert np.abs(got - want).max() <= 1e-5
    # No [UNK] on Chinese with the XLM-R tokenizer.
    ids = np.concatenate(encoder.tokenizer.encode(chinese))
    assert (ids == encoder.tokenizer.unk_token_id).sum() == 0


def e5_first_layers(e5_path, folder, layers=2):
    """The multilingual-e5-small folder cut to its first ``layers`` of 12 encoder layers: the same
    files, tokenizer, 250k-entry word embeddings and sentence-transformers modules."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    # Only the kept tensors are read, and the 470 MB weights file is not copied first.
    shutil.copytree(e5_path, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    with safe_open(os.path.join(e5_path, "model.safetensors"), "numpy") as weights:
        kept = {name: weights.get_tensor(name) for name in weights.keys()
                if not name.startswith("encoder.layer.") or int(name.split(".")[2]) < layers}
    save_file(kept, str(folder / "model.safetensors"))
    return str(folder)


def test_training_from_multilingual_e5_small_exports_a_folder_sentence_transformers_loads_with_its_prompts(
        e5_path, shared_data, tmp_path):
    """A few steps from the multilingual-e5-small folder (its first 2 layers: the real tokenizer,
    250k-entry word embeddings and modules; the whole model's embeddings are checked against
    sentence-transformers above) on real medical_zh pairs with e5 prompts (negatives filled from
    other answers) and the word-embedding table frozen, as the medical_zh recipe trains it, then
    the export in sentence-transformers."""
    import subprocess
    import sys

    from sentence_transformers import SentenceTransformer

    from conftest import read_jsonl

    start = e5_first_layers(e5_path, tmp_path / "e5_2_layers")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    train = tmp_path / "medical_zh.jsonl"
    with open(shared_data / "medical_zh" / "train_pairs.jsonl", encoding="utf-8") as src, open(train, "w") as dst:
        for line, _ in zip(src, range(24)):
            dst.write(line)
    workdir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "pegjax.main", "--config=configs/peg.py:paper", f"--workdir={workdir}",
         f"--config.model.path={start}", "--config.model.pooling=mean", "--config.model.dtype=float32",
         "--config.model.dropout=false", "--config.mesh.fsdp=1", "--config.mesh.data=-1",
         f"--config.data.train_files={train}", "--config.data.query_prompt=query: ",
         "--config.data.passage_prompt=passage: ", "--config.data.hard_negatives=1",
         "--config.data.too_few_negatives=fill", "--config.data.query_length=32", "--config.data.passage_length=48",
         "--config.train.queries_per_step=4", "--config.train.steps=2", "--config.train.checkpoint_steps=100",
         "--config.train.encode_chunk=4", "--config.loss.query_block=4", "--config.loss.temperature=0.05",
         "--config.optimizer.learning_rate.warmup_steps=0", "--config.optimizer.learning_rate.peak=1e-4",
         "--config.model.frozen=embeddings/word_embeddings"],
        cwd=repo, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, XLA_FLAGS=xla_flags(1)))
    assert done.returncode == 0, done.stderr[-3000:]
    export_dir = str(workdir / "export")
    prompts = json.loads(open(os.path.join(export_dir, "config_sentence_transformers.json")).read())["prompts"]
    assert prompts == {"query": "query: ", "document": "passage: "}
    config = json.loads(open(os.path.join(export_dir, "config.json")).read())
    assert config["pad_token_id"] == 1 and config["vocab_size"] == 250037
    word = "embeddings.word_embeddings.weight"
    after, before = (load_file(os.path.join(folder, "model.safetensors")) for folder in (export_dir, start))
    assert np.array_equal(after[word], before[word])
    # Training moved every other tensor (but the attention key biases: they add the same amount to
    # all of a query's scores, which the softmax cancels, so their gradient is zero).
    still = [name for name in before if name != word and not name.endswith("attention.self.key.bias")
             and np.abs(after[name] - before[name]).max() <= 1e-5]
    assert not still, f"training left these unchanged: {still}"

    queries = read_jsonl(shared_data / "medical_zh" / "queries.jsonl", "text", 8)
    reference = SentenceTransformer(export_dir, device="cpu")
    trained = Encoder.from_pretrained(export_dir)
    got = trained.encode(queries, prompt_name="query")
    assert np.abs(reference.encode(queries, prompt_name="query") - got).max() <= 1e-5
    # The prompt is really there.
    assert np.abs(trained.encode(queries) - got).max() > 1e-3
