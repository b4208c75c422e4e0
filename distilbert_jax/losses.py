"""The distillation losses, on flattened token axes.

Every loss takes rows N (tokens of the flattened batch, or positions gathered with ``gather_positions``) and
0/1 ``weights_N`` that select the rows that count; it returns a float32 scalar averaged over the selected
rows, matching the reference's "select rows, then reduce" with a static shape. The average divides by
max(sum(weights), 1), so a batch with nothing selected gives 0 (not NaN) and a zero gradient.

All arithmetic is float32 whatever the input dtype (bf16 logits lose too much in log-softmax over 30k ids).

`chunked_soft_losses` gives L_ce, L_mlm (and L_mse) of every row without ever holding (N, V) logits: it takes
the vocabulary heads and the hidden states instead of logits.
"""
import fractions
from typing import Callable

import jax
import jax.numpy as jnp

# torch's cosine_embedding_loss adds this to each squared norm before the square root.
_COSINE_EPS = 1e-12


def _weighted_mean(values_N: jax.Array, weights_N: jax.Array) -> jax.Array:
  weights_N = weights_N.astype(jnp.float32)
  return jnp.sum(values_N * weights_N) / jnp.maximum(jnp.sum(weights_N), 1.0)


def _soft_kl_N(student_logits_NxV: jax.Array, teacher_logits_NxV: jax.Array, temperature: float) -> jax.Array:
  """(N,) KL(softmax(t/T) ‖ softmax(s/T)) of each row, without the T² factor.

  Computed as Σ_v p_t · (t − s)/T − lse(t/T) + lse(s/T) (the p_t sum to 1) rather than from two (N, V)
  log-softmax arrays: the same value, and XLA keeps fewer (N, V) buffers alive for the backward pass.
  """
  s_NxV = student_logits_NxV.astype(jnp.float32) / temperature
  t_NxV = teacher_logits_NxV.astype(jnp.float32) / temperature
  lse_t_N = jax.nn.logsumexp(t_NxV, axis=-1)
  p_t_NxV = jnp.exp(t_NxV - lse_t_N[:, None])
  return jnp.sum(p_t_NxV * (t_NxV - s_NxV), axis=-1) - lse_t_N + jax.nn.logsumexp(s_NxV, axis=-1)


def _nll_N(logits_NxV: jax.Array, targets_N: jax.Array) -> jax.Array:
  """(N,) negative log-likelihood (nats) of each row's target id: lse(s) − s[target]."""
  logits_NxV = logits_NxV.astype(jnp.float32)
  target_logit_N = jnp.take_along_axis(logits_NxV, targets_N.astype(jnp.int32)[:, None], axis=-1)[:, 0]
  return jax.nn.logsumexp(logits_NxV, axis=-1) - target_logit_N


def _squared_error_N(student_logits_NxV: jax.Array, teacher_logits_NxV: jax.Array) -> jax.Array:
  """(N,) squared error of each row, summed over V."""
  diff_NxV = student_logits_NxV.astype(jnp.float32) - teacher_logits_NxV.astype(jnp.float32)
  return jnp.sum(diff_NxV * diff_NxV, axis=-1)


def _correct_N(logits_NxV: jax.Array, targets_N: jax.Array, weights_N: jax.Array) -> jax.Array:
  """(N,) bool: the row is selected and its argmax is the target."""
  return (jnp.argmax(logits_NxV, axis=-1) == targets_N.astype(jnp.int32)) & (weights_N > 0)


def ce_loss(student_logits_NxV: jax.Array, teacher_logits_NxV: jax.Array, weights_N: jax.Array,
            temperature: float) -> jax.Array:
  """Soft-target loss T² · KL(softmax(t/T) ‖ softmax(s/T)), summed over V, mean over selected rows.

  Equals torch ``KLDivLoss(reduction='batchmean')(log_softmax(s/T), softmax(t/T)) * T**2`` on the selected
  rows. The T² keeps the gradient scale independent of T (Hinton et al.).
  """
  kl_N = _soft_kl_N(student_logits_NxV, teacher_logits_NxV, temperature)
  return temperature**2 * _weighted_mean(kl_N, weights_N)


def mlm_loss(logits_NxV: jax.Array, targets_N: jax.Array, weights_N: jax.Array) -> jax.Array:
  """Cross-entropy (nats) of logits against the original ids, mean over selected rows."""
  return _weighted_mean(_nll_N(logits_NxV, targets_N), weights_N)


