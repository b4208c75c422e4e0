"""tools/fidelity.py: the study end to end on the tiny preset, its resume, and the report's arithmetic."""
import importlib.util
import json
import pathlib

import numpy as np
import pytest

from distilbert_jax import metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(path: pathlib.Path, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


fidelity = _load(ROOT / "tools" / "fidelity.py", "fidelity")
fidelity_config = _load(ROOT / "configs" / "fidelity.py", "fidelity_config")


def test_plateau_is_the_rise_over_the_last_quarter():
  curve = [{"step": s, "accuracy": a} for s, a in [(100, 0.10), (200, 0.20), (300, 0.296), (400, 0.30)]]
  p = metrics.plateau(curve, 0.5)
  assert p["from_step"] == 300 and p["to_step"] == 400
  assert p["rise_last_quarter_points"] == pytest.approx(0.4) and p["reached"]
  curve[-1]["accuracy"] = 0.31
  assert not metrics.plateau(curve, 0.5)["reached"]
  assert not metrics.plateau(curve[:1], 0.5)["reached"]


def test_curve_counts_tokens_and_minutes_from_the_logged_rates(tmp_path):
  rows = [{"step": 10, "steps_per_s": 2.0, "tokens_per_s": 100.0},
          {"step": 10, "heldout_mlm_accuracy": 0.1, "heldout_mlm_loss": 5.0},
          {"step": 20, "steps_per_s": 5.0, "tokens_per_s": 1000.0},
          {"step": 20, "heldout_mlm_accuracy": 0.2, "heldout_mlm_loss": 4.0}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  curve = metrics.read_curve(tmp_path)
  assert [c["step"] for c in curve] == [10, 20]
  assert curve[0]["tokens"] == 500.0 and curve[0]["minutes"] == pytest.approx(5 / 60)  # 10 steps at 2/s
  assert curve[1]["tokens"] == 500.0 + 2000.0 and curve[1]["minutes"] == pytest.approx(7 / 60)


def test_targets_from_seeded_results():
  cfg = fidelity_config.get_config("tiny:/nowhere")
  cfg.variants = ("full", "mlm_only")
  cfg.seeds = (0, 1)

  def mlm_entry(acc):
    return {c: {"mlm_accuracy": acc, "uniform_mlm_accuracy": acc, "uniform_perplexity": 9.0}
            for c in ("in_domain", "out_of_domain")}

  mlm = {"teacher": mlm_entry(0.50), "full/seed0": mlm_entry(0.49), "full/seed1": mlm_entry(0.495),
         "mlm_only/seed0": mlm_entry(0.40), "mlm_only/seed1": mlm_entry(0.42)}
  finetune = [{"model": m, "seed": s, "domain": d, "accuracy": a}
              for m, s, a in [("teacher", 0, 0.80), ("teacher", 1, 0.82), ("full/seed0", 0, 0.70),
                              ("full/seed1", 1, 0.72), ("mlm_only/seed0", 0, 0.70), ("mlm_only/seed1", 1, 0.71),
                              ("full_D/seed0", 0, 0.80), ("full_D/seed1", 1, 0.80)]
              for d in ("imdb", "yelp")]
  results = {"mlm": mlm, "finetune": finetune, "speed": {"speedup": {"cls_speedup_batch32": 1.7}}}
  by_name = {t["target"]: t for t in fidelity.targets(cfg, results)}
  mlm_kept = by_name["student keeps ≥ 97% of the teacher's masked-LM accuracy (in-domain, uniform)"]
  assert mlm_kept["met"] and mlm_kept["figure"].startswith("98.5%")
  assert not by_name["student keeps ≥ 97% of the teacher's mean fine-tuned accuracy"]["met"]  # 0.71 / 0.81
  assert by_name["student distilled during fine-tuning (D) keeps ≥ 97% of the teacher's mean fine-tuned "
                 "accuracy"]["met"]  # 0.80 / 0.81
  beats = [t for t in by_name.values() if t["target"].startswith("distillation beats")]
  assert [t["met"] for t in beats] == [True, False]  # +8.25 > 2 x 1.41; +0.5 < 2 x 1.41 (fine-tuned)
  assert by_name["student ≥ 1.6× faster than the teacher at batch 32 with the classification head"]["met"]
  assert fidelity.mean_sd([0.1, 0.3]) == pytest.approx((0.2, np.std([0.1, 0.3], ddof=1)))


def test_layer_loss_and_narrow_variants(tiny_teacher, tmp_path):
  """Issue 14's rows: each recipe and shape gives a config the trainer accepts (configs only, nothing trained)."""
  cfg = fidelity_config.get_config(f"tiny:{tiny_teacher}")
  cfg.lock()  # as the command line loads it
  base = fidelity._distill_base(cfg)
  teacher_cfg = fidelity.checkpoint.load_config(tiny_teacher)  # 2 layers, width 64, 4 heads of 16
  tinybert = fidelity.variant_config(base, "tinybert@1x32", str(tiny_teacher), 0, tmp_path)
  assert tinybert.student.layers == (0,) and tinybert.loss.alpha_cos == 0.0
  assert dict(tinybert.student.overrides) == dict(hidden_size=32, num_heads=2, intermediate_size=64)
  assert (tinybert.layer_loss.alpha_hidden, tinybert.layer_loss.alpha_embedding) == (1.0, 1.0)
  assert tinybert.layer_loss.alpha_attention == 0.0  # 2 heads against 4: no head-by-head term
  same_width = fidelity.variant_config(base, "tinybert", str(tiny_teacher), 0, tmp_path)
  assert same_width.layer_loss.alpha_attention == 1.0 and same_width.loss.alpha_cos == 0.0
  minilm = fidelity.variant_config(base, "minilmv2@2x32", str(tiny_teacher), 1, tmp_path)
  assert minilm.student.layers == (0, 1) and minilm.layer_loss.layer_map == ((2, 2),)
  assert minilm.layer_loss.relation_heads == 4 and minilm.seed == 1
  full = fidelity.variant_config(base, "full", str(tiny_teacher), 0, tmp_path)
  assert full.loss.alpha_cos > 0 and not full.layer_loss.alpha_relations
  for c in (tinybert, same_width, minilm, full):
    fidelity.train.student_config(c, teacher_cfg)  # refuses what cannot run
  assert fidelity.relation_heads(fidelity.train.model_lib.EncoderConfig.bert(hidden_size=384, num_heads=12), 256) == 8
  assert fidelity.relation_heads(fidelity.train.model_lib.EncoderConfig.bert(hidden_size=384, num_heads=12), 384) == 12
  assert fidelity.shapes_of(cfg) == {"": "full", "@1x32": "tinybert@1x32"}
  cfg.variants = ("no_cos", "minilmv2@1x32", "full", "tinybert@1x32")
  assert fidelity.shapes_of(cfg) == {"": "full", "@1x32": "minilmv2@1x32"}
  for bad, message in (("tinybert@3", "LAYERSxWIDTH"), ("distil", "unknown variant"), ("full@0x32", "LAYERSxWIDTH")):
    with pytest.raises(ValueError, match=message):
      fidelity.parse_variant(bad)
  with pytest.raises(ValueError, match="heads of its size 16"):
    fidelity.variant_config(base, "full@1x40", str(tiny_teacher), 0, tmp_path)


def test_a_misspelt_variant_fails_at_the_start(tiny_teacher, tmp_path):
  """A bad row is refused before the teacher stage (a name) or before any student trains (a shape the teacher
  cannot be narrowed to), not hours in when its turn comes; the CLI prints it as a one-line error."""
  cfg = fidelity_config.get_config(f"tiny:{tiny_teacher}")
  cfg.variants = ("full", "ful")
  with pytest.raises(fidelity.ConfigError, match="unknown variant 'ful'"):
    fidelity.run_study(cfg, tmp_path / "a", stages=("teacher", "students"))
  assert not (tmp_path / "a" / "teacher.json").exists()
  cfg.variants = ("full", "full@9x64")
  with pytest.raises(fidelity.ConfigError, match="student shape 9x64: at most the teacher's 2 layers"):
    fidelity.run_study(cfg, tmp_path / "b", teacher=str(tiny_teacher), stages=("students",))
  assert not (tmp_path / "b" / "students").exists()
  assert issubclass(fidelity.ConfigError, fidelity.trainer.USER_ERRORS)


@pytest.mark.slow
def test_study_end_to_end_on_the_tiny_preset_and_its_resume(tmp_path, tiny_teacher, data_cache, test_data,
                                                             monkeypatch):
  cfg = fidelity_config.get_config(f"tiny:{tiny_teacher}")
  cfg.cache_dir = str(data_cache)
  cfg.corpus_dir = str(test_data / "corpus")
  cfg.sentiment_dir = str(test_data / "sentiment")
  out = tmp_path / "study"

  # An interruption in the middle of the fine-tuning stage (as a preemption would).
  calls = {"train": 0, "finetune": 0}
  real_train, real_finetune = fidelity.train.run, fidelity.finetune.run

  def counting_train(*a, **kw):
    calls["train"] += 1
    return real_train(*a, **kw)

  def interrupted_finetune(*a, **kw):
    calls["finetune"] += 1
    if calls["finetune"] == 5:
      raise KeyboardInterrupt
    return real_finetune(*a, **kw)

  monkeypatch.setattr(fidelity.train, "run", counting_train)
  monkeypatch.setattr(fidelity.finetune, "run", interrupted_finetune)
  with pytest.raises(KeyboardInterrupt):
    fidelity.run_study(cfg, out, command="test")
  assert calls["train"] == 2 + 1 + 4 * 2  # sweep (2 rates), teacher, 4 variants x 2 seeds
  calls.update(train=0, finetune=0)
  monkeypatch.setattr(fidelity.finetune, "run", real_finetune)
  results = fidelity.run_study(cfg, out, command="test")
  assert calls["train"] == 0  # nothing trained twice

  teacher = results["teacher"]
  assert [r["lr"] for r in teacher["sweep"]["runs"]] == [5e-4, 1e-3] and teacher["lr"] in (5e-4, 1e-3)
  assert [c["step"] for c in teacher["curve"]] == [2, 4, 6, 8]
  assert teacher["plateau"]["to_step"] == 8
  for variant in cfg.variants:
    for seed in cfg.seeds:
      workdir = out / "students" / variant / f"seed{seed}"
      assert (workdir / "final").is_dir() and (workdir / "export" / "config.json").is_file()
      assert (workdir / "teacher" / "final").resolve() == pathlib.Path(teacher["path"]).resolve()
  # mlm_only trains without a teacher from the full student's initial weights.
  rows = [json.loads(x) for x in (out / "students" / "mlm_only" / "seed0" / "metrics.jsonl").read_text().splitlines()]
  assert not any("cos" in r for r in rows) and any("mlm" in r for r in rows)
  models = ["teacher"] + [f"{v}/seed{s}" for v in cfg.variants for s in cfg.seeds]
  assert list(results["mlm"]) == models
  for name in models:
    for corpus in ("in_domain", "out_of_domain"):
      entry = results["mlm"][name][corpus]
      assert entry["predictions"] > 0 and entry["uniform_predictions"] > 0, (name, corpus)
      assert 0 <= entry["uniform_mlm_accuracy"] <= 1 and entry["uniform_perplexity"] > 1
  n_domains, n_seeds = len(cfg.finetune.domains), len(cfg.seeds)
  assert len(results["finetune"]) == n_domains * (len(cfg.finetune.teacher_seeds) + (len(models) - 1) + n_seeds)
  assert {r["model"] for r in results["finetune"]} >= {"teacher", "full_D/seed0", "no_cos/seed1"}
  assert all(0 <= r["accuracy"] <= 1 for r in results["finetune"])
  speed = results["speed"]
  assert set(speed["speedup"]) == {f"{h}_speedup_batch{b}" for h in ("cls", "mlm") for b in (1, 2)}
  assert set(speed["shapes"]["@1x32"]["speedup"]) == set(speed["speedup"])  # the narrow student timed too
  assert results["mlm"]["tinybert@1x32/seed0"]["parameters"] < results["mlm"]["full/seed0"]["parameters"]
  report = (out / "REPORT.md").read_text()
  for text in ("## Targets", "`full`", "`mlm_only`", "`no_cos`", "`full_D`", "King James", "seed",
               "## Layer losses and narrower students", "`tinybert@1x32`"):
    assert text in report
  assert (out / "fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert json.loads((out / "results.json").read_text())["teacher"]["path"] == teacher["path"]
