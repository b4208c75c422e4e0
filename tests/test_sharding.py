"""Mesh shapes, logical-axis rules and the activation pins."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from distilbert_jax import model as model_lib
from distilbert_jax import sharding


def test_mesh_shape_fills_one_axis():
  assert sharding.mesh_shape((1, -1, 2), 8) == (1, 4, 2)
  with pytest.raises(ValueError, match="cannot fill 8 devices"):
    sharding.mesh_shape((3, -1, 1), 8)
  with pytest.raises(ValueError, match="needs 4 devices but 8"):
    sharding.mesh_shape((1, 4, 1), 8)


def test_rules_map_to_one_axis_several_or_none():
  mesh = sharding.make_mesh((2, 2, 2))
  rules = sharding.DEFAULT_RULES
  # batch -> (data, fsdp): one dimension split over 4 devices; the hidden dimension (act_embed) whole.
  assert sharding.logical_to_spec(model_lib.ACTIVATION_AXES, (8, 16, 32), mesh, rules) == P(("data", "fsdp"), None,
                                                                                             None)
  assert sharding.logical_to_spec(("embed", "mlp"), (32, 64), mesh, rules) == P("fsdp", "tensor")
  # 6 rows do not divide by 4 devices: replicated, not an error.
  assert sharding.logical_to_spec(("batch",), (6,), mesh, rules) == P(None)
  # A mesh axis is used once per array: the second dimension asking for fsdp stays whole.
  assert sharding.logical_to_spec(("embed", "embed"), (4, 4), mesh, {"embed": "fsdp"}) == P("fsdp", None)
  # `--config.mesh.rules.batch=None` on a command line gives (None,): no mesh axis, as None.
  assert sharding.logical_to_spec(("batch",), (8,), mesh, {"batch": (None,)}) == P(None)
  with pytest.raises(ValueError, match="'heads' has no sharding rule"):
    sharding.logical_to_spec(("heads",), (4,), mesh, {"embed": "fsdp"})


def test_rules_naming_unknown_mesh_axes_are_refused():
  sharding.check_rules(sharding.DEFAULT_RULES)
  sharding.check_rules({**sharding.DEFAULT_RULES, "batch": (None,)})
  with pytest.raises(ValueError, match=r"rules\['batch'\] names \['dp'\]"):
    sharding.check_rules({**sharding.DEFAULT_RULES, "batch": ["data", "dp"]})


def test_pins_act_only_inside_activation_sharding():
  mesh = sharding.make_mesh((1, 8, 1))

  def pinned(x):
    return nn.with_logical_constraint(x * 2.0, model_lib.ACTIVATION_AXES).sum()

  x = jax.device_put(jnp.ones((8, 4, 16)), NamedSharding(mesh, P(None, None, "fsdp")))
  inside = jax.jit(sharding.with_activation_sharding(pinned, mesh, sharding.DEFAULT_RULES)).lower(x).as_text()
  outside = jax.jit(pinned).lower(x).as_text()
  assert 'sharding_constraint' in inside and '[{"data", "fsdp"}, {}, {}]' in inside
  assert 'sharding_constraint' not in outside
  np.testing.assert_allclose(jax.jit(sharding.with_activation_sharding(pinned, mesh, sharding.DEFAULT_RULES))(x),
                             2.0 * 8 * 4 * 16)
