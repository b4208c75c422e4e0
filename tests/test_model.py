"""The encoder itself: axes, dropout, dtypes, remat (and its policies), fused attention, the head alone."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

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


def _dropout(rate, x, key=jax.random.key(0)):
  return np.asarray(model_lib.Dropout(rate).apply({}, x, False, rngs={"dropout": key}))


def test_dropout_draws_two_16_bit_decisions_per_word():
  """Hand-checked on a small input: the module's key gives one 32-bit word per two elements of the last axis
  (an odd axis leaves the last high half unused); the low half decides the even element, the high half the odd
  one; an element is kept where its 16-bit draw is below round(0.9 · 65536) = 58,982, and divided by
  58,982 / 65,536."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32))
  key = model_lib.Dropout(0.1).apply({}, rngs={"dropout": jax.random.key(7)}, method=lambda m: m.make_rng("dropout"))
  words = np.asarray(jax.random.bits(key, (3, 4, 3), jnp.uint32))
  draws = np.stack([words & 0xFFFF, words >> 16], axis=-1).reshape(3, 4, 6)[..., :5]
  keep = draws < 58982
  expected = np.where(keep, np.asarray(x) / np.float32(58982 / 65536), 0.0)
  got = _dropout(0.1, x, jax.random.key(7))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert np.array_equal(got != 0, keep) and 0 < keep.sum() < keep.size


def test_dropout_keeps_the_rounded_probability_and_the_expectation():
  x = jnp.ones((64, 128, 33), jnp.float32)  # 270,336 decisions
  kept = _dropout(0.1, x) != 0
  p = 58982 / 65536
  assert abs(kept.mean() - p) < 4 * np.sqrt(p * (1 - p) / kept.size)  # 4 standard errors
  np.testing.assert_allclose(_dropout(0.1, x)[kept], 1 / p, rtol=1e-6)
  np.testing.assert_allclose(_dropout(0.1, x).mean(), 1.0, atol=4 * np.sqrt((1 - p) / p / kept.size))
  # The two halves of a word decide independently.
  assert abs(np.corrcoef(kept[..., 0:32:2].ravel(), kept[..., 1:32:2].ravel())[0, 1]) < 0.01
  # One draw per element against a threshold: with the same key, what a higher rate keeps a lower one keeps too.
  kept_half = _dropout(0.5, x) != 0
  assert abs(kept_half.mean() - 0.5) < 0.01 and not (kept_half & ~kept).any()
  # Gradient: the mask divided by the keep probability.
  grad = jax.grad(lambda v: jnp.sum(model_lib.Dropout(0.1).apply({}, v, False,
                                                                   rngs={"dropout": jax.random.key(0)})))(x)
  np.testing.assert_allclose(grad, np.where(kept, 1 / p, 0.0), rtol=1e-6)


def test_dropout_edge_rates_dtypes_and_the_32_bit_choice():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6)), jnp.bfloat16)
  assert np.array_equal(_dropout(0.0, x), x) and np.array_equal(_dropout(1e-6, x), x)  # rounds to keep all
  assert not _dropout(1.0, x).any() and _dropout(0.3, x).dtype == jnp.bfloat16
  assert np.array_equal(model_lib.Dropout(0.3).apply({}, x, True), x)  # deterministic
  # dropout_bits=32 is flax's own module (the bits runs made before 2026-12-07 drew); 16 draws other masks.
  assert type(model_lib._dropout(CFG.replace(dropout_bits=32), 0.1)) is nn.Dropout
  assert type(model_lib._dropout(CFG, 0.1)) is model_lib.Dropout and CFG.dropout_bits == 16
  ids, mask = _ids()
  run = lambda cfg, det: distilbert_jax.Encoder(cfg).apply(  # noqa: E731
      {"params": distilbert_jax.init_params(distilbert_jax.Encoder(CFG), jax.random.key(0))}, ids,
      attention_mask=mask, deterministic=det, rngs={"dropout": jax.random.key(1)}).logits
  assert np.array_equal(run(CFG, True), run(CFG.replace(dropout_bits=32), True))
  assert not np.allclose(run(CFG, False), run(CFG.replace(dropout_bits=32), False))
  with pytest.raises(ValueError, match="dropout_bits must be one of"):
    CFG.replace(dropout_bits=8)


def _primitives(jaxpr, found=None):
  """(primitive name, its `policy` param) of every equation, nested jaxprs included."""
  found = [] if found is None else found
  for eqn in jaxpr.eqns:
    found.append((eqn.primitive.name, eqn.params.get("policy")))
    for value in eqn.params.values():
      inner = getattr(value, "jaxpr", None)
      if inner is not None:
        _primitives(getattr(inner, "jaxpr", inner), found)
  return found


