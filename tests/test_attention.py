"""The model's attention against plain references.

The fused path (cuDNN on a GPU) gets its padding right: cuDNN cannot run here, so
`fused_attention` is run through JAX's reference implementation with the very arguments it hands
cuDNN (key lengths for one text a row, the block-diagonal bias for packed rows) and compared with
the model's own XLA attention. The XLA path's hand-written backward (products, and the dropout mask
read off the forward's output) gives autodiff's gradient of the textbook formula.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pegjax.models.bert import attention_bias, dot_attention, dropout, fused_attention


def _qkv(rows, length, heads=4, size=16):
    keys = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(k, (rows, length, heads, size), jnp.float32) for k in keys]


@pytest.mark.parametrize("packed", [False, True])
def test_fused_attention_arguments_give_the_models_attention(packed):
    length = 24
    if packed:  # segments 1, 2, 3 then padding; a row of one text; an empty row
        segments = np.zeros((3, length), np.int32)
        segments[0, :7], segments[0, 7:15], segments[0, 15:20] = 1, 2, 3
        segments[1, :length] = 1
    else:  # texts of 5, 24 and 0 tokens, padded at the end
        segments = (np.arange(length)[None, :] < np.array([[5], [24], [0]])).astype(np.int32)
    query, key, value = _qkv(3, length)
    bias = attention_bias(jnp.asarray(segments), packed)
    ours = dot_attention(query, key, value, bias, dropout_rate=0.0, seed=None, site=0, implementation="xla")
    fused = fused_attention(query, key, value, bias, implementation="xla")
    real = segments > 0  # what a padding token sees is never pooled
    np.testing.assert_allclose(np.asarray(fused)[real], np.asarray(ours)[real], atol=2e-6)
    assert np.isfinite(np.asarray(fused)).all()
    if not packed:  # a wrong length would let the first text see its padding: check it matters
        leaky = jax.nn.dot_product_attention(query, key, value, implementation="xla")
        assert not np.allclose(np.asarray(leaky)[0, :5], np.asarray(ours)[0, :5], atol=1e-3)


def test_the_configs_attention_settings_reach_the_model(shared_data):
    from configs.peg import get_config
    from pegjax.errors import ConfigError
    from pegjax.models.build import architecture, embedding_model

    config = get_config("paper")
    config.model.random_init.vocab_file = str(shared_data / "vocab" / "bert-base-chinese-vocab.txt")
    bert = architecture(config)
    assert embedding_model(config, bert).config.attention_probs_dropout_prob == 0.1  # -1: the model's own
    config.model.attention_dropout = 0.0
    model = embedding_model(config, bert)
    assert model.config.attention_probs_dropout_prob == 0.0
    assert model.attention_implementation == "xla"  # auto: cuDNN only on a GPU
    config.model.attention_dropout = 1.0
    with pytest.raises(ConfigError, match=r"config.model.attention_dropout=1.0: use a rate in \[0, 1\)"):
        embedding_model(config, bert)
    config.model.attention_dropout = 0.0
    config.model.attention = "flash"
    with pytest.raises(ConfigError, match="config.model.attention='flash': use auto"):
        embedding_model(config, bert)
    config.model.attention = "cudnn"
    with pytest.raises(ConfigError, match=r"config.model.attention=cudnn needs a CUDA GPU \(this job runs on cpu\)"):
        embedding_model(config, bert)


@pytest.mark.parametrize("packed", [False, True])
def test_attention_with_dropout_has_autodiffs_gradient(packed):
    """softmax(q k^T / sqrt(d) + bias), dropped out, times v, differentiated by autodiff through
    the same `dropout` (same mask), against `dot_attention`'s forward and backward. Padding keys
    make exponentials underflow to zero, the case where the backward's mask (nonzero outputs)
    differs from the forward's."""
    length, rate, seed = 24, 0.3, jnp.uint32(7)
    segments = np.zeros((3, length), np.int32)
    segments[0, :7], segments[0, 7:15], segments[0, 15:20] = 1, 2, 3
    segments[1, :] = 1
    segments[2, :11] = 1 if not packed else 2
    bias = attention_bias(jnp.asarray(segments), packed)
    probe = jax.random.normal(jax.random.key(1), (3, length, 4, 16), jnp.float32)

    def reference(query, key, value):
        scores = jnp.einsum("blhk,bmhk->bhlm", query, key) / 4.0 + bias
        weights = dropout(jax.nn.softmax(scores, axis=-1), rate, seed, site=0)
        return jnp.einsum("bhlm,bmhk->blhk", weights, value)

    def ours(query, key, value, rate=rate, seed=seed):
        return dot_attention(query, key, value, bias, dropout_rate=rate, seed=seed, site=0, implementation="xla")

    def plain(query, key, value):
        return ours(query, key, value, rate=0.0, seed=None)

    inputs = _qkv(3, length)
    objective = lambda f: lambda *qkv: jnp.sum(f(*qkv) * probe)  # noqa: E731
    want, got = reference(*inputs), ours(*inputs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    assert not np.allclose(np.asarray(got), np.asarray(plain(*inputs)), atol=1e-3)  # the forward drops weights,
    dropped = float(jnp.mean(dropout(jnp.ones((3, 4, length, length)), rate, seed, site=0) == 0))
    assert abs(dropped - rate) < 0.03  # at the rate asked
    want_grads = jax.grad(objective(reference), argnums=(0, 1, 2))(*inputs)
    got_grads = jax.grad(objective(ours), argnums=(0, 1, 2))(*inputs)
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=5e-5 * float(jnp.abs(w).max()), err_msg=name)
    no_dropout = jax.grad(objective(plain), argnums=0)(*inputs)
    assert not np.allclose(np.asarray(no_dropout), np.asarray(got_grads[0]), atol=1e-3)  # dropout shows
