"""The one tokenizer path: a Rust fast tokenizer (`tokenizers`) from a model folder or a vocab file.

pegjax reads the tokenizer itself instead of through transformers: ``tokenizer.json`` as it is,
or a WordPiece ``vocab.txt`` built the way transformers' ``BertTokenizerFast`` builds it. This
gives the ids transformers gives (tests/test_hf.py checks them on real SciFact and medical_zh
text) without importing transformers, which costs every run ~2.5 s (and imports torch with it
when torch is installed). An export writes the tokenizer files without it too
(`Tokenizer.save_pretrained`); transformers is imported only to read a folder that has neither
file (e.g. only a SentencePiece model), which it converts.

One difference is known: transformers 5 rebuilds an XLM-R tokenizer from its own class rather than
from ``tokenizer.json`` as written, and the two split a special token written inside a text (the
literal ``</s>``) differently; pegjax keeps ``tokenizer.json``'s. On real text they agree.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from pegjax.errors import UserError


class TokenizerError(UserError, FileNotFoundError):
    """No tokenizer where the user pointed."""


class Tokenizer:
    """Text -> token ids ([CLS] ... [SEP] or the model's own markers), with the special-token ids
    pegjax needs. The Rust tokenizer it holds never truncates or pads and is never changed after
    it is made, so grain's reader threads can share it; truncation is `tokenize`'s."""

    def __init__(self, backend, source: str, pad_token: str | None = None, unk_token: str | None = None,
                 lowercase: bool = True):
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.source = source  # the folder or vocab file it was read from, for save_pretrained
        self.lowercase = lowercase
        self.pad_token_id = _token_id(backend, pad_token, ("[PAD]", "<pad>"))
        self.unk_token_id = _token_id(backend, unk_token, ("[UNK]", "<unk>"))

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, {self.backend.get_vocab_size()} entries)"

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, special tokens included, nothing truncated."""
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=True)]

    def tokenize(self, text: str) -> list[str]:
        """The tokens of one text, special tokens left out."""
        return self.backend.encode(text, add_special_tokens=False).tokens

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        """Every token and its id, added tokens included."""
        return self.backend.get_vocab(with_added_tokens=True)

    def save_pretrained(self, folder: str) -> None:
        """Writes the tokenizer files that transformers and sentence-transformers load: those of
        the source folder as they are (so the folder tokenizes as its source does), or, for a
        ``vocab.txt`` file, the ``tokenizer.json`` and ``tokenizer_config.json`` that transformers'
        ``BertTokenizerFast`` writes for it. transformers is not imported (with torch installed,
        importing it takes ~7 s of an export on a 2-core CPU)."""
        os.makedirs(folder, exist_ok=True)
        if os.path.isdir(self.source):
            for name in TOKENIZER_FILES:
                source, target = os.path.join(self.source, name), os.path.join(folder, name)
                if os.path.isfile(source) and not (os.path.exists(target) and os.path.samefile(source, target)):
                    shutil.copyfile(source, target)
            return
        self.backend.save(os.path.join(folder, "tokenizer.json"))
        specials = {"cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]",
                    "unk_token": "[UNK]"}
        config = {"backend": "tokenizers", "do_lower_case": self.lowercase, "strip_accents": None,
                  "tokenize_chinese_chars": True, "tokenizer_class": "BertTokenizer",
                  **{k: v for k, v in specials.items() if self.backend.token_to_id(v) is not None}}
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True, ensure_ascii=False)
            f.write("\n")


# The files a Hugging Face tokenizer folder may hold (fast and slow tokenizers of the BERT, RoBERTa
# and XLM-R families): what an export copies from its source folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model")


