"""The losses against direct PyTorch computations of the reference formulas on the selected rows."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from distilbert_jax import losses

N, V, D = 24, 50, 16
TEMPERATURE = 2.0


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  weights_N = (rng.random(N) < 0.6).astype(np.float32)
  weights_N[:2] = (0.0, 1.0)  # at least one zero and one selected row whatever the draw
  return dict(
      s_NxV=(3.0 * rng.standard_normal((N, V))).astype(np.float32),
      t_NxV=(3.0 * rng.standard_normal((N, V))).astype(np.float32),
      s_NxD=rng.standard_normal((N, D)).astype(np.float32),
      t_NxD=rng.standard_normal((N, D)).astype(np.float32),
      targets_N=rng.integers(0, V, N).astype(np.int32),
      weights_N=weights_N,
  )


def _selected(data, name):
  """torch float64 copy of the selected rows, as the reference's masked_select gives them."""
  return torch.from_numpy(data[name][data["weights_N"] > 0]).double()


def test_ce_loss_matches_torch_kldiv_batchmean(data):
  s, t = _selected(data, "s_NxV"), _selected(data, "t_NxV")
  want = torch.nn.KLDivLoss(reduction="batchmean")(
      torch.log_softmax(s / TEMPERATURE, -1), torch.softmax(t / TEMPERATURE, -1)) * TEMPERATURE**2
  got = losses.ce_loss(data["s_NxV"], data["t_NxV"], data["weights_N"], TEMPERATURE)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(got, want.item(), rtol=1e-5, atol=1e-5)


def test_mlm_loss_matches_torch_cross_entropy(data):
  targets = torch.from_numpy(data["targets_N"][data["weights_N"] > 0]).long()
  want = torch.nn.CrossEntropyLoss()(_selected(data, "s_NxV"), targets)
  got = losses.mlm_loss(data["s_NxV"], data["targets_N"], data["weights_N"])
  np.testing.assert_allclose(got, want.item(), rtol=1e-5, atol=1e-5)


def test_cosine_loss_matches_torch_cosine_embedding(data):
  s_NxD = data["s_NxD"].copy()
  s_NxD[1] = 0.0  # a zero vector on a selected row: the epsilon branch
  data = dict(data, s_NxD=s_NxD)
  s, t = _selected(data, "s_NxD"), _selected(data, "t_NxD")
  want = torch.nn.CosineEmbeddingLoss()(s, t, torch.ones(s.shape[0], dtype=torch.float64))
  got = losses.cosine_loss(data["s_NxD"], data["t_NxD"], data["weights_N"])
  np.testing.assert_allclose(got, want.item(), rtol=1e-5, atol=1e-5)


def test_mse_loss_matches_torch_sum_over_selected(data):
  s, t = _selected(data, "s_NxV"), _selected(data, "t_NxV")
  want = torch.nn.MSELoss(reduction="sum")(s, t) / s.shape[0]
  got = losses.mse_loss(data["s_NxV"], data["t_NxV"], data["weights_N"])
  np.testing.assert_allclose(got, want.item(), rtol=1e-5, atol=1e-5)