@pytest.mark.parametrize("policy", sorted(model_lib.REMAT_POLICIES))
def test_remat_policies_give_the_same_gradients(params, policy):
  ids, mask = _ids()
  weights = np.random.default_rng(1).normal(size=(2, 9, 71)).astype(np.float32)

  def loss(p, cfg):
    # Dropout on: a rematerialised layer must redraw the same masks in its backward pass.
    out = distilbert_jax.Encoder(cfg).apply({"params": p}, ids, attention_mask=mask, deterministic=False,
                                            rngs={"dropout": jax.random.key(3)})
    return jnp.sum(out.logits * weights)

  cfg = CFG.replace(remat=True, remat_policy=policy)
  grad = jax.jit(jax.grad(loss), static_argnums=1)  # one compile each, not hundreds of eager ops
  g1 = grad(params, CFG)
  g2 = grad(params, cfg)
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-5)  # float32 sums of values up to ~60
  # The policy reaches jax.checkpoint: one rematerialised call per layer, with the policy asked for.
  def remats(c):
    return [pol for name, pol in _primitives(jax.make_jaxpr(lambda p: loss(p, c))(params).jaxpr)
            if name.startswith("remat")]

  assert len(remats(cfg)) == CFG.num_layers
  assert all(pol is model_lib.REMAT_POLICIES[policy] for pol in remats(cfg))
  assert remats(CFG) == []


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
    (dict(family="gpt2"), "family"), (dict(dtype="int8"), "dtype"), (dict(remat_policy="most"), "remat_policy"),
    (dict(attention="flash"), "attention must be"), (dict(attention="cudnn"), "bfloat16 or float16"),
    (dict(mlm_head_act="swish"), "mlm_head_act"), (dict(num_languages=1), "num_languages=1"),
    (dict(positions_skip_padding=True, pad_token_id=600), "beyond max_position_embeddings")])
def test_bad_config(kw, message):
  with pytest.raises(ValueError, match=message):
    CFG.replace(**kw)


def test_config_dict_round_trip():
  assert distilbert_jax.EncoderConfig.from_dict(CFG.to_dict()) == CFG
  with pytest.raises(ValueError, match="unknown EncoderConfig fields"):
    distilbert_jax.EncoderConfig.from_dict({**CFG.to_dict(), "n_layers": 3})


def test_configs_saved_before_the_throughput_options_still_load():
  old = {k: v for k, v in CFG.to_dict().items() if k not in ("attention", "remat_policy")}
  cfg = distilbert_jax.EncoderConfig.from_dict(old)
  assert cfg == CFG and cfg.attention == "einsum" and cfg.remat_policy == "full"
  assert CFG.replace(remat=True, remat_policy="dots_saveable").to_dict()["remat_policy"] == "dots_saveable"


# ------------------------------------------------------------------------- fused attention

@pytest.fixture
def fused_calls(monkeypatch):
  """Counts the calls of jax.nn.dot_product_attention (still computing through it)."""
  calls = []
  real = jax.nn.dot_product_attention

  def spy(*args, **kw):
    calls.append(kw.get("implementation"))
    return real(*args, **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  return calls


def _masks(kind):
  """(attention_mask, extra kwargs) of 3 rows of 12: padding only, or packed rows with segment ids
  (row 2 has pad positions, which may attend nothing; row 3 a single segment)."""
  if kind == "padding":
    return np.array([[1] * 12, [1] * 7 + [0] * 5, [1] * 3 + [0] * 9]), {}
  seg = np.array([[1] * 5 + [2] * 7, [1] * 3 + [2] * 4 + [0] * 5, [1] * 3 + [0] * 9])
  return (seg > 0).astype(np.int32), {"segment_ids": seg, "position_ids": np.array(
      [list(range(5)) + list(range(7)), list(range(3)) + list(range(4)) + [0] * 5, list(range(3)) + [0] * 9])}


@pytest.mark.parametrize("kind", ["padding", "segments"])
def test_dot_product_attention_matches_einsum(params, fused_calls, kind):
  ids = np.random.default_rng(0).integers(1, 71, (3, 12))
  mask, extra = _masks(kind)
  # Pad positions weigh nothing, as in every loss: in a packed row a pad query may attend nothing, and there
  # the einsum path passes a gradient through softmax(scores + float32 min), which is constant in the
  # scores after rounding, while the fused path's where(mask, scores, -big) passes none.
  weights = np.random.default_rng(1).normal(size=(3, 12, 71)).astype(np.float32) * mask[:, :, None]

  def run(p, cfg):
    return distilbert_jax.Encoder(cfg).apply({"params": p}, ids, attention_mask=mask, **extra)

  def loss(p, cfg):
    return jnp.sum(run(p, cfg).logits * weights)

  fused_cfg = CFG.replace(attention="dot_product")
  ref, out = run(params, CFG), run(params, fused_cfg)
  assert fused_calls == [None] * CFG.num_layers  # the fused call ran in every layer, JAX's implementation
  np.testing.assert_allclose(out.logits, ref.logits, atol=1e-5)  # every position, pad included
  for h_ref, h in zip(ref.hidden_states, out.hidden_states):
    np.testing.assert_allclose(h, h_ref, atol=1e-5)
  grad = jax.jit(jax.grad(loss), static_argnums=1)  # one compile each, not hundreds of eager ops
  g_ref, g = grad(params, CFG), grad(params, fused_cfg)
  for x, y in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g)):
    np.testing.assert_allclose(y, x, atol=1e-5)
  assert max(float(np.max(np.abs(x))) for x in jax.tree.leaves(g)) > 1e-2  # not trivially zero gradients


