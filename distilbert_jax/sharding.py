"""The device mesh and the shardings of parameters, optimizer state and batches.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism whose devices also split
the parameters and optimizer state) and `tensor` (model parallelism over heads, MLP and vocabulary). Sizes
come from the config; one -1 fills with what is left of the devices.

Parameters carry logical axis names (`model.py`); `rules` map each logical name to a mesh axis (or None),
as data in the config. A dimension that the chosen mesh axis does not divide stays replicated (the
bert-base vocabulary, 30,522, divides by 2 only), so any mesh shape works for any model.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# FSDP over the hidden dimension (every matrix has one), tensor parallelism over heads/MLP/vocabulary.
DEFAULT_RULES: dict[str, str | None] = {
    "embed": "fsdp", "embed_out": "tensor", "vocab": "tensor", "heads": "tensor", "kv": None, "mlp": "tensor",
    "position": None, "token_type": None, "labels": None,
}


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 in a (data, fsdp, tensor) shape so that the product is `num_devices`."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape {shape}: sizes must be positive, with at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh shape {shape} cannot fill {num_devices} devices: {known} does not divide it")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices but {num_devices} are present: "
                     "set --config.mesh.shape to match (one -1 fills automatically)")
  return shape


def make_mesh(shape: Sequence[int], devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(shape, len(devices))
  # Auto axes: the compiler propagates shardings through the step (GSPMD), we pin only inputs and outputs.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_spec(logical: P, shape: Sequence[int], mesh: Mesh, rules: Mapping[str, str | None]) -> P:
  """Mesh PartitionSpec for one array from its logical axis names; indivisible dimensions stay replicated."""
  out, used = [], set()
  for name, size in zip(logical, shape):
    axis = rules.get(name) if name is not None else None
    if name is not None and name not in rules:
      raise ValueError(f"logical axis {name!r} has no sharding rule: add it to config.mesh.rules")
    if axis is None or axis in used or size % mesh.shape[axis]:
      out.append(None)
    else:
      out.append(axis)
      used.add(axis)
  return P(*out)


def param_shardings(logical_tree, abstract_params, mesh: Mesh, rules: Mapping[str, str | None]):
  """A tree of NamedShardings shaped like the parameters."""
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, logical_to_spec(spec, x.shape, mesh, rules)),
      logical_tree, abstract_params, is_leaf=lambda x: isinstance(x, P))


def _dict_path(path) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(abstract_tree, params_shardings, mesh: Mesh):
  """Shardings for any tree whose leaves mirror parameters (optimizer moments) or are scalars.

  A leaf whose dict-key path ends in a parameter's path, with the same shape, takes that parameter's
  sharding (Adam's mu and nu); everything else (step counts, RNG keys) is replicated. optax creates
  its `count` unsharded, so every leaf needs an explicit sharding before it enters a jit.
  """
  by_path = {_dict_path(p): s for p, s in jax.tree_util.tree_leaves_with_path(params_shardings)}
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    names = _dict_path(path)
    for start in range(len(names)):
      sharding = by_path.get(names[start:])
      if sharding is not None:
        return sharding
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """(B, ...) arrays split over the data and fsdp axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Builds global arrays from this process's rows (each process holds its share of the batch)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def to_host(tree):
  """A tree of (possibly sharded, multi-host) global arrays as numpy arrays on every process.

  With one process this is `jax.device_get`; across processes each holds only its shards, so they are
  gathered (a collective: every process must call it).
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)
