"""The device mesh, the logical-axis rules, and the shardings of params, optimizer state and batch.

The mesh has three axes, sized by ``config.mesh`` (one size may be -1: the rest of the devices):

    data    pure data parallel: the batch is split, parameters are replicated
    fsdp    the batch is split and parameters + optimizer state are sharded (ZeRO-3 style)
    tensor  parameters are split along heads / mlp / vocab; the batch is replicated

Parameters carry logical axis names (`pegjax.models.bert`); `LOGICAL_AXIS_RULES` maps them to mesh
axes. Changing the parallelism of a run is a config change, never a model change.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import jax
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis of a parameter -> mesh axis (None: replicated along that dimension)
LOGICAL_AXIS_RULES = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("layers", None),
    ("positions", None),
    ("token_types", None),
)


def mesh_shape(sizes: Mapping[str, int], device_count: int) -> tuple[int, ...]:
    """Resolves ``{data, fsdp, tensor}`` sizes (one may be -1) against the device count.

    Raises ValueError naming ``config.mesh`` when the sizes do not multiply to the device count.
    """
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh: unknown axis {sorted(unknown)}; axes are {MESH_AXES}")
    shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
    free = [i for i, size in enumerate(shape) if size == -1]
    if len(free) > 1 or any(size == 0 or size < -1 for size in shape):
        raise ValueError(f"config.mesh: {dict(zip(MESH_AXES, shape))}: sizes are positive, at most one -1")
    if free:
        known = math.prod(size for size in shape if size != -1)
        if device_count % known:
            raise ValueError(
                f"config.mesh: {dict(zip(MESH_AXES, shape))} does not divide {device_count} devices"
            )
        shape[free[0]] = device_count // known
    if math.prod(shape) != device_count:
        raise ValueError(
            f"config.mesh: {dict(zip(MESH_AXES, shape))} uses {math.prod(shape)} devices, "
            f"but {device_count} are present; set one axis to -1 to take the rest"
        )
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices=None) -> Mesh:
    """A Mesh over all (or the given) devices with axes (data, fsdp, tensor)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch dimension is split (data x fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_shardings(boxed_params: Any, mesh: Mesh) -> Any:
    """Tree of NamedSharding for params, from their logical axis names (boxed, or abstract).

    A dimension that its mesh axes do not divide (a vocabulary of 21,128 rows over 6 devices, say)
    is left unsharded along them; the first call logs which.
    """
    return _fitted_shardings(boxed_params, mesh, LOGICAL_AXIS_RULES)


def gathered_param_shardings(boxed_params: Any, mesh: Mesh) -> Any:
    """Param shardings with the fsdp split undone (tensor split kept): the layout an encoder call
    uses, so that FSDP all-gathers weights, never activations."""
    rules = tuple((name, None if axis == "fsdp" else axis) for name, axis in LOGICAL_AXIS_RULES)
    return _fitted_shardings(boxed_params, mesh, rules)


_LOGGED: set = set()


def _fitted_shardings(boxed_params: Any, mesh: Mesh, rules) -> Any:
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_params), rules)
    shapes = jax.tree.map(lambda x: x.shape, nn.unbox(boxed_params))
    unsharded = []

    def fit(path, spec, shape):
        axes = []
        for dim, (size, axis) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
            names = (axis,) if isinstance(axis, str) else tuple(axis or ())
            ways = math.prod(mesh.shape[name] for name in names)
            if ways > 1 and size % ways:
                unsharded.append(f"{jax.tree_util.keystr(path)}[{dim}]={size} over {'x'.join(names)}={ways}")
                axis = None
            axes.append(axis)
        return NamedSharding(mesh, PartitionSpec(*axes))

    shardings = jax.tree_util.tree_map_with_path(fit, specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))
    message = "; ".join(unsharded)
    if unsharded and message not in _LOGGED:
        _LOGGED.add(message)
        logging.warning("parameter dimensions the mesh does not divide stay unsharded along those axes: %s", message)
    return shardings


def state_shardings(tx, params_sharding: Any, abstract_opt_state: Any, mesh: Mesh) -> Any:
    """Optimizer-state shardings: moments follow their parameter, scalars are replicated.

    A state leaf belongs to the parameter whose path ends its own path (``mu/encoder/.../kernel``):
    this holds for every optax state, masked and multi-transform ones included.
    """
    del tx  # the layout follows from the paths alone
    names = lambda path: tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)  # noqa: E731
    by_path = {names(path): s for path, s in jax.tree_util.tree_flatten_with_path(
        params_sharding, is_leaf=lambda x: isinstance(x, NamedSharding))[0]}
    lengths = sorted({len(p) for p in by_path}, reverse=True)

    def of(path, leaf):
        key = names(path)
        for n in lengths:
            found = by_path.get(key[-n:]) if len(key) >= n else None
            if found is not None and len(found.spec) <= len(getattr(leaf, "shape", ())):
                return found
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(of, abstract_opt_state)


def describe(mesh: Mesh) -> str:
    sizes = " x ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
    return f"{sizes} ({mesh.devices.size} devices)"
