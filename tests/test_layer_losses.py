"""The layer losses (TinyBERT, MiniLM, MiniLMv2) against direct transcriptions of their papers' formulas, values
and gradients; padding honoured; the encoder's queries, keys and values (output_qkv) change nothing else."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distilbert_jax
from distilbert_jax import losses

B, L = 3, 7
LENGTHS = (7, 5, 2)  # real tokens per row; the rest is padding


def _pad():
  return (np.arange(L)[None, :] < np.array(LENGTHS)[:, None]).astype(np.float32)


def _x(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _close(a, b, what):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=what)


def _softmax_rows(scores):
  e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
  return e / jnp.sum(e, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------------ transcriptions
# Written row by row from the papers, each sequence cut to its real tokens: no masks, no einsum tricks.

def _ref_hidden_mse(hs, ht, kernel, bias):
  """TinyBERT eq. 8: MSE(H^S W_h, H^T), the mean over real tokens and the teacher's features."""
  per_token = []
  for b, n in enumerate(LENGTHS):
    for i in range(n):
      d = hs[b, i] @ kernel + bias - ht[b, i]
      per_token.append(jnp.mean(d * d))
  return sum(per_token) / len(per_token)


def _ref_relation_kl(s_a, s_b, t_a, t_b):
  """MiniLM eq. 7/9: 1/(A_h |x|) Σ_a Σ_t KL(R^T_{a,t} ‖ R^S_{a,t}), R_a = softmax(A_a B_aᵀ / √d_k)."""
  total, count = 0.0, 0
  for b, n in enumerate(LENGTHS):
    heads = s_a.shape[1]
    for h in range(heads):
      rs = _softmax_rows(s_a[b, h, :n] @ s_b[b, h, :n].T / np.sqrt(s_a.shape[-1]))
      rt = _softmax_rows(t_a[b, h, :n] @ t_b[b, h, :n].T / np.sqrt(t_a.shape[-1]))
      total = total + jnp.sum(rt * (jnp.log(rt) - jnp.log(rs))) / heads
    count += n
  return total / count


def _ref_minilmv2(s_qkv, t_qkv, r):
  """MiniLMv2 eq. 2-5: per sequence, concatenate the heads, split into r relation heads, R = softmax(A Aᵀ/√d_r)
  per relation head for A in (Q, K, V); Σ over Q, K, V of the mean KL over relation heads and tokens."""
  total = 0.0
  for s_x, t_x in zip(s_qkv, t_qkv):
    kl, count = 0.0, 0
    for b, n in enumerate(LENGTHS):
      s_cat = jnp.concatenate([s_x[b, h, :n] for h in range(s_x.shape[1])], axis=-1)
      t_cat = jnp.concatenate([t_x[b, h, :n] for h in range(t_x.shape[1])], axis=-1)
      ds, dt = s_cat.shape[-1] // r, t_cat.shape[-1] // r
      for a in range(r):
        sa, ta = s_cat[:, a * ds:(a + 1) * ds], t_cat[:, a * dt:(a + 1) * dt]
        rs = _softmax_rows(sa @ sa.T / np.sqrt(ds))
        rt = _softmax_rows(ta @ ta.T / np.sqrt(dt))
        kl = kl + jnp.sum(rt * (jnp.log(rt) - jnp.log(rs))) / r
      count += n
    total = total + kl / count
  return total


# ------------------------------------------------------------------------------------------------ formulas

