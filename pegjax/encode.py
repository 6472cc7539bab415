"""Public inference API: load a model folder, embed texts.

    from pegjax.encode import Encoder
    encoder = Encoder.from_pretrained("path/to/model")     # any Hugging Face BERT folder
    vectors = encoder.encode(["first text", "second text"])  # np.ndarray [2, D] float32

Texts are tokenized with the folder's own fast tokenizer, sorted by length and padded to a few
bucket lengths (powers of two up to ``max_length``) with a fixed number of rows, so jit compiles a
handful of shapes whatever the input. Rows come back in input order.

Edge cases: an empty list gives an array of shape [0, D]; an empty string is encoded as
``[CLS] [SEP]`` like any other text; a text longer than ``max_length`` tokens is truncated to its
first ``max_length`` tokens (as sentence-transformers does).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from functools import partial

import jax
import numpy as np

from pegjax.data.tokenizer import bucket_length, load_tokenizer, pad_batch, tokenize
from pegjax.models import hf
from pegjax.models.bert import EmbeddingModel

_PROGRESS_MIN_TEXTS = 2048


class Encoder:
    """An embedding model ready to encode: architecture + pooling, params, tokenizer."""

    def __init__(self, model: EmbeddingModel, params, tokenizer, max_length: int, prompts: dict | None = None):
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.model = model
        # Process-local: each process encodes its own texts on its own devices, also in a
        # multi-process run; every batch is split over them.
        mesh = Mesh(np.array(jax.local_devices()), ("rows",))
        self._rows = NamedSharding(mesh, PartitionSpec("rows"))
        self.params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        self.tokenizer = tokenizer
        # Named prompts, as sentence-transformers keeps them: "query" and "document" (passages).
        self.prompts = dict(prompts or {})
        self.max_length = min(max_length, model.config.max_length)
        # Pooled without normalisation: one compiled function serves both settings.
        self._embed = _compiled_embed(model)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        dtype: str = "float32",
        pooling: str | None = None,
        normalize: bool | None = None,
        max_length: int | None = None,
        allow_pickle: bool = False,
    ) -> "Encoder":
        """Loads a Hugging Face / sentence-transformers BERT folder.

        pooling / normalize / max_length default to what the folder declares
        (``1_Pooling``, ``2_Normalize``, ``sentence_bert_config.json``), else CLS, True and the
        model's position limit. dtype: "float32" or "bfloat16" compute (params stay float32).
        """
        config, params = hf.load(path, allow_pickle=allow_pickle)
        folder_pooling, folder_normalize = hf.read_pooling(path)
        if max_length is None:
            max_length = _folder_max_length(path) or config.max_length
        model = EmbeddingModel(
            config,
            pooling=pooling or folder_pooling or "cls",
            normalize=normalize if normalize is not None else (folder_normalize is not False),
            dtype=dtype,
        )
        return cls(model, params, load_tokenizer(path), max_length, prompts=_folder_prompts(path))

    @property
    def dimension(self) -> int:
        return self.model.config.hidden_size

    def encode(
        self,
        texts: list[str],
        batch_size: int = 32,
        max_length: int | None = None,
        normalize: bool | None = None,
        show_progress: bool | None = None,
        prompt: str = "",
        prompt_name: str | None = None,
    ) -> np.ndarray:
        """texts -> [len(texts), D] float32 embeddings, in input order.

        prompt: prepended to every text; prompt_name: one of ``self.prompts`` ("query",
        "document") instead. normalize: None keeps the model's setting. show_progress: None shows
        a bar for long inputs.
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single text as [text]")
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise KeyError(f"prompt_name={prompt_name!r}: this encoder's prompts are {sorted(self.prompts) or 'none'}")
            prompt = self.prompts[prompt_name]
        if prompt:
            texts = [prompt + t for t in texts]
        max_length = min(max_length or self.max_length, self.model.config.max_length)
        normalize = self.model.normalize if normalize is None else normalize
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        if not texts:
            return out
        devices = self._rows.mesh.devices.size
        batch_size = -(-batch_size // devices) * devices  # every device gets the same number of rows
        sequences = tokenize(self.tokenizer, texts, max_length)
        order = np.argsort([-len(s) for s in sequences], kind="stable")
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if show_progress is None:
            show_progress = len(texts) >= _PROGRESS_MIN_TEXTS
        if show_progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="encode", unit="batch")
        pending = []
        for rows in batches:
            length = bucket_length(len(sequences[rows[0]]), max_length)
            ids, mask = pad_batch([sequences[r] for r in rows], length, batch_size, self.tokenizer.pad_token_id or 0)
            ids, mask = jax.device_put((ids, mask), self._rows)
            pending.append((rows, self._embed(self.params, ids, mask)))  # dispatch is async
            if len(pending) > 2:
                self._collect(pending.pop(0), out)
        for item in pending:
            self._collect(item, out)
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    @staticmethod
    def _collect(item, out):
        rows, embeddings = item
        out[rows] = np.asarray(embeddings)[: len(rows)]


