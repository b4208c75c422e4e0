"""colab/distilbert_jax.ipynb: committed without outputs, and runs top to bottom headless in short mode."""
import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "distilbert_jax.ipynb"


def test_committed_notebook_has_no_outputs():
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, "the notebook has no code cells"
  stale = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
  assert not stale, f"code cells {stale} carry outputs or execution counts: clear them before committing"
  assert "parameters" in code[0].metadata.get("tags", []), "the first code cell must be the parameters cell"
  # Nothing may import jax before the cell that sets XLA_FLAGS (XLA reads them once, when jax starts).
  flags_cell = next(i for i, c in enumerate(code) if "xla_force_host_platform_device_count" in c.source)
  assert all(not re.search(r"^\s*(import jax|from jax|import distilbert_jax|from distilbert_jax)", c.source, re.M)
             for c in code[:flags_cell + 1])


def _text(outputs) -> str:
  parts = []
  for out in outputs:
    if out.output_type == "stream":
      parts.append(out.text)
    elif out.output_type in ("execute_result", "display_data"):
      parts.append(out.data.get("text/plain", ""))
  return "".join(parts)


@pytest.mark.slow
def test_notebook_runs_in_short_mode(tmp_path, monkeypatch, test_data):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  # The kernel is a child process and inherits this environment.
  for key, value in {
      "DISTILBERT_JAX_NOTEBOOK_SHORT": "1",
      "DISTILBERT_JAX_NOTEBOOK_WORKDIR": str(tmp_path / "run"),
      "DISTILBERT_JAX_CACHE_DIR": str(tmp_path / "cache"),  # never ~/.cache
      "DISTILBERT_JAX_CORPUS_DIR": str(test_data / "corpus"),  # the shared corpus: no npm
      "HF_HOME": str(tmp_path / "hf"),
      "HF_HUB_OFFLINE": "1",
      "JAX_PLATFORMS": "cpu",  # no accelerator probing; the CPU path of the device detection
      "XLA_FLAGS": "",  # the notebook's own setup cell asks for the simulated devices
  }.items():
    monkeypatch.setenv(key, value)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count is not None for c in code)
  errors = [o for c in code for o in c.outputs if o.output_type == "error"]
  assert not errors
  text = "\n".join(_text(c.outputs) for c in code)

  assert "xla_force_host_platform_device_count=8" in text
  assert "installing nothing" in text and "$ pip install" not in text
  assert re.search(r"backend 'cpu': 8 device\(s\)", text)
  assert "found: no accelerator: 8 simulated CPU devices" in text
  # The run's mesh is FSDP over the 8 devices: the MLP kernel's 384 rows split 8 ways.
  assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in text
  assert "layer_0/mlp/wi/kernel: shape (384, 1536), logical ('embed', 'mlp') -> mesh ('fsdp', 'tensor')" in text
  assert "each device holds a (48, 1536) block of the (384, 1536) kernel" in text
  assert "mode: SHORT" in text
  # train.run's last lines: the run's own (rare-token) masking, then BERT's uniform masking.
  run_line = re.search(r"held-out masked-LM accuracy, the run's masking \((\d+) predictions\): student "
                       r"(\d+\.\d\d)%, teacher (\d+\.\d\d)%", text)
  assert run_line, "train.run's held-out line is missing"
  assert re.search(r"held-out masked-LM accuracy, uniform masking \(\d+ predictions\): student \d+\.\d\d%, "
                   r"teacher \d+\.\d\d%", text), "train.run's uniform-masking line is missing"
  # evaluate's side-by-side table: same seed, batches and masks as the run's own scoring, so the same figures.
  table = re.search(r"masked-LM accuracy, rare-token masking\s+(\d+\.\d\d)%\s+(\d+\.\d\d)%\s+\d+\.\d\d", text)
  assert table, "evaluate's table is missing"
  assert (table.group(1), table.group(2)) == (run_line.group(3), run_line.group(2))
  predictions = f"{int(run_line.group(1)):,}"
  assert re.search(rf"masked predictions, rare-token masking\s+{predictions}\s+{predictions}", text)
  assert re.search(r"masked-LM accuracy, uniform masking\s+\d+\.\d\d%\s+\d+\.\d\d%", text)
  assert re.search(r"tokens/s, batch 1, encoder \+ classifier\s+[\d,]+\s+[\d,]+\s+\d+\.\d\d", text)
  assert re.search(r"parameters\s+22,\d{3},\d{3}\s+17,\d{3},\d{3}", text)
  # fill-mask predictions of both exports, five each
  for name in ("teacher", "student"):
    lines = re.findall(rf"fill-mask +{name}: (.+)", text)
    assert len(lines) == 2 and all(len(re.findall(r"\(\d\.\d\d\)", line)) == 5 for line in lines), lines
  diff = float(re.search(r"max \|JAX - PyTorch\| = (\S+)", text).group(1))
  assert diff < 1e-3

  run = tmp_path / "run"
  summary = json.loads((run / "summary.json").read_text())
  assert summary["step"] == 6 and 0 <= summary["student_heldout_mlm_accuracy"] <= 1
  export = run / "export"
  assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()
  assert json.loads((export / "config.json").read_text())["architectures"] == ["DistilBertForMaskedLM"]
  assert (run / "teacher_jax" / "config.json").is_file()
  assert (tmp_path / "cache" / "tokenized").is_dir()
