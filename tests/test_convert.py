"""The conversion command line and the JAX model folder (Orbax)."""
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

from distilbert_jax import checkpoint
from hf_helpers import BERT, DISTILBERT, write_hf

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "tools"))
import convert  # noqa: E402


@pytest.mark.parametrize("family", [BERT, DISTILBERT])
def test_hf2jax_then_jax2hf_is_bit_exact(tmp_path, family, capsys):
  src, _ = write_hf(tmp_path / "hf", family)
  assert convert.main(["hf2jax", "--src", str(src), "--dst", str(tmp_path / "jax")]) == 0
  assert "wrote" in capsys.readouterr().out
  assert checkpoint.is_model_dir(tmp_path / "jax")
  assert convert.main(["jax2hf", "--src", str(tmp_path / "jax"), "--dst", str(tmp_path / "out")]) == 0
  before = safetensors.numpy.load_file(str(src / "model.safetensors"))
  after = safetensors.numpy.load_file(str(tmp_path / "out" / "model.safetensors"))
  assert set(before) == set(after) and all(np.array_equal(before[k], after[k]) for k in before)


def test_orbax_model_folder_round_trip(tmp_path):
  src, _ = write_hf(tmp_path / "hf", BERT)
  import distilbert_jax
  model, params = distilbert_jax.load_hf(src)
  checkpoint.save_model(tmp_path / "jax", model, params)
  model2, params2 = checkpoint.load_model(tmp_path / "jax")
  assert model2.cfg == model.cfg
  assert jax.tree.all(jax.tree.map(np.array_equal, params, jax.device_get(params2)))


def test_refuses_non_empty_destination(tmp_path, capsys):
  src, _ = write_hf(tmp_path / "hf", BERT)
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "keep.txt").write_text("mine")
  capsys.readouterr()  # drop transformers' progress bars of the set-up
  assert convert.main(["hf2jax", "--src", str(src), "--dst", str(tmp_path / "busy")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "not empty" in err and "--overwrite" in err
  assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
  assert convert.main(["hf2jax", "--src", str(src), "--dst", str(tmp_path / "busy"), "--overwrite"]) == 0
  assert not (tmp_path / "busy" / "keep.txt").exists()


def test_bad_source_is_one_clear_line(tmp_path, capsys):
  assert convert.main(["hf2jax", "--src", str(tmp_path), "--dst", str(tmp_path / "x")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "config.json" in err and err.count("\n") == 1
  assert convert.main(["jax2hf", "--src", str(tmp_path), "--dst", str(tmp_path / "y")]) == 2
  assert "hf2jax" in capsys.readouterr().err


def test_run_model_check_compares_configs_not_dicts():
  """A checkpoint written before a config field existed still belongs to the same model."""
  import distilbert_jax
  cfg = distilbert_jax.EncoderConfig.distilbert(num_layers=3).to_dict()
  older = {k: v for k, v in cfg.items() if k not in ("num_labels", "pooler_activation")}
  assert checkpoint._same_model(older, cfg)
  assert not checkpoint._same_model({**cfg, "num_layers": 4}, cfg)
  assert not checkpoint._same_model({**cfg, "n_layers": 3}, cfg)
  assert not checkpoint._same_model(None, cfg)
