"""Masking statistics on real text (State of the Union, bert-base-uncased WordPiece) and exact small cases."""
import fractions
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distilbert_jax import losses
from distilbert_jax import masking

PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
SPECIAL_IDS = (PAD, UNK, CLS, SEP, MASK)
VOCAB = 30522
BATCH, SEQ_LEN = 16, 128
NUM_DRAWS = 8  # masking draws per corpus batch


def _ceil_15_percent(n):
  return -(-3 * n // 20)  # exact integer ceil(0.15 * n)


@pytest.fixture(scope="module")
def corpus(test_data, minilm_path):
  """Batches "[CLS] text [SEP]" of 20-128 tokens, padded to 128, from three recent addresses."""
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path))
  assert (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.mask_token_id) == (PAD, CLS, MASK)
  files = sorted((test_data / "corpus" / "sotu").glob("*.txt"))[-3:]
  docs = [np.asarray(tokenizer(f.read_text(), add_special_tokens=False)["input_ids"], np.int32)
          for f in files]
  counts_V = masking.count_tokens(docs, VOCAB)

  rng = np.random.default_rng(0)
  rows = []
  for doc in docs:
    start = 0
    while start < len(doc):
      n = int(rng.integers(18, SEQ_LEN - 1))  # lengths vary so batches carry padding
      rows.append([CLS, *doc[start:start + n], SEP])
      start += n
  rows = rows[:len(rows) // BATCH * BATCH]
  ids = np.zeros((len(rows), SEQ_LEN), np.int32)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
  ids_GxBxL = ids.reshape(-1, BATCH, SEQ_LEN)
  return dict(ids=ids_GxBxL, attention=(ids_GxBxL != PAD).astype(np.int32), counts=counts_V,
              probs=masking.token_probs(counts_V, SPECIAL_IDS))


def _draw(corpus, scheme, seed=0):
  """NUM_DRAWS maskings of every corpus batch: arrays (NUM_DRAWS, G, B, L)."""
  fn = functools.partial(masking.mask_tokens, mask_token_id=MASK, vocab_size=VOCAB, scheme=scheme)
  per_batch = jax.vmap(fn, in_axes=(0, 0, 0, None))
  num_batches = corpus["ids"].shape[0]
  keys = jax.random.split(jax.random.key(seed), (NUM_DRAWS, num_batches))
  out = jax.jit(jax.vmap(per_batch, in_axes=(0, None, None, None)))(
      keys, corpus["ids"], corpus["attention"], corpus["probs"])
  return jax.tree.map(np.asarray, out)


@pytest.fixture(scope="module")
def distilbert_draws(corpus):
  return _draw(corpus, "distilbert")


@pytest.fixture(scope="module")
def bernoulli_draws(corpus):
  return _draw(corpus, "bernoulli")


def test_token_probs_and_counts():
  counts_V = masking.count_tokens([np.array([5, 5, 7]), np.array([[5, 0]])], 10)
  np.testing.assert_array_equal(counts_V, [1, 0, 0, 0, 0, 3, 0, 1, 0, 0])
  probs_V = masking.token_probs(counts_V, special_ids=(0, 9))
  assert probs_V.dtype == np.float32
  np.testing.assert_allclose(probs_V, [0, 1, 1, 1, 1, 3**-0.7, 1, 1, 1, 0], rtol=1e-6)
  with pytest.raises(ValueError, match="token ids"):
    masking.count_tokens(np.array([10]), 10)


def test_corpus_is_realistic(corpus):
  assert corpus["ids"].shape[0] >= 10
  assert 0.2 < 1 - corpus["attention"].mean() < 0.6  # a fair share of padding
  assert corpus["counts"].sum() > 20_000


def test_selects_exactly_ceil_15_percent_of_the_batch(corpus, distilbert_draws):
  nonpad_G = corpus["attention"].sum(axis=(1, 2))
  selected_RxG = distilbert_draws.mlm_weights.sum(axis=(2, 3))
  np.testing.assert_array_equal(selected_RxG, np.broadcast_to(_ceil_15_percent(nonpad_G), selected_RxG.shape))
  assert selected_RxG.max() <= losses.num_gather_slots(BATCH, SEQ_LEN, 0.15)
  assert set(np.unique(distilbert_draws.mlm_weights)) == {0.0, 1.0}


@pytest.mark.parametrize("scheme", ["distilbert", "bernoulli"])
def test_never_selects_special_or_pad_and_keeps_the_rest(corpus, scheme, request):
  draws = request.getfixturevalue(f"{scheme}_draws")
  ids = np.broadcast_to(corpus["ids"], draws.targets.shape)
  chosen = draws.mlm_weights > 0
  np.testing.assert_array_equal(draws.targets, ids)
  assert not chosen[np.isin(ids, SPECIAL_IDS)].any()
  assert not chosen[np.broadcast_to(corpus["attention"] == 0, chosen.shape)].any()
  np.testing.assert_array_equal(draws.input_ids[~chosen], ids[~chosen])
  assert draws.input_ids.dtype == draws.targets.dtype == np.int32
  assert draws.mlm_weights.dtype == np.float32


def test_80_10_10_split(distilbert_draws):
  chosen = distilbert_draws.mlm_weights > 0
  new, old = distilbert_draws.input_ids[chosen], distilbert_draws.targets[chosen]
  assert len(new) > 25_000
  masked, kept = np.mean(new == MASK), np.mean(new == old)
  random = 1 - masked - kept
  # Standard errors are <= 0.0025 at this size; a random id equals the original with probability 1/V.
  assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(random - 0.1) < 0.01
  random_ids = new[(new != MASK) & (new != old)]
  assert random_ids.min() >= 0 and random_ids.max() < VOCAB
  # Uniform over the vocabulary, not the corpus distribution: mean near V/2, both ends reached.
  assert abs(random_ids.mean() / VOCAB - 0.5) < 0.02
  assert random_ids.min() < 0.01 * VOCAB and random_ids.max() > 0.99 * VOCAB


def test_rare_tokens_are_masked_more_than_frequent_ones(corpus, distilbert_draws):
  """P ∝ count^-0.7: tokens below the median count are picked far more often than "the", ",", "."."""
  counts_V = corpus["counts"].copy()
  counts_V[list(SPECIAL_IDS)] = 0
  chosen = distilbert_draws.mlm_weights > 0
  picked_V = np.bincount(distilbert_draws.targets[chosen], minlength=VOCAB)
  seen_V = np.bincount(np.broadcast_to(corpus["ids"], chosen.shape).reshape(-1), minlength=VOCAB)
  rare = (seen_V > 0) & (counts_V > 0) & (counts_V < np.median(counts_V[counts_V > 0]))
  frequent = np.argsort(counts_V)[-10:]
  rare_rate = picked_V[rare].sum() / seen_V[rare].sum()
  frequent_rate = picked_V[frequent].sum() / seen_V[frequent].sum()
  assert rare.sum() > 500
  assert rare_rate > 0.15 > frequent_rate
  assert rare_rate > 5 * frequent_rate, (rare_rate, frequent_rate)


def test_deterministic_given_rng(corpus):
  fn = jax.jit(functools.partial(masking.mask_tokens, mask_token_id=MASK, vocab_size=VOCAB))
  args = corpus["ids"][0], corpus["attention"][0], corpus["probs"]
  a, b = fn(jax.random.key(3), *args), fn(jax.random.key(3), *args)
  c = fn(jax.random.key(4), *args)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert (a.mlm_weights != c.mlm_weights).any()


def test_bernoulli_rate(corpus, bernoulli_draws):
  draws = bernoulli_draws
  eligible = np.broadcast_to((corpus["attention"] > 0) & ~np.isin(corpus["ids"], SPECIAL_IDS),
                             draws.mlm_weights.shape)
  rate = draws.mlm_weights[eligible].mean()
  assert abs(rate - 0.15) < 0.005, rate
  # Independent per token: the count varies from batch to batch, unlike the distilbert scheme.
  assert len(np.unique(draws.mlm_weights.sum(axis=(2, 3)))) > 5


def _exact_subset_probs(p, n):
  """P(chosen set) for n successive draws without replacement ∝ p, by enumerating the orders."""
  p = np.asarray(p, np.float64) / np.sum(p)
  probs = {}
  for order in itertools.permutations(np.flatnonzero(p), n):
    prob, left = 1.0, 1.0
    for i in order:
      prob *= p[i] / left
      left -= p[i]
    key = frozenset(order)
    probs[key] = probs.get(key, 0.0) + prob
  return probs


def test_gumbel_top_k_is_sampling_without_replacement():
  """On a tiny batch, chosen-set frequencies match exact without-replacement probabilities."""
  token_probs_V = np.array([0, 0.4, 0.25, 0.15, 0.1, 0.06, 0.04, 0], np.float32)  # ids 0 and 7 special
  ids_1xL = np.array([[1, 2, 3, 7, 4, 5, 6, 0]], np.int32)  # a special token and a pad
  attention_1xL = (ids_1xL != 0).astype(np.int32)
  # n = ceil(0.4 * 7 non-pad) = 3.
  fn = functools.partial(masking.mask_tokens, mask_token_id=MASK, vocab_size=VOCAB, mlm_prob=0.4)
  num = 20_000
  keys = jax.random.split(jax.random.key(0), num)
  draw = jax.jit(jax.vmap(lambda k: fn(k, ids_1xL, attention_1xL, token_probs_V).mlm_weights))
  weights = np.asarray(draw(keys))
  chosen_NxL = weights[:, 0] > 0
  assert (chosen_NxL.sum(-1) == 3).all()
  assert not chosen_NxL[:, [3, 7]].any()

  p_L = token_probs_V[ids_1xL[0]]
  exact = _exact_subset_probs(p_L, 3)
  empirical = {}
  for row in chosen_NxL:
    key = frozenset(np.flatnonzero(row).tolist())
    empirical[key] = empirical.get(key, 0) + 1 / num
  assert set(empirical) <= set(exact)
  for key, prob in exact.items():
    assert abs(empirical.get(key, 0.0) - prob) < 0.01, (sorted(key), empirical.get(key), prob)
  # The same check per position (inclusion probabilities), tighter.
  inclusion = {i: sum(v for k, v in exact.items() if i in k) for i in range(8)}
  np.testing.assert_allclose(chosen_NxL.mean(0), [inclusion[i] for i in range(8)], atol=0.012)


def test_n_is_clamped_to_eligible_positions():
  token_probs_V = np.array([0, 1, 0], np.float32)
  ids_1xL = np.array([[2, 1, 2, 2, 0]], np.int32)  # one selectable token among specials and a pad
  fn = jax.jit(functools.partial(masking.mask_tokens, mask_token_id=2, vocab_size=3, mlm_prob=1.0))
  out = fn(jax.random.key(0), ids_1xL, (ids_1xL != 0).astype(np.int32), token_probs_V)
  np.testing.assert_array_equal(out.mlm_weights, [[0, 1, 0, 0, 0]])


def test_argument_validation():
  args = jax.random.key(0), np.ones((1, 4), np.int32), np.ones((1, 4), np.int32), np.ones(8, np.float32)
  with pytest.raises(ValueError, match="scheme"):
    masking.mask_tokens(*args, mask_token_id=3, vocab_size=8, scheme="xlm")
  with pytest.raises(ValueError, match="sum to 1"):
    masking.mask_tokens(*args, mask_token_id=3, vocab_size=8, word_mask=0.8, word_keep=0.1, word_rand=0.2)
  with pytest.raises(ValueError, match="mlm_prob"):
    masking.mask_tokens(*args, mask_token_id=3, vocab_size=8, mlm_prob=0.0)
  with pytest.raises(ValueError, match="mask_token_id"):
    masking.mask_tokens(*args, mask_token_id=8, vocab_size=8)


@pytest.mark.parametrize("mlm_prob", [0.15, 0.1, 0.3, 1 / 3])
def test_count_to_select_is_an_exact_ceil(mlm_prob):
  """ceil(mlm_prob * count) in int32 has no float round-up (float32 gives ceil(0.15 * 200) = 31)."""
  frac = fractions.Fraction(mlm_prob).limit_denominator(10_000)
  count_N = np.arange(0, 2_000_001, 7)
  got_N = masking._ceil_times(jnp.asarray(count_N, jnp.int32), frac)
  np.testing.assert_array_equal(got_N, -(-count_N * frac.numerator // frac.denominator))


def test_uint16_ids_and_legacy_keys(corpus):
  """Token ids stored as uint16 and raw uint32 PRNGKeys give the same result as int32 ids and typed keys."""
  fn = jax.jit(functools.partial(masking.mask_tokens, mask_token_id=MASK, vocab_size=VOCAB))
  ids, attention = corpus["ids"][1], corpus["attention"][1]
  a = fn(jax.random.key(7), ids, attention, corpus["probs"])
  b = fn(jax.random.PRNGKey(7), ids.astype(np.uint16), attention, corpus["probs"])
  jax.tree.map(np.testing.assert_array_equal, a, b)
