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

    def __init__(self, model: EmbeddingModel, params, tokenizer, max_length: int):
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.model = model
        # Process-local: each process encodes its own texts on its own devices, also in a
        # multi-process run; every batch is split over them.
        mesh = Mesh(np.array(jax.local_devices()), ("rows",))
        self._rows = NamedSharding(mesh, PartitionSpec("rows"))
        self.params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        self.tokenizer = tokenizer
        self.max_length = min(max_length, model.config.max_position_embeddings)
        # Pooled without normalisation: one compiled function serves both settings.
        self._embed = jax.jit(partial(_embed_unnormalized, model))

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
            max_length = _folder_max_length(path) or config.max_position_embeddings
        model = EmbeddingModel(
            config,
            pooling=pooling or folder_pooling or "cls",
            normalize=normalize if normalize is not None else (folder_normalize is not False),
            dtype=dtype,
        )
        return cls(model, params, load_tokenizer(path), max_length)

    def save_pretrained(self, folder: str, **card) -> None:
        """Writes a model folder that transformers and sentence-transformers load as is (see
        `pegjax.export`); ``card``: query_prompt, passage_prompt, training, results."""
        from pegjax.export import write_model_folder

        write_model_folder(
            folder, self.model.config, jax.device_get(self.params), self.tokenizer,
            pooling=self.model.pooling, normalize=self.model.normalize, max_length=self.max_length, **card,
        )

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
    ) -> np.ndarray:
        """texts -> [len(texts), D] float32 embeddings, in input order.

        normalize: None keeps the model's setting. show_progress: None shows a bar for long inputs.
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single text as [text]")
        max_length = min(max_length or self.max_length, self.model.config.max_position_embeddings)
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


def _embed_unnormalized(model: EmbeddingModel, params, input_ids, attention_mask):
    """[B, L] int32 -> [B, D] float32 pooled, not normalised."""
    return dataclasses.replace(model, normalize=False).embed(params, input_ids, attention_mask)


def _folder_max_length(path: str) -> int | None:
    config_path = os.path.join(path, "sentence_bert_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            return json.load(f).get("max_seq_length")
    return None
