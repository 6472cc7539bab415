"""Embeddings equal the references (sentence-transformers, transformers' BertModel) on real text."""

import logging

import jax
import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer, BertModel

from pegjax.encode import Encoder, encode_dtype, fast_bfloat16


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return Encoder.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def reference(minilm_path):
    return SentenceTransformer(minilm_path, device="cpu")


def test_reads_sentence_transformers_pooling(minilm):
    assert minilm.model.pooling == "mean"
    assert minilm.model.normalize is True
    assert minilm.max_length == 256


@pytest.mark.parametrize("max_length", [256, 64])
def test_float32_embeddings_equal_sentence_transformers(minilm, reference, mixed_texts, max_length):
    assert len(mixed_texts) >= 200
    if max_length == 64:  # every kind of text, most of them truncated: half the texts suffice
        mixed_texts = mixed_texts[::2]
    reference.max_seq_length = max_length
    expected = reference.encode(mixed_texts, batch_size=16, convert_to_numpy=True)
    got = minilm.encode(mixed_texts, batch_size=16, max_length=max_length)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-5


def test_bfloat16_compute_stays_close(minilm_path, minilm, mixed_texts):
    texts = mixed_texts[::3]  # every kind and length of text, a third of the encoding time
    half = Encoder.from_pretrained(minilm_path, dtype="bfloat16")
    full = minilm.encode(texts)
    cosine = (half.encode(texts) * full).sum(axis=1)
    assert cosine.min() >= 0.999


def test_a_new_encoder_of_the_same_model_compiles_nothing(minilm, mixed_texts, caplog):
    """A training run builds an encoder for every eval (new params, same model): they share the
    compiled shapes."""
    texts = mixed_texts[:50]
    minilm.encode(texts, max_length=64)
    again = Encoder(minilm.model, jax.tree.map(lambda p: p * 1.0, minilm.params), minilm.tokenizer, 64)
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            again.encode(texts, max_length=64)
    finally:
        jax.config.update("jax_log_compiles", False)
    assert not [r for r in caplog.records if "Compiling" in r.getMessage() and "_embed_unnormalized" in r.getMessage()]


def test_encode_dtype_setting():
    assert encode_dtype("", "float32") == "float32" and encode_dtype("", "bfloat16") == "bfloat16"
    assert encode_dtype("bfloat16", "float32") == "bfloat16" and encode_dtype("float32", "bfloat16") == "float32"
    assert encode_dtype("auto", "float32") == ("bfloat16" if fast_bfloat16() else "float32")
    with pytest.raises(ValueError, match="encode dtype 'fp16': use '' \\(the model's dtype\\), auto, float32 or bfloat16"):
        encode_dtype("fp16", "float32")


def test_cls_pooling_equals_bert_model_first_token(minilm_path, mixed_texts):
    encoder = Encoder.from_pretrained(minilm_path, pooling="cls", normalize=False, max_length=128)
    texts = mixed_texts[:40] + mixed_texts[-60:]
    model = BertModel.from_pretrained(minilm_path).eval()
    batch = AutoTokenizer.from_pretrained(minilm_path)(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        expected = model(**batch).last_hidden_state[:, 0].numpy()
    assert np.abs(encoder.encode(texts) - expected).max() <= 1e-5


def test_rows_come_back_in_input_order(minilm, mixed_texts):
    texts = mixed_texts[:50]
    together = minilm.encode(texts, batch_size=8)
    one_by_one = np.concatenate([minilm.encode([t], batch_size=8) for t in texts[::7]])
    np.testing.assert_allclose(together[::7], one_by_one, atol=1e-5)


def test_edge_cases(minilm):
    assert minilm.encode([]).shape == (0, 384)
    empty = minilm.encode(["", "text"])
    assert np.isfinite(empty).all() and abs(np.linalg.norm(empty[0]) - 1) < 1e-5
    with pytest.raises(TypeError, match="list of texts"):
        minilm.encode("one text")


def test_over_long_text_is_truncated(minilm):
    words = "retrieval " * 1000
    long_one, its_prefix = minilm.encode([words, "retrieval " * 300], max_length=64)
    # Both truncate to the same first 64 tokens.
    np.testing.assert_allclose(long_one, its_prefix, atol=1e-6)


def test_the_ffn_activation_is_not_fused_into_the_next_product(minilm):
    """On the CPU the activation ends at `fusion_boundary`: XLA:CPU otherwise runs it inside the FFN
    output product, as a prologue that makes the product ~1.5x slower (bench/RESULTS.md)."""
    from bench.profile_step import op_table

    ids = np.ones((32, 256), np.int32)
    text = minilm._embed.lower(minilm.params, ids, ids).compile().as_text()
    products = [op for op in op_table(text).values() if op.kind == "dense products"]
    ffn_out = [op for op in products if "x f32[1536,384]" in op.describe]
    assert ffn_out, [op.describe for op in products]  # the FFN output product is there, on its own or fused
    assert not [op.describe for op in products if "erf" in op.describe]
