"""Dynamic masked-LM corruption of a batch, as in the DistilBERT recipe.

Two selection schemes:

* ``"distilbert"`` (the reference, XLM-style): exactly n = ceil(mlm_prob * non-pad tokens of the whole batch)
  positions, drawn over the flattened batch without replacement with probability proportional to
  ``token_probs[id]``. With ``token_probs = max(count, 1) ** -0.7`` rare tokens are picked more often.
* ``"bernoulli"`` (BERT / run_mlm): every eligible token independently with probability mlm_prob.

Either way the chosen positions are then split 80/10/10 into [MASK] / kept / random id.

``token_probs`` and ``count_tokens`` run once on the host (numpy); ``mask_tokens`` is pure and jittable with
its keyword arguments static.
"""
from collections.abc import Iterable, Sequence
import fractions
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SCHEMES = ("distilbert", "bernoulli")

# mlm_prob is turned into a fraction num/den so that n = ceil(mlm_prob * count) is exact integer arithmetic
# (float32 would give ceil(0.15f * 200) = 31). Decimal probabilities such as 0.15 = 3/20 are represented
# exactly; den <= 10_000 keeps every intermediate product below 1e8, inside int32.
_MAX_DENOMINATOR = 10_000


@flax.struct.dataclass
class MaskedBatch:
  """A corrupted batch and what to predict; a pytree.

  Attributes:
    input_ids: (B, L) int32, the ids fed to the model after corruption.
    targets: (B, L) int32, the original ids.
    mlm_weights: (B, L) float32, 1.0 at positions selected for prediction, else 0.0.
  """
  input_ids: jax.Array
  targets: jax.Array
  mlm_weights: jax.Array


def count_tokens(ids: np.ndarray | Iterable[np.ndarray], vocab_size: int) -> np.ndarray:
  """Occurrences of every vocabulary id; host-side, once per corpus.

  Args:
    ids: an integer array of any shape, or an iterable of such arrays (e.g. one per document).
    vocab_size: V.

  Returns:
    (V,) int64 counts.
  """
  if isinstance(ids, np.ndarray):
    ids = [ids]
  counts_V = np.zeros(vocab_size, np.int64)
  for chunk in ids:
    chunk = np.asarray(chunk).reshape(-1)
    if chunk.size == 0:
      continue
    if chunk.min() < 0 or chunk.max() >= vocab_size:
      raise ValueError(f"token ids must lie in [0, {vocab_size}); got [{chunk.min()}, {chunk.max()}]")
    counts_V += np.bincount(chunk.astype(np.int64), minlength=vocab_size)
  return counts_V


def token_probs(counts_V: np.ndarray, special_ids: Sequence[int], smoothing: float = 0.7) -> np.ndarray:
  """Unnormalised selection weight of every id: max(count, 1) ** -smoothing, 0 for special ids.

  Ids never seen get the weight of a count of 1 (the rarest), as in the reference.

  Args:
    counts_V: (V,) token counts over the corpus.
    special_ids: ids that must never be selected ([PAD], [CLS], [SEP], [MASK], [UNK], ...).
    smoothing: the exponent (mlm_smoothing); 0 gives uniform weights over non-special ids.

  Returns:
    (V,) float32.
  """
  counts_V = np.asarray(counts_V)
  if counts_V.ndim != 1:
    raise ValueError(f"counts_V must be 1-D, got shape {counts_V.shape}")
  probs_V = np.maximum(counts_V.astype(np.float64), 1.0) ** (-smoothing)
  probs_V[np.asarray(list(special_ids), np.int64)] = 0.0
  return probs_V.astype(np.float32)


def _as_fraction(mlm_prob: float) -> fractions.Fraction:
  return fractions.Fraction(mlm_prob).limit_denominator(_MAX_DENOMINATOR)


def _ceil_times(count: jax.Array, frac: fractions.Fraction) -> jax.Array:
  """ceil(count * frac) in int32 without overflow: count = q * den + r, so the product splits exactly."""
  num, den = frac.numerator, frac.denominator
  q, r = count // den, count % den
  return q * num + (r * num + den - 1) // den


def _check_args(mlm_prob, word_mask, word_keep, word_rand, scheme, mask_token_id, vocab_size):
  if scheme not in SCHEMES:
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
  if not 0.0 < mlm_prob <= 1.0:
    raise ValueError(f"mlm_prob must lie in (0, 1], got {mlm_prob}")
  split = (word_mask, word_keep, word_rand)
  if min(split) < 0.0 or not math.isclose(sum(split), 1.0, abs_tol=1e-6):
    raise ValueError(f"word_mask, word_keep, word_rand must be >= 0 and sum to 1, got {split}")
  if not 0 <= mask_token_id < vocab_size:
    raise ValueError(f"mask_token_id {mask_token_id} is outside the vocabulary [0, {vocab_size})")


