"""Ahead-of-time compilation for TPU topologies (distilbert_jax/aot.py).

The end-to-end tests compile the tiny config for real TPU slices with libtpu's compiler, in a subprocess:
the compile-only settings must be in place before jax starts a backend, and this process already has its
eight fake CPU devices. Without libtpu (`pip install -e '.[tpu]'`, or `WITH_TPU=1 ./setup.sh`; CI does) they are skipped.
"""
import importlib.util
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from distilbert_jax import aot, train, validation
from distilbert_jax import model as model_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed: `WITH_TPU=1 ./setup.sh` (or pip install -e '.[tpu]') to compile for TPUs")


@pytest.mark.parametrize("name, libtpu_name, host_bounds, chip_config", [
    ("v5e-8", "v5e:2x4", (2, 4, 1), "default"),
    ("v5litepod-4", "v5e:2x2", (2, 2, 1), "default"),
    ("v5e-32", "v5e:4x8", (2, 2, 1), "default"),  # 8 hosts of 2 x 2 chips
    ("v6e-8", "v6e:2x4", (2, 4, 1), "default"),
    ("v4-8", "v4:2x2x1", (2, 2, 1), "megacore"),  # 8 TensorCores = 4 chips
    ("v4-32", "v4:2x2x4", (2, 2, 1), "megacore"),
    ("v4-128", "v4:4x4x4", (2, 2, 1), "megacore"),
    ("v5p-8", "v5p:2x2x1", (2, 2, 1), "megacore"),
    ("v5e:2x4", "v5e:2x4", (2, 4, 1), "default"),
    ("v4:2x2x2", "v4:2x2x2", (2, 2, 1), "megacore"),
])
def test_topology_names(name, libtpu_name, host_bounds, chip_config):
  topo = aot.parse_topology(name)
  assert (topo.libtpu_name, topo.host_bounds, topo.chip.chip_config) == (libtpu_name, host_bounds, chip_config)


@pytest.mark.parametrize("name", ["v7-8", "v5e-3", "v4-4x", "v4-6", "v5e:2x2x1", "tpu"])
def test_bad_topology_names(name):
  with pytest.raises(validation.ConfigError):
    aot.parse_topology(name)


def test_sizes_from_oom_messages():
  gib = 2 ** 30
  assert aot.parse_oom("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
                       "hbm. Used 20.50G of 15.75G hbm. Exceeded hbm capacity by 4.75G.") == (20.5 * gib, 15.75 * gib)
  needed, available = aot.parse_oom("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
                                    "HLO temporaries (17.37G) exceeds available HBM (15.75G).")
  assert (needed, available) == (pytest.approx(17.37 * gib), 15.75 * gib)
  assert aot.parse_oom("RESOURCE_EXHAUSTED: out of memory") == (None, None)


def test_traced_matmul_flops_counts_loops_and_recomputation():
  def f(x_BxD, w_DxD):
    def body(h, _):
      return h @ w_DxD, None
    h, _ = jax.lax.scan(body, x_BxD, None, length=4)
    return jax.checkpoint(lambda h: jnp.sum(jnp.tanh(h @ w_DxD)))(h)

  traced = jax.jit(jax.grad(f, argnums=(0, 1))).trace(jnp.ones((8, 16)), jnp.ones((16, 16)))
  one = 2 * 8 * 16 * 16
  # 5 matmuls forward, 2 each backward, and the checkpointed one once more.
  assert aot.traced_matmul_flops(traced.jaxpr.jaxpr) == one * (5 * 3 + 1)


def test_abstract_models_match_build_models(tiny_teacher):
  """The configurations alone (step one of building the models, no weights read) give exactly the models and
  parameter shapes that training builds from the weights (step two)."""
  config = _tiny_config(str(tiny_teacher))
  teacher, student = aot.abstract_models(config)
  real_teacher, real_teacher_params, real_student, real_student_params = train.build_models(config)
  assert student.cfg == real_student.cfg and teacher.cfg == real_teacher.cfg
  assert jax.tree.map(lambda x: (x.shape, x.dtype), aot.abstract_params(student)) == \
      jax.tree.map(lambda x: (x.shape, jnp.asarray(x).dtype), real_student_params)
  assert jax.tree.map(lambda x: x.shape, aot.abstract_params(teacher)) == \
      jax.tree.map(lambda x: x.shape, real_teacher_params)