def test_hidden_mse_through_a_projection_across_widths():
  hs, ht = _x(0, B, L, 6), _x(1, B, L, 10)
  proj = {"kernel": _x(2, 6, 10) * 0.3, "bias": _x(3, 10)}
  pad = _pad()
  ours = lambda hs, k, b: losses.hidden_mse_loss(hs, ht, pad, {"kernel": k, "bias": b})  # noqa: E731
  ref = lambda hs, k, b: _ref_hidden_mse(hs, ht, k, b)  # noqa: E731
  _close(ours(hs, proj["kernel"], proj["bias"]), ref(hs, proj["kernel"], proj["bias"]), "value")
  for i, (g, gr) in enumerate(zip(jax.grad(ours, argnums=(0, 1, 2))(hs, proj["kernel"], proj["bias"]),
                                  jax.grad(ref, argnums=(0, 1, 2))(hs, proj["kernel"], proj["bias"]))):
    _close(g, gr, f"gradient {i}")
  # Without a projection (same widths) it is the plain MSE.
  eye = {"kernel": jnp.eye(10), "bias": jnp.zeros(10)}
  _close(losses.hidden_mse_loss(ht * 0.5, ht, pad), losses.hidden_mse_loss(ht * 0.5, ht, pad, eye), "identity")


@pytest.mark.parametrize("kind", ["attention", "value_relation"])
def test_minilm_attention_and_value_relation_kl(kind):
  # Same head count, different head sizes (MiniLM needs the former only).
  sq, sk, sv = (_x(i, B, 2, L, 4) for i in range(3))
  tq, tk, tv = (_x(10 + i, B, 2, L, 8) for i in range(3))
  attend, pad = losses.attend_mask(jnp.asarray(_pad())), _pad()
  if kind == "attention":
    ours = lambda a, b: losses.attention_kl_loss((a, b), (tq, tk), attend, pad)  # noqa: E731
    ref = lambda a, b: _ref_relation_kl(a, b, tq, tk)  # noqa: E731
    args = (sq, sk)
  else:
    ours = lambda a, b: losses.value_relation_loss(a + b, tv, attend, pad)  # noqa: E731
    ref = lambda a, b: _ref_relation_kl(a + b, a + b, tv, tv)  # noqa: E731
    args = (sv, jnp.zeros_like(sv))
  _close(ours(*args), ref(*args), "value")
  assert float(ours(*args)) > 0
  for i, (g, gr) in enumerate(zip(jax.grad(ours, argnums=(0, 1))(*args), jax.grad(ref, argnums=(0, 1))(*args))):
    _close(g, gr, f"gradient {i}")
  # Identical inputs: zero loss.
  _close(losses.attention_kl_loss((tq, tk), (tq, tk), attend, pad), 0.0, "self")


@pytest.mark.parametrize("s_heads,t_heads,r", [(2, 4, 4), (3, 4, 2), (2, 2, 8)])
def test_minilmv2_relations_with_any_relation_head_count(s_heads, t_heads, r):
  """Student 2 or 3 heads of 8 (width 16/24), teacher 2 or 4 heads of 8 (width 16/32): R relation heads on both."""
  s_qkv = tuple(_x(i, B, s_heads, L, 8) for i in range(3))
  t_qkv = tuple(_x(10 + i, B, t_heads, L, 8) for i in range(3))
  attend, pad = losses.attend_mask(jnp.asarray(_pad())), _pad()
  ours = lambda s: losses.minilmv2_relation_loss(s, t_qkv, attend, pad, r)  # noqa: E731
  ref = lambda s: _ref_minilmv2(s, t_qkv, r)  # noqa: E731
  _close(ours(s_qkv), ref(s_qkv), "value")
  for i, (g, gr) in enumerate(zip(jax.grad(ours)(s_qkv), jax.grad(ref)(s_qkv))):
    _close(g, gr, f"gradient of {'qkv'[i]}")


def test_relation_heads_must_divide_the_width():
  with pytest.raises(ValueError, match="5 relation heads do not divide the 16"):
    losses.split_relation_heads(jnp.zeros((1, 2, 3, 8)), 5)


