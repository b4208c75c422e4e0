"""The DistilBERT paper's loss ablations, reproduced at the demo's scale with one budget for all.

  python tools/ablation.py --config configs/demo.py --out runs/ablation [--config.key=value ...] \
      [--finetune_steps 56] [--teacher runs/demo/teacher/final] [--sentiment_dir DIR]

Every variant distils the same student (same data, steps, batch, seed and adapted teacher) from the config
(`configs/demo.py`: MiniLM-L6 teacher -> 3-layer student, 160 steps of 32 x 128), changing one thing:

  full         α_ce·L_ce + α_mlm·L_mlm + α_cos·L_cos, student initialised from teacher layers
  no_ce        without L_ce (α_ce = 0)
  no_cos       without L_cos (α_cos = 0)
  no_mlm       without L_mlm (α_mlm = 0)
  random_init  the full loss, student initialised randomly
  mlm_only     the same-size student, random init, trained by masked-LM alone (no teacher at all)

Then each student is fine-tuned on the IMDb sentiment sentences (900 train / 100 held out) with the same
budget, and the report compares held-out masked-LM accuracy and sentiment accuracy against the full loss,
next to the paper's GLUE macro-score changes (Sanh et al. 2019, Table 4). Writes OUT/REPORT.md,
OUT/ablation.png (training L_mlm and held-out accuracy over steps) and OUT/results.json. Finished variants
are found and reused, so an interrupted report resumes where it stopped.
"""
from __future__ import annotations

import json
import logging
import pathlib
import sys
import time

import ml_collections

from distilbert_jax import checkpoint, finetune, train

# The paper's GLUE macro-score change against the full loss with teacher init (Table 4); None: not in the paper.
PAPER_GLUE_DELTA = {"full": 0.0, "no_ce": -2.96, "no_cos": -1.46, "no_mlm": -0.31, "random_init": -3.69,
                    "mlm_only": None}
DESCRIPTIONS = {
    "full": "triple loss, teacher init",
    "no_ce": "without L_ce",
    "no_cos": "without L_cos",
    "no_mlm": "without L_mlm",
    "random_init": "triple loss, random init",
    "mlm_only": "masked-LM alone, random init, no teacher",
}
VARIANTS = tuple(PAPER_GLUE_DELTA)


def variant_config(base: ml_collections.ConfigDict, name: str, teacher: str, workdir: pathlib.Path
                   ) -> ml_collections.ConfigDict:
  """The distillation config of one variant: `base` with the teacher already adapted and one change.

  `base.data.tokenizer` must be set (the teacher's), so that every variant reads the same tokenized data.
  """
  c = base.copy_and_resolve_references()
  c.teacher = teacher
  c.teacher_mlm.steps = 0
  if name == "no_ce":
    c.loss.alpha_ce = 0.0
  elif name == "no_cos":
    c.loss.alpha_cos = 0.0
  elif name == "no_mlm":
    c.loss.alpha_mlm = 0.0
  elif name == "random_init":
    c.student.init = "random"
  elif name == "mlm_only":
    # The random_init student's architecture and initial weights, trained with no teacher in the loss.
    init = workdir / "mlm_only_init"
    if not checkpoint.is_model_dir(init):
      r = variant_config(base, "random_init", teacher, workdir)
      _, _, student, params = train.build_models(r)
      checkpoint.save_model(init, student, params)
    c.teacher = ""
    c.student.init = str(init)
  elif name != "full":
    raise ValueError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
  return c


def finetune_config(model: pathlib.Path, steps: int, sentiment_dir: str, cache_dir: str, seed: int
                    ) -> ml_collections.ConfigDict:
  c = finetune.default_config()
  c.model = str(model)
  c.task = "sentiment:imdb"
  c.sentiment_dir = sentiment_dir
  c.cache_dir = cache_dir
  c.seed = seed
  c.max_len = 64
  c.optim.lr = 1e-4
  c.train.steps = steps
  c.train.progress = False
  c.train.export = True
  return c


