"""Mesh sizes from config: -1 takes the rest; impossible sizes fail naming config.mesh."""

import jax
import pytest

from pegjax import sharding


def test_mesh_takes_the_rest_of_the_devices():
    assert sharding.mesh_shape({"data": -1}, 8) == (8, 1, 1)
    assert sharding.mesh_shape({"data": 2, "fsdp": -1}, 8) == (2, 4, 1)
    assert sharding.mesh_shape({"fsdp": 2, "tensor": 2, "data": -1}, 8) == (2, 2, 2)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sharding.batch_shards(mesh) == 8 == len(jax.devices())


@pytest.mark.parametrize("sizes, message", [
    ({"data": 3}, r"config.mesh: .* uses 3 devices, but 8 are present"),
    ({"data": -1, "fsdp": 3}, r"config.mesh: .* does not divide 8 devices"),
    ({"data": -1, "fsdp": -1}, r"config.mesh: .* at most one -1"),
    ({"pipeline": 2}, r"config.mesh: unknown axis \['pipeline'\]"),
])
def test_impossible_meshes_name_config_mesh(sizes, message):
    with pytest.raises(ValueError, match=message):
        sharding.mesh_shape(sizes, 8)


def test_dimensions_the_mesh_does_not_divide_stay_unsharded(caplog):
    """BERT-base's 21,128-row vocabulary over 6 devices: the embedding table is not split along the
    vocabulary, every other parameter still is, and the log names what was left whole."""
    from pegjax.models.bert import BertConfig, EmbeddingModel

    config = BertConfig(vocab_size=21128, hidden_size=96, num_hidden_layers=1, num_attention_heads=6, intermediate_size=192)
    boxed = jax.eval_shape(EmbeddingModel(config).init, jax.random.key(0))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 3}, devices=jax.devices()[:6])
    with caplog.at_level("WARNING"):
        shardings = sharding.param_shardings(boxed, mesh)
    table = shardings["embeddings"]["word_embeddings"]["embedding"]
    assert tuple(table.spec) == (None, "fsdp")  # 21,128 % 3 != 0: whole along the vocabulary
    assert tuple(shardings["layers"]["intermediate"]["kernel"].spec) == (None, "fsdp", "tensor")
    assert "['embeddings']['word_embeddings']['embedding'][0]=21128 over tensor=3" in caplog.text
