"""A BERT-family text encoder as a Flax linen module, and pooling.

The module is a pure function of its parameters: ``BertEncoder(config).apply({"params": params},
input_ids, attention_mask)`` returns the last hidden states. It knows nothing of devices or
training; every parameter carries logical axis names ("vocab", "embed", "heads", "kv", "mlp", ...)
that `pegjax.sharding` maps to mesh axes.

Layout of the parameters (all float32 unless ``param_dtype`` says otherwise)::

    embeddings/word_embeddings/embedding        [vocab, embed]
    embeddings/position_embeddings/embedding    [positions, embed]
    embeddings/token_type_embeddings/embedding  [token_types, embed]
    embeddings/layer_norm/{scale,bias}          [embed]
    layer_{i}/attention/{query,key,value}/kernel [embed, heads, kv]   bias [heads, kv]
    layer_{i}/attention/output/kernel           [heads, kv, embed]    bias [embed]
    layer_{i}/attention_norm/{scale,bias}       [embed]
    layer_{i}/intermediate/kernel               [embed, mlp]          bias [mlp]
    layer_{i}/output/kernel                     [mlp, embed]          bias [embed]
    layer_{i}/output_norm/{scale,bias}          [embed]
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

Pooling = Literal["cls", "mean"]

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT-family encoder (the fields of a Hugging Face ``config.json``)."""

    vocab_size: int
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _init(config: BertConfig, axes: tuple[str, ...]):
    return nn.with_logical_partitioning(
        nn.initializers.normal(stddev=config.initializer_range), axes
    )


def _zeros(axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _ones(axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    # LayerNorm statistics in float32 whatever the compute dtype: bf16 variance loses too much.
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        scale_init=_ones(("embed",)),
        bias_init=_zeros(("embed",)),
        name=name,
    )


class SelfAttention(nn.Module):
    config: BertConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, hidden, attention_bias, deterministic: bool):
        """hidden [B, L, E] dtype; attention_bias [B, 1, 1, L] float32 -> [B, L, E] dtype."""
        cfg = self.config
        proj = lambda name: nn.DenseGeneral(  # noqa: E731
            features=(cfg.num_attention_heads, cfg.head_dim),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_init(cfg, ("embed", "heads", "kv")),
            bias_init=_zeros(("heads", "kv")),
            name=name,
        )
        # Heads-major layout [B, H, L, K] before the batched matmuls: XLA:CPU runs them ~3x
        # faster than the equivalent einsum on [B, L, H, K] (bench/encode.py).
        heads_major = lambda t: t.transpose(0, 2, 1, 3)  # noqa: E731
        query = heads_major(proj("query")(hidden))
        key = heads_major(proj("key")(hidden))
        value = heads_major(proj("value")(hidden))
        scores = jnp.matmul(
            query, key.transpose(0, 1, 3, 2), preferred_element_type=jnp.float32
        )  # [B, H, L, L]
        scores = scores / jnp.sqrt(jnp.float32(cfg.head_dim)) + attention_bias
        probs = jax.nn.softmax(scores, axis=-1)
        probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        context = jnp.matmul(probs.astype(self.dtype), value).transpose(0, 2, 1, 3)  # [B, L, H, K]
        return nn.DenseGeneral(
            features=cfg.hidden_size,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_init(cfg, ("heads", "kv", "embed")),
            bias_init=_zeros(("embed",)),
            name="output",
        )(context)


class TransformerLayer(nn.Module):
    """One post-LayerNorm transformer layer, as in BERT."""

    config: BertConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, hidden, attention_bias, deterministic: bool):
        cfg = self.config
        dropout = nn.Dropout(cfg.hidden_dropout_prob)
        attended = SelfAttention(cfg, self.dtype, self.param_dtype, name="attention")(
            hidden, attention_bias, deterministic
        )
        attended = dropout(attended, deterministic=deterministic)
        hidden = _layer_norm(cfg, "attention_norm")(hidden + attended).astype(self.dtype)
        inner = nn.Dense(
            cfg.intermediate_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_init(cfg, ("embed", "mlp")),
            bias_init=_zeros(("mlp",)),
            name="intermediate",
        )(hidden)
        inner = ACTIVATIONS[cfg.hidden_act](inner)
        out = nn.Dense(
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_init(cfg, ("mlp", "embed")),
            bias_init=_zeros(("embed",)),
            name="output",
        )(inner)
        out = dropout(out, deterministic=deterministic)
        return _layer_norm(cfg, "output_norm")(hidden + out).astype(self.dtype)


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    config: BertConfig
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, input_ids, positions, token_type_ids):
        """[B, L] int32 each -> [B, L, E] float32."""
        cfg = self.config

        def table(num, axes, name):
            return nn.Embed(
                num,
                cfg.hidden_size,
                dtype=jnp.float32,
                param_dtype=self.param_dtype,
                embedding_init=_init(cfg, axes),
                name=name,
            )

        summed = (
            table(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)
            + table(cfg.max_position_embeddings, ("positions", "embed"), "position_embeddings")(
                positions
            )
            + table(cfg.type_vocab_size, ("token_types", "embed"), "token_type_embeddings")(
                token_type_ids
            )
        )
        return _layer_norm(cfg, "layer_norm")(summed)