def read_curves(workdir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {key: [(r["step"], r[key]) for r in rows if key in r] for key in ("mlm", "heldout_mlm_accuracy")}


def run_variant(name: str, base, teacher: str, out: pathlib.Path, finetune_steps: int, sentiment_dir: str
                ) -> dict:
  done = out / name / "result.json"
  if done.is_file():
    return json.loads(done.read_text())
  workdir = out / name
  t0 = time.time()
  print(f"[{name}] distilling ({DESCRIPTIONS[name]})", flush=True)
  summary = train.run(variant_config(base, name, teacher, out), workdir / "distill")
  print(f"[{name}] fine-tuning on IMDb sentences", flush=True)
  ft = finetune.run(finetune_config(workdir / "distill" / "final", finetune_steps, sentiment_dir,
                                    base.data.cache_dir, base.seed), workdir / "sentiment")
  result = {"variant": name, "heldout_mlm_accuracy": summary["student_heldout_mlm_accuracy"],
            "teacher_heldout_mlm_accuracy": summary.get("teacher_heldout_mlm_accuracy"),
            "sentiment_accuracy": ft["eval"]["accuracy"], "sentiment_majority": ft["majority_baseline"]["accuracy"],
            "curves": read_curves(workdir / "distill"), "seconds": time.time() - t0}
  done.write_text(json.dumps(result, indent=2) + "\n")
  return result


def _delta(value: float, ref: float) -> str:
  return "—" if value is ref else f"{100 * (value - ref):+.2f}"


def write_report(results: dict[str, dict], base, out: pathlib.Path, command: str, finetune_steps: int) -> str:
  full = results["full"]
  lines = [
      "# Ablation report: the DistilBERT loss terms at demo scale", "",
      f"Command: `{command}`", "",
      f"Budget for every variant: {base.train.steps} distillation steps of {base.data.batch_size} × "
      f"{base.data.max_len} tokens on the demo corpus, then {finetune_steps} fine-tuning steps of 32 IMDb "
      "sentences (900 train, 100 held out; max length 64). Student: "
      f"{len(base.student.layers) or 'half the'} layers of the teacher's width. "
      f"Held-out masked-LM accuracy: {base.data.eval_batches} batches of held-out documents, the same masks "
      "for every model. Δ columns: change against the full loss, in percentage points. The paper's column is "
      "its GLUE macro-score change (Sanh et al. 2019, Table 4), a different measure on a far larger budget: "
      "compare directions, not sizes.", "",
      "| variant | | held-out MLM acc. | Δ | sentiment acc. | Δ | paper: GLUE Δ |",
      "|---|---|---:|---:|---:|---:|---:|"]
  for name in VARIANTS:
    r = results[name]
    paper = PAPER_GLUE_DELTA[name]
    paper_text = "—" if paper is None else ("0 (reference)" if name == "full" else f"{paper:+.2f}")
    lines.append(f"| `{name}` | {DESCRIPTIONS[name]} | {r['heldout_mlm_accuracy']:.2%} | "
                 f"{_delta(r['heldout_mlm_accuracy'], full['heldout_mlm_accuracy']) if name != 'full' else '—'} | "
                 f"{r['sentiment_accuracy']:.0%} | "
                 f"{_delta(r['sentiment_accuracy'], full['sentiment_accuracy']) if name != 'full' else '—'} | "
                 f"{paper_text} |")
  teacher_acc = full.get("teacher_heldout_mlm_accuracy")
  if teacher_acc is not None:
    lines += ["", f"Teacher (adapted MiniLM-L6) held-out MLM accuracy on the same masks: {teacher_acc:.2%}. "
              f"Majority class on the sentiment hold-out: {full['sentiment_majority']:.0%}."]
  lines += ["", "![training L_mlm and held-out accuracy over steps](ablation.png)", ""]
  text = "\n".join(lines)
  (out / "REPORT.md").write_text(text)
  return text


def plot(results: dict[str, dict], path: pathlib.Path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for name in VARIANTS:
    curves = results[name]["curves"]
    if curves["mlm"]:
      steps, values = zip(*curves["mlm"])
      ax_loss.plot(steps, values, label=name)
    if curves["heldout_mlm_accuracy"]:
      steps, values = zip(*curves["heldout_mlm_accuracy"])
      ax_acc.plot(steps, [100 * v for v in values], marker="o", label=name)
  ax_loss.set(title="training L_mlm (masked positions)", xlabel="step", ylabel="nats")
  ax_acc.set(title="held-out masked-LM accuracy", xlabel="step", ylabel="%")
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  from absl import app, flags
  from ml_collections import config_flags
  config_flag = config_flags.DEFINE_config_file("config", "configs/demo.py", "the distillation config",
                                                lock_config=True)
  out_flag = flags.DEFINE_string("out", "runs/ablation", "where the runs and the report go")
  teacher_flag = flags.DEFINE_string("teacher", "", "an already adapted teacher (e.g. runs/demo/teacher/final); "
                                                    "default: adapt it once in OUT/teacher")
  ft_steps_flag = flags.DEFINE_integer("finetune_steps", 56, "fine-tuning steps per student (28 = one epoch)")
  sentiment_flag = flags.DEFINE_string("sentiment_dir", "", "local folder with imdb.json (default: npm fetch)")
  variants_flag = flags.DEFINE_list("variants", list(VARIANTS), "variants to run")

  def _main(argv):
    del argv
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = pathlib.Path(out_flag.value).absolute()
    out.mkdir(parents=True, exist_ok=True)
    base = config_flag.value.copy_and_resolve_references()
    base.train.eval_every = base.train.eval_every or max(base.train.steps // 8, 1)
    base.train.progress = False
    teacher = teacher_flag.value
    if not teacher:
      teacher = train.adapt_teacher(base, out) if base.teacher_mlm.steps > 0 else base.teacher
      if teacher is None:
        print("stopped by a preemption signal while adapting the teacher; run again to resume", flush=True)
        return
    base.data.tokenizer = base.data.tokenizer or train.load_pretrained(teacher)[0].cfg.tokenizer
    results = {}
    for name in variants_flag.value:
      results[name] = run_variant(name, base, teacher, out, ft_steps_flag.value, sentiment_flag.value)
    if set(VARIANTS) <= set(results):
      command = "python tools/ablation.py " + " ".join(a for a in sys.argv[1:])
      (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
      plot(results, out / "ablation.png")
      print(write_report(results, base, out, command, ft_steps_flag.value))

  app.run(_main)


if __name__ == "__main__":
  main()
