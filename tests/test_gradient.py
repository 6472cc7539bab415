"""The encoder's parameter gradients equal torch's, for the same model and real texts.

The forward pass is checked against sentence-transformers in test_encode.py; this checks the
backward pass, which pegjax writes partly by hand (the dense layers' products,
`pegjax.models.bert._project_bwd`) and partly leaves to autodiff (attention, LayerNorm, pooling).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer

from pegjax.data.packing import RowGeometry, pack, rows_needed
from pegjax.encode import Encoder
from pegjax.models.hf import params_to_hf

LENGTH = 64


@pytest.fixture(scope="module")
def texts(mixed_texts):
    # English abstracts (truncated at 64 tokens), English claims, Chinese questions and answers.
    return mixed_texts[:4] + mixed_texts[90:94] + mixed_texts[120:124] + mixed_texts[210:212]


@pytest.fixture(scope="module")
def torch_gradients(minilm_path, texts):
    """d/dparams of sum(embeddings * probe) through sentence-transformers (mean pooling, L2 norm)."""
    model = SentenceTransformer(minilm_path, device="cpu").eval()  # eval: no dropout
    model.max_seq_length = LENGTH
    features = model.preprocess(texts)
    probe = torch.from_numpy(_probe(len(texts)))
    (model(features)["sentence_embedding"] * probe).sum().backward()
    bert = model[0].auto_model
    return {name: p.grad.numpy() for name, p in bert.named_parameters() if p.grad is not None}


def _probe(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 384)).astype(np.float32)


def tokenized(minilm_path, texts):
    batch = AutoTokenizer.from_pretrained(minilm_path)(texts, padding="max_length", truncation=True, max_length=LENGTH,
                                                       return_tensors="np")
    return batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)


def gradient_and_embeddings(embed, probe):
    """jit of params -> (d/dparams sum(embed(params) * probe), embed(params)): one compiled
    program gives both."""
    def objective(params):
        vectors = embed(params)
        return jnp.sum(vectors * probe), vectors
    return jax.jit(jax.grad(objective, has_aux=True))


@pytest.fixture(scope="module")
def float32_gradient(minilm_path, texts):
    """(encoder, its float32 parameter gradients, its embeddings) of the one-text-a-row batch."""
    encoder = Encoder.from_pretrained(minilm_path, max_length=LENGTH)
    ids, mask = tokenized(minilm_path, texts)
    probe = jnp.asarray(_probe(len(texts)))
    grads, vectors = gradient_and_embeddings(lambda params: encoder.model.embed(params, ids, mask), probe)(encoder.params)
    return encoder, grads, np.asarray(vectors)


@pytest.mark.parametrize("packed", [False, True])
def test_parameter_gradients_equal_torch(minilm_path, texts, torch_gradients, float32_gradient, packed):
    encoder, grads, _ = float32_gradient
    model = encoder.model
    if packed:
        ids, mask = tokenized(minilm_path, texts)
        probe = jnp.asarray(_probe(len(texts)))
        geometry = RowGeometry(texts=len(texts), rows=rows_needed(mask.sum(1), 2 * LENGTH, 4), length=2 * LENGTH,
                               slots=4, max_chunk=64)
        tokens, segments, slots = pack(ids, mask, geometry)
        assert geometry.rows < len(texts)  # several texts share a row

        def embed(params):
            return model.embed_packed(params, tokens, segments, geometry.slots).reshape(-1, 384)[slots]

        grads, _ = gradient_and_embeddings(embed, probe)(encoder.params)
    got = params_to_hf(grads, model.config)
    assert set(got) == set(torch_gradients)  # every parameter that gets a gradient in torch, and no other
    for name, expected in torch_gradients.items():
        error = np.abs(got[name] - expected).max()
        if name.endswith("attention.self.key.bias"):
            # Softmax ignores a shift of a query's scores, so this gradient is zero: both sides
            # give rounding noise.
            assert error <= 1e-6 and np.abs(got[name]).max() <= 1e-6, name
        else:
            assert error <= 2e-5 * np.abs(expected).max(), name


def test_bfloat16_gradients_stay_close_and_the_weight_gradients_run_in_bfloat16(minilm_path, texts, float32_gradient):
    """Computing in bf16 (float32 parameters) gives the float32 gradients to bf16 precision, and on
    the CPU no weight-gradient product is left contracting the token axis of its left operand: XLA
    runs that form by converting both operands to float32, ~2.5x slower (`_project_bwd`). The same
    holds with the dense products returning bf16, as on accelerators (`narrow_products`), whose
    products really do return bf16."""
    encoder, want_grads, want_vectors = float32_gradient
    ids, mask = tokenized(minilm_path, texts)
    probe = jnp.asarray(_probe(len(texts)))
    want = params_to_hf(want_grads, encoder.model.config)
    bf16_model = dataclasses.replace(encoder.model, dtype="bfloat16")
    narrow = dataclasses.replace(bf16_model, narrow_products=True)
    for model in (bf16_model, narrow):
        lowered = gradient_and_embeddings(lambda params, model=model: model.embed(params, ids, mask), probe).lower(encoder.params)
        compiled = lowered.compile()
        grads, vectors = compiled(encoder.params)
        got = params_to_hf(grads, encoder.model.config)
        for name, expected in want.items():
            if name.endswith("attention.self.key.bias"):
                continue  # zero up to rounding noise on both sides (see above)
            assert got[name].dtype == np.float32
            cosine = np.sum(got[name] * expected) / (np.linalg.norm(got[name]) * np.linalg.norm(expected))
            assert cosine >= 0.99, (model.narrow_products, name, cosine)
        assert np.sum(want_vectors * np.asarray(vectors), axis=1).min() >= 0.999, model.narrow_products
        if model is bf16_model:
            token_contracting = [line for line in compiled.as_text().splitlines()
                                 if " dot(" in line and "lhs_contracting_dims={0}" in line]
            assert not token_contracting, token_contracting[0]
        else:
            dense = [line for line in lowered.as_text().splitlines()
                     if "dot_general" in line and "x384xbf16>" in line.split("->")[-1]]
            assert dense, "no dense-layer product returns bf16"


def test_bias_gradients_are_float32_sums_of_a_bfloat16_gradient():
    """A bf16 layer's bias gradient is the float32 sum of its bf16 output gradient over every row
    (`pegjax.models.bert._add_bias`), not a sum rounded to bf16 on the way: summed over 8,192 rows,
    bf16 would be off by ~1e-3 of the gradient's scale."""
    from pegjax.models.bert import _add_bias

    rng = np.random.default_rng(0)
    outputs = jnp.asarray(rng.standard_normal((4, 2048, 12, 32)), jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal((12, 32)), jnp.float32)
    grad = jnp.asarray(rng.standard_normal((4, 2048, 12, 32)), jnp.bfloat16)
    added, pullback = jax.vjp(_add_bias, outputs, bias)
    assert added.dtype == jnp.bfloat16
    grad_outputs, grad_bias = pullback(grad)
    expected = np.asarray(grad, np.float64).reshape(-1, 12, 32).sum(axis=0)
    assert grad_bias.dtype == jnp.float32 and grad_outputs.dtype == jnp.bfloat16
    assert np.abs(np.asarray(grad_bias, np.float64) - expected).max() <= 1e-5 * np.abs(expected).max()
    np.testing.assert_array_equal(np.asarray(grad_outputs), np.asarray(grad))