def cosine_loss(student_h_NxD: jax.Array, teacher_h_NxD: jax.Array, weights_N: jax.Array) -> jax.Array:
  """mean(1 − cos(h_s, h_t)) over selected rows.

  cos = <s, t> / sqrt((|s|² + 1e-12) · (|t|² + 1e-12)), the formula of torch ``CosineEmbeddingLoss`` with
  target 1: the epsilon on the squared norms makes a zero vector give cos = 0 (loss 1) with finite gradients
  instead of NaN.
  """
  s_NxD = student_h_NxD.astype(jnp.float32)
  t_NxD = teacher_h_NxD.astype(jnp.float32)
  dot_N = jnp.sum(s_NxD * t_NxD, axis=-1)
  norms2_N = (jnp.sum(s_NxD * s_NxD, axis=-1) + _COSINE_EPS) * (jnp.sum(t_NxD * t_NxD, axis=-1) + _COSINE_EPS)
  return _weighted_mean(1.0 - dot_N / jnp.sqrt(norms2_N), weights_N)


def mse_loss(student_logits_NxV: jax.Array, teacher_logits_NxV: jax.Array, weights_N: jax.Array) -> jax.Array:
  """Squared error summed over V and selected rows, divided by the number of selected rows.

  The reference's ``MSELoss(reduction='sum')(s, t) / n_selected``: a per-token sum, not a per-logit mean.
  """
  return _weighted_mean(_squared_error_N(student_logits_NxV, teacher_logits_NxV), weights_N)


