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