def _select_distilbert(rng, probs_BxL, num_nonpad, mlm_prob):
  """Exactly ceil(mlm_prob * num_nonpad) positions without replacement, P ∝ probs (Gumbel-top-k).

  Sorting log(p) + Gumbel noise and taking the first n is distributed as n successive draws without
  replacement proportional to p, for any n; n is data dependent, so the cut is a comparison of each
  position's rank with n rather than a static top_k.
  """
  probs_N = probs_BxL.reshape(-1)
  eligible_N = probs_N > 0
  gumbel_N = jax.random.gumbel(rng, probs_N.shape, jnp.float32)
  keys_N = jnp.where(eligible_N, jnp.log(jnp.where(eligible_N, probs_N, 1.0)) + gumbel_N, -jnp.inf)
  order_N = jnp.argsort(-keys_N)
  rank_N = jnp.zeros_like(order_N).at[order_N].set(jnp.arange(order_N.shape[0], dtype=order_N.dtype))
  # Clamped so that only positive-probability positions are ever taken (tiny or all-special batches).
  n = jnp.minimum(_ceil_times(num_nonpad, _as_fraction(mlm_prob)), jnp.sum(eligible_N, dtype=jnp.int32))
  return ((rank_N < n) & eligible_N).reshape(probs_BxL.shape)


def mask_tokens(
    rng: jax.Array,
    input_ids_BxL: jax.Array,
    attention_mask_BxL: jax.Array,
    token_probs_V: jax.Array,
    *,
    mask_token_id: int,
    vocab_size: int,
    mlm_prob: float = 0.15,
    word_mask: float = 0.8,
    word_keep: float = 0.1,
    word_rand: float = 0.1,
    scheme: str = "distilbert",
) -> MaskedBatch:
  """Selects positions to predict and corrupts them; deterministic given rng.

  Jit with every keyword argument static (e.g. ``jax.jit(functools.partial(mask_tokens, mask_token_id=103,
  vocab_size=30522))``).

  Args:
    rng: a PRNG key.
    input_ids_BxL: token ids, any integer dtype (uint16 storage is fine).
    attention_mask_BxL: 1 for real tokens, 0 for padding.
    token_probs_V: (V,) from ``token_probs``; 0 marks ids that are never selected (special tokens). In the
      "bernoulli" scheme only its zeros matter.
    mask_token_id: the [MASK] id.
    vocab_size: V; random replacements are uniform over [0, V), special ids included, as in the reference.
    mlm_prob: fraction of non-pad tokens to predict ("distilbert": exact count over the whole batch, treated
      as the nearest fraction with denominator <= 10,000, exact for decimals like 0.15; "bernoulli": the
      per-token rate).
    word_mask, word_keep, word_rand: how the chosen positions are corrupted: [MASK] / unchanged / random id.
    scheme: "distilbert" or "bernoulli".

  Returns:
    A MaskedBatch of (B, L) arrays.
  """
  _check_args(mlm_prob, word_mask, word_keep, word_rand, scheme, mask_token_id, vocab_size)
  select_rng, split_rng, rand_rng = jax.random.split(rng, 3)
  ids_BxL = input_ids_BxL.astype(jnp.int32)
  real_BxL = attention_mask_BxL > 0
  probs_BxL = jnp.where(real_BxL, jnp.asarray(token_probs_V, jnp.float32)[ids_BxL], 0.0)

  if scheme == "distilbert":
    chosen_BxL = _select_distilbert(select_rng, probs_BxL, jnp.sum(real_BxL, dtype=jnp.int32), mlm_prob)
  else:
    chosen_BxL = (probs_BxL > 0) & jax.random.bernoulli(select_rng, mlm_prob, ids_BxL.shape)

  # One categorical draw per position (0: mask, 1: keep, 2: random); only the chosen ones use it.
  split_logits = jnp.log(jnp.asarray([word_mask, word_keep, word_rand], jnp.float32))
  how_BxL = jax.random.categorical(split_rng, split_logits, shape=ids_BxL.shape)
  random_ids_BxL = jax.random.randint(rand_rng, ids_BxL.shape, 0, vocab_size, jnp.int32)
  corrupted_BxL = jnp.select([how_BxL == 0, how_BxL == 1], [jnp.full_like(ids_BxL, mask_token_id), ids_BxL],
                             random_ids_BxL)
  return MaskedBatch(
      input_ids=jnp.where(chosen_BxL, corrupted_BxL, ids_BxL),
      targets=ids_BxL,
      mlm_weights=chosen_BxL.astype(jnp.float32),
  )