def test_dot_product_attention_under_remat_and_bf16(params, fused_calls):
  ids = np.random.default_rng(0).integers(1, 71, (3, 12))
  mask, extra = _masks("segments")
  ref = distilbert_jax.Encoder(CFG.replace(dtype="bfloat16")).apply(
      {"params": params}, ids, attention_mask=mask, **extra)
  out = distilbert_jax.Encoder(CFG.replace(dtype="bfloat16", attention="dot_product", remat=True)).apply(
      {"params": params}, ids, attention_mask=mask, **extra)
  assert len(fused_calls) == CFG.num_layers and out.last_hidden_state.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.logits, ref.logits, atol=0.05)


def test_attention_dropout_falls_back_to_einsum(params, fused_calls):
  """Training with attention dropout takes the explicit path (same masks, same result); without attention
  dropout the fused path runs and still agrees, the other dropouts included."""
  ids = np.random.default_rng(0).integers(1, 71, (3, 12))
  mask, _ = _masks("padding")

  def train_logits(cfg):
    return distilbert_jax.Encoder(cfg).apply({"params": params}, ids, attention_mask=mask, deterministic=False,
                                             rngs={"dropout": jax.random.key(5)}).logits

  dropping = CFG.replace(attention_dropout_rate=0.5)
  np.testing.assert_array_equal(train_logits(dropping.replace(attention="dot_product")), train_logits(dropping))
  assert fused_calls == []
  no_attention_dropout = CFG.replace(attention_dropout_rate=0.0)
  fused = train_logits(no_attention_dropout.replace(attention="dot_product"))
  assert len(fused_calls) == CFG.num_layers
  np.testing.assert_allclose(fused, train_logits(no_attention_dropout), atol=1e-5)
  assert not np.allclose(fused, distilbert_jax.Encoder(CFG).apply({"params": params}, ids, attention_mask=mask).logits)


def test_output_attentions_takes_the_explicit_path(params, fused_calls):
  ids = np.random.default_rng(0).integers(1, 71, (3, 12))
  mask, extra = _masks("segments")
  ref = distilbert_jax.Encoder(CFG).apply({"params": params}, ids, attention_mask=mask, output_attentions=True,
                                          **extra)
  out = distilbert_jax.Encoder(CFG.replace(attention="dot_product", remat=True)).apply(
      {"params": params}, ids, attention_mask=mask, output_attentions=True, **extra)
  assert fused_calls == [] and len(out.attentions) == CFG.num_layers
  for a_ref, a in zip(ref.attentions, out.attentions):
    assert a.shape == (3, CFG.num_heads, 12, 12)
    np.testing.assert_allclose(a, a_ref, atol=1e-6)
  # Block-diagonal: no weight crosses from segment 1 to segment 2 of the first row.
  assert float(np.max(out.attentions[0][0, :, :5, 5:])) == 0.0


def test_roberta_packed_row_matches_its_examples_alone():
  """A packed row with RoBERTa's positions (each example from pad_token_id + 1) computes each example as if alone."""
  cfg = distilbert_jax.EncoderConfig.roberta(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                                             intermediate_size=32, max_position_embeddings=20)
  model = distilbert_jax.Encoder(cfg)
  params = distilbert_jax.init_params(model, jax.random.key(0))
  a, b = np.array([0, 7, 8, 9, 2]), np.array([0, 11, 2])
  packed = model.apply({"params": params}, np.concatenate([a, b])[None], segment_ids=np.array([[1] * 5 + [2] * 3]),
                       position_ids=np.array([list(range(2, 7)) + list(range(2, 5))]))
  for ids, rows in ((a, slice(0, 5)), (b, slice(5, 8))):
    alone = model.apply({"params": params}, ids[None])
    np.testing.assert_allclose(packed.logits[0, rows], alone.logits[0], atol=1e-5)


def test_gelu_is_torchs_exact_gelu_with_its_gradient():
  """The erf form PyTorch computes (BERT's "gelu"), tails included, in float32 and from bfloat16 inputs."""
  x = np.concatenate([np.linspace(-12, 12, 2001), [-40.0, -6.0, 0.0, 6.0, 40.0]]).astype(np.float32)
  tx = torch.from_numpy(x).requires_grad_()
  want = torch.nn.functional.gelu(tx)
  want.backward(torch.ones_like(tx))
  got, vjp = jax.vjp(model_lib.gelu, jnp.asarray(x))
  # Within float32 rounding of either (the tanh approximation is 1e-4 to 5e-4 off).
  np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(vjp(jnp.ones_like(got))[0], tx.grad.numpy(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got, jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6)
  assert np.abs(got - jax.nn.gelu(x, approximate=True)).max() > 1e-4
  bf16 = jnp.asarray(x, jnp.bfloat16)
  got_bf16 = model_lib.gelu(bf16)
  assert got_bf16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(got_bf16, model_lib.gelu(bf16.astype(jnp.float32)).astype(jnp.bfloat16))
  assert model_lib.ACTIVATIONS["gelu"] is model_lib.gelu
