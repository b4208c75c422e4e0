"""The offline demo's teacher and corpus (configs/demo.py), distilled into a narrower student through layer losses:

  python -m distilbert_jax.train --config configs/layers_demo.py:minilmv2 --workdir runs/minilmv2

The argument picks the recipe: "tinybert" (TinyBERT's hidden-state and embedding MSE through learned 192 -> 384
projections, and the attention KL per head, uniform layer map 1->2, 2->4, 3->6), "minilm" (MiniLM: the last
layer's attention-distribution KL and value relation, 3 -> 6), "minilmv2" (MiniLMv2: query-query, key-key,
value-value relations over 12 relation heads, 3 -> 6). Each keeps L_ce and L_mlm; L_cos is off (the widths
differ). Student: 3 layers, width 192, 12 heads (head size 16, as the head-by-head terms need the teacher's head
count), feed-forward 768, initialised randomly (`--config.student.init=teacher` selects the teacher's leading
weights from layers [0, 2, 4] instead: student.select_weights). Not yet measured (issue 14,
item 4); expect the demo's time or less per step (the student is a quarter of the demo student's size).
"""
from distilbert_jax import trainer

RECIPES = {
    "tinybert": dict(alpha_hidden=1.0, alpha_embedding=1.0, alpha_attention=1.0),
    "minilm": dict(alpha_attention=1.0, alpha_value_relation=1.0, layer_map=((3, 6),)),
    "minilmv2": dict(alpha_relations=1.0, relation_heads=12, layer_map=((3, 6),)),
}


def get_config(recipe: str = "minilmv2"):
  if recipe not in RECIPES:
    raise ValueError(f"recipe {recipe!r}: use one of {sorted(RECIPES)}")
  c = trainer.sibling_config(__file__, "demo.py")
  c.student.init = "random"
  c.student.overrides.update(num_layers=3, hidden_size=192, num_heads=12, intermediate_size=768)
  c.loss.alpha_cos = 0.0
  c.layer_loss.update(RECIPES[recipe])
  return c