def test_padding_does_not_count():
  """Whatever sits at padded positions (as queries or as keys) changes no layer loss, nor its gradient there."""
  pad = _pad()
  attend = losses.attend_mask(jnp.asarray(pad))
  s_qkv = tuple(_x(i, B, 2, L, 4) for i in range(3))
  t_qkv = tuple(_x(10 + i, B, 2, L, 4) for i in range(3))
  junk = lambda x, seed: jnp.where(pad[:, None, :, None] > 0, x, _x(seed, *x.shape) * 100)  # noqa: E731
  s_junk = tuple(junk(x, 20 + i) for i, x in enumerate(s_qkv))
  for fn in (lambda s: losses.attention_kl_loss(s[:2], t_qkv[:2], attend, pad),
             lambda s: losses.value_relation_loss(s[2], t_qkv[2], attend, pad),
             lambda s: losses.minilmv2_relation_loss(s, t_qkv, attend, pad, 2)):
    _close(fn(s_qkv), fn(s_junk), "value")
    for g in jax.grad(fn)(s_junk):
      assert np.all(np.swapaxes(np.asarray(g), 1, 2)[pad == 0] == 0)
  hs, ht = _x(0, B, L, 4), _x(1, B, L, 4)
  _close(losses.hidden_mse_loss(hs, ht, pad), losses.hidden_mse_loss(hs * (1 + 9 * (1 - pad[..., None])), ht, pad),
         "hidden")


def test_packed_rows_attend_within_their_example():
  seg = jnp.array([[1, 1, 2, 2, 2, 0, 0]])
  attend = losses.attend_mask((seg > 0).astype(jnp.float32), seg)
  assert attend.shape == (1, L, L) and bool(attend[0, 0, 1]) and not bool(attend[0, 0, 2])
  assert not bool(attend[0, 2, 5])


# ------------------------------------------------------------------------------------------------ the encoder

def _encoder(**kw):
  cfg = distilbert_jax.EncoderConfig.distilbert(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                                                intermediate_size=32, max_position_embeddings=16, **kw)
  model = distilbert_jax.Encoder(cfg)
  return model, distilbert_jax.init_params(model, jax.random.key(0))


def _ids():
  ids = np.random.default_rng(0).integers(5, 50, (B, L)).astype(np.int32)
  return ids, _pad().astype(np.int32)


@pytest.mark.parametrize("attention", ["einsum", "dot_product"])
def test_output_qkv_changes_nothing_else_and_gives_the_attention(attention):
  model, params = _encoder(attention=attention)
  ids, mask = _ids()
  plain = model.apply({"params": params}, ids, attention_mask=mask)
  asked = model.apply({"params": params}, ids, attention_mask=mask, output_qkv=True)
  assert plain.qkv is None and len(asked.qkv) == 2
  np.testing.assert_array_equal(plain.logits, asked.logits)
  for a, b in zip(plain.hidden_states, asked.hidden_states):
    np.testing.assert_array_equal(a, b)
  q, k, v = asked.qkv[0]
  assert q.shape == k.shape == v.shape == (B, 2, L, 8)
  # The queries are the layer's query projection of its input, split into heads.
  kernel, bias = params["layer_0"]["attention"]["query"]["kernel"], params["layer_0"]["attention"]["query"]["bias"]
  want = jnp.einsum("bld,dhk->bhlk", asked.hidden_states[0], kernel) + bias[None, :, None, :]
  _close(q, want, "queries")
  # softmax(q·kᵀ/√K, masked) is the encoder's own attention distribution at every real query.
  probs = model.apply({"params": params}, ids, attention_mask=mask, output_attentions=True).attentions
  attend = losses.attend_mask(jnp.asarray(mask))
  for (q, k, _), p in zip(asked.qkv, probs):
    mine = jnp.exp(losses._relation_log_probs(q, k, attend))
    _close(mine * mask[:, None, :, None], p * mask[:, None, :, None], "attention")
  # The parameters do not depend on the flag (it adds no module).
  assert jax.tree.structure(params) == jax.tree.structure(_encoder(attention=attention)[1])


def test_output_qkv_under_remat_is_the_same():
  model, params = _encoder()
  remat, _ = _encoder(remat=True)
  ids, mask = _ids()
  a = model.apply({"params": params}, ids, attention_mask=mask, output_qkv=True).qkv
  b = remat.apply({"params": params}, ids, attention_mask=mask, output_qkv=True).qkv
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    _close(x, y, "remat")