def test_mlm_accuracy_counts(data):
  selected_N = data["weights_N"] > 0
  targets_N = data["targets_N"].copy()
  targets_N[:6] = data["s_NxV"][:6].argmax(-1)  # make some predictions right
  correct, total = losses.mlm_accuracy(data["s_NxV"], targets_N, data["weights_N"])
  assert int(total) == selected_N.sum()
  assert int(correct) == ((data["s_NxV"].argmax(-1) == targets_N) & selected_N).sum()
  assert int(correct) >= 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mlm_accuracy_is_argmax_with_ties(dtype):
  """Ties at the maximum count for the first index only, as argmax: logits rounded to a few values tie often."""
  rng = np.random.default_rng(1)
  s_NxV = rng.integers(0, 4, (64, 12)).astype(np.float32)  # every row has several maxima
  s_NxV[0] = 3.0  # all equal: only index 0 is the argmax
  targets_N = np.concatenate([s_NxV[:32].argmax(-1),  # the first maximum: correct
                              [int(np.flatnonzero(row == row.max())[-1]) for row in s_NxV[32:48]],  # the last one
                              rng.integers(0, 12, 16)]).astype(np.int32)
  s_NxV[1], targets_N[1] = 3.0, 11  # all equal again, the target the last index: a maximum, not the first
  weights_N = np.ones(64, np.float32)
  weights_N[5] = 0.0
  want = (s_NxV.argmax(-1) == targets_N) & (weights_N > 0)
  assert 0 < want.sum() < 63 and not want[1]
  correct, _ = losses.mlm_accuracy(jnp.asarray(s_NxV, dtype), targets_N, weights_N)
  assert int(correct) == want.sum()
  got_N = jax.jit(losses._correct_N)(jnp.asarray(s_NxV, dtype), targets_N, weights_N)
  np.testing.assert_array_equal(got_N, want)


def test_bf16_inputs_are_computed_in_float32(data):
  s_bf16 = jnp.asarray(data["s_NxV"], jnp.bfloat16)
  got = losses.mlm_loss(s_bf16, data["targets_N"], data["weights_N"])
  want = losses.mlm_loss(s_bf16.astype(jnp.float32), data["targets_N"], data["weights_N"])
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-6)


def _total(s_NxV, s_NxD, data, weights_N):
  return (losses.ce_loss(s_NxV, data["t_NxV"], weights_N, TEMPERATURE)
          + losses.mlm_loss(s_NxV, data["targets_N"], weights_N)
          + losses.cosine_loss(s_NxD, data["t_NxD"], weights_N)
          + losses.mse_loss(s_NxV, data["t_NxV"], weights_N))


@pytest.mark.parametrize("which", ["some", "none"])
def test_jit_and_finite_gradients(data, which):
  weights_N = data["weights_N"] if which == "some" else np.zeros(N, np.float32)
  s_NxD = data["s_NxD"].copy()
  s_NxD[1] = 0.0
  grad_fn = jax.jit(jax.value_and_grad(lambda a, b: _total(a, b, data, weights_N), argnums=(0, 1)))
  value, (g_NxV, g_NxD) = grad_fn(data["s_NxV"], s_NxD)
  assert np.isfinite(value) and np.isfinite(g_NxV).all() and np.isfinite(g_NxD).all()
  np.testing.assert_allclose(value, _total(data["s_NxV"], s_NxD, data, weights_N), rtol=1e-6)
  # Unselected rows get no gradient; with nothing selected every loss is 0, not NaN.
  unselected = weights_N == 0
  assert not g_NxV[unselected].any() and not g_NxD[unselected].any()
  if which == "none":
    assert value == 0.0


def _gather_reference(x, weights, k):
  flat_w = weights.reshape(-1)
  idx = np.flatnonzero(flat_w > 0)[:k]
  index = np.zeros(k, np.int64)
  index[:len(idx)] = idx
  w = np.zeros(k, np.float32)
  w[:len(idx)] = flat_w[idx]
  return x.reshape(-1, *x.shape[2:])[index], w, index


@pytest.mark.parametrize("k", [4, 9, 30])  # fewer, as many as, more slots than selected positions
def test_gather_positions_matches_numpy(k):
  rng = np.random.default_rng(1)
  weights_BxL = np.zeros((3, 7), np.float32)
  weights_BxL.reshape(-1)[rng.choice(21, 9, replace=False)] = 1.0
  x_BxLxD = rng.standard_normal((3, 7, 5)).astype(np.float32)
  x_KxD, w_K, index_K = jax.jit(losses.gather_positions, static_argnums=2)(x_BxLxD, weights_BxL, k)
  want_x, want_w, want_index = _gather_reference(x_BxLxD, weights_BxL, k)
  assert x_KxD.shape == (k, 5) and w_K.shape == (k,) and index_K.shape == (k,)
  np.testing.assert_array_equal(index_K, want_index)
  np.testing.assert_array_equal(w_K, want_w)
  np.testing.assert_array_equal(x_KxD, want_x)
  if k > 9:
    assert not w_K[9:].any()  # padding slots carry no weight


