"""tools/ablation.py end to end on the tiny config: every variant runs, the report and plot are written."""
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ablation_report_on_the_tiny_config(tmp_path, tiny_teacher, data_cache, test_data):
  out = tmp_path / "ablation"
  cmd = [sys.executable, str(ROOT / "tools" / "ablation.py"), f"--config={ROOT / 'configs' / 'tiny.py'}:{tiny_teacher}",
         f"--out={out}", "--finetune_steps=2", f"--sentiment_dir={test_data / 'sentiment'}",
         f"--config.data.cache_dir={data_cache}", f"--config.data.corpus_dir={test_data / 'corpus'}",
         "--config.train.steps=4", "--config.train.ckpt_every=4"]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  assert list(results) == ["full", "no_ce", "no_cos", "no_mlm", "random_init", "mlm_only"]
  for name, r in results.items():
    assert 0.0 <= r["heldout_mlm_accuracy"] <= 1.0 and 0.0 <= r["sentiment_accuracy"] <= 1.0, name
    assert [s for s, _ in r["curves"]["heldout_mlm_accuracy"]] == [1, 2, 3, 4], name  # eval_every = steps // 8
  # The variants really differ: without L_ce the logged ce term is absent from the loss (alpha 0), and the
  # masked-LM-only student trained with no teacher logs no cos term at all.
  nocos = [json.loads(x) for x in (out / "mlm_only" / "distill" / "metrics.jsonl").read_text().splitlines()]
  assert not any("cos" in r for r in nocos) and any("mlm" in r for r in nocos)
  full = [json.loads(x) for x in (out / "full" / "distill" / "metrics.jsonl").read_text().splitlines()]
  assert any("cos" in r for r in full)
  report = (out / "REPORT.md").read_text()
  for name in results:
    assert f"`{name}`" in report
  assert "-2.96" in report and "-3.69" in report
  assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # A second invocation finds every variant finished and only rewrites the report.
  again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert again.returncode == 0 and "distilling" not in again.stdout
