"""Tiny config for tests and smoke runs: a random 2-layer teacher distilled into a 1-layer student.

  python -m distilbert_jax.train --config configs/tiny.py:TEACHER_DIR --workdir /tmp/tiny

TEACHER_DIR is a model folder (Hugging Face or tools/convert.py hf2jax) whose tokenizer has the
bert-base-uncased vocabulary; the tests build one. Runs in well under a minute on 2 CPU cores.
"""
from distilbert_jax.train import default_config


def get_config(teacher: str = ""):
  c = default_config()
  c.seed = 0
  c.teacher = teacher
  c.student.layers = (0,)
  c.data.demo_corpus = True
  c.data.max_len = 64
  c.data.batch_size = 8
  c.data.held_out_fraction = 0.1
  c.data.eval_batches = 2
  c.train.steps = 6
  c.train.log_every = 2
  c.train.ckpt_every = 3
  c.train.progress = False
  return c
