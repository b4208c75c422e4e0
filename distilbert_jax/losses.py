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
  """(N,) bool: the row is selected and its argmax is the target (the first index among equal maxima).

  The argmax is the target when no logit beats the target's: none is larger, and none before it is equal.
  One comparison pass and an `any`, the same answer as `argmax(logits) == target` for logits without NaN, at a
  quarter of its time on a CPU, where XLA's variadic argmax reduction is slow (BENCHMARKS.md "GELU and the
  accuracy count").
  """
  targets_N = targets_N.astype(jnp.int32)
  target_N1 = jnp.take_along_axis(logits_NxV, targets_N[:, None], axis=-1)
  index_NxV = jax.lax.broadcasted_iota(jnp.int32, logits_NxV.shape, logits_NxV.ndim - 1)
  beaten_NxV = (logits_NxV > target_N1) | ((logits_NxV == target_N1) & (index_NxV < targets_N[:, None]))
  return ~jnp.any(beaten_NxV, axis=-1) & (weights_N > 0)


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


# ------------------------------------------------------------------------------------------------ layers

# The layer losses of TinyBERT (Jiao et al. 2020, arXiv 1909.10351), MiniLM (Wang et al. 2020, arXiv 2002.10957)
# and MiniLMv2 (Wang et al. 2021, arXiv 2012.15828), on (B, L, ...) arrays of one student layer and one teacher
# layer. Each averages over the selected tokens (``weights_BxL`` > 0, padding excluded) as the vocabulary losses
# do; the relation losses also mask padded keys (``attend_mask``). The teacher's arrays are not differentiated
# by the caller (stop_gradient); nothing here depends on which model is which beyond the argument order.


def attend_mask(pad_BxL: jax.Array, segment_ids_BxL: jax.Array | None = None) -> jax.Array:
  """(B, Q, L) bool, True where a query may attend a key, as the encoder builds it: Q = 1 (every query sees
  the non-pad keys) or, for packed rows (``segment_ids_BxL``, 0 = padding), Q = L (only its own example)."""
  if segment_ids_BxL is None:
    return (pad_BxL > 0)[:, None, :]
  seg_BxL = segment_ids_BxL
  return (seg_BxL[:, :, None] == seg_BxL[:, None, :]) & (seg_BxL[:, None, :] > 0)


def hidden_mse_loss(student_h_BxLxDs: jax.Array, teacher_h_BxLxDt: jax.Array, weights_BxL: jax.Array,
                    projection: Mapping[str, jax.Array] | None = None) -> jax.Array:
  """TinyBERT's hidden-state (and embedding-layer) loss MSE(H_s W + b, H_t): the squared error of each selected
  token averaged over the teacher's D_t features, then over the selected tokens.

  ``projection`` {"kernel": (D_s, D_t), "bias": (D_t,)} is TinyBERT's learned W_h (W_e for the embeddings), which
  lets a narrower student meet its teacher; None: no projection (D_s = D_t). TinyBERT's own code averages over
  every position, padding included; here padding is left out, like every loss of this module.
  """
  h_BxLxD = student_h_BxLxDs.astype(jnp.float32)
  if projection is not None:
    h_BxLxD = h_BxLxD @ projection["kernel"].astype(jnp.float32) + projection["bias"].astype(jnp.float32)
  diff_BxLxD = h_BxLxD - teacher_h_BxLxDt.astype(jnp.float32)
  return _weighted_mean(jnp.mean(diff_BxLxD * diff_BxLxD, axis=-1).reshape(-1), weights_BxL.reshape(-1))


def _relation_log_probs(a_BxHxLxK: jax.Array, b_BxHxLxK: jax.Array, attend_BxQxL: jax.Array) -> jax.Array:
  """(B, H, L, L) log softmax over keys of a·bᵀ/√K, masked keys at the float32 minimum (as the encoder)."""
  scale = 1.0 / jnp.sqrt(jnp.float32(a_BxHxLxK.shape[-1]))
  scores = jnp.einsum("bhqk,bhtk->bhqt", a_BxHxLxK.astype(jnp.float32), b_BxHxLxK.astype(jnp.float32)) * scale
  scores = jnp.where(attend_BxQxL[:, None], scores, jnp.finfo(jnp.float32).min)
  return jax.nn.log_softmax(scores, axis=-1)


def relation_kl_loss(student_pair: tuple[jax.Array, jax.Array], teacher_pair: tuple[jax.Array, jax.Array],
                     attend_BxQxL: jax.Array, weights_BxL: jax.Array) -> jax.Array:
  """KL(R_t ‖ R_s) of the relations R = softmax(a·bᵀ/√K) (per head, over the keys), summed over keys, averaged
  over heads and selected queries: MiniLM's 1/(A_h·|x|) Σ_a Σ_t KL(R_t,a,t ‖ R_s,a,t).

  Each pair holds two (B, H, L, K) arrays; student and teacher need the same H, not the same K. (queries,
  keys) gives the attention distributions (TinyBERT's attention transfer in KL form, MiniLM's L_AT), (values,
  values) MiniLM's value relation L_VR; ``split_relation_heads`` first gives MiniLMv2's relations.
  ``attend_BxQxL``: ``attend_mask``; keys it masks count neither in the softmax nor in the KL.
  """
  log_s = _relation_log_probs(*student_pair, attend_BxQxL)
  log_t = _relation_log_probs(*teacher_pair, attend_BxQxL)
  kl_BxHxQ = jnp.sum(jnp.where(attend_BxQxL[:, None], jnp.exp(log_t) * (log_t - log_s), 0.0), axis=-1)
  return _weighted_mean(jnp.mean(kl_BxHxQ, axis=1).reshape(-1), weights_BxL.reshape(-1))


def split_relation_heads(x_BxHxLxK: jax.Array, num_relation_heads: int) -> jax.Array:
  """MiniLMv2's relation heads: the H heads concatenated (B, L, H·K) and re-split into R heads of H·K/R
  features -> (B, R, L, H·K/R); R is free of both models' head counts but must divide H·K."""
  b, h, l, k = x_BxHxLxK.shape
  if (h * k) % num_relation_heads:
    raise ValueError(f"{num_relation_heads} relation heads do not divide the {h * k} attention features")
  x_BxLxHK = jnp.swapaxes(x_BxHxLxK, 1, 2).reshape(b, l, h * k)
  return jnp.swapaxes(x_BxLxHK.reshape(b, l, num_relation_heads, h * k // num_relation_heads), 1, 2)


def attention_kl_loss(student_qk, teacher_qk, attend_BxQxL, weights_BxL) -> jax.Array:
  """TinyBERT/MiniLM attention transfer as a KL per head: KL(A_t ‖ A_s) of the attention distributions
  softmax(q·kᵀ/√K + mask), from each model's (queries, keys) (B, H, L, K); same head count on both sides.
  (TinyBERT's paper takes the MSE of the unnormalised scores; this is the distribution form MiniLM uses.)"""
  return relation_kl_loss(student_qk, teacher_qk, attend_BxQxL, weights_BxL)


def value_relation_loss(student_v, teacher_v, attend_BxQxL, weights_BxL) -> jax.Array:
  """MiniLM's value-relation loss: KL of softmax(V·Vᵀ/√K) per head, from each model's values (B, H, L, K)."""
  return relation_kl_loss((student_v, student_v), (teacher_v, teacher_v), attend_BxQxL, weights_BxL)


def minilmv2_relation_loss(student_qkv, teacher_qkv, attend_BxQxL, weights_BxL, num_relation_heads: int
                           ) -> jax.Array:
  """MiniLMv2's multi-head self-attention relation loss: Σ over query-query, key-key and value-value of the
  relation KL over ``num_relation_heads`` relation heads (``split_relation_heads``), each averaged over relation
  heads and selected queries (the paper's weights, all 1). ``*_qkv``: (queries, keys, values), (B, H, L, K)."""
  total = jnp.float32(0.0)
  for s_x, t_x in zip(student_qkv, teacher_qkv):
    s_r = split_relation_heads(s_x, num_relation_heads)
    t_r = split_relation_heads(t_x, num_relation_heads)
    total = total + relation_kl_loss((s_r, s_r), (t_r, t_r), attend_BxQxL, weights_BxL)
  return total


@dataclasses.dataclass(frozen=True)
class LayerLossConfig:
  """The layer losses' weights and where they apply, fixed when the step is compiled (``config.layer_loss``).

  ``layer_map``: (student layer, teacher layer) pairs, 1-based layer outputs (hidden state i is the output of
  layer i; its attention is that layer's): the hidden-state MSE and the attention KL summed over the pairs (as
  TinyBERT sums its layers), the MiniLM value relation and MiniLMv2 relations at the last pair. The embedding
  MSE always pairs the embeddings. One projection serves every hidden pair (TinyBERT's single W_h).
  """
  alpha_hidden: float = 0.0  # TinyBERT hidden-state MSE (through the "hidden" projection when present)
  alpha_embedding: float = 0.0  # TinyBERT embedding-layer MSE (through the "embedding" projection when present)
  alpha_attention: float = 0.0  # attention-distribution KL per head (TinyBERT in KL form; MiniLM's L_AT)
  alpha_value_relation: float = 0.0  # MiniLM's value-relation KL
  alpha_relations: float = 0.0  # MiniLMv2's query-query, key-key, value-value relations
  relation_heads: int = 1  # MiniLMv2's relation heads R
  layer_map: tuple[tuple[int, int], ...] = ()

  TERMS = ("hidden", "embedding", "attention", "value_relation", "relations")

  def weight(self, name: str) -> float:
    return getattr(self, f"alpha_{name}")

  @property
  def active(self) -> bool:
    return any(self.weight(name) > 0 for name in self.TERMS)

  @property
  def needs_qkv(self) -> bool:
    return any(self.weight(name) > 0 for name in ("attention", "value_relation", "relations"))

  def terms(self, student_hidden, teacher_hidden, student_qkv, teacher_qkv, projections: Mapping,
            attend_BxQxL: jax.Array, weights_BxL: jax.Array) -> dict[str, jax.Array]:
    """The weighted-on terms {name: value}: ``*_hidden`` are the models' hidden states (embeddings first),
    ``*_qkv`` their per-layer (queries, keys, values), ``projections`` the learned {"hidden", "embedding"}
    projections there are (a missing one: none)."""
    out = {}
    on = lambda name: self.weight(name) > 0  # noqa: E731
    if on("embedding"):
      out["embedding"] = hidden_mse_loss(student_hidden[0], teacher_hidden[0], weights_BxL,
                                         projections.get("embedding"))
    if on("hidden"):
      out["hidden"] = sum(hidden_mse_loss(student_hidden[s], teacher_hidden[t], weights_BxL,
                                          projections.get("hidden")) for s, t in self.layer_map)
    if on("attention"):
      out["attention"] = sum(
          attention_kl_loss(student_qkv[s - 1][:2], teacher_qkv[t - 1][:2], attend_BxQxL, weights_BxL)
          for s, t in self.layer_map)
    s_last, t_last = self.layer_map[-1] if self.layer_map else (0, 0)
    if on("value_relation"):
      out["value_relation"] = value_relation_loss(student_qkv[s_last - 1][2], teacher_qkv[t_last - 1][2],
                                                  attend_BxQxL, weights_BxL)
    if on("relations"):
      out["relations"] = minilmv2_relation_loss(student_qkv[s_last - 1], teacher_qkv[t_last - 1], attend_BxQxL,
                                                weights_BxL, self.relation_heads)
    return out

  def total(self, terms: Mapping[str, jax.Array]) -> jax.Array:
    return sum(self.weight(name) * value for name, value in terms.items())
