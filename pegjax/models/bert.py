"""A BERT-family text encoder as a Flax linen module, and pooling per text.

The module is a pure function of its parameters: ``BertEncoder(config).apply({"params": params},
input_ids, segment_ids)`` returns the last hidden states. It knows nothing of devices or training;
every parameter carries logical axis names ("vocab", "embed", "heads", "kv", "mlp", "layers", ...)
that `pegjax.sharding` maps to mesh axes.

**Rows and segments.** A row of ``input_ids [B, L]`` holds one text or several packed ones.
``segment_ids [B, L]`` says which: 0 is padding, k > 0 the k-th text of the row. Tokens attend only
within their own segment (block-diagonal attention), positions restart at 0 for every text, and
`pool_segments` gives one vector per text. A plain padded batch is the case of one segment per
row: its attention mask (1 = token, 0 = padding) *is* its segment ids.

**Layers** run under ``nn.scan``: their parameters are stacked on a leading "layers" axis and the
layer body is traced once, whatever the depth. On the CPU and the GPU the scan is unrolled
(``unroll_layers``): its loop costs ~8% of a train step on the CPU, and on an H200 a BERT-base step
ran 1.47x faster unrolled (the loop keeps XLA from fusing across layers and stacks every layer's
residuals with copies: temp memory 42.8 -> 20.5 GiB) for 12 s more compile (bench/RESULTS.md). A
TPU keeps the loop (compile time at pod scale; not measured here).

**Dropout** draws its keep-mask from a counter-based hash of (seed, call site, element index)
instead of threefry: it is a few integer operations per element that fuse into the surrounding
kernel, gives the same mask in the forward pass and in its recomputation, and does not depend on
how the array is sharded. ``dropout_seed`` ([] uint32) switches it on; ``(seed, shard)`` encodes
rows ``shard * B ..`` of a larger batch split into equal shards of B rows (the training step's
per-shard encoder calls) with the masks those rows get in the whole batch.

Layout of the parameters (all float32 unless ``param_dtype`` says otherwise; n = layers)::

    embeddings/word_embeddings/embedding          [vocab, embed]
    embeddings/position_embeddings/embedding      [positions, embed]
    embeddings/token_type_embeddings/embedding    [token_types, embed]
    embeddings/layer_norm/{scale,bias}            [embed]
    layers/attention/{query,key,value}/kernel     [n, embed, heads, kv]   bias [n, heads, kv]
    layers/attention/output/kernel                [n, heads, kv, embed]   bias [n, embed]
    layers/attention_norm/{scale,bias}            [n, embed]
    layers/intermediate/kernel                    [n, embed, mlp]         bias [n, mlp]
    layers/output/kernel                          [n, mlp, embed]         bias [n, embed]
    layers/output_norm/{scale,bias}               [n, embed]
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

Pooling = Literal["cls", "mean"]
Attention = Literal["auto", "xla", "cudnn"]
# The name every dense layer gives its product's output, for a remat policy that keeps these
# outputs (`pegjax.step`, ``keep_dense_outputs``); outside such a policy the name changes nothing.
DENSE_OUTPUT = "dense_output"


def gelu_erf(x):
    """Exact GELU, x * Phi(x), written with erf as torch does: XLA:CPU runs it ~1.7x faster than
    ``jax.nn.gelu(approximate=False)``'s erfc form (same values within 5e-7)."""
    return 0.5 * x * (1 + lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


@jax.custom_jvp
def fusion_boundary(x):
    """The identity, written as an op that XLA:CPU keeps out of its YNNPACK fusions.

    Without it XLA:CPU fuses the FFN's activation into the next product as a prologue, and that
    fusion runs the [tokens, M] x [M, E] product at ~91 GFLOP/s against ~137 for the plain product
    (one Intel Xeon core, float32, bench/RESULTS.md; the encode's whole forward 1.16x faster in
    float32, 1.07x in bf16 with the boundary). YNNPACK fuses only floating and 8-bit elementwise
    ops, so a bitwise AND in the same-width unsigned type, with all bits set by a value XLA cannot
    see through (an optimization barrier), ends the fusion and changes no bit."""
    bits = jnp.dtype(f"uint{8 * jnp.dtype(x.dtype).itemsize}")
    ones = lax.optimization_barrier(jnp.asarray(jnp.iinfo(bits).max, bits))
    return lax.bitcast_convert_type(lax.bitcast_convert_type(x, bits) & ones, x.dtype)


@fusion_boundary.defjvp
def _fusion_boundary_jvp(primals, tangents):
    return fusion_boundary(primals[0]), tangents[0]


def _activation(name: str, x):
    """The FFN's activation computed in float32 and rounded once to ``x``'s dtype, as torch computes
    a bf16 GELU. Computed in bf16 itself it rounds every intermediate, and XLA:CPU runs it ~1.5x
    slower ([4,096 x 1,536] on one Intel Xeon core: 11.0 ms against 7.4 ms)."""
    return ACTIVATIONS[name](x.astype(jnp.float32)).astype(x.dtype)


ACTIVATIONS = {
    "gelu": gelu_erf,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# A masked attention score: far below any real one, finite so that a row with nothing to attend
# to (padding) stays finite.
_MASKED = -1e9


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
    # The family (Hugging Face ``model_type``): "bert", or "roberta" / "xlm-roberta", whose
    # positions start after the padding index (position of token i = pad_token_id + 1 + i).
    model_type: str = "bert"

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
    def position_offset(self) -> int:
        return 0 if self.model_type == "bert" else self.pad_token_id + 1

    @property
    def max_length(self) -> int:
        """The longest text the position table holds."""
        return self.max_position_embeddings - self.position_offset

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _hash32(x):
    """A 32-bit integer mix with full avalanche (uint32 -> uint32, a bijection)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x21F0AAAD)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x735A2D97)
    return x ^ (x >> 15)


def dropout(x, rate: float, seed, site: int):
    """Inverted dropout: x * keep / (1 - rate), keep ~ Bernoulli(1 - rate) per element.

    x: any shape and float dtype, rows leading; seed: [] uint32, or (seed, shard) when x is shard
    ``shard`` of a batch split into equal row shards (None: no dropout); site: an int distinct for
    every call site of one forward pass. The mask is a hash of (seed, site, the element's index in
    the whole batch), so it is the same wherever, however often and however split it is computed.
    """
    if seed is None or rate <= 0.0:
        return x
    shard = None
    if isinstance(seed, tuple):
        seed, shard = seed
    if x.size >= 2**32:
        raise ValueError(f"dropout over {x.size} elements: at most 2**32 - 1 per call; use a smaller encode chunk")
    # The element's index in the whole batch (earlier shards come first): offset + sum over dims of
    # iota * stride. The strides and offset go through a barrier with the key, which changes from
    # one encode chunk to the next: otherwise XLA computes the index array once, outside the
    # chunk loop, and every dropout reads it back from memory (4 bytes an element, each time).
    strides = [math.prod(x.shape[dim + 1:]) for dim in range(x.ndim)]
    offset = 0 if shard is None else jnp.asarray(shard, jnp.uint32) * jnp.uint32(x.size)
    key = _hash32(seed.astype(jnp.uint32) ^ jnp.uint32((site * 0x9E3779B9) & 0xFFFFFFFF))
    offset, strides, key = lax.optimization_barrier(
        (jnp.asarray(offset, jnp.uint32), [jnp.uint32(s) for s in strides], key))
    index = offset
    for dim, stride in enumerate(strides):  # each term a broadcast of a [n] vector: nothing full-size to hoist
        index = index + lax.broadcast_in_dim(jnp.arange(x.shape[dim], dtype=jnp.uint32) * stride, x.shape, (dim,))
    bits = _hash32(index ^ key)
    keep = bits >= jnp.uint32(min(int(rate * 2**32), 2**32 - 1))
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def attention_bias(segment_ids, packed: bool):
    """Additive attention bias [B, 1, L|1, L] float32 from segment ids [B, L] int32.

    Packed rows: a token sees the tokens of its own segment (padding sees padding). Otherwise only
    the key side matters, so the bias is [B, 1, 1, L] and costs no [L, L] array.
    """
    if packed:
        same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        return jnp.where(same, 0.0, _MASKED).astype(jnp.float32)
    return jnp.where(segment_ids[:, None, None, :] > 0, 0.0, _MASKED).astype(jnp.float32)


def segment_positions(segment_ids):
    """Position of every token within its own segment: [B, L] int32 -> [B, L] int32."""
    index = lax.broadcasted_iota(jnp.int32, segment_ids.shape, 1)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    start_index = lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - start_index


def dot_attention(query, key, value, bias, *, dropout_rate: float, seed, site: int, implementation: str):
    """Softmax attention. query/key/value [B, L, H, K] dtype; bias [B, 1, L|1, L] float32 ->
    [B, L, H, K] dtype.

    "cudnn" (GPU, bf16/fp16, no attention dropout) calls ``jax.nn.dot_product_attention``'s fused
    kernel. "xla" computes it in the heads-major layout [B, H, L, K] with batched matmuls and
    float32 scores and softmax: XLA:CPU runs that ~3x faster than the einsum form (bench/encode.py).
    """
    if implementation == "cudnn":
        if seed is not None and dropout_rate > 0:
            raise ValueError("the cudnn attention has no dropout: set config.model.attention=xla, or "
                             "config.model.attention_dropout=0 (BertConfig.attention_probs_dropout_prob=0)")
        return fused_attention(query, key, value, bias)
    heads_major = lambda t: t.transpose(0, 2, 1, 3)  # noqa: E731
    # XLA:CPU runs a batched bf16 product in float32 (it converts the operands itself), so on the
    # CPU the weights stay float32 instead of being rounded to bf16 and converted back: two passes
    # over [B, H, L, L] saved.
    inner = jnp.float32 if jax.default_backend() == "cpu" else value.dtype
    # The 1/sqrt(K) scale goes on the query, K times smaller than the scores: scaling the scores
    # makes XLA:CPU materialise the scale as a constant of the full [B, H, L, L] shape.
    query = query * jnp.asarray(1 / query.shape[-1] ** 0.5, query.dtype)
    scores = _scores(heads_major(query), heads_major(key))  # [B, H, L, L]
    scores = scores + bias
    # Softmax with the division deferred past the value product: it divides [B, H, L, K] instead of
    # [B, H, L, L] and lets XLA fuse the exponential into one pass (forward ~2.4x faster on CPU).
    # Dropout scales each probability by keep/(1 - rate), so it commutes with the row division.
    weights = jnp.exp(scores - lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    if seed is not None and dropout_rate > 0:
        weights = _dropped_weights(weights, seed, dropout_rate, site, inner)
    context = _weighted_sum(weights.astype(inner), heads_major(value).astype(inner))
    return (context / total).astype(value.dtype).transpose(0, 2, 1, 3)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dropped_weights(weights, seed, rate: float, site: int, dtype):
    """`dropout` of the attention's exponentiated scores [B, H, L, L] float32, cast to ``dtype``.

    Its backward reads the keep-mask off its output (kept = nonzero) instead of hashing every
    element again (on one Zen 3 core, 16 x 256 tokens: ~11 of a layer's ~700 ms forward +
    backward). That is exact here: a weight whose output is zero but was kept is an exponential
    that underflowed to zero, and the scores' gradient multiplies the weights' gradient by that
    zero. The output is the array the value product keeps for its own backward, so the mask costs
    no memory."""
    return dropout(weights, rate, seed, site).astype(dtype)


def _dropped_weights_fwd(weights, seed, rate, site, dtype):
    out = _dropped_weights(weights, seed, rate, site, dtype)
    return out, out


def _dropped_weights_bwd(rate, site, dtype, out, grad):
    grad = grad.astype(jnp.float32) / jnp.float32(1.0 - rate)
    return jnp.where(out != 0, grad, jnp.zeros((), jnp.float32)), None


_dropped_weights.defvjp(_dropped_weights_fwd, _dropped_weights_bwd)


def fused_attention(query, key, value, bias, implementation: str = "cudnn"):
    """``jax.nn.dot_product_attention`` (cuDNN's fused kernel by default), fed the way it runs fastest.

    A key-padding bias [B, 1, 1, L] (one text a row) goes in as key lengths: cuDNN's padding mask,
    which needs no bias tensor (it rejects a broadcast one) and skips the padded keys. That holds
    because every row's padding is at its end, as `pegjax.data.packing.step_batch` and the
    tokenizer lay rows out. A row with no tokens (a padding row) keeps one key, so it stays
    finite. A packed row's block-diagonal bias [B, 1, L, L] goes in as a bias.
    ``implementation="xla"`` runs the same arguments through JAX's reference path (tests, CPU).
    """
    if bias.shape[2] == 1:
        lengths = jnp.maximum(jnp.sum(bias[:, 0, 0, :] == 0, axis=-1), 1).astype(jnp.int32)
        return jax.nn.dot_product_attention(query, key, value, key_value_seq_lengths=lengths,
                                            implementation=implementation)
    return jax.nn.dot_product_attention(query, key, value, bias=bias.astype(query.dtype), implementation=implementation)


def _per_head(a, b, contract_a: int, contract_b: int):
    """Products over [B, H, ...] operands, batched over (B, H), accumulated in float32."""
    return _dot(a, b, (((contract_a,), (contract_b,)), ((0, 1), (0, 1))))


def _flipped(a, b):
    """a [B, H, M, K] and b [B, H, M, N] -> b^T a, [B, H, N, K] float32, computed as (a^T b)^T.

    The attention's key and value gradients have this form (dS^T Q, P^T dO). Taken directly,
    XLA:CPU runs the product with the large [M, N] operand transposed, ~2.2x slower than a^T b on
    one core; bench/attention.py times the whole backward against the autodiff form. The barrier
    keeps XLA from folding the small [K, N] transpose back into the product."""
    return lax.optimization_barrier(_per_head(a, b, 2, 2)).transpose(0, 1, 3, 2)


@jax.custom_vjp
def _scores(query, key):
    """query [B, H, L, K] times key [B, H, M, K] transposed -> [B, H, L, M] float32."""
    return _per_head(query, key, 3, 3)


def _scores_fwd(query, key):
    return _scores(query, key), (query, key)


def _scores_bwd(residual, grad):
    query, key = residual
    grad = grad.astype(query.dtype)
    return _per_head(grad, key, 3, 2).astype(query.dtype), _flipped(query, grad).astype(key.dtype)


_scores.defvjp(_scores_fwd, _scores_bwd)


@jax.custom_vjp
def _weighted_sum(weights, value):
    """weights [B, H, L, M] times value [B, H, M, K] -> [B, H, L, K] float32."""
    return _per_head(weights, value, 3, 2)


def _weighted_sum_fwd(weights, value):
    return _weighted_sum(weights, value), (weights, value)


def _weighted_sum_bwd(residual, grad):
    weights, value = residual
    grad = grad.astype(value.dtype)
    return _per_head(grad, value, 3, 3).astype(weights.dtype), _flipped(grad, weights).astype(value.dtype)


_weighted_sum.defvjp(_weighted_sum_fwd, _weighted_sum_bwd)


def _matmul_2d(x, kernel, contract: int, narrow: bool = False):
    """x [..., *in] times kernel [*in, *out] (``contract`` = len(in)) as one 2-D product."""
    inner, outer = math.prod(kernel.shape[:contract]), math.prod(kernel.shape[contract:])
    flat = _product(x.reshape(-1, inner), kernel.reshape(inner, outer), (((1,), (0,)), ((), ())), narrow)
    return flat.reshape(x.shape[: x.ndim - contract] + kernel.shape[contract:]).astype(x.dtype)


def _dot(a, b, dims):
    """A product accumulated and returned in float32: XLA:CPU runs bf16 operands ~2x faster than
    float32 ones when the output is float32, and no faster when the output is bf16 (its bf16-out
    path is the slow one), so the cast back to bf16 comes after."""
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _product(a, b, dims, narrow: bool):
    """An activation-sized product: returned in the operands' dtype when ``narrow`` (accelerators:
    the product still accumulates in float32 inside, and a bf16 result halves the bytes every
    dense layer writes and the next op reads back), else accumulated and returned in float32
    (`_dot`)."""
    if narrow and a.dtype == b.dtype:
        return lax.dot_general(a, b, dims, preferred_element_type=a.dtype)
    return _dot(a, b, dims)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _project(x, kernel, contract: int, narrow: bool):
    return _matmul_2d(x, kernel, contract, narrow)


def _project_fwd(x, kernel, contract, narrow):
    return _matmul_2d(x, kernel, contract, narrow), (x, kernel)


def _project_bwd(contract, narrow, residual, grad):
    """The two products of a dense layer's backward, written out because XLA:CPU's layout choice
    for the autodiff form costs ~2x on the weight gradient: it transposes the [tokens, out]
    gradient in memory and then runs a product with both operands transposed."""
    x, kernel = residual
    inner, outer = math.prod(kernel.shape[:contract]), math.prod(kernel.shape[contract:])
    x2, g2 = x.reshape(-1, inner), grad.reshape(-1, outer)
    contract_rows = (((0,), (0,)), ((), ()))
    dx = _product(g2, kernel.reshape(inner, outer), (((1,), (1,)), ((), ())), narrow)
    if jax.default_backend() == "cpu":
        # The narrower operand transposed in memory, so that the weight gradient is a plain
        # [n, tokens] x [tokens, m] product: XLA:CPU runs a product that contracts the token axis
        # of its left operand on a slower path. One core of a Zen 3 EPYC, float32, 4,096 tokens:
        # MiniLM's FFN weight gradients 75 -> 56 ms each (64 -> 86 GFLOP/s; 384 x 384: no change);
        # bf16 on 2 AVX512-BF16 cores: ~142 -> ~355 GFLOP/s, as XLA converts the slow form to
        # float32.
        if inner <= outer:
            dk = _dot(_transposed(x2), g2, (((1,), (0,)), ((), ())))
        else:
            dk = _transposed(_dot(_transposed(g2), x2, (((1,), (0,)), ((), ()))))
    elif inner <= outer:
        dk = _dot(x2, g2, contract_rows)
    else:  # the product runs ~25% faster with the shorter side leading; the barrier keeps XLA
        # from folding the (small) transpose back into it
        dk = lax.optimization_barrier(_dot(g2, x2, contract_rows)).T
    return dx.reshape(x.shape).astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


def _transposed(x):
    """x [M, N] -> x^T [N, M], transposed in memory (~0.5 ms for [8192, 384] bf16). A plain
    transpose feeding a product is folded into it by XLA (the product then reads x transposed);
    one through a 3-D shape is not."""
    return x.reshape(x.shape[0], 1, x.shape[1]).transpose(2, 0, 1).reshape(x.shape[1], x.shape[0])


_project.defvjp(_project_fwd, _project_bwd)


@jax.custom_vjp
def _add_bias(y, bias):
    """y [..., *features] + bias [*features] (cast to y's dtype)."""
    return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
    return _add_bias(y, bias), bias


def _add_bias_bwd(bias, grad):
    """The bias gradient as one float32 sum over the rows of the 2-D gradient. Left to autodiff,
    a bf16 step sums the [..., *features] gradient in bf16 and XLA:CPU splits that sum into a
    float32 copy and a `reduce-window` loop: ~11% of a bf16 SciFact step on the AMX Intel Xeon
    (bench/RESULTS.md), where this sum takes ~1 ms a layer."""
    rows = grad.reshape(-1, bias.size).astype(jnp.float32)
    return grad, jnp.sum(rows, axis=0).reshape(bias.shape).astype(bias.dtype)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class Projection(nn.Module):
    """x [..., *in] -> [..., *features] + bias: Flax's Dense/DenseGeneral (same parameter names,
    shapes and initialisers), applied as one 2-D product with a hand-written backward."""

    features: tuple[int, ...]
    contract: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    kernel_init: object
    bias_init: object
    narrow: bool = False  # `_product`

    @nn.compact
    def __call__(self, x):
        inner = x.shape[x.ndim - self.contract:]
        kernel = self.param("kernel", self.kernel_init, tuple(inner) + tuple(self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, tuple(self.features), self.param_dtype)
        y = checkpoint_name(_project(x.astype(self.dtype), kernel.astype(self.dtype), self.contract, self.narrow),
                            DENSE_OUTPUT)
        return _add_bias(y, bias)


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
    implementation: str
    narrow: bool = False

    @nn.compact
    def __call__(self, hidden, bias, seed):
        """hidden [B, L, E] dtype; bias [B, 1, L|1, L] float32; seed [] uint32 or None -> [B, L, E]."""
        cfg = self.config
        proj = lambda name: Projection(  # noqa: E731
            (cfg.num_attention_heads, cfg.head_dim), 1, self.dtype, self.param_dtype,
            _init(cfg, ("embed", "heads", "kv")), _zeros(("heads", "kv")), self.narrow, name=name,
        )
        context = dot_attention(
            proj("query")(hidden), proj("key")(hidden), proj("value")(hidden), bias,
            dropout_rate=cfg.attention_probs_dropout_prob, seed=seed, site=0, implementation=self.implementation,
        )
        return Projection(
            (cfg.hidden_size,), 2, self.dtype, self.param_dtype,
            _init(cfg, ("heads", "kv", "embed")), _zeros(("embed",)), self.narrow, name="output",
        )(context)


class TransformerLayer(nn.Module):
    """One post-LayerNorm transformer layer, as in BERT; the body of the layer scan."""

    config: BertConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    implementation: str
    narrow: bool = False

    @nn.compact
    def __call__(self, hidden, bias, seed):
        """(hidden [B, L, E], bias, seed [] uint32 or None) -> (hidden, None)."""
        cfg = self.config
        rate = cfg.hidden_dropout_prob
        attended = SelfAttention(cfg, self.dtype, self.param_dtype, self.implementation, self.narrow, name="attention")(
            hidden, bias, seed
        )
        attended = dropout(attended, rate, seed, site=1)
        hidden = _layer_norm(cfg, "attention_norm")(hidden + attended).astype(self.dtype)
        inner = Projection(
            (cfg.intermediate_size,), 1, self.dtype, self.param_dtype,
            _init(cfg, ("embed", "mlp")), _zeros(("mlp",)), self.narrow, name="intermediate",
        )(hidden)
        inner = _activation(cfg.hidden_act, inner)
        if jax.default_backend() == "cpu":
            inner = fusion_boundary(inner)
        out = Projection(
            (cfg.hidden_size,), 1, self.dtype, self.param_dtype,
            _init(cfg, ("mlp", "embed")), _zeros(("embed",)), self.narrow, name="output",
        )(inner)
        out = dropout(out, rate, seed, site=2)
        return _layer_norm(cfg, "output_norm")(hidden + out).astype(self.dtype), None


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
      attention: "xla" or "cudnn" (see `dot_attention`).
      unroll: unroll the layer scan (same parameters, same results; no loop at run time).
      narrow_products: dense layers return their products in ``dtype`` rather than float32
        (`_product`).
    """

    config: BertConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    unroll: bool = False
    narrow_products: bool = False

    @nn.compact
    def __call__(self, input_ids, segment_ids, packed: bool = False, dropout_seed=None):
        """input_ids, segment_ids: [B, L] int32 -> hidden states [B, L, E] dtype.

        ``packed``: rows may hold several texts (block-diagonal attention); with False every row is
        one text and ``segment_ids`` is its 0/1 attention mask. ``dropout_seed``: [] uint32 turns
        dropout on (None: off).
        """
        cfg = self.config
        if input_ids.shape[1] > cfg.max_length:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds the {cfg.max_length} positions of this "
                f"{cfg.model_type} model; lower max_length"
            )
        positions = segment_positions(segment_ids) if packed else jnp.arange(input_ids.shape[1])[None, :]
        positions = positions + cfg.position_offset
        hidden = Embeddings(cfg, self.param_dtype, name="embeddings")(
            input_ids, positions, jnp.zeros_like(input_ids)
        )
        layers = cfg.num_hidden_layers
        seeds = None
        if dropout_seed is not None:
            # One seed per layer (scanned); site 3 of the step's own seed for the embedding dropout.
            seed, shard = dropout_seed if isinstance(dropout_seed, tuple) else (dropout_seed, None)
            seeds = _hash32(seed.astype(jnp.uint32) + jnp.arange(1, layers + 1, dtype=jnp.uint32))
            if shard is not None:
                seeds = (seeds, jnp.broadcast_to(jnp.asarray(shard, jnp.uint32), (layers,)))
            hidden = dropout(hidden, cfg.hidden_dropout_prob, dropout_seed, site=3)
        hidden = hidden.astype(self.dtype)
        bias = attention_bias(segment_ids, packed)
        scan = nn.scan(
            TransformerLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, 0),
            length=layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
            unroll=layers if self.unroll else 1,
        )
        hidden, _ = scan(cfg, self.dtype, self.param_dtype, self.attention, self.narrow_products, name="layers")(
            hidden, bias, seeds)
        return hidden


def pool(hidden, attention_mask, pooling: Pooling, normalize: bool):
    """Sentence embeddings of one-text rows.

    hidden [B, L, E] any float dtype; attention_mask [B, L] int -> [B, E] float32.
    "cls" takes the first token; "mean" averages the attended tokens. ``normalize`` L2-normalises.
    """
    return pool_segments(hidden, attention_mask, 1, pooling, normalize)[:, 0]


def pool_segments(hidden, segment_ids, slots: int, pooling: Pooling, normalize: bool):
    """One vector per segment: hidden [B, L, E]; segment_ids [B, L] int32 -> [B, slots, E] float32.

    Slot s of a row is its segment s + 1 ("cls": the segment's first token; "mean": the average of
    its tokens); a slot with no segment gives zeros.
    """
    hidden = hidden.astype(jnp.float32)
    member = (segment_ids[:, None, :] == jnp.arange(1, slots + 1, dtype=segment_ids.dtype)[None, :, None])
    if pooling == "cls":
        first = member & ~jnp.concatenate([jnp.zeros_like(member[..., :1]), member[..., :-1]], axis=-1)
        pooled = jnp.einsum("bsl,ble->bse", first.astype(jnp.float32), hidden, precision=lax.Precision.HIGHEST)
    elif pooling == "mean":
        weights = member.astype(jnp.float32)
        pooled = jnp.einsum("bsl,ble->bse", weights, hidden, precision=lax.Precision.HIGHEST)
        pooled = pooled / jnp.maximum(weights.sum(-1)[..., None], 1e-9)
    else:
        raise ValueError(f"pooling={pooling!r} is not supported; use 'cls' or 'mean'")
    if normalize:
        # The floor sits inside the square root: an empty slot (a zero vector) then has a finite
        # gradient, not 0 * inf.
        pooled = pooled * lax.rsqrt(jnp.maximum(jnp.sum(pooled * pooled, axis=-1, keepdims=True), 1e-24))
    return pooled


@dataclasses.dataclass(frozen=True)
class EmbeddingModel:
    """An encoder plus its pooling: the thing that turns token ids into one vector per text."""

    config: BertConfig
    pooling: Pooling = "cls"
    normalize: bool = True
    dtype: str = "float32"
    attention: Attention = "auto"
    unroll_layers: bool | None = None  # None: unrolled on the CPU and GPU, scanned on a TPU
    # None: on accelerators. XLA:CPU runs bf16 products fastest with float32 results (`_dot`).
    narrow_products: bool | None = None

    @property
    def attention_implementation(self) -> str:
        if self.attention != "auto":
            return self.attention
        fused = jax.default_backend() == "gpu" and self.dtype == "bfloat16"
        return "cudnn" if fused and self.config.attention_probs_dropout_prob == 0 else "xla"

    @property
    def module(self) -> BertEncoder:
        backend = jax.default_backend()
        unroll = backend in ("cpu", "gpu") if self.unroll_layers is None else self.unroll_layers
        narrow = backend != "cpu" if self.narrow_products is None else self.narrow_products
        return BertEncoder(self.config, dtype=DTYPES[self.dtype], attention=self.attention_implementation, unroll=unroll,
                           narrow_products=narrow)

    def embed(self, params, input_ids, attention_mask, dropout_seed=None):
        """params (unboxed); [B, L] int32 ids / 0-1 mask, one text a row -> [B, E] float32."""
        hidden = self.module.apply({"params": params}, input_ids, attention_mask, False, dropout_seed)
        return pool(hidden, attention_mask, self.pooling, self.normalize)

    def embed_packed(self, params, input_ids, segment_ids, slots: int, dropout_seed=None):
        """params; [B, L] int32 ids / segment ids, up to ``slots`` texts a row -> [B, slots, E] float32."""
        hidden = self.module.apply({"params": params}, input_ids, segment_ids, True, dropout_seed)
        return pool_segments(hidden, segment_ids, slots, self.pooling, self.normalize)

    def init(self, rng, seq_len: int = 8):
        """Random parameters, boxed with their logical axis names (``nn.unbox`` for arrays)."""
        ids = jnp.zeros((1, seq_len), jnp.int32)
        return self.module.init(rng, ids, jnp.ones_like(ids))["params"]
