"""The one tokenizer path: a Hugging Face fast tokenizer from a model folder or a vocab file."""

from __future__ import annotations

import os
import threading
import weakref

import numpy as np

from pegjax.errors import UserError


class TokenizerError(UserError, FileNotFoundError):
    """No tokenizer where the user pointed."""


def load_tokenizer(path: str, lowercase: bool = True):
    """A fast tokenizer from a model folder (``tokenizer.json`` / ``vocab.txt``) or a WordPiece
    ``vocab.txt`` file (e.g. bert-base-chinese's; Chinese characters are split one per token)."""
    from transformers import AutoTokenizer, BertTokenizerFast

    if os.path.isfile(path):
        return BertTokenizerFast(vocab=path, do_lower_case=lowercase, tokenize_chinese_chars=True)
    if not os.path.isdir(path):
        raise TokenizerError(f"{path}: no such tokenizer folder or vocab file")
    if not any(
        os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
    ):
        raise TokenizerError(f"{path}: no tokenizer.json or vocab.txt in this folder")
    return AutoTokenizer.from_pretrained(path, use_fast=True)


_BACKENDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_BACKENDS_LOCK = threading.Lock()


def _backend(tokenizer):
    """The Rust tokenizer behind a fast Hugging Face tokenizer, as a private copy that never
    truncates or pads (None for a tokenizer without one).

    A copy, because the tokenizer's own backend keeps truncation and padding as state that every
    ``tokenizer(...)`` call may set (a ``tokenizer.json`` may also ship with them on); this one is
    never changed after it is made, so grain's reader threads can share it.
    """
    with _BACKENDS_LOCK:
        if tokenizer not in _BACKENDS:
            from tokenizers import Tokenizer

            own = getattr(tokenizer, "backend_tokenizer", None)
            backend = None if own is None else Tokenizer.from_str(own.to_str())
            if backend is not None:
                backend.no_truncation()
                backend.no_padding()
            _BACKENDS[tokenizer] = backend
        return _BACKENDS[tokenizer]


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[np.ndarray]:
    """Token ids per text ([CLS] ... [SEP]), truncated to ``max_length`` tokens; no padding.

    Fast tokenizers are called through their Rust backend (``_backend``): the ids
    ``tokenizer(texts)`` gives, without its per-call Python work (a fifth of the paper recipe's
    host batch, which calls this once for a query and once for its 6 passages). Truncation is done
    here, not by the tokenizer, whose truncation length is state shared by grain's reader threads.
    """
    backend = _backend(tokenizer)
    if backend is not None:
        encoded = [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=True)]
    else:
        encoded = tokenizer(list(texts), truncation=False, padding=False, return_attention_mask=False,
                            return_token_type_ids=False, verbose=False)["input_ids"]
    out = []
    for ids in encoded:
        if len(ids) > max_length:  # keep the leading tokens and the closing [SEP]
            ids = ids[: max_length - 1] + ids[-1:]
        out.append(np.asarray(ids, dtype=np.int32))
    return out


def bucket_length(length: int, max_length: int, smallest: int = 16) -> int:
    """The padded length for a sequence: the smallest of 16, 24, 32, 48, 64, 96, ... (powers of two
    and their midpoints) that holds ``length``, capped at ``max_length``. A handful of shapes
    means a handful of compilations, and at most a third of each row is padding."""
    bucket = smallest
    while bucket < length:
        bucket = bucket + bucket // 2 if bucket & (bucket - 1) == 0 else bucket // 3 * 4
    return min(bucket, max_length)


def pad_batch(sequences: list[np.ndarray], length: int, rows: int, pad_id: int = 0):
    """Sequences -> (input_ids, attention_mask), each [rows, length] int32; extra rows are empty."""
    input_ids = np.full((rows, length), pad_id, dtype=np.int32)
    attention_mask = np.zeros((rows, length), dtype=np.int32)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask
