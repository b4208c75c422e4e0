"""The distillation losses, on flattened token axes.

Every loss takes rows N (tokens of the flattened batch, or positions gathered with ``gather_positions``) and
0/1 ``weights_N`` that select the rows that count; it returns a float32 scalar averaged over the selected
rows, matching the reference's "select rows, then reduce" with a static shape. The average divides by
max(sum(weights), 1), so a batch with nothing selected gives 0 (not NaN) and a zero gradient.

All arithmetic is float32 whatever the input dtype (bf16 logits lose too much in log-softmax over 30k ids).

A step computes them in two moves: `select_rows` picks the rows of the batch that need the vocabulary
projection (every token, or only the K masked ones), and `vocab_losses` gives L_mlm, L_ce (and L_mse) of
those rows from the vocabulary heads and the hidden states, a chunk of rows at a time if asked, so that
never all (N, V) logits exist at once. `LossConfig` holds the weights and what decides the selection.
"""
from __future__ import annotations

import dataclasses
import fractions
from collections.abc import Callable, Mapping
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from distilbert_jax import masking

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


# ------------------------------------------------------------------------------------------------ rows

# Logical axes of (N, D) hidden-state rows taken from a batch (as model.ACTIVATION_AXES without length): the rows
# stay split over the data-parallel devices like the batch they come from.
ROW_AXES = ("batch", "act_embed")


class Rows(NamedTuple):
  """N rows of a flattened (B, L) batch that get the vocabulary projection, chosen by ``select_rows``."""
  h_NxD: jax.Array  # (N, D) the hidden states there
  soft_N: jax.Array  # (N,) float32 weights of L_ce and L_mse
  mlm_N: jax.Array  # (N,) float32 weights of L_mlm (the masked positions)
  targets_N: jax.Array  # (N,) int original ids
  index_N: jax.Array | None  # (N,) int32 flat indices into B·L; None: all B·L rows, in order

  def take(self, x_BxLxD: jax.Array) -> jax.Array:
    """The same rows of another (B, L, D) array (the teacher's hidden states), split like the batch rows."""
    x_NxD = x_BxLxD.reshape(-1, x_BxLxD.shape[-1])
    if self.index_N is not None:
      x_NxD = x_NxD[self.index_N]
    return nn.with_logical_constraint(x_NxD, ROW_AXES)


def select_rows(h_BxLxD: jax.Array, pad_BxL: jax.Array, mlm_weights_BxL: jax.Array, targets_BxL: jax.Array, *,
                slots: int = 0, row_shards: int = 1) -> Rows:
  """The rows where the vocabulary losses are computed, at a static shape.

  ``slots`` 0: all B·L rows; the soft losses weigh the non-pad ones (``pad_BxL``), L_mlm the masked ones.
  ``slots`` K > 0: only the masked positions, the first K of them (``gather_positions``; K must bound their
  number: ``masked_slots``), K rounded up to a multiple of ``row_shards`` so the rows split evenly over the
  data-parallel devices and each projects its own share; soft and MLM weights are both the masked weights,
  0 on the slots beyond the masked positions. The projection is what costs: gathering ~15% of the rows
  saves ~85% of it when no loss needs the others.

  Args:
    h_BxLxD: (B, L, D) the student's last hidden states.
    pad_BxL: (B, L) 1 at real tokens, 0 at padding.
    mlm_weights_BxL, targets_BxL: (B, L) the masking's weights (> 0 where predicted) and original ids.
    slots: 0, or the K masked rows to gather.
    row_shards: the number of devices the batch rows are split over.

  Returns:
    ``Rows`` with N = B·L or N = K rounded up; ``rows.take`` gives the same rows of another (B, L, D) array.
  """
  if slots:
    k = -(-slots // row_shards) * row_shards
    targets_N, weights_N, index_N = gather_positions(targets_BxL, mlm_weights_BxL, k)
    rows = Rows(h_NxD=None, soft_N=weights_N, mlm_N=weights_N, targets_N=targets_N, index_N=index_N)
  else:
    rows = Rows(h_NxD=None, soft_N=pad_BxL.reshape(-1).astype(jnp.float32),
                mlm_N=mlm_weights_BxL.reshape(-1).astype(jnp.float32), targets_N=targets_BxL.reshape(-1),
                index_N=None)
  return rows._replace(h_NxD=rows.take(h_BxLxD))


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


def masked_slots(batch_size: int, seq_len: int, mlm_prob: float, scheme: str) -> int:
  """The most positions a masking scheme can select in a B×L batch: a safe K for ``gather_positions``.

  ``num_gather_slots`` for "distilbert" (an exact count); B·L for "bernoulli", whose per-token draws have no
  bound below that.
  """
  return batch_size * seq_len if scheme == "bernoulli" else num_gather_slots(batch_size, seq_len, mlm_prob)


# ------------------------------------------------------------------------------------------------ vocabulary

def vocab_losses(student_head: Callable[[jax.Array], jax.Array], teacher_head: Callable[[jax.Array], jax.Array] | None,
                 rows: Rows, ht_NxD: jax.Array | None = None, *, temperature: float = 1.0, chunk_size: int = 0,
                 with_mse: bool = False) -> dict[str, jax.Array]:
  """The losses that need the vocabulary projection, on the selected rows, a chunk of rows at a time.

  L_mlm over ``rows.mlm_N`` and, with a teacher, L_ce (and L_mse) over ``rows.soft_N``: the values of
  ``mlm_loss``/``mlm_accuracy``/``ce_loss``/``mse_loss`` on the logits ``student_head(rows.h_NxD)`` and
  ``teacher_head(ht_NxD)``. With ``chunk_size`` > 0 and more rows than that, at most ``chunk_size`` rows of
  logits exist at once, forward and backward: the chunk body is rematerialised, so the backward pass
  recomputes a chunk's student and teacher logits instead of keeping (N, V) residuals. The price is one more
  projection by each head: six (N, D) x (D, V) matmuls instead of four (about 14% more matmul FLOPs in a
  distilbert-base step). With one chunk (``chunk_size`` 0, or N <= chunk_size) the same body runs once on all
  rows, with nothing recomputed: the plain computation, not a special case of it.

  Chunk j holds rows j, j + K, j + 2K, ... (K chunks): rows split over devices along N stay split the same
  way within every chunk, so each device projects its own rows and nothing moves between devices. N is
  padded with zero-weight rows to K · ceil(N / K), fewer than K extra rows (none when K divides N).

  Args:
    student_head, teacher_head: (C, D) hidden states -> (C, V) logits, closing over their parameters;
      gradients flow to the student's parameters through ``student_head`` and to ``rows.h_NxD``. The
      teacher's logits are under ``stop_gradient``. ``teacher_head`` None: L_mlm only (no soft targets).
    rows: the rows, their weights and targets (``select_rows``).
    ht_NxD: (N, D_t) the teacher's hidden states of the same rows (``rows.take``); with a teacher only.
    temperature: T of L_ce.
    chunk_size: the most rows per chunk (of the arrays as traced: under jit over a mesh, the global rows, of
      which each device holds its share); 0: one chunk.
    with_mse: also compute L_mse (with a teacher).

  Returns:
    {"mlm", "mlm_correct"[, "ce"[, "mse"]]}: float32 scalars as the per-logit losses give them, and
    "mlm_correct", the int32 number of ``rows.mlm_N`` rows whose argmax is the target.
  """
  if chunk_size < 0:
    raise ValueError(f"chunk_size must be >= 0, got {chunk_size}")
  xs = dict(hs=rows.h_NxD, soft=rows.soft_N.astype(jnp.float32), mlm=rows.mlm_N.astype(jnp.float32),
            targets=rows.targets_N)
  if teacher_head is not None:
    xs["ht"] = ht_NxD
  n = rows.soft_N.shape[0]
  k = -(-n // chunk_size) if chunk_size else 1
  c = -(-n // k)  # rows per chunk, <= chunk_size

  def chunks(x_N):
    """(N, ...) -> (K, C, ...): zero rows appended, chunk j = rows j, j + K, ..."""
    x_N = jnp.pad(x_N, [(0, c * k - n)] + [(0, 0)] * (x_N.ndim - 1))
    return jnp.swapaxes(x_N.reshape(c, k, *x_N.shape[1:]), 0, 1)

  def chunk_sums(x):
    s_CxV = student_head(x["hs"])
    sums = dict(nll=jnp.sum(_nll_N(s_CxV, x["targets"]) * x["mlm"]),
                correct=jnp.sum(_correct_N(s_CxV, x["targets"], x["mlm"]), dtype=jnp.int32))
    if teacher_head is not None:
      t_CxV = jax.lax.stop_gradient(teacher_head(x["ht"]))
      sums["kl"] = jnp.sum(_soft_kl_N(s_CxV, t_CxV, temperature) * x["soft"])
      if with_mse:
        sums["sq"] = jnp.sum(_squared_error_N(s_CxV, t_CxV) * x["soft"])
    return sums

  if k == 1:
    # Recomputing a single chunk in the backward pass would only add work (and XLA then keeps more, not less).
    sums = chunk_sums(xs)
  else:
    # prevent_cse=False: inside a loop the recomputation cannot be merged into the forward pass anyway.
    per_chunk = jax.lax.map(jax.checkpoint(chunk_sums, prevent_cse=False), jax.tree.map(chunks, xs))
    sums = {name: jnp.sum(v_K) for name, v_K in per_chunk.items()}
  # As _weighted_mean: the sum over the selected rows divided by max(their weight, 1).
  out = dict(mlm=sums["nll"] / jnp.maximum(jnp.sum(xs["mlm"]), 1.0), mlm_correct=sums["correct"])
  n_soft = jnp.maximum(jnp.sum(xs["soft"]), 1.0)
  if "kl" in sums:
    out["ce"] = temperature**2 * (sums["kl"] / n_soft)
  if "sq" in sums:
    out["mse"] = sums["sq"] / n_soft
  return out


# ------------------------------------------------------------------------------------------------ config

@dataclasses.dataclass(frozen=True)
class LossConfig:
  """How a step's loss is computed, fixed when the step is compiled: frozen and hashable (a static argument).

  The weights and temperature of ``config.loss``, and what decides which rows get the vocabulary projection:
  the masking's rate and scheme (they bound the number of masked rows) and the number of devices the batch
  rows are split over (gathered rows are split alike).
  """
  alpha_ce: float = 5.0
  alpha_mlm: float = 2.0
  alpha_cos: float = 1.0
  alpha_mse: float = 0.0
  temperature: float = 2.0
  restrict_ce_to_mask: bool = False  # soft targets only at the masked positions (else at every non-pad token)
  chunk_size: int = 0  # > 0: the vocabulary losses this many rows at a time (``vocab_losses``)
  mlm_prob: float = 0.15
  mlm_scheme: str = "distilbert"
  row_shards: int = 1  # data-parallel devices (``sharding.data_parallel_size``)

  def __post_init__(self):
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature}")
    if min(self.alpha_ce, self.alpha_mlm, self.alpha_cos, self.alpha_mse) < 0:
      raise ValueError(f"loss weights must be >= 0: {self}")
    if self.chunk_size < 0 or self.row_shards < 1:
      raise ValueError(f"chunk_size must be >= 0 and row_shards >= 1: {self}")
    if self.mlm_scheme not in masking.SCHEMES:
      raise ValueError(f"mlm_scheme must be one of {masking.SCHEMES}, got {self.mlm_scheme!r}")

  @classmethod
  def from_config(cls, loss: Mapping, mlm: Mapping, row_shards: int = 1) -> LossConfig:
    """From ``config.loss`` (each key a field: an unknown key raises TypeError) and ``config.mlm``."""
    return cls(**loss, mlm_prob=mlm["prob"], mlm_scheme=mlm["scheme"], row_shards=row_shards)

  def soft(self, distilling: bool) -> bool:
    """Whether the teacher's logits are needed: there is a teacher and L_ce or L_mse counts."""
    return distilling and (self.alpha_ce > 0 or self.alpha_mse > 0)

  def slots(self, batch_size: int, seq_len: int, distilling: bool) -> int:
    """``select_rows``'s choice for a B×L micro-batch: 0 (every row) when soft targets are wanted at every
    token, else the number of masked rows to gather, the only ones L_mlm (and a restricted L_ce) need."""
    if self.soft(distilling) and not self.restrict_ce_to_mask:
      return 0
    return masked_slots(batch_size, seq_len, self.mlm_prob, self.mlm_scheme)

  def total(self, terms: dict[str, jax.Array], distilling: bool) -> jax.Array:
    """Σ alpha_name · terms[name] when distilling; without a teacher, plain masked-LM training: L_mlm."""
    if not distilling:
      return terms["mlm"]
    return sum(getattr(self, f"alpha_{name}") * value for name, value in terms.items())