class BertEncoder(nn.Module):
    """BERT encoder: token ids to contextual token states.

    Attributes:
      config: the architecture.
      dtype: compute dtype (float32 or bfloat16); softmax and LayerNorm statistics stay float32.
      param_dtype: dtype the parameters are stored in (float32).
    """

    config: BertConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        """input_ids, attention_mask, token_type_ids: [B, L] int32 -> hidden states [B, L, E] dtype.

        Dropout is active only with ``deterministic=False`` (needs a "dropout" rng).
        """
        cfg = self.config
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                f"{cfg.max_position_embeddings}; lower max_length"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        positions = jnp.arange(input_ids.shape[1])[None, :]
        hidden = Embeddings(cfg, self.param_dtype, name="embeddings")(
            input_ids, positions, token_type_ids
        )
        hidden = nn.Dropout(cfg.hidden_dropout_prob)(hidden, deterministic=deterministic)
        hidden = hidden.astype(self.dtype)
        # Additive mask, float32 so that bf16 compute does not round it.
        attention_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, -1e9).astype(
            jnp.float32
        )
        for i in range(cfg.num_hidden_layers):
            hidden = TransformerLayer(cfg, self.dtype, self.param_dtype, name=f"layer_{i}")(
                hidden, attention_bias, deterministic
            )
        return hidden


def pool(hidden, attention_mask, pooling: Pooling, normalize: bool):
    """Sentence embeddings from token states.

    hidden [B, L, E] any float dtype; attention_mask [B, L] int -> [B, E] float32.
    "cls" takes the first token; "mean" averages the attended tokens. ``normalize`` L2-normalises.
    """
    hidden = hidden.astype(jnp.float32)
    if pooling == "cls":
        pooled = hidden[:, 0]
    elif pooling == "mean":
        mask = attention_mask.astype(jnp.float32)[:, :, None]
        pooled = (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1e-9)
    else:
        raise ValueError(f"pooling={pooling!r} is not supported; use 'cls' or 'mean'")
    if normalize:
        norm = jnp.sqrt(jnp.sum(pooled * pooled, axis=-1, keepdims=True))
        pooled = pooled / jnp.maximum(norm, 1e-12)
    return pooled


@dataclasses.dataclass(frozen=True)
class EmbeddingModel:
    """An encoder plus its pooling: the thing that turns token ids into one vector per text."""

    config: BertConfig
    pooling: Pooling = "cls"
    normalize: bool = True
    dtype: str = "float32"

    @property
    def module(self) -> BertEncoder:
        return BertEncoder(self.config, dtype=DTYPES[self.dtype])

    def embed(self, params, input_ids, attention_mask, token_type_ids=None, dropout_rng=None):
        """params (unboxed); [B, L] int32 ids/mask -> [B, E] float32 embeddings.

        Dropout runs when ``dropout_rng`` is given, never otherwise.
        """
        hidden = self.module.apply(
            {"params": params},
            input_ids,
            attention_mask,
            token_type_ids,
            deterministic=dropout_rng is None,
            rngs=None if dropout_rng is None else {"dropout": dropout_rng},
        )
        return pool(hidden, attention_mask, self.pooling, self.normalize)

    def init(self, rng, seq_len: int = 8):
        """Random parameters, boxed with their logical axis names (``nn.unbox`` for arrays)."""
        ids = jnp.zeros((1, seq_len), jnp.int32)
        return self.module.init(rng, ids, jnp.ones_like(ids))["params"]
