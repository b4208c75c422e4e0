"""Fine-tuning on a GLUE task or a local file (BERT's recipe: AdamW 5e-5, warmup 10%, 3 epochs, batch 32).

  python -m distilbert_jax.finetune --config configs/finetune.py:sst2 --workdir runs/sst2 \
      --config.model=runs/demo/final

The argument after ':' is the task: a GLUE name (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli; read
through `datasets` from `nyu-mll/glue`), a .csv/.tsv/.json/.jsonl file (then --config.text_fields and
--config.label_field name its columns), or sentiment:imdb|amazon|yelp (offline sentences). `--config.model`
is a JAX model folder, a training workdir or a Hugging Face folder / hub name (e.g. bert-base-uncased).
"""
from distilbert_jax.finetune import default_config


def get_config(task: str = ""):
  c = default_config()
  c.task = task
  return c