def test_known_hub_teacher_needs_no_download():
  cfg = aot.model_config("bert-base-uncased")
  assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.family) == (12, 768, 30522, "bert")
  cfg = aot.model_config("FacebookAI/roberta-base")
  assert (cfg.num_layers, cfg.vocab_size, cfg.family, cfg.max_length, cfg.layer_norm_eps) == (
      12, 50265, "roberta", 512, 1e-5)
  cfg = aot.model_config("flaubert/flaubert_small_cased")
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.vocab_size, cfg.pre_norm, cfg.layer_norm_eps) == (
      6, 512, 8, 68729, True, 1e-6)
  with pytest.raises(validation.ConfigError, match="config.json"):
    aot.model_config("someone/unknown-model")


def _tiny_config(teacher: str):
  sys.path.insert(0, str(ROOT / "configs"))
  import tiny  # noqa: PLC0415  (configs/ is a folder of files, not a package)
  return tiny.get_config(teacher)


@pytest.fixture(scope="module")
def tiny_teacher_config(tmp_path_factory) -> pathlib.Path:
  """A folder with only the config.json of a 2-layer, 64-wide BERT: the compiler needs no weights."""
  import transformers
  folder = tmp_path_factory.mktemp("teacher_config")
  transformers.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, max_position_embeddings=64,
                          architectures=["BertForMaskedLM"]).save_pretrained(folder)
  return folder


def _aot(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "distilbert_jax.aot", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)


@needs_libtpu
@pytest.mark.parametrize("topology, devices", [("v5e-8", 8), ("v4-8", 4)])
def test_tiny_step_fits_a_small_slice(tiny_teacher_config, topology, devices):
  out = _aot("--config", f"configs/tiny.py:{tiny_teacher_config}", "--topology", topology, "--batch", "16",
             "--config.optim.grad_accum=2")
  assert out.returncode == 0, out.stdout + out.stderr
  text = out.stdout
  assert f"{devices} × TPU v" in text
  for field in ("arguments", "temporaries", "generated code", "peak"):
    assert field in text, text
  assert "traced matmuls" in text and "XLA compiled" in text, text
  # The traced matmuls are what the formula counts: no remat, one scan of 2 micro-batches.
  ratio = float(text.split("traced matmuls")[1].split("(")[1].split("×")[0])
  assert ratio == pytest.approx(1.0, abs=0.02), text
  assert "verdict   fits (peak" in text and "headroom)" in text, text


@needs_libtpu
def test_too_large_a_model_does_not_fit(tmp_path):
  """A 16M-id vocabulary: 4 GiB per copy of the embeddings (parameters, Adam moments, teacher) on one v5e."""
  import transformers
  transformers.BertConfig(vocab_size=2 ** 24, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                          intermediate_size=128, max_position_embeddings=64,
                          architectures=["BertForMaskedLM"]).save_pretrained(tmp_path)
  out = _aot("--config", f"configs/tiny.py:{tmp_path}", "--topology", "v5e-1", "--batch", "1", "--seq", "8")
  assert out.returncode == 1, out.stdout + out.stderr
  assert "does not fit (needs" in out.stdout and "GiB XLA may use)" in out.stdout, out.stdout + out.stderr


def test_bad_arguments_exit_2(tiny_teacher_config):
  out = _aot("--config", f"configs/tiny.py:{tiny_teacher_config}", "--topology", "v9-8")
  assert out.returncode == 2 and "unknown TPU topology" in out.stderr, out.stderr


def test_missing_libtpu_says_how_to_install(tiny_teacher_config):
  """With libtpu hidden from the import system: one line with the pip command, exit code 2."""
  hide = ("import importlib.util as u, runpy, sys; find = u.find_spec; "
          "u.find_spec = lambda name, *a: None if name == 'libtpu' else find(name, *a); "
          "sys.argv = ['aot'] + sys.argv[1:]; runpy.run_module('distilbert_jax.aot', run_name='__main__')")
  out = subprocess.run([sys.executable, "-c", hide, "--config", f"configs/tiny.py:{tiny_teacher_config}",
                        "--topology", "v5e-8"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stdout + out.stderr
  assert "pip install 'distilbert-jax[tpu]'" in out.stderr


def test_model_config_reads_a_folder(tiny_teacher_config):
  cfg = aot.model_config(str(tiny_teacher_config))
  assert (cfg.num_layers, cfg.hidden_size, cfg.family) == (2, 64, "bert")
  assert isinstance(cfg, model_lib.EncoderConfig)
