"""tools/fidelity.py: the study end to end on the tiny preset, its resume, and the report's arithmetic."""
import importlib.util
import json
import pathlib
import subprocess
import sys

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


def test_growth_per_doubling_and_what_it_means_for_the_plateau():
  curve = [{"step": s, "accuracy": (30 + 3.5 * np.log2(s / 300)) / 100} for s in (300, 600, 1200, 2400, 4800)]
  assert metrics.growth_per_doubling(curve) == pytest.approx(3.5)
  assert metrics.growth_per_doubling(curve, 1200) == pytest.approx(3.5)
  assert metrics.growth_per_doubling(curve, 2400) is None  # two points
  assert metrics.growth_per_doubling([{"step": 8, "accuracy": a} for a in (0.1, 0.2, 0.3)]) is None
  curve = [{"step": s, "accuracy": 0.40} for s in (300, 600, 1200)]
  assert metrics.growth_per_doubling(curve) == pytest.approx(0.0)
  lines = fidelity._teacher_lines({"given": True, "path": "/t", "curve": [
      {"step": s, "accuracy": (30 + 4 * np.log2(s / 300)) / 100, "tokens": 0, "minutes": 0, "loss": 1.0}
      for s in (300, 600, 1200, 2400)]})
  assert any("+4.00 points per doubling" in line and "rises 1.66 points over the last quarter" in line
             for line in lines), lines


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
  assert [t["met"] for t in beats] == [True, False]  # +8.25 > 2 x 1.41; +0.5 < 2 x 0.71 (fine-tuned, paired)
  assert beats[1]["figure"] == "+0.50 points, spread of the 2 paired differences 0.71"  # 0.0 and +1.0
  assert by_name["student ≥ 1.6× faster than the teacher at batch 32 with the classification head"]["met"]
  assert fidelity.mean_sd([0.1, 0.3]) == pytest.approx((0.2, np.std([0.1, 0.3], ddof=1)))
  assert fidelity._kept_of_teacher(mlm, "full") == "98.5% / 98.5%"  # (0.49 + 0.495) / 2 of 0.50
  assert fidelity._kept_of_teacher(mlm, "mlm_only") == "82.0% / 82.0%"
  assert fidelity._kept_of_teacher(mlm, "teacher") == "—" and fidelity._kept_of_teacher(mlm, "no_cos") == "— / —"


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
  assert full.loss.restrict_ce_to_mask and not fidelity.variant_config(
      base, "ce_all", str(tiny_teacher), 0, tmp_path).loss.restrict_ce_to_mask
  assert full.mlm.smoothing == 0.7 and fidelity.variant_config(
      base, "uniform", str(tiny_teacher), 0, tmp_path).mlm.smoothing == 0.0
  assert fidelity.variant_config(base, "mixed", str(tiny_teacher), 0, tmp_path).mlm.smoothing == 0.35
  longer = fidelity.variant_config(base, "full:12", str(tiny_teacher), 0, tmp_path)
  assert longer.train.steps == 12 and full.train.steps == cfg.distill.train.steps == 4
  assert fidelity.budget_of("tinybert@1x32:12") == 12 and fidelity.parse_variant("tinybert@1x32:12") == (
      "tinybert", (1, 32)) and fidelity.budget_of("full") is None
  assert fidelity.describe("full:2400").endswith("; 2,400 steps")
  for bad, message in (("tinybert@3", "LAYERSxWIDTH"), ("distil", "unknown variant"), ("full@0x32", "LAYERSxWIDTH"),
                       ("full:0", "number of steps"), ("full:x", "number of steps")):
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
  assert calls["train"] == 2 + 1 + 5 * 2  # sweep (2 rates), teacher, 5 variants x 2 seeds
  calls.update(train=0, finetune=0)
  monkeypatch.setattr(fidelity.finetune, "run", real_finetune)
  results = fidelity.run_study(cfg, out, command="test")
  assert calls["train"] == 0  # nothing trained twice

  def no_work(*a, **kw):
    raise AssertionError("a finished study made something again")

  with monkeypatch.context() as m:  # a finished study, run again, makes nothing again (no result found stale)
    for module, name in ((fidelity.train, "run"), (fidelity.finetune, "run"), (fidelity.evaluate, "evaluate_models"),
                         (fidelity.evaluate, "speed_report")):
      m.setattr(module, name, no_work)
    fidelity.run_study(cfg, out, command="test")

  teacher = results["teacher"]
  assert [r["lr"] for r in teacher["sweep"]["runs"]] == [5e-4, 1e-3] and teacher["lr"] in (5e-4, 1e-3)
  assert [c["step"] for c in teacher["curve"]] == [2, 4, 6, 8]
  assert teacher["plateau"]["to_step"] == 8
  for variant in cfg.variants:
    for seed in cfg.seeds:
      workdir = fidelity.student_workdir(out, variant, seed)
      assert ":" not in workdir.parent.name  # "full:6" -> full-6: a folder name every file system takes
      assert (workdir / "final").is_dir() and (workdir / "export" / "config.json").is_file()
      assert (workdir / "teacher" / "final").resolve() == pathlib.Path(teacher["path"]).resolve()
  assert [c["step"] for c in results["students"]["full:6/seed1"]["curve"]] == [2, 4, 6]  # its own budget
  assert [c["step"] for c in results["students"]["full/seed1"]["curve"]] == [2, 4]
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
               "## Layer losses and narrower students", "`tinybert@1x32`", "− teacher, paired",
               "## Ablation: each row against the triple loss, seed by seed", "| `no_cos` | without L_cos | ",
               "## Budget: does the gap close with training?", "| `full` | 4 | ", "| `full` | 6 | ",
               "| `full`, per doubling | |"):
    assert text in report
  assert (out / "fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert json.loads((out / "results.json").read_text())["teacher"]["path"] == teacher["path"]


# ------------------------------------------------------------------------------------------------ resuming safely

def _tiny_cfg(tiny_teacher, data_cache=None, test_data=None):
  cfg = fidelity_config.get_config(f"tiny:{tiny_teacher}")
  if data_cache is not None:
    cfg.cache_dir, cfg.corpus_dir = str(data_cache), str(test_data / "corpus")
  return cfg


def test_every_student_holds_out_the_documents_the_study_scores(tiny_teacher, tmp_path, monkeypatch):
  """The held-out split is drawn by data.split_seed, not by the run's seed: the students of every seed, the
  teacher and the in-domain scoring tokenize with the same split, so no student trains on a scored document."""
  splits = []
  monkeypatch.setattr(fidelity.data, "prepare_tokenized", lambda *a, **kw: splits.append(kw) or tmp_path)
  cfg = _tiny_cfg(tiny_teacher)
  base = fidelity._distill_base(cfg)
  students = [fidelity.variant_config(base, v, str(tiny_teacher), seed, tmp_path)
              for v in ("full", "no_cos") for seed in (0, 1, 2)]
  assert len({c.seed for c in students}) == 3
  for c in students:
    fidelity.train.prepare_data(c, str(tiny_teacher))
  fidelity.in_domain_split(cfg, str(tiny_teacher))
  teacher_run = cfg.teacher_recipe.copy_and_resolve_references()
  fidelity.train.prepare_data(teacher_run, str(tiny_teacher))
  keys = ("seed", "held_out_fraction", "min_len", "max_len")
  assert len(splits) == len(students) + 2 and {tuple(kw[k] for k in keys) for kw in splits} == {(56, 0.05, 12, 64)}
  teacher_cpu = fidelity_config._teacher_recipe("cpu")
  assert (teacher_cpu.data.split_seed, teacher_cpu.data.held_out_fraction) == (56, 0.05)


def test_a_student_begun_with_other_settings_is_refused_before_anything_runs(tiny_teacher, tmp_path, monkeypatch):
  runs = []
  monkeypatch.setattr(fidelity.train, "run", lambda c, w: runs.append(w) or {"preempted": True})
  cfg = _tiny_cfg(tiny_teacher)
  out = tmp_path / "study"
  with pytest.raises(KeyboardInterrupt):  # the first student starts (and is "preempted"): its settings are kept
    fidelity.run_study(cfg, out, teacher=str(tiny_teacher), stages=("students",))
  assert runs == [out / "students" / "full" / "seed0"]
  cfg.distill.train.steps = 8
  with pytest.raises(fidelity.ConfigError, match=r"students/full/seed0 was made with other settings \("
                                                 r"train.steps: 4 then, 8 now\).*move .* away"):
    fidelity.run_study(cfg, out, teacher=str(tiny_teacher), stages=("students",))
  assert len(runs) == 1
  cfg.distill.train.steps = 4
  cfg.cache_dir = str(tmp_path / "elsewhere")  # a place, not a setting: the run resumes
  with pytest.raises(KeyboardInterrupt):
    fidelity.run_study(cfg, out, teacher=str(tiny_teacher), stages=("students",))
  assert len(runs) == 2
  with pytest.raises(fidelity.ConfigError, match="moby"):
    fidelity.check_settings({"eval.max_batches": 2}, {"eval.max_batches": 3}, pathlib.Path("moby"))
  fidelity.check_settings({"a": 1}, {"a": 1, "b": None}, tmp_path)  # a setting a later version added: no change
  old = out / "students" / "no_cos" / "seed0"  # a student made before the study kept settings
  (old / "checkpoints").mkdir(parents=True)
  with pytest.raises(fidelity.ConfigError, match="no_cos/seed0 was made before the study kept each run's settings"):
    fidelity.run_study(cfg, out, teacher=str(tiny_teacher), stages=("students",))


def test_derived_results_are_made_again_for_a_remade_student_or_other_scoring(tiny_teacher, tmp_path, monkeypatch):
  """Scores, timings and fine-tuning runs are cheap and derived: one made from a student since remade (other
  settings) or under other scoring settings is made again, never reported for the new student."""
  cfg = _tiny_cfg(tiny_teacher)
  cfg.variants, cfg.seeds = ("full",), (0,)
  out = tmp_path / "study"
  student = fidelity.student_workdir(out, "full", 0)
  (student / "final").mkdir(parents=True)
  fidelity._write_json(student / fidelity.SETTINGS_FILE, {"train.steps": 4})
  stamp = fidelity.model_stamp(student / "final")
  assert fidelity.model_stamp(tiny_teacher) == "teacher" and len(stamp) == 16
  scored = {**fidelity.mlm_settings(cfg), "model": stamp}
  fidelity._write_json(out / "mlm" / "full_seed0.json", {"in_domain": {}, "settings": scored})
  fidelity._write_json(out / "mlm" / "teacher.json", {"in_domain": {}, "settings": {**scored, "model": "teacher"}})
  assert sorted(fidelity.mlm_stage(cfg, out, str(tiny_teacher), run_missing=False)) == ["full/seed0", "teacher"]
  fidelity._write_json(student / fidelity.SETTINGS_FILE, {"train.steps": 8})  # the student remade
  assert fidelity.model_stamp(student / "final") != stamp
  assert sorted(fidelity.mlm_stage(cfg, out, str(tiny_teacher), run_missing=False)) == ["teacher"]
  cfg.eval.max_batches = 3  # other scoring: every score is made again
  assert fidelity.mlm_stage(cfg, out, str(tiny_teacher), run_missing=False) == {}
  fidelity._write_json(out / "speed.json", {"settings": {"eval.speed_seq_len": 512}, "student": {"x": 1.0}})
  assert "student" not in fidelity.speed_stage(cfg, out, str(tiny_teacher), run_missing=False)

  tuned = out / "finetune" / "full_seed0" / "imdb_seed0"  # fine-tuned from the student before it was remade
  config = fidelity._finetune_config(cfg, str(student / "final"), "imdb", 0, export=False)
  fidelity._write_json(tuned / fidelity.SETTINGS_FILE, {**fidelity.settings_of(config), "model": stamp,
                                                        "teacher_model": ""})
  fidelity._write_json(tuned / "study.json", {"model": "full/seed0", "domain": "imdb", "seed": 0, "accuracy": 0.9})
  assert fidelity._finetune_one(cfg, out, "full/seed0", str(student / "final"), "imdb", 0, run_missing=False) is None
  runs = []
  monkeypatch.setattr(fidelity.finetune, "run", lambda c, w: runs.append(w) or {
      "eval": {"accuracy": 0.7}, "majority_baseline": {"accuracy": 0.5}})
  # A student still saving (weights, no config yet), as another stage's process may see it: not read.
  (student / "final" / fidelity.checkpoint.PARAMS_DIR).mkdir()
  assert not fidelity.ready(student / "final") and fidelity.ready(tiny_teacher)
  assert fidelity._finetune_one(cfg, out, "full/seed0", str(student / "final"), "imdb", 0) is None and not runs
  (student / "final" / fidelity.checkpoint.CONFIG_FILE).write_text("{}")
  row = fidelity._finetune_one(cfg, out, "full/seed0", str(student / "final"), "imdb", 0)
  assert row["accuracy"] == 0.7 and runs == [tuned] and (tuned.parent / "imdb_seed0.stale" / "study.json").is_file()


def test_the_teacher_is_checked_and_one_study_keeps_one_teacher(tiny_teacher, tmp_path):
  cfg = _tiny_cfg(tiny_teacher)
  out = tmp_path / "study"
  for bad, message in ((tmp_path / "none", "no such folder"), (tmp_path, "not a model folder")):
    with pytest.raises(fidelity.ConfigError, match=message):
      fidelity.teacher_stage(cfg, out, str(bad))
    assert not (out / "teacher.json").exists()
  run_dir = tmp_path / "run"
  (run_dir / "checkpoints").mkdir(parents=True)
  with pytest.raises(fidelity.ConfigError, match="training workdir: give .*/run/final once its run has ended"):
    fidelity.teacher_stage(cfg, out, str(run_dir))
  info = fidelity.teacher_stage(cfg, out, str(tiny_teacher))
  assert info["path"] == str(tiny_teacher) and fidelity.teacher_stage(cfg, out, "") == info
  other = tmp_path / "other_teacher"
  fidelity.shutil.copytree(tiny_teacher, other)
  with pytest.raises(fidelity.ConfigError, match=f"made with the teacher {tiny_teacher}, not {other}"):
    fidelity.teacher_stage(cfg, out, str(other))


def test_a_failing_run_is_recorded_and_the_study_goes_on(tiny_teacher, tmp_path, monkeypatch):
  attempts = []

  def run(config, workdir):
    attempts.append(workdir.parent.name)
    if workdir.parent.name == "no_cos":
      raise fidelity.trainer.NonFiniteLossError("the loss is nan at step 3")
    return {"step": config.train.steps, "student_heldout_mlm_accuracy": 0.5}

  monkeypatch.setattr(fidelity.train, "run", run)
  cfg = _tiny_cfg(tiny_teacher)
  cfg.variants = ("full", "no_cos", "no_mlm")
  cfg.seeds = (0,)
  out = tmp_path / "study"
  results = fidelity.students_stage(cfg, out, str(tiny_teacher))
  assert attempts == ["full", "no_cos", "no_mlm"] and sorted(results) == ["full/seed0", "no_mlm/seed0"]
  assert [(f["run"], f["error"]) for f in fidelity.failures(out)] == [
      ("student no_cos seed 0", "NonFiniteLossError: the loss is nan at step 3")]
  fidelity.students_stage(cfg, out, str(tiny_teacher))
  assert len(attempts) == 3  # the same settings fail the same way: not tried again
  cfg.distill.loss.temperature = 1.0  # another recipe: the finished runs are refused ...
  with pytest.raises(fidelity.ConfigError, match="full/seed0 was made with other settings"):
    fidelity.students_stage(cfg, out, str(tiny_teacher))
  for variant in ("full", "no_mlm"):
    (out / "students" / variant / "seed0").rename(tmp_path / variant)
  fidelity.students_stage(cfg, out, str(tiny_teacher))  # ... and the failed one is moved aside and made again
  assert attempts[3:] == ["full", "no_cos", "no_mlm"]
  assert [f["settings"]["loss.temperature"] for f in fidelity.failures(out)] == [1.0]  # failed again, once listed
  assert (out / "students" / "no_cos" / "seed0.failed" / "failed.json").is_file()
  link = out / "students" / "full" / "seed0" / "teacher" / "final"
  assert link.resolve() == tiny_teacher.resolve()
  moved = tmp_path / "moved_teacher"
  fidelity.shutil.copytree(tiny_teacher, moved)
  link.unlink()
  link.symlink_to(tmp_path / "gone", target_is_directory=True)  # a teacher moved away since
  fidelity._link_teacher(link.parents[1], str(moved))
  assert link.resolve() == moved.resolve()


def test_a_refused_run_is_tried_again_on_the_next_run_of_the_study(tiny_teacher, tmp_path, monkeypatch):
  attempts = []

  def run(config, workdir):
    attempts.append(workdir)
    if len(attempts) == 1:
      raise fidelity.ConfigError("--config.data.corpus_dir /mnt/gone: no such folder")
    return {"step": config.train.steps, "student_heldout_mlm_accuracy": 0.5}

  monkeypatch.setattr(fidelity.train, "run", run)
  cfg = _tiny_cfg(tiny_teacher)
  cfg.variants, cfg.seeds = ("full",), (0,)
  out = tmp_path / "study"
  assert fidelity.students_stage(cfg, out, str(tiny_teacher)) == {}
  assert fidelity.failures(out)[0]["error"].startswith("ConfigError: --config.data.corpus_dir")
  workdir = out / "students" / "full" / "seed0"
  (workdir / "checkpoints").mkdir()  # it had run part of the way before the refusal
  cfg.distill.train.steps = 8  # and the study's budget changed since: its checkpoints belong to the old one
  with pytest.raises(fidelity.ConfigError, match=r"full/seed0 was made with other settings \(train.steps: 4"):
    fidelity.students_stage(cfg, out, str(tiny_teacher))
  cfg.distill.train.steps = 4
  assert list(fidelity.students_stage(cfg, out, str(tiny_teacher))) == ["full/seed0"]  # mended: made now
  assert len(attempts) == 2 and not fidelity.failures(out)
  # A failed.json from before failures said whether they diverged: its error tells.
  other = out / "students" / "no_cos" / "seed0"
  cfg.variants = ("no_cos",)
  settings = fidelity.settings_of(fidelity.variant_config(fidelity._distill_base(cfg), "no_cos", str(tiny_teacher),
                                                          0, out))
  fidelity._write_json(other / fidelity.FAILED_FILE, {"run": "x", "error": "NonFiniteLossError: nan at step 2",
                                                      "settings": settings})
  assert fidelity.students_stage(cfg, out, str(tiny_teacher)) == {} and len(attempts) == 2


def test_seeds_pair_with_the_teachers_fine_tuning_seeds_and_partial_seeds_wait(tiny_teacher):
  cfg = _tiny_cfg(tiny_teacher)
  cfg.seeds = (0, 1, 5)
  with pytest.raises(fidelity.ConfigError, match=r"seeds \(0, 1, 5\).*teacher_seeds is \(0, 1\)"):
    fidelity.check_variants(cfg)
  rows = [{"model": "full/seed0", "seed": 0, "domain": d, "accuracy": a} for d, a in (("imdb", 0.8), ("yelp", 0.6))]
  rows.append({"model": "full/seed1", "seed": 1, "domain": "imdb", "accuracy": 0.9})  # yelp not yet run
  assert fidelity.finetune_values(rows, "full", ("imdb", "yelp")) == [pytest.approx(0.7)]
  assert fidelity.finetune_values(rows, "full", ("imdb",)) == [0.8, 0.9]
  assert fidelity.finetune_values(rows, "full", ("imdb", "yelp", "amazon")) == []  # no seed has all three


def test_budget_rows_share_of_the_teacher_per_doubling_of_the_steps():
  cfg = fidelity_config.get_config("tiny:/nowhere")  # the study's budget: 4 steps
  cfg.variants = ("full", "mlm_only", "full:16", "full:64", "mlm_only:8")

  def entry(uniform, rare):
    return {c: {"uniform_mlm_accuracy": uniform, "mlm_accuracy": rare} for c in ("in_domain", "out_of_domain")}

  mlm = {"teacher": entry(0.40, 0.20), "full/seed0": entry(0.30, 0.19), "full/seed1": entry(0.32, 0.19),
         "full:16/seed0": entry(0.34, 0.20), "full:64/seed0": entry(0.36, 0.21), "mlm_only/seed0": entry(0.2, 0.2)}
  rows = fidelity.budget_rows(cfg, mlm)
  assert list(rows) == ["full"]  # mlm_only:8 has no scores yet: one point is no trend
  steps, shares = zip(*rows["full"])
  assert steps == (4, 16, 64)
  assert [s["in-domain, uniform"] for s in shares] == pytest.approx([0.775, 0.85, 0.90])  # 0.31, 0.34, 0.36 of 0.40
  assert [s["in-domain, rare-token"] for s in shares] == pytest.approx([0.95, 1.0, 1.05])
  # uniform: 0.775 -> 0.90 over 4 doublings, +3.125 points each; 0.97 is 2.24 doublings past 64 steps
  gain, at, measured = fidelity.steps_to_target([(4, 0.775), (64, 0.90)])
  assert gain == pytest.approx(0.03125) and at == pytest.approx(64 * 2 ** (0.07 / 0.03125)) and not measured
  assert fidelity.steps_to_target([(4, 0.95), (16, 1.0), (64, 1.05)]) == (pytest.approx(0.025), 16.0, True)
  assert fidelity.steps_to_target([(4, 0.9), (64, 0.85)])[1:] == (None, False)  # falling: never
  assert fidelity.steps_to_target([(4, 0.98), (64, 0.96)])[1:] == (4.0, True)  # met at 4 steps, then fell below
  lines = "\n".join(fidelity._budget_lines(cfg, mlm))
  assert "| `full` | 16 | 85.0% | 100.0% |" in lines
  assert "| `full`, per doubling | | +3.1 points | +2.5 points |" in lines
  assert ("| `full`, 97% at | | ~300 steps (extrapolated) | met at 16 steps | ~300 steps (extrapolated) | "
          "met at 16 steps |") in lines


def test_paired_differences_compare_two_models_on_the_same_held_out_sentences():
  # A seed draws the held-out sentences: teacher and student of one seed are scored on the same ones. Here the
  # seeds' sentences differ in difficulty (0.80 vs 0.90) and the student is always 2 points behind: unpaired,
  # both spreads are 7 points; paired, the difference is exactly -2 with no spread.
  rows = [{"model": m, "seed": s, "domain": "imdb", "accuracy": a}
          for m, s, a in [("teacher", 0, 0.80), ("teacher", 1, 0.90), ("teacher", 2, 0.85),
                          ("full/seed0", 0, 0.78), ("full/seed1", 1, 0.88)]]  # seed 2 of the student: not yet
  assert fidelity.paired_differences(rows, "full", "teacher", ("imdb",)) == [pytest.approx(-0.02)] * 2
  assert fidelity.mean_sd(fidelity.finetune_values(rows, "full", ("imdb",)))[1] == pytest.approx(0.0707, abs=1e-4)
  assert fidelity._pct(fidelity.paired_differences(rows, "full", "teacher", ("imdb",)), "+") == "-2.00 ± 0.00"
  assert fidelity._pct([0.3912]) == "39.12 (1 seed)" and fidelity._pct([]) == "—"
  assert fidelity.paired_differences(rows, "full", "mlm_only", ("imdb",)) == []


def test_layer_table_compares_each_recipe_with_the_triple_loss_of_its_shape_seed_by_seed():
  """Issue 14's table: each layer-loss row minus the triple-loss student of the same shape and seed, in
  masked-LM and fine-tuned accuracy; a narrow row is compared with the narrow triple loss, not the wide one."""
  cfg = fidelity_config.get_config("tiny:/nowhere")
  cfg.variants = ("full", "tinybert", "full@1x32", "minilmv2@1x32")
  cfg.seeds = (0, 1)
  cfg.finetune.domains = ("imdb",)

  def entry(acc, params):
    return {"parameters": params, **{c: {"mlm_accuracy": acc, "uniform_mlm_accuracy": acc} for c in
                                      ("in_domain", "out_of_domain")}}

  figures = {"full": (0.30, 0.32, 100e6), "tinybert": (0.31, 0.34, 100e6), "full@1x32": (0.20, 0.26, 50e6),
             "minilmv2@1x32": (0.25, 0.27, 50e6)}  # seed 0, seed 1, parameters
  mlm = {f"{name}/seed{seed}": entry(acc[seed], acc[2]) for name, acc in figures.items() for seed in (0, 1)}
  assert fidelity.mlm_by_seed(mlm, "full", "in_domain", "uniform_mlm_accuracy") == {0: 0.30, 1: 0.32}
  assert fidelity.mlm_paired_differences(mlm, "tinybert", "full", "in_domain", "uniform_mlm_accuracy") == [
      pytest.approx(0.01), pytest.approx(0.02)]
  rows = [{"model": f"{name}/seed{seed}", "seed": seed, "domain": "imdb", "accuracy": acc[seed] + 0.5}
          for name, acc in figures.items() for seed in (0, 1)]
  lines = fidelity._layer_lines(cfg, {"mlm": mlm, "finetune": rows, "speed": {}})
  by_row = {line.split(" | ")[0]: line.split(" | ") for line in lines if line.startswith("| `")}
  assert by_row["| `full`"][6] == "—" and by_row["| `full@1x32`"][8] == "—"  # the reference of its shape
  assert by_row["| `tinybert`"][6] == "+1.50 ± 0.71" and by_row["| `tinybert`"][8] == "+1.50 ± 0.71"
  assert by_row["| `minilmv2@1x32`"][6] == "+3.00 ± 2.83"  # against full@1x32 (+5, +1), not against full
  assert by_row["| `minilmv2@1x32`"][2] == "50.0M" and by_row["| `tinybert`"][3] == "32.50 ± 2.12"


def test_ablation_table_gives_each_row_against_the_triple_loss_seed_by_seed_beside_the_paper():
  cfg = fidelity_config.get_config("tiny:/nowhere")
  cfg.variants = ("full", "no_cos", "mlm_only", "uniform")
  cfg.finetune.domains = ("imdb",)

  def entry(acc):
    return {c: {"mlm_accuracy": acc / 2, "uniform_mlm_accuracy": acc} for c in ("in_domain", "out_of_domain")}

  figures = {"full": (0.30, 0.32), "no_cos": (0.29, 0.33), "mlm_only": (0.20, 0.21), "uniform": (0.4, 0.4)}
  mlm = {f"{name}/seed{seed}": entry(acc[seed]) for name, acc in figures.items() for seed in (0, 1)}
  rows = [{"model": f"{name}/seed{seed}", "seed": seed, "domain": "imdb", "accuracy": 0.8 + acc[seed]}
          for name, acc in figures.items() for seed in (0, 1)]
  lines = fidelity._ablation_lines(cfg, {"mlm": mlm, "finetune": rows})
  by_row = {line.split(" | ")[0]: line.split(" | ") for line in lines if line.startswith("| `")}
  assert list(by_row) == ["| `no_cos`", "| `mlm_only`"]  # the paper's rows only; `full` is the reference
  assert by_row["| `no_cos`"][2] == "+0.00 ± 1.41"  # (-1, +1): nothing, with its spread
  assert by_row["| `no_cos`"][3] == "+0.00 ± 0.71"  # rare-token column: half the figures
  assert by_row["| `mlm_only`"][2] == "-10.50 ± 0.71" and by_row["| `mlm_only`"][6] == "-10.50 ± 0.71"
  assert by_row["| `no_cos`"][7] == "-1.46 |" and by_row["| `mlm_only`"][7] == "— |"
  cfg.variants = ("full", "uniform")
  assert fidelity._ablation_lines(cfg, {"mlm": mlm, "finetune": rows}) == []  # no ablation row, no section


def test_two_processes_may_not_run_the_same_stage_of_one_study(tiny_teacher, tmp_path, monkeypatch):
  cfg = _tiny_cfg(tiny_teacher)
  out = tmp_path / "study"
  out.mkdir()
  holder = subprocess.Popen(  # another process in the middle of the students stage
      [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
       "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(out / ".lock-students")],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    ran = []
    for name in ("students_stage", "mlm_stage", "speed_stage", "finetune_stage"):
      monkeypatch.setattr(fidelity, name, lambda *a, run_missing, _n=name: ran.append((_n, run_missing)) or {})
    with pytest.raises(fidelity.ConfigError, match="another process is running the 'students' stage"):
      fidelity.run_study(cfg, out, teacher=str(tiny_teacher), stages=("students", "mlm"))
    ran.clear()
    fidelity.run_study(cfg, out, teacher=str(tiny_teacher), stages=("mlm",))  # another stage goes on beside it
    assert ran == [("students_stage", False), ("mlm_stage", True), ("speed_stage", False), ("finetune_stage", False)]
  finally:
    holder.kill()
    holder.wait()
  fidelity.run_study(cfg, out, teacher=str(tiny_teacher), stages=("students",))  # the lock went with its holder


def test_plot_of_a_given_teacher_leaves_out_the_empty_curve_panel_and_shows_every_bar(tmp_path, monkeypatch):
  """A study of a given teacher has no teacher curve: the plot has two panels, not an empty third, and the
  masked-LM panel's height fits the tallest share (a student above its teacher under rare-token masking)."""
  import matplotlib.axes
  cfg = fidelity_config.get_config("tiny:/nowhere")
  cfg.variants = ("full",)
  scores = {"in_domain": {"uniform_mlm_accuracy": 0.2, "mlm_accuracy": 0.05},
            "out_of_domain": {"uniform_mlm_accuracy": 0.2, "mlm_accuracy": 0.05}}
  student = {c: {k: v * (3.0 if k == "mlm_accuracy" else 0.9) for k, v in s.items()} for c, s in scores.items()}
  results = {"teacher": {"path": "/given"}, "mlm": {"teacher": scores, "full/seed0": student}, "finetune": []}
  share_limits, original_set = [], matplotlib.axes.Axes.set

  def recording_set(self, **kw):
    if kw.get("ylabel") == "% of the teacher":
      share_limits.append(kw["ylim"])
    return original_set(self, **kw)

  monkeypatch.setattr(matplotlib.axes.Axes, "set", recording_set)

  def width_px(curve):
    results["teacher"]["curve"] = curve
    path = tmp_path / f"plot{len(curve)}.png"
    fidelity.plot(cfg, results, path)
    return int.from_bytes(path.read_bytes()[16:20], "big")  # the PNG header's width

  given = width_px([])
  trained = width_px([{"step": 2, "accuracy": 0.1}, {"step": 4, "accuracy": 0.2}])
  assert given < trained  # two panels against three
  assert share_limits[0][1] > 300  # the student keeps 300% of the rare-token accuracy: its bar is not cut off
