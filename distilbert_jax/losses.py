"""The distillation losses, on flattened token axes.

Every loss takes rows N (tokens of the flattened batch, or positions gathered with ``gather_positions``) and
0/1 ``weights_N`` that select the rows that count; it returns a float32 scalar averaged over the selected
rows, matching the reference's "select rows, then reduce" with a static shape. The average divides by
max(sum(weights), 1), so a batch with nothing selected gives 0 (not NaN) and a zero gradient.

All arithmetic is float32 whatever the input dtype (bf16 logits lose too much in log-softmax over 30k ids).
"""
import fractions

import jax
import jax.numpy as jnp

# torch's cosine_embedding_loss adds this to each squared norm before the square root.
_COSINE_EPS = 1e-12


def _weighted_mean(values_N: jax.Array, weights_N: jax.Array) -> jax.Array:
  weights_N = weights_N.astype(jnp.float32)
  return jnp.sum(values_N * weights_N) / jnp.maximum(jnp.sum(weights_N), 1.0)


def ce_loss(student_logits_NxV: jax.Array, teacher_logits_NxV: jax.Array, weights_N: jax.Array,
            temperature: float) -> jax.Array:
  """Soft-target loss T² · KL(softmax(t/T) ‖ softmax(s/T)), summed over V, mean over selected rows.

  Equals torch ``KLDivLoss(reduction='batchmean')(log_softmax(s/T), softmax(t/T)) * T**2`` on the selected
  rows. The T² keeps the gradient scale independent of T (Hinton et al.).
  """
  s_NxV = student_logits_NxV.astype(jnp.float32) / temperature
  t_NxV = teacher_logits_NxV.astype(jnp.float32) / temperature
  log_ps_NxV = jax.nn.log_softmax(s_NxV, axis=-1)
  log_pt_NxV = jax.nn.log_softmax(t_NxV, axis=-1)
  kl_N = jnp.sum(jnp.exp(log_pt_NxV) * (log_pt_NxV - log_ps_NxV), axis=-1)
  return temperature**2 * _weighted_mean(kl_N, weights_N)


def mlm_loss(logits_NxV: jax.Array, targets_N: jax.Array, weights_N: jax.Array) -> jax.Array:
  """Cross-entropy (nats) of logits against the original ids, mean over selected rows."""
  log_p_NxV = jax.nn.log_softmax(logits_NxV.astype(jnp.float32), axis=-1)
  nll_N = -jnp.take_along_axis(log_p_NxV, targets_N.astype(jnp.int32)[:, None], axis=-1)[:, 0]
  return _weighted_mean(nll_N, weights_N)


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
  diff_NxV = student_logits_NxV.astype(jnp.float32) - teacher_logits_NxV.astype(jnp.float32)
  return _weighted_mean(jnp.sum(diff_NxV * diff_NxV, axis=-1), weights_N)


def mlm_accuracy(logits_NxV: jax.Array, targets_N: jax.Array,
                 weights_N: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(num_correct, num_selected): int32 counts over rows with weight > 0; sum over batches, then divide."""
  selected_N = weights_N > 0
  correct_N = jnp.argmax(logits_NxV, axis=-1) == targets_N.astype(jnp.int32)
  return jnp.sum(correct_N & selected_N, dtype=jnp.int32), jnp.sum(selected_N, dtype=jnp.int32)


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
