"""Evaluate a pegjax model with ``mteb`` (optional extra: ``pip install 'pegjax[mteb]'``).

    import mteb
    from pegjax.mteb_adapter import MtebEncoder
    model = MtebEncoder.from_pretrained("path/to/model")
    mteb.evaluate(model, mteb.get_tasks(tasks=["T2Retrieval"]))

Queries get ``query_instruction`` prepended, else the model's own query prompt (none by default,
as PEG evaluates); passages get the model's document prompt, if it has one (e5: "passage: ").
Similarity is cosine (embeddings are L2-normalised).
"""

from __future__ import annotations

import numpy as np
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.models.abs_encoder import AbsEncoder
from mteb.types import PromptType

from pegjax.encode import Encoder


class MtebEncoder(AbsEncoder):
    def __init__(self, encoder: Encoder, name: str = "pegjax/model", query_instruction: str = "", batch_size: int = 64):
        self.encoder = encoder
        self.query_instruction = query_instruction
        self.batch_size = batch_size
        self.mteb_model_meta = ModelMeta.create_empty(overwrites={"name": name, "similarity_fn_name": ScoringFunction.COSINE})

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "MtebEncoder":
        return cls(Encoder.from_pretrained(path), **kwargs)

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        if prompt_type == PromptType.query:
            prompt = self.query_instruction or self.encoder.prompts.get("query", "")
        else:
            prompt = self.encoder.prompts.get("document", "")
        return self.encoder.encode(texts, batch_size=self.batch_size, normalize=True, prompt=prompt)
