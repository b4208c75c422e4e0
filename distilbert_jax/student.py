"""Student initialisation from a teacher: model surgery on parameter trees (the reference's
`extract_distilbert.py`).

A BERT teacher gives a DistilBERT student (no token-type embeddings, no pooler); a RoBERTa or XLM/FlauBERT
teacher gives a student of its own family (DistilRoBERTa: RoBERTa with fewer layers, its one-row token-type
table kept; FlauBERT: its language embeddings kept), and no pooler. The student takes the teacher's
embeddings, the embedding LayerNorm, the chosen layers in order and, unless told otherwise, the masked-LM head
(transform, its LayerNorm and the output bias; the decoder is tied to the embeddings).

A narrower student (smaller hidden size, fewer heads, smaller head or feed-forward size) is initialised by
weight selection (Xu et al. 2023, "Initializing Models with Larger Ones"): every copied tensor keeps the first
entries along each axis the student has fewer of (`select_weights`) — the first heads, the first units of
each head, the first hidden and feed-forward units — so the student is the teacher's leading sub-network.
"""
from __future__ import annotations

from typing import Sequence

import jax

from distilbert_jax import model as model_lib

# The reference's choice for bert-base (12 layers) -> distilbert-base (6 layers).
REFERENCE_LAYERS_12 = (0, 2, 4, 7, 9, 11)


def default_layers(num_teacher_layers: int) -> tuple[int, ...]:
  """[0, 2, 4, 7, 9, 11] for a 12-layer teacher, else every other layer from the first ([0, 2, 4] for 6)."""
  if num_teacher_layers == 12:
    return REFERENCE_LAYERS_12
  return tuple(range(0, num_teacher_layers, 2))


def student_config(teacher_cfg: model_lib.EncoderConfig, num_layers: int) -> model_lib.EncoderConfig:
  if teacher_cfg.family == "bert":
    return teacher_cfg.replace(family="distilbert", num_layers=num_layers, type_vocab_size=0, use_pooler=False)
  return teacher_cfg.replace(num_layers=num_layers, use_pooler=False)


def check_layers(layers: Sequence[int], num_teacher_layers: int):
  """Raises ValueError unless `layers` are strictly increasing indices of existing teacher layers."""
  n = num_teacher_layers
  if not layers or any(not isinstance(i, int) or isinstance(i, bool) for i in layers):
    raise ValueError(f"layers must be a non-empty list of teacher layer indices, got {list(layers)}")
  bad = [i for i in layers if not 0 <= i < n]
  if bad:
    raise ValueError(f"layers {bad} do not exist in a {n}-layer teacher: choose indices in 0..{n - 1}")
  if any(b <= a for a, b in zip(layers, layers[1:])):
    raise ValueError(f"layers must be strictly increasing (each teacher layer copied once, in order), got "
                     f"{list(layers)}")


# The widths a student copied from its teacher may narrow (`select_weights`).
NARROWABLE = ("hidden_size", "num_heads", "intermediate_size")


def check_narrower(teacher_cfg: model_lib.EncoderConfig, student_cfg: model_lib.EncoderConfig):
  """Raises ValueError unless every width of the student is at most the teacher's (heads and head size too)."""
  wider = [f"{k} {getattr(student_cfg, k)} > {getattr(teacher_cfg, k)}" for k in (*NARROWABLE, "head_size")
           if getattr(student_cfg, k) > getattr(teacher_cfg, k)]
  if wider:
    raise ValueError(f"a student copied from its teacher can only be narrower, but {', '.join(wider)}")


def select_weights(params, shapes):
  """Each array of `params` cut to the shape of the same leaf of `shapes` (ShapeDtypeStructs or arrays): the
  first entries along every axis that is shorter there."""
  def cut(x, target):
    if x.ndim != len(target.shape) or any(t > n for t, n in zip(target.shape, x.shape)):
      raise ValueError(f"cannot select a {tuple(target.shape)} tensor from a {tuple(x.shape)} one")
    return x[tuple(slice(0, t) for t in target.shape)]
  return jax.tree.map(cut, params, shapes)


def student_from_teacher(teacher: model_lib.Encoder, teacher_params, layers: Sequence[int] | None = None,
                         *, copy_head: bool = True, seed: int = 0, widths: dict | None = None):
  """Returns (student, student_params) initialised from the teacher.

  `layers` lists the teacher layers copied into student layers 0, 1, ... (strictly increasing); by default
  `default_layers(teacher layers)`. With `copy_head=False` the MLM transform and LayerNorm are freshly
  initialised (the reference copies them only with `--vocab_transform`; the output bias is always copied).
  `widths`: narrower `NARROWABLE` sizes for the student, its tensors selected from the teacher's
  (`select_weights`).
  """
  n = teacher.cfg.num_layers
  layers = default_layers(n) if layers is None else tuple(layers)
  check_layers(layers, n)
  unknown = sorted(set(widths or {}) - set(NARROWABLE))
  if unknown:
    raise ValueError(f"widths {unknown} cannot be narrowed: only {', '.join(NARROWABLE)}")

  cfg = student_config(teacher.cfg, len(layers)).replace(**(widths or {}))
  check_narrower(teacher.cfg, cfg)
  student = model_lib.Encoder(cfg)
  fresh = model_lib.init_params(student, jax.random.key(seed))
  # Every embedding table the student has, which is the teacher's less BERT's token types.
  params = {
      "embeddings": {k: teacher_params["embeddings"][k] for k in fresh["embeddings"]},
      **{f"layer_{j}": teacher_params[f"layer_{i}"] for j, i in enumerate(layers)},
      "mlm_head": dict(teacher_params["mlm_head"]) if copy_head else
                  {**fresh["mlm_head"], "bias": teacher_params["mlm_head"]["bias"]},
  }
  params = select_weights(params, fresh)  # the identity at the teacher's widths
  # The student owns its arrays: copying makes donation of the student's buffers safe.
  return student, jax.tree.map(lambda x: jax.numpy.array(x, copy=True), params)