def test_gathered_losses_equal_full_losses(data):
  """Losses on gathered rows equal the full-path losses: the point of gathering."""
  weights_BxL = data["weights_N"].reshape(4, 6)
  k = int(weights_BxL.sum()) + 3
  s_KxV, w_K, index_K = losses.gather_positions(data["s_NxV"].reshape(4, 6, V), weights_BxL, k)
  t_KxV = data["t_NxV"][np.asarray(index_K)]
  targets_K = data["targets_N"][np.asarray(index_K)]
  np.testing.assert_allclose(losses.ce_loss(s_KxV, t_KxV, w_K, TEMPERATURE),
                             losses.ce_loss(data["s_NxV"], data["t_NxV"], data["weights_N"], TEMPERATURE),
                             rtol=1e-6)
  np.testing.assert_allclose(losses.mlm_loss(s_KxV, targets_K, w_K),
                             losses.mlm_loss(data["s_NxV"], data["targets_N"], data["weights_N"]), rtol=1e-6)


def test_num_gather_slots():
  assert losses.num_gather_slots(16, 128, 0.15) == 308  # ceil(307.2)
  assert losses.num_gather_slots(10, 20, 0.15) == 30  # exact: no float round-up to 31
  assert losses.num_gather_slots(1, 7, 1.0) == 7


# ------------------------------------------------------------------------------------------------ chunked

def _head(params, h_NxD):
  """A small nonlinear vocabulary head: tanh(h A) Eᵀ + b, (N, D) -> (N, V)."""
  return jnp.tanh(h_NxD @ params["a_DxD"]) @ params["e_VxD"].T + params["b_V"]


def _head_params(rng):
  return dict(a_DxD=rng.standard_normal((D, D)).astype(np.float32),
              e_VxD=rng.standard_normal((V, D)).astype(np.float32), b_V=rng.standard_normal(V).astype(np.float32))


@pytest.fixture(scope="module")
def heads():
  rng = np.random.default_rng(2)
  pad_N = (rng.random(N) < 0.75).astype(np.float32)
  pad_N[:2] = (0.0, 1.0)
  mlm_N = pad_N * (rng.random(N) < 0.4)
  mlm_N[1] = 1.0
  student, hs_NxD = _head_params(rng), rng.standard_normal((N, D)).astype(np.float32)
  targets_N = rng.integers(0, V, N).astype(np.int32)
  targets_N[:4] = np.argmax(_head(student, hs_NxD[:4]), -1)  # some right predictions to count
  return dict(student=student, teacher=_head_params(rng), hs_NxD=hs_NxD,
              ht_NxD=rng.standard_normal((N, D)).astype(np.float32), pad_N=pad_N, mlm_N=mlm_N, targets_N=targets_N)


def _naive_soft(student_params, hs_NxD, h):
  s_NxV, t_NxV = _head(student_params, hs_NxD), _head(h["teacher"], h["ht_NxD"])
  return dict(ce=losses.ce_loss(s_NxV, t_NxV, h["pad_N"], TEMPERATURE),
              mlm=losses.mlm_loss(s_NxV, h["targets_N"], h["mlm_N"]), mse=losses.mse_loss(s_NxV, t_NxV, h["pad_N"]),
              mlm_correct=losses.mlm_accuracy(s_NxV, h["targets_N"], h["mlm_N"])[0])


def _rows(hs_NxD, h) -> losses.Rows:
  return losses.Rows(h_NxD=hs_NxD, soft_N=h["pad_N"], mlm_N=h["mlm_N"], targets_N=h["targets_N"], index_N=None)