def mlm_accuracy(logits_NxV: jax.Array, targets_N: jax.Array,
                 weights_N: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(num_correct, num_selected): int32 counts over rows with weight > 0; sum over batches, then divide."""
  return (jnp.sum(_correct_N(logits_NxV, targets_N, weights_N), dtype=jnp.int32),
          jnp.sum(weights_N > 0, dtype=jnp.int32))


def chunked_soft_losses(student_head: Callable[[jax.Array], jax.Array],
                        teacher_head: Callable[[jax.Array], jax.Array], hs_NxD: jax.Array, ht_NxD: jax.Array,
                        pad_N: jax.Array, targets_N: jax.Array, mlm_N: jax.Array, *, temperature: float,
                        chunk_size: int, with_mse: bool = False) -> dict[str, jax.Array]:
  """L_ce (and L_mse) over the ``pad_N`` rows and L_mlm over the ``mlm_N`` rows, a chunk of rows at a time.

  The same values as ``ce_loss``/``mse_loss`` on ``pad_N`` and ``mlm_loss``/``mlm_accuracy`` on ``mlm_N`` of
  the full logits ``student_head(hs_NxD)``, ``teacher_head(ht_NxD)``, but at most ``chunk_size`` rows of
  logits exist at once, forward and backward: the chunk body is rematerialised, so the backward pass
  recomputes a chunk's student and teacher logits instead of keeping (N, V) residuals. The price is one more
  projection by each head: six (N, D) x (D, V) matmuls instead of four (about 14% more matmul FLOPs in a
  distilbert-base step). With a single chunk (N <= chunk_size) nothing is recomputed: the plain computation.

  Chunk j holds rows j, j + K, j + 2K, ... (K chunks): rows split over devices along N stay split the same
  way within every chunk, so each device projects its own rows and nothing moves between devices. N is
  padded with zero-weight rows to K · ceil(N / K), fewer than K extra rows (none when K divides N).

  Args:
    student_head, teacher_head: (C, D) hidden states -> (C, V) logits, closing over their parameters;
      gradients flow to the student's parameters through ``student_head`` and to ``hs_NxD``. The teacher's
      logits are under ``stop_gradient``.
    hs_NxD, ht_NxD: (N, D_s), (N, D_t) student and teacher hidden states of the N rows.
    pad_N: (N,) 0/1 weights of the rows L_ce and L_mse average over (the non-pad tokens).
    targets_N: (N,) int original ids; mlm_N: (N,) weights of the rows L_mlm averages over (the masked ones).
    temperature: T of L_ce.
    chunk_size: the most rows per chunk (of the arrays as traced: under jit over a mesh, the global rows, of
      which each device holds its share).
    with_mse: also compute L_mse.

  Returns:
    {"mlm", "ce"[, "mse"]}: float32 scalars, as the unchunked losses; "mlm_correct": int32 number of
    selected ``mlm_N`` rows whose argmax is the target (``mlm_accuracy``'s first count).
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  n = pad_N.shape[0]
  k = -(-n // chunk_size)
  c = -(-n // k)  # rows per chunk, <= chunk_size

  def chunks(x_N):
    """(N, ...) -> (K, C, ...): zero rows appended, chunk j = rows j, j + K, ..."""
    x_N = jnp.pad(x_N, [(0, c * k - n)] + [(0, 0)] * (x_N.ndim - 1))
    return jnp.swapaxes(x_N.reshape(c, k, *x_N.shape[1:]), 0, 1)

  def chunk_sums(xs):
    hs_CxD, ht_CxD, pad_C, targets_C, mlm_C = xs
    s_CxV = student_head(hs_CxD)
    t_CxV = jax.lax.stop_gradient(teacher_head(ht_CxD))
    sums = dict(kl=jnp.sum(_soft_kl_N(s_CxV, t_CxV, temperature) * pad_C),
                nll=jnp.sum(_nll_N(s_CxV, targets_C) * mlm_C),
                correct=jnp.sum(_correct_N(s_CxV, targets_C, mlm_C), dtype=jnp.int32))
    if with_mse:
      sums["sq"] = jnp.sum(_squared_error_N(s_CxV, t_CxV) * pad_C)
    return sums

  pad_N = pad_N.astype(jnp.float32)
  mlm_N = mlm_N.astype(jnp.float32)
  if k == 1:
    # One chunk: recomputing it in the backward pass would only add work (and XLA then keeps more, not less).
    sums = chunk_sums((hs_NxD, ht_NxD, pad_N, targets_N, mlm_N))
  else:
    # prevent_cse=False: inside a loop the recomputation cannot be merged into the forward pass anyway.
    per_chunk = jax.lax.map(jax.checkpoint(chunk_sums, prevent_cse=False),
                            tuple(map(chunks, (hs_NxD, ht_NxD, pad_N, targets_N, mlm_N))))
    sums = {name: jnp.sum(v_K) for name, v_K in per_chunk.items()}
  n_pad = jnp.maximum(jnp.sum(pad_N), 1.0)
  out = dict(mlm=sums["nll"] / jnp.maximum(jnp.sum(mlm_N), 1.0), ce=temperature**2 * sums["kl"] / n_pad,
             mlm_correct=sums["correct"])
  if with_mse:
    out["mse"] = sums["sq"] / n_pad
  return out


def gather_positions(x_BxLxD: jax.Array, weights_BxL: jax.Array,
                     k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The first k selected positions of the flattened batch, at a static shape K = k.

  Lets the vocabulary projection (the costliest part of a step) run only where a loss needs it. Slots beyond
  the number of selected positions point at flat index 0 and get weight 0; if more than k positions are
  selected, those after the first k (in row-major order) are dropped, so k must be a safe upper bound
  (``num_gather_slots``).

  Args:
    x_BxLxD: (B, L, ...) per-token values (hidden states, or (B, L) ids).
    weights_BxL: (B, L); a position is selected where its weight is > 0.
    k: number of slots K.

  Returns:
    x_KxD: (K, ...) the gathered values; weights_K: (K,) float32, the weights there (0 on padding slots);
    index_K: (K,) int32 flat indices into B·L, e.g. to gather targets with ``targets.reshape(-1)[index_K]``.
  """
  b, l = weights_BxL.shape
  weights_N = weights_BxL.reshape(-1).astype(jnp.float32)
  index_K = jnp.nonzero(weights_N > 0, size=k, fill_value=0)[0].astype(jnp.int32)
  valid_K = jnp.arange(k) < jnp.sum(weights_N > 0)
  x_KxD = x_BxLxD.reshape(b * l, *x_BxLxD.shape[2:])[index_K]
  return x_KxD, jnp.where(valid_K, weights_N[index_K], 0.0), index_K


def num_gather_slots(batch_size: int, seq_len: int, mlm_prob: float) -> int:
  """ceil(mlm_prob · B · L): the most positions the "distilbert" masking scheme can select in a B×L batch.

  Uses the same fraction of mlm_prob as ``masking.mask_tokens`` (denominator <= 10,000) so the bound is tight
  and exact. The "bernoulli" scheme draws per token and can exceed it: give ``gather_positions`` a bound with
  margin there (or B·L), or use the full, ungathered path.
  """
  frac = fractions.Fraction(mlm_prob).limit_denominator(10_000)
  return -(-batch_size * seq_len * frac.numerator // frac.denominator)
