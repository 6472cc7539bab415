"""Hugging Face folders: Chinese round trip, transformers interop, and the documented errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import linen as nn
from transformers import AutoTokenizer, BertModel, BertTokenizerFast

from pegjax import export
from pegjax.data.tokenizer import TokenizerError, load_tokenizer, tokenize
from pegjax.encode import Encoder
from pegjax.models import hf
from pegjax.models.bert import BertConfig, EmbeddingModel

CHINESE = BertConfig(
    vocab_size=21128, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256
)


@pytest.fixture(scope="module")
def chinese_tokenizer(shared_data):
    return load_tokenizer(str(shared_data / "vocab" / "bert-base-chinese-vocab.txt"))


@pytest.fixture(scope="module")
def chinese_folder(tmp_path_factory, chinese_tokenizer):
    model = EmbeddingModel(CHINESE, pooling="cls")
    params = nn.unbox(model.init(jax.random.key(0)))
    encoder = Encoder(model, params, chinese_tokenizer, max_length=128)
    folder = str(tmp_path_factory.mktemp("chinese"))
    export.save(encoder, folder)
    return encoder, folder


def test_chinese_text_tokenizes_without_unknown_floods(chinese_tokenizer, mixed_texts):
    chinese = [t for t in mixed_texts if any("\u4e00" <= c <= "\u9fff" for c in t)]
    sequences = tokenize(chinese_tokenizer, chinese, max_length=512)
    tokens = np.concatenate([s[1:-1] for s in sequences])
    unknown = (tokens == chinese_tokenizer.unk_token_id).mean()
    assert len(chinese) >= 100 and unknown < 0.01
    # One token per Chinese character.
    assert chinese_tokenizer.tokenize("高血压") == ["高", "血", "压"]


@pytest.mark.parametrize("which", ["minilm", "minilm_vocab_txt", "chinese_vocab", "e5"])
def test_tokenize_gives_the_ids_transformers_gives(which, minilm_path, shared_data, mixed_texts, tmp_path, request):
    """pegjax reads tokenizers itself, without transformers: the ids transformers' own tokenizer
    gives for the same folder or vocab file, untruncated and unpadded even where tokenizer.json
    ships with truncation and padding on; the same pad and unknown ids."""
    from transformers import BertTokenizerFast

    folder = tmp_path / "tokenizer"
    source = str(folder)
    if which == "minilm":  # a tokenizer.json that truncates and pads to 40
        shutil.copytree(minilm_path, folder)
        spec = json.loads((folder / "tokenizer.json").read_text())
        spec["truncation"] = {"direction": "Right", "max_length": 40, "strategy": "LongestFirst", "stride": 0}
        spec["padding"] = {"strategy": {"Fixed": 40}, "direction": "Right", "pad_to_multiple_of": None,
                           "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"}
        (folder / "tokenizer.json").write_text(json.dumps(spec))
    elif which == "minilm_vocab_txt":  # no tokenizer.json: vocab.txt and tokenizer_config.json's casing
        shutil.copytree(minilm_path, folder)
        (folder / "tokenizer.json").unlink()
        settings = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "do_lower_case": False}))
    elif which == "chinese_vocab":
        source = str(shared_data / "vocab" / "bert-base-chinese-vocab.txt")
    else:
        source = request.getfixturevalue("e5_path")
    ours = load_tokenizer(source)
    reference = (BertTokenizerFast(vocab=source, do_lower_case=True, tokenize_chinese_chars=True)
                 if which == "chinese_vocab" else AutoTokenizer.from_pretrained(source))
    want = reference(mixed_texts, truncation=False, padding=False)["input_ids"]
    assert max(len(ids) for ids in want) > 300  # long abstracts: nothing truncated them
    got = tokenize(ours, mixed_texts, 10**6)
    assert [list(ids) for ids in got] == [list(ids) for ids in want]
    assert (ours.pad_token_id, ours.unk_token_id) == (reference.pad_token_id, reference.unk_token_id)
    cut = tokenize(ours, mixed_texts, 16)  # truncated here: the first 15 tokens and the closing one
    assert all(list(c) == (list(w) if len(w) <= 16 else list(w[:15]) + [w[-1]]) for c, w in zip(cut, want))
    if which == "minilm_vocab_txt":  # the folder's casing was read: cased ids differ from MiniLM's own
        assert [list(ids) for ids in want] != load_tokenizer(minilm_path).encode(mixed_texts)


def test_a_run_reads_and_exports_its_tokenizer_without_importing_transformers(minilm_path, shared_data, tmp_path):
    """transformers costs each run ~2.5 s to import, ~7 s when torch is installed (it imports torch)."""
    vocab = str(shared_data / "vocab" / "bert-base-chinese-vocab.txt")
    script = ("import sys\nimport pegjax.main, pegjax.train, pegjax.evaluate, pegjax.mine, pegjax.export\n"
              "from pegjax.data.tokenizer import TokenizerError, load_tokenizer, tokenize\n"
              f"tokenize(load_tokenizer({minilm_path!r}), ['a claim'], 64)\n"
              f"load_tokenizer({minilm_path!r}).save_pretrained({str(tmp_path / 'folder')!r})\n"
              f"load_tokenizer({vocab!r}).save_pretrained({str(tmp_path / 'vocab')!r})\n"
              "print(sorted(m for m in ('transformers', 'torch', 'sentence_transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    # What was written tokenizes as transformers tokenizes the source: a folder's files as they
    # were, a vocab file as BertTokenizerFast makes it.
    texts = ["Aspirin's effect, ÉCOLE café", "阿司匹林的作用机制", "[MASK] inside [SEP] a text", ""]
    for written, source in ((tmp_path / "folder", AutoTokenizer.from_pretrained(minilm_path)),
                            (tmp_path / "vocab", BertTokenizerFast(vocab=vocab))):
        assert AutoTokenizer.from_pretrained(str(written))(texts)["input_ids"] == source(texts)["input_ids"]
    assert sorted(os.listdir(tmp_path / "folder")) == sorted(
        name for name in os.listdir(minilm_path) if name in ("tokenizer.json", "tokenizer_config.json",
                                                              "special_tokens_map.json", "vocab.txt"))


def test_an_unreadable_tokenizer_json_is_named(minilm_path, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(minilm_path, folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match=f"{folder}/tokenizer.json: not a tokenizer.json that the tokenizers "
                                             "library can read"):
        load_tokenizer(str(folder))


def test_chinese_round_trip_gives_identical_embeddings(chinese_folder, mixed_texts):
    encoder, folder = chinese_folder
    loaded = Encoder.from_pretrained(folder, pooling="cls", max_length=128)
    np.testing.assert_array_equal(encoder.encode(mixed_texts), loaded.encode(mixed_texts))


def test_saved_folder_loads_in_transformers_with_same_outputs(chinese_folder, mixed_texts):
    encoder, folder = chinese_folder
    texts = mixed_texts[-80:]
    model = BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
    batch = AutoTokenizer.from_pretrained(folder)(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        expected = model(**batch).last_hidden_state[:, 0].numpy()
    got = encoder.encode(texts, normalize=False)
    assert np.abs(got - expected).max() <= 1e-5


def test_bert_prefix_and_gamma_beta_names_load(chinese_folder, tmp_path):
    encoder, folder = chinese_folder
    from safetensors.numpy import load_file, save_file

    tensors = load_file(os.path.join(folder, hf.WEIGHTS_NAME))
    renamed = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in tensors.items()}
    renamed["cls.predictions.bias"] = np.zeros(CHINESE.vocab_size, np.float32)  # an MLM head: ignored
    shutil.copy(os.path.join(folder, "config.json"), tmp_path)
    save_file(renamed, str(tmp_path / hf.WEIGHTS_NAME))
    _, params = hf.load(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(encoder.params))


def _copy_folder(folder, dest):
    shutil.copytree(folder, dest)
    return str(dest)


def test_truncated_safetensors_is_reported(chinese_folder, tmp_path):
    folder = _copy_folder(chinese_folder[1], tmp_path / "m")
    weights = os.path.join(folder, hf.WEIGHTS_NAME)
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(hf.CheckpointError, match="cannot read the safetensors file.*truncated"):
        hf.load(folder)


def test_mismatched_tensors_are_listed(chinese_folder, tmp_path):
    folder = _copy_folder(chinese_folder[1], tmp_path / "m")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config["intermediate_size"] = 512
    config["num_hidden_layers"] = 3
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(hf.CheckpointError) as err:
        hf.load(folder)
    message = str(err.value)
    assert "do not match a BertModel of its config.json" in message
    assert "missing (16): encoder.layer.2." in message
    assert "encoder.layer.0.intermediate.dense.weight: file has (256, 128), config.json implies (512, 128)" in message


def test_unexpected_tensor_is_listed(chinese_folder, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = _copy_folder(chinese_folder[1], tmp_path / "m")
    weights = os.path.join(folder, hf.WEIGHTS_NAME)
    tensors = load_file(weights)
    tensors["encoder.layer.0.attention.self.rotary.weight"] = np.zeros(3, np.float32)
    save_file(tensors, weights)
    with pytest.raises(hf.CheckpointError, match=r"unexpected \(1\): encoder.layer.0.attention.self.rotary.weight"):
        hf.load(folder)


def test_missing_config_key_is_named(chinese_folder, tmp_path):
    folder = _copy_folder(chinese_folder[1], tmp_path / "m")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    del config["num_attention_heads"]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(hf.CheckpointError, match=r"config.json: missing required key\(s\) num_attention_heads"):
        hf.load(folder)


def test_pickle_only_folder_is_refused_unless_allowed(chinese_folder, tmp_path):
    folder = _copy_folder(chinese_folder[1], tmp_path / "m")
    model = BertModel.from_pretrained(folder, add_pooling_layer=False)
    torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    os.remove(os.path.join(folder, hf.WEIGHTS_NAME))
    with pytest.raises(hf.CheckpointError, match="has only pytorch_model.bin.*safe_serialization=True"):
        hf.load(folder)
    _, params = hf.load(folder, allow_pickle=True)
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(chinese_folder[0].params))