def _chunked_soft(student_params, hs_NxD, h, chunk_size, teacher_params=None, ht_NxD=None):
  return losses.vocab_losses(
      functools.partial(_head, student_params), functools.partial(_head, h["teacher"] if teacher_params is None
                                                                  else teacher_params),
      _rows(hs_NxD, h), h["ht_NxD"] if ht_NxD is None else ht_NxD, temperature=TEMPERATURE, chunk_size=chunk_size,
      with_mse=True)


def _weighted_total(terms):
  return 5.0 * terms["ce"] + 2.0 * terms["mlm"] + 0.5 * terms["mse"]


# 1: one row a chunk; 5: 5 chunks of 5 for N = 24 (one zero-weight row added); 7: 4 chunks of 6; N; more than N.
@pytest.mark.parametrize("chunk_size", [1, 5, 7, N, 100])
def test_chunked_vocab_losses_equal_the_full_losses_and_gradients(heads, chunk_size):
  h = heads
  want = _naive_soft(h["student"], h["hs_NxD"], h)
  assert int(want["mlm_correct"]) >= 1
  value_and_grad = jax.jit(jax.value_and_grad(lambda p, hs: _weighted_total(_chunked_soft(p, hs, h, chunk_size)),
                                              argnums=(0, 1)))
  value, (g_params, g_NxD) = value_and_grad(h["student"], h["hs_NxD"])
  want_value, (want_params, want_NxD) = jax.value_and_grad(
      lambda p, hs: _weighted_total(_naive_soft(p, hs, h)), argnums=(0, 1))(h["student"], h["hs_NxD"])

  got = jax.jit(lambda p, hs: _chunked_soft(p, hs, h, chunk_size))(h["student"], h["hs_NxD"])
  for name in ("ce", "mlm", "mse"):
    assert got[name].dtype == jnp.float32 and got[name].shape == ()
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
  assert got["mlm_correct"].dtype == jnp.int32 and int(got["mlm_correct"]) == int(want["mlm_correct"])
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for name in g_params:
    np.testing.assert_allclose(g_params[name], want_params[name], rtol=1e-5, atol=1e-5, err_msg=name)
  np.testing.assert_allclose(g_NxD, want_NxD, rtol=1e-5, atol=1e-5)
  assert not g_NxD[h["pad_N"] == 0].any()  # pad rows (and the zero-weight rows added to fill a chunk) give nothing


def test_chunked_vocab_losses_leave_the_teacher_alone(heads):
  h = heads
  grad_fn = jax.grad(lambda tp, ht: _weighted_total(_chunked_soft(h["student"], h["hs_NxD"], h, 5, tp, ht)),
                     argnums=(0, 1))
  g_teacher, g_ht = grad_fn(h["teacher"], h["ht_NxD"])
  assert not any(np.asarray(g).any() for g in jax.tree.leaves(g_teacher)) and not np.asarray(g_ht).any()


def test_chunked_vocab_losses_with_nothing_selected_are_zero(heads):
  h = dict(heads, pad_N=np.zeros(N, np.float32), mlm_N=np.zeros(N, np.float32))
  got = _chunked_soft(h["student"], h["hs_NxD"], h, 5)
  assert float(got["ce"]) == float(got["mlm"]) == float(got["mse"]) == 0.0 and int(got["mlm_correct"]) == 0
  g_NxD = jax.grad(lambda hs: _weighted_total(_chunked_soft(h["student"], hs, h, 5)))(h["hs_NxD"])
  assert np.isfinite(g_NxD).all() and not g_NxD.any()


# ------------------------------------------------------------------------------------------------ row selection

B, L = 4, 6  # B·L = N rows
M = 5  # masked positions of the `heads` rows


