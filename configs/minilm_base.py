"""bert-base-uncased -> a MiniLM-L6-H384-shaped student through layer losses, on a Cloud TPU VM.

  python -m distilbert_jax.train --config configs/minilm_base.py --workdir gs://BUCKET/minilm     # MiniLMv2
  python -m distilbert_jax.train --config configs/minilm_base.py:tinybert --workdir gs://BUCKET/tinybert
  python -m distilbert_jax.aot --config configs/minilm_base.py --topology v5e-8    # compile and memory, no TPU

The student has 6 layers of width 384, 12 heads (head size 32) and a 1,536-wide feed-forward (22.7M
parameters with its masked-LM head, MiniLM-L6-H384's shape), initialised randomly as MiniLM's was
(`--config.student.init=teacher` selects the teacher's leading weights instead: student.select_weights);
the widths differ, so L_cos is off. Recipes (the argument):

- "minilmv2" (default): MiniLMv2's query-query, key-key and value-value relations over 12 relation heads,
  from the teacher's last layer to the student's last (the paper's choice for base-size teachers), beside
  L_ce and L_mlm.
- "tinybert": TinyBERT's hidden-state and embedding MSE through learned 384 -> 768 projections (trained with
  the student, never exported) and the attention-distribution KL per head, uniform layer map (student layer
  m -> teacher layer 2m).

Data, mesh and optimiser as configs/distilbert_base.py (Wikipedia + BookCorpus through `datasets`, 256 x 512
tokens per step x 8 accumulation steps, bf16 compute, all chips on fsdp); the learning rate is MiniLM's
(a randomly initialised student takes a larger one than a copied DistilBERT: 1e-3 is within the paper's
range for small students, not tuned here). BENCHMARKS.md has its compile and memory on v5e-8.
"""
from distilbert_jax import trainer

RECIPES = {
    "minilmv2": dict(alpha_relations=1.0, relation_heads=12, layer_map=((6, 12),)),
    "tinybert": dict(alpha_hidden=1.0, alpha_embedding=1.0, alpha_attention=1.0),
}


def get_config(recipe: str = "minilmv2"):
  if recipe not in RECIPES:
    raise ValueError(f"recipe {recipe!r}: use one of {sorted(RECIPES)}")
  c = trainer.sibling_config(__file__, "distilbert_base.py")
  c.student.init = "random"
  c.student.layers = ()
  c.student.overrides.update(num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536)
  c.loss.alpha_cos = 0.0
  c.optim.lr = 1e-3
  c.layer_loss.update(RECIPES[recipe])
  return c
