"""The encoder itself: axes, dropout, dtypes, remat, the head applied alone."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distilbert_jax
from distilbert_jax import model as model_lib

CFG = distilbert_jax.EncoderConfig.bert(vocab_size=71, hidden_size=32, num_layers=2, num_heads=4,
                                        intermediate_size=64, max_position_embeddings=16)


@pytest.fixture(scope="module")
def params():
  return distilbert_jax.init_params(distilbert_jax.Encoder(CFG), jax.random.key(0))


def _ids():
  return np.random.default_rng(0).integers(1, 71, (2, 9)), np.array([[1] * 9, [1] * 5 + [0] * 4])


def test_every_parameter_has_logical_axes(params):
  axes = model_lib.logical_axes(distilbert_jax.Encoder(CFG))
  specs = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  leaves = jax.tree.leaves(params)
  assert len(specs) == len(leaves)
  for spec, leaf in zip(specs, leaves):
    assert len(spec) == leaf.ndim and all(isinstance(a, str) for a in spec)
  assert axes["embeddings"]["word_embeddings"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
  assert axes["layer_0"]["attention"]["query"]["kernel"] == jax.sharding.PartitionSpec("embed", "heads", "kv")
  assert axes["layer_0"]["mlp"]["wi"]["kernel"] == jax.sharding.PartitionSpec("embed", "mlp")


def test_dropout_only_when_not_deterministic(params):
  model = distilbert_jax.Encoder(CFG)
  ids, mask = _ids()
  a = model.apply({"params": params}, ids, attention_mask=mask)
  b = model.apply({"params": params}, ids, attention_mask=mask)
  c = model.apply({"params": params}, ids, attention_mask=mask, deterministic=False,
                  rngs={"dropout": jax.random.key(1)})
  d = model.apply({"params": params}, ids, attention_mask=mask, deterministic=False,
                  rngs={"dropout": jax.random.key(2)})
  assert np.array_equal(a.logits, b.logits)
  assert not np.allclose(a.logits, c.logits) and not np.allclose(c.logits, d.logits)


def test_remat_gives_the_same_gradients(params):
  ids, mask = _ids()

  def loss(p, cfg):
    return distilbert_jax.Encoder(cfg).apply({"params": p}, ids, attention_mask=mask).logits.sum()

  g1 = jax.grad(loss)(params, CFG)
  g2 = jax.grad(loss)(params, CFG.replace(remat=True))
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(x, y, atol=1e-5)


def test_bf16_compute_keeps_float32_params_and_logits(params):
  ids, mask = _ids()
  full = distilbert_jax.Encoder(CFG).apply({"params": params}, ids, attention_mask=mask)
  half = distilbert_jax.Encoder(CFG.replace(dtype="bfloat16")).apply({"params": params}, ids, attention_mask=mask)
  assert half.logits.dtype == jnp.float32 and half.hidden_states[-1].dtype == jnp.bfloat16
  np.testing.assert_allclose(half.logits, full.logits, atol=0.1)
  assert not np.array_equal(half.logits, full.logits)


def test_head_alone_equals_full_logits(params):
  model = distilbert_jax.Encoder(CFG)
  ids, mask = _ids()
  out = model.apply({"params": params}, ids, attention_mask=mask)
  nologits = model.apply({"params": params}, ids, attention_mask=mask, compute_logits=False)
  assert nologits.logits is None
  picked = out.last_hidden_state[np.array([0, 1]), np.array([3, 4])]
  head = model.apply({"params": params}, picked, method=model_lib.Encoder.mlm_logits)
  np.testing.assert_allclose(head, out.logits[np.array([0, 1]), np.array([3, 4])], atol=1e-6)


def test_padding_does_not_change_unpadded_positions(params):
  model = distilbert_jax.Encoder(CFG)
  ids, _ = _ids()
  short = model.apply({"params": params}, ids[:1, :5]).logits
  padded_ids = np.concatenate([ids[:1, :5], np.zeros((1, 4), int)], 1)
  padded = model.apply({"params": params}, padded_ids, attention_mask=np.array([[1] * 5 + [0] * 4])).logits
  np.testing.assert_allclose(padded[:, :5], short, atol=1e-5)


@pytest.mark.parametrize("kw,message", [
    (dict(hidden_size=30, num_heads=4), "not divisible"), (dict(hidden_act="swish"), "hidden_act"),
    (dict(family="roberta"), "family"), (dict(dtype="int8"), "dtype")])
def test_bad_config(kw, message):
  with pytest.raises(ValueError, match=message):
    CFG.replace(**kw)


def test_config_dict_round_trip():
  assert distilbert_jax.EncoderConfig.from_dict(CFG.to_dict()) == CFG
  with pytest.raises(ValueError, match="unknown EncoderConfig fields"):
    distilbert_jax.EncoderConfig.from_dict({**CFG.to_dict(), "n_layers": 3})