@pytest.fixture(scope="module")
def batch(heads):
  """The `heads` rows as a (B, L) batch: pad mask, masked positions (M of them) and the student's states."""
  h = heads
  assert int((h["mlm_N"] > 0).sum()) == M
  return dict(hs_BxLxD=h["hs_NxD"].reshape(B, L, D), ht_BxLxD=h["ht_NxD"].reshape(B, L, D),
              pad_BxL=h["pad_N"].reshape(B, L), mlm_BxL=h["mlm_N"].reshape(B, L),
              targets_BxL=h["targets_N"].reshape(B, L))


def _assert_equal_in_float32(got, want, err_msg=""):
  """Equal up to float32 rounding: within 1e-6 of the array's scale (max |want|), element by element.

  Chunks, or slots that only pad, change the shapes of the matmuls and so the order of their float32 sums:
  gradients then differ by a few units in the last place of their largest entries, not by a relative 1e-6
  on their smallest ones.
  """
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, err_msg
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * max(np.abs(want).max(), 1e-30), err_msg=err_msg)


def _select(batch, slots=0, row_shards=1):
  return losses.select_rows(batch["hs_BxLxD"], batch["pad_BxL"], batch["mlm_BxL"], batch["targets_BxL"], slots=slots,
                            row_shards=row_shards)


def test_all_rows_are_the_flattened_batch(heads, batch):
  rows = _select(batch)
  assert rows.index_N is None
  np.testing.assert_array_equal(rows.h_NxD, heads["hs_NxD"])
  np.testing.assert_array_equal(rows.soft_N, heads["pad_N"])  # soft targets at every non-pad token
  np.testing.assert_array_equal(rows.mlm_N, heads["mlm_N"])
  np.testing.assert_array_equal(rows.targets_N, heads["targets_N"])
  np.testing.assert_array_equal(rows.take(batch["ht_BxLxD"]), heads["ht_NxD"])


def test_gathered_rows_are_the_masked_rows_of_all_rows(heads, batch):
  everything, gathered = _select(batch), _select(batch, slots=10)
  masked = np.flatnonzero(heads["mlm_N"] > 0)
  index = np.asarray(gathered.index_N)
  np.testing.assert_array_equal(index[:M], masked)
  np.testing.assert_array_equal(gathered.h_NxD[:M], np.asarray(everything.h_NxD)[masked])
  np.testing.assert_array_equal(gathered.take(batch["ht_BxLxD"])[:M], heads["ht_NxD"][masked])
  np.testing.assert_array_equal(gathered.targets_N[:M], heads["targets_N"][masked])
  # Only the masked rows count, for L_mlm and for the (restricted) soft losses alike; the extra slots weigh 0.
  np.testing.assert_array_equal(gathered.mlm_N, [1.0] * M + [0.0] * (10 - M))
  np.testing.assert_array_equal(gathered.soft_N, gathered.mlm_N)


def _vocab(params, rows, h, chunk_size=0, teacher=True):
  """vocab_losses with the test heads, the teacher's states taken at the same rows."""
  t_head = functools.partial(_head, h["teacher"]) if teacher else None
  ht_NxD = rows.take(h["ht_NxD"].reshape(B, L, D)) if teacher else None
  return losses.vocab_losses(functools.partial(_head, params), t_head, rows, ht_NxD, temperature=TEMPERATURE,
                             chunk_size=chunk_size, with_mse=True)


def test_gathered_rows_give_the_same_masked_lm_terms_as_all_rows(heads, batch):
  h = heads
  everything, gathered = _vocab(h["student"], _select(batch), h), _vocab(h["student"], _select(batch, slots=10), h)
  np.testing.assert_allclose(gathered["mlm"], everything["mlm"], rtol=1e-6)
  assert int(gathered["mlm_correct"]) == int(everything["mlm_correct"]) >= 1
  # The soft losses of gathered rows are those of all rows restricted to the masked ones (restrict_ce_to_mask).
  s_NxV, t_NxV = _head(h["student"], h["hs_NxD"]), _head(h["teacher"], h["ht_NxD"])
  np.testing.assert_allclose(gathered["ce"], losses.ce_loss(s_NxV, t_NxV, h["mlm_N"], TEMPERATURE), rtol=1e-6)
  np.testing.assert_allclose(gathered["mse"], losses.mse_loss(s_NxV, t_NxV, h["mlm_N"]), rtol=1e-6)
  assert abs(float(gathered["ce"]) - float(everything["ce"])) > 1e-3  # not the all-rows value by accident


