"""The device mesh and the shardings of parameters, optimizer state and batches.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism whose devices also split
the parameters and optimizer state) and `tensor` (model parallelism over heads, MLP and vocabulary). Sizes
come from the config; one -1 fills with what is left of the devices.

Parameters carry logical axis names (`model.py`); `rules` map each logical name to a mesh axis, a tuple of
mesh axes, or None, as data in the config. A dimension that the chosen mesh axes do not divide stays
replicated (the bert-base vocabulary, 30,522, divides by 2 only), so any mesh shape works for any model.

How parameters are stored is not how compute is laid out. The model also names the axes of its residual
stream (`model.ACTIVATION_AXES`: `batch`, `length`, `act_embed`) and pins it with
`nn.with_logical_constraint` at every block boundary; inside `activation_sharding` those names resolve
through the same rules, so each device computes its own rows of the batch (`batch` -> data and fsdp) and
gathers the fsdp-split weights it needs, layer by layer. Without the constraint the compiler keeps the
activations split like the weights, on the hidden dimension, with the whole batch on every device.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rule = str | tuple[str, ...] | None

# Parameters: FSDP over the hidden dimension (every matrix has one), tensor parallelism over heads, MLP and
# vocabulary. Activations: rows split over every data-parallel device, the residual stream's hidden
# dimension whole (Megatron-style tensor parallelism splits only inside attention and the MLP).
DEFAULT_RULES: dict[str, Rule] = {
    "embed": "fsdp", "embed_out": "tensor", "vocab": "tensor", "heads": "tensor", "kv": None, "mlp": "tensor",
    "position": None, "token_type": None, "language": None, "labels": None,
    "batch": BATCH_AXES, "length": None, "act_embed": None,
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


def _axes(rule: Rule) -> tuple[str, ...]:
  """A rule as a tuple of mesh axis names (config files may give a list; `--config.mesh.rules.batch=None`
  on a command line arrives as `(None,)`)."""
  if rule is None:
    return ()
  return (rule,) if isinstance(rule, str) else tuple(a for a in rule if a is not None)


def check_rules(rules: Mapping[str, Rule]):
  for name, rule in rules.items():
    unknown = [a for a in _axes(rule) if a not in MESH_AXES]
    if unknown:
      raise ValueError(f"config.mesh.rules[{name!r}] names {unknown}, not mesh axes: use {MESH_AXES} or None")


def logical_to_spec(logical: P, shape: Sequence[int], mesh: Mesh, rules: Mapping[str, Rule]) -> P:
  """Mesh PartitionSpec for one array from its logical axis names; indivisible dimensions stay replicated."""
  out, used = [], set()
  for name, size in zip(logical, shape):
    if name is not None and name not in rules:
      raise ValueError(f"logical axis {name!r} has no sharding rule: add it to config.mesh.rules")
    axes = _axes(rules[name]) if name is not None else ()
    if not axes or used.intersection(axes) or size % math.prod(mesh.shape[a] for a in axes):
      out.append(None)
    else:
      out.append(axes[0] if len(axes) == 1 else axes)
      used.update(axes)
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


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Mapping[str, Rule]):
  """While a step is traced in this context, the model's `nn.with_logical_constraint` calls resolve their
  logical names (`batch`, `length`, `act_embed`) to `mesh` axes through `rules`; outside it they do nothing.
  The batch a step sees must divide by the mesh axes of `batch` (`trainer.check_batch`)."""
  flax_rules = tuple((name, _axes(rule) or None) for name, rule in rules.items())
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(flax_rules):
    yield


def with_activation_sharding(fn, mesh: Mesh, rules: Mapping[str, Rule]):
  """`fn`, traced inside `activation_sharding(mesh, rules)`: wrap a step before `jax.jit`."""

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with activation_sharding(mesh, rules):
      return fn(*args, **kwargs)

  return traced


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