def fast_bfloat16() -> bool:
    """Whether this backend runs bf16 products faster than float32 ones: accelerators do; a CPU
    does when it has AVX512-BF16 or AMX (XLA:CPU then runs them ~2x faster; without, it converts
    them to float32)."""
    if jax.default_backend() != "cpu":
        return True
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def encode_dtype(setting: str, model_dtype: str) -> str:
    """config.model.encode_dtype ("", "auto", "float32" or "bfloat16") -> the compute dtype."""
    if setting == "":
        return model_dtype
    if setting == "auto":
        return "bfloat16" if fast_bfloat16() else model_dtype
    if setting not in ("float32", "bfloat16"):
        raise ValueError(f"encode dtype {setting!r}: use '' (the model's dtype), auto, float32 or bfloat16")
    return setting


@functools.lru_cache(maxsize=None)
def _compiled_embed(model: EmbeddingModel):
    """One jitted embed per model: the encoders a training run builds for each eval (new params,
    same model) reuse its compiled shapes instead of compiling them again (3.4 s for the 2 shapes
    of a 350-text encode on a 2-core AMD EPYC; a full eval compiles one shape per bucket length)."""
    return jax.jit(partial(_embed_unnormalized, model))


def _embed_unnormalized(model: EmbeddingModel, params, input_ids, attention_mask):
    """[B, L] int32 -> [B, D] float32 pooled, not normalised."""
    return dataclasses.replace(model, normalize=False).embed(params, input_ids, attention_mask)


def _folder_prompts(path: str) -> dict:
    """The named prompts of a sentence-transformers folder (``config_sentence_transformers.json``);
    "passage" is read as "document"."""
    config_path = os.path.join(path, "config_sentence_transformers.json")
    if not os.path.isfile(config_path):
        return {}
    with open(config_path, encoding="utf-8") as f:
        prompts = json.load(f).get("prompts") or {}
    if "passage" in prompts and "document" not in prompts:
        prompts["document"] = prompts["passage"]
    return {name: text for name, text in prompts.items() if text}


def _folder_max_length(path: str) -> int | None:
    config_path = os.path.join(path, "sentence_bert_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            return json.load(f).get("max_seq_length")
    return None


def encoded_corpus(encoder, texts: list[str], cache_dir: str | None, batch_size: int, block: int = 65536):
    """[N, D] float32 corpus embeddings, encoded ``block`` texts at a time; with ``cache_dir``,
    written to (and next time read from) a memory-mapped file keyed by model and texts."""
    dim = encoder.dimension
    if not cache_dir:
        return encoder.encode(texts, batch_size=batch_size, show_progress=len(texts) > 2048)
    digest = hashlib.sha1()
    digest.update(repr((encoder.model, encoder.max_length)).encode())
    for leaf in _leaves(encoder.params):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    for text in texts:
        digest.update(hashlib.sha1(text.encode()).digest())
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"corpus-{digest.hexdigest()[:20]}-{len(texts)}x{dim}.f32")
    if os.path.isfile(path):
        return np.memmap(path, dtype=np.float32, mode="r", shape=(len(texts), dim))
    partial = path + ".partial"
    out = np.memmap(partial, dtype=np.float32, mode="w+", shape=(len(texts), dim))
    for start in range(0, len(texts), block):
        out[start : start + block] = encoder.encode(texts[start : start + block], batch_size=batch_size,
                                                    show_progress=len(texts) > 2048)
    out.flush()
    del out
    os.replace(partial, path)  # a half-written cache never looks complete
    return np.memmap(path, dtype=np.float32, mode="r", shape=(len(texts), dim))


def _leaves(params):
    import jax

    return [np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(params))]
