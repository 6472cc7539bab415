"""mteb can evaluate a pegjax model: the adapter speaks mteb's encoder interface."""

import numpy as np
import pytest

mteb = pytest.importorskip("mteb")

from pegjax.encode import Encoder  # noqa: E402
from pegjax.mteb_adapter import MtebEncoder  # noqa: E402


def test_adapter_encodes_like_pegjax_and_scores_by_cosine(minilm_path, mixed_texts):
    from mteb.models import EncoderProtocol
    from mteb.types import PromptType
    from torch.utils.data import DataLoader

    encoder = Encoder.from_pretrained(minilm_path)
    model = MtebEncoder(encoder, name="pegjax/minilm", query_instruction="query: ")
    assert isinstance(model, EncoderProtocol)
    texts = mixed_texts[:40]
    loader = DataLoader([{"text": t} for t in texts], batch_size=16,
                        collate_fn=lambda rows: {"text": [r["text"] for r in rows]})
    metadata = mteb.get_task("SciFact").metadata
    passages = model.encode(loader, task_metadata=metadata, hf_split="test", hf_subset="default",
                            prompt_type=PromptType.document)
    queries = model.encode(loader, task_metadata=metadata, hf_split="test", hf_subset="default",
                           prompt_type=PromptType.query)
    np.testing.assert_allclose(passages, encoder.encode(texts), atol=1e-6)
    np.testing.assert_allclose(queries, encoder.encode(["query: " + t for t in texts]), atol=1e-6)
    similarity = np.asarray(model.similarity(queries[:3], passages[:5]))
    np.testing.assert_allclose(similarity, queries[:3] @ passages[:5].T, atol=1e-5)