def _token_id(backend, token: str | None, defaults: tuple[str, ...]) -> int | None:
    for name in ((token,) if token else ()) + defaults:
        token_id = backend.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def _wordpiece(vocab_file: str, lowercase: bool, chinese_chars: bool = True, strip_accents=None):
    """A WordPiece tokenizer from a ``vocab.txt``, as transformers' ``BertTokenizerFast`` makes it:
    BERT's normaliser and pre-tokeniser, ``[CLS] text [SEP]``, the special tokens kept whole."""
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as RustTokenizer

    backend = RustTokenizer(models.WordPiece.from_file(vocab_file, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=chinese_chars,
                                                    strip_accents=strip_accents, lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    if cls is None or sep is None:
        raise TokenizerError(f"{vocab_file}: a BERT vocab.txt needs the [CLS] and [SEP] tokens; this one lacks "
                             + " and ".join(t for t, i in (("[CLS]", cls), ("[SEP]", sep)) if i is None))
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    specials = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if backend.token_to_id(t) is not None]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return backend


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{path}: cannot read it as JSON ({err})") from None
    return value if isinstance(value, dict) else {}


def _special_token(settings: list[dict], name: str) -> str | None:
    """``pad_token`` etc. from tokenizer_config.json / special_tokens_map.json (a string or
    ``{"content": ...}``), first file first."""
    for values in settings:
        value = values.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return value
    return None


def load_tokenizer(path: str, lowercase: bool = True) -> Tokenizer:
    """The tokenizer of a model folder (``tokenizer.json``, else ``vocab.txt``, else whatever
    transformers can convert) or of a WordPiece ``vocab.txt`` file (e.g. bert-base-chinese's;
    Chinese characters are split one per token; ``lowercase`` applies to it)."""
    from tokenizers import Tokenizer as RustTokenizer

    if os.path.isfile(path):
        return Tokenizer(_wordpiece(path, lowercase), path, lowercase=lowercase)
    if not os.path.isdir(path):
        raise TokenizerError(f"{path}: no such tokenizer folder or vocab file")
    settings = [_read_json(os.path.join(path, "tokenizer_config.json")),
                _read_json(os.path.join(path, "special_tokens_map.json"))]
    tokens = {"pad_token": _special_token(settings, "pad_token"), "unk_token": _special_token(settings, "unk_token")}
    spec, vocab = os.path.join(path, "tokenizer.json"), os.path.join(path, "vocab.txt")
    if os.path.isfile(spec):
        try:
            backend = RustTokenizer.from_file(spec)
        except Exception as err:  # the Rust reader raises a bare Exception
            raise TokenizerError(f"{spec}: not a tokenizer.json that the tokenizers library can read ({err})") from None
        return Tokenizer(backend, path, **tokens)
    config = settings[0]
    if os.path.isfile(vocab):
        lower = bool(config.get("do_lower_case", True))
        backend = _wordpiece(vocab, lower, bool(config.get("tokenize_chinese_chars", True)), config.get("strip_accents"))
        return Tokenizer(backend, path, lowercase=lower, **tokens)
    if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        raise TokenizerError(f"{path}: no tokenizer.json or vocab.txt in this folder")
    converted = _transformers_tokenizer(path, lowercase)
    backend = getattr(converted, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError(f"{path}: transformers has no fast tokenizer for this folder; save one with "
                             "tokenizer.save_pretrained() from a fast tokenizer (it writes tokenizer.json)")
    return Tokenizer(RustTokenizer.from_str(backend.to_str()), path, pad_token=converted.pad_token,
                     unk_token=converted.unk_token)


def _transformers_tokenizer(source: str, lowercase: bool):
    """transformers' own tokenizer for a folder or vocab file (imported here only)."""
    from transformers import AutoTokenizer, BertTokenizerFast

    if os.path.isfile(source):
        return BertTokenizerFast(vocab=source, do_lower_case=lowercase, tokenize_chinese_chars=True)
    return AutoTokenizer.from_pretrained(source, use_fast=True)


def tokenize(tokenizer: Tokenizer, texts: list[str], max_length: int) -> list[np.ndarray]:
    """Token ids per text ([CLS] ... [SEP]), truncated to ``max_length`` tokens; no padding.
    Truncation keeps the leading tokens and the closing [SEP]."""
    return [np.asarray(truncate(ids, max_length), dtype=np.int32) for ids in tokenizer.encode(texts)]


def truncate(ids, max_length: int):
    """A text's token ids (a list) cut to ``max_length``: the leading tokens and the closing one
    ([SEP])."""
    return ids if len(ids) <= max_length else ids[: max_length - 1] + ids[-1:]


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