@pytest.mark.parametrize("slots,row_shards,rows", [(5, 1, 5), (5, 4, 8), (6, 3, 6), (9, 4, 12), (10, 8, 16)])
def test_gathered_rows_round_up_to_the_row_shards_and_extra_slots_weigh_nothing(heads, batch, slots, row_shards, rows):
  h = heads
  gathered = _select(batch, slots=slots, row_shards=row_shards)
  assert gathered.h_NxD.shape == (rows, D) and gathered.mlm_N.shape == gathered.index_N.shape == (rows,)
  assert not np.asarray(gathered.mlm_N)[M:].any() and not np.asarray(gathered.soft_N)[M:].any()
  tight = _select(batch, slots=M)
  value = lambda p, hs, r: _weighted_total(_vocab(p, r._replace(h_NxD=hs), h))  # noqa: E731
  got, (g_params, g_NxD) = jax.value_and_grad(value, argnums=(0, 1))(h["student"], gathered.h_NxD, gathered)
  want, (want_params, want_NxD) = jax.value_and_grad(value, argnums=(0, 1))(h["student"], tight.h_NxD, tight)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for name in g_params:
    _assert_equal_in_float32(g_params[name], want_params[name], err_msg=name)
  _assert_equal_in_float32(g_NxD[:M], want_NxD)
  assert not np.asarray(g_NxD)[M:].any()


def test_masked_slots_bound_each_scheme():
  assert losses.masked_slots(16, 128, 0.15, "distilbert") == losses.num_gather_slots(16, 128, 0.15) == 308
  assert losses.masked_slots(16, 128, 0.15, "bernoulli") == 16 * 128  # per-token draws: no tighter bound


# ------------------------------------------------------------------------------------------------ vocab_losses

def test_one_chunk_is_the_plain_per_logit_losses(heads):
  """chunk_size 0 (and any chunk_size >= N) runs the loss body once on all rows: the per-logit functions."""
  h = heads
  rows = _select(dict(hs_BxLxD=h["hs_NxD"].reshape(B, L, D), pad_BxL=h["pad_N"].reshape(B, L),
                      mlm_BxL=h["mlm_N"].reshape(B, L), targets_BxL=h["targets_N"].reshape(B, L)))
  got = _vocab(h["student"], rows, h)
  want = _naive_soft(h["student"], h["hs_NxD"], h)
  for name in ("ce", "mlm", "mse"):
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, err_msg=name)
  assert int(got["mlm_correct"]) == int(want["mlm_correct"])
  for chunk_size in (N, 100):
    same = _vocab(h["student"], rows, h, chunk_size=chunk_size)
    for name in got:
      np.testing.assert_array_equal(same[name], got[name], err_msg=f"{chunk_size} {name}")


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 23])
def test_chunks_equal_one_chunk_in_values_and_gradients(heads, batch, chunk_size):
  h = heads
  rows = _select(batch)
  terms = lambda p, hs, c: _vocab(p, rows._replace(h_NxD=hs), h, chunk_size=c)  # noqa: E731
  total = lambda p, hs, c: _weighted_total(terms(p, hs, c))  # noqa: E731
  grad = jax.jit(jax.value_and_grad(total, argnums=(0, 1)), static_argnums=2)
  got, (g_params, g_NxD) = grad(h["student"], rows.h_NxD, chunk_size)
  want, (want_params, want_NxD) = grad(h["student"], rows.h_NxD, 0)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  chunked, plain = terms(h["student"], rows.h_NxD, chunk_size), terms(h["student"], rows.h_NxD, 0)
  for name in ("ce", "mlm", "mse"):
    np.testing.assert_allclose(chunked[name], plain[name], rtol=1e-6, err_msg=name)
  assert int(chunked["mlm_correct"]) == int(plain["mlm_correct"]) >= 1
  for name in g_params:
    _assert_equal_in_float32(g_params[name], want_params[name], err_msg=name)
  _assert_equal_in_float32(g_NxD, want_NxD)


