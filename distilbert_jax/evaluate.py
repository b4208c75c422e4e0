"""Held-out masked-LM evaluation with deterministic masking.

Every batch i of the held-out split is masked with `fold_in(key(seed), i)`, so teacher and student (and
two runs) are scored on exactly the same masked positions.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from distilbert_jax import losses, masking
from distilbert_jax import model as model_lib


@dataclasses.dataclass(frozen=True)
class MlmScore:
  accuracy: float  # share of masked positions whose original token is the arg-max prediction
  loss: float  # mean cross-entropy (nats) over masked positions
  num_predictions: int

  @property
  def perplexity(self) -> float:
    return math.exp(min(self.loss, 700.0))


@functools.partial(jax.jit, static_argnames=("model", "mask_token_id", "vocab_size", "mlm_prob", "scheme"))
def _score_batch(model: model_lib.Encoder, params, key, ids_BxL, mask_BxL, token_probs_V, *, mask_token_id,
                 vocab_size, mlm_prob, scheme):
  masked = masking.mask_tokens(key, ids_BxL, mask_BxL, token_probs_V, mask_token_id=mask_token_id,
                               vocab_size=vocab_size, mlm_prob=mlm_prob, scheme=scheme)
  out = model.apply({"params": params}, masked.input_ids, attention_mask=mask_BxL, compute_logits=False)
  k = ids_BxL.size if scheme == "bernoulli" else losses.num_gather_slots(*ids_BxL.shape, mlm_prob)
  h_KxD, w_K, index_K = losses.gather_positions(out.last_hidden_state, masked.mlm_weights, k)
  logits_KxV = model.apply({"params": params}, h_KxD, method=model_lib.Encoder.mlm_logits)
  targets_K = masked.targets.reshape(-1)[index_K]
  correct, count = losses.mlm_accuracy(logits_KxV, targets_K, w_K)
  nll = losses.mlm_loss(logits_KxV, targets_K, w_K) * jnp.maximum(jnp.sum(w_K), 1.0)
  return correct, count, nll


def mlm_score(model: model_lib.Encoder, params, batches, token_probs_V, *, mask_token_id: int,
              seed: int = 0, mlm_prob: float = 0.15, scheme: str = "distilbert", max_batches: int | None = None
              ) -> MlmScore:
  """Masked-LM accuracy and loss over `batches` (dicts with input_ids, attention_mask)."""
  correct = count = 0
  nll = 0.0
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    c, n, s = _score_batch(model, params, jax.random.fold_in(jax.random.key(seed), i),
                           jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                           jnp.asarray(token_probs_V), mask_token_id=mask_token_id,
                           vocab_size=model.cfg.vocab_size, mlm_prob=mlm_prob, scheme=scheme)
    correct, count, nll = correct + int(c), count + int(n), nll + float(s)
  if not count:
    raise ValueError("no masked positions to score: is the held-out split empty?")
  return MlmScore(accuracy=correct / count, loss=nll / count, num_predictions=count)


def as_numpy(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))