def test_without_a_teacher_only_the_masked_lm_terms(heads, batch):
  h = heads
  got = _vocab(h["student"], _select(batch, slots=M), h, chunk_size=3, teacher=False)
  assert set(got) == {"mlm", "mlm_correct"}
  s_NxV = _head(h["student"], h["hs_NxD"])
  np.testing.assert_allclose(got["mlm"], losses.mlm_loss(s_NxV, h["targets_N"], h["mlm_N"]), rtol=1e-6)
  assert int(got["mlm_correct"]) == int(losses.mlm_accuracy(s_NxV, h["targets_N"], h["mlm_N"])[0])


# ------------------------------------------------------------------------------------------------ LossConfig

def _loss_config(**overrides):
  from distilbert_jax import train  # the run's config: every key of config.loss must be a LossConfig field
  c = train.default_config()
  c.loss.update(overrides)
  return losses.LossConfig.from_config(c.loss.to_dict(), c.mlm.to_dict(), row_shards=4)


def test_loss_config_is_frozen_and_hashable():
  a, b = _loss_config(), _loss_config()
  assert a == b and hash(a) == hash(b) and a is not b
  assert (a.alpha_ce, a.alpha_mlm, a.alpha_cos, a.temperature, a.mlm_prob, a.row_shards) == (5.0, 2.0, 1.0, 2.0,
                                                                                              0.15, 4)
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.alpha_ce = 1.0
  assert _loss_config(chunk_size=64) != a and hash(_loss_config(chunk_size=64)) != hash(a)
  traces = []

  @functools.partial(jax.jit, static_argnums=0)
  def weighted(config, x):
    traces.append(config)
    return config.alpha_ce * x

  assert float(weighted(a, 1.0)) == float(weighted(b, 2.0)) / 2 == 5.0
  assert len(traces) == 1  # an equal config is the same static argument: no second compile
  weighted(_loss_config(alpha_ce=1.0), 1.0)
  assert len(traces) == 2


def test_loss_config_refuses_what_it_cannot_use():
  with pytest.raises(TypeError, match="alpha_clm"):
    losses.LossConfig.from_config(dict(alpha_clm=1.0), dict(prob=0.15, scheme="distilbert"))
  for bad in (dict(temperature=0.0), dict(alpha_mse=-1.0), dict(chunk_size=-1), dict(row_shards=0),
              dict(mlm_scheme="span")):
    with pytest.raises(ValueError):
      losses.LossConfig(**bad)


def test_loss_config_chooses_the_rows():
  plain, restricted = _loss_config(), _loss_config(restrict_ce_to_mask=True)
  assert plain.slots(8, 32, distilling=True) == 0  # soft targets at every token: all rows
  assert restricted.slots(8, 32, distilling=True) == plain.slots(8, 32, distilling=False) == 39
  assert _loss_config(alpha_ce=0.0).slots(8, 32, distilling=True) == 39  # no soft loss: masked rows suffice
  assert _loss_config(alpha_ce=0.0, alpha_mse=1.0).slots(8, 32, distilling=True) == 0
  bernoulli = dataclasses.replace(restricted, mlm_scheme="bernoulli")
  assert bernoulli.slots(8, 32, distilling=True) == 8 * 32
  terms = dict(mlm=jnp.float32(1.0), ce=jnp.float32(2.0), cos=jnp.float32(3.0))
  assert float(plain.total(terms, distilling=True)) == 2.0 * 1.0 + 5.0 * 2.0 + 1.0 * 3.0
  assert float(plain.total(terms, distilling=False)) == 1.0
