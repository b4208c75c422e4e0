"""Distillation (and plain masked-LM) training: its config, its models, the pure train step and the run (the
state, the loop, checkpoints and the command line come from `trainer.py`).

  python -m distilbert_jax.train --config configs/demo.py --workdir runs/demo [--config.key=value ...]

With `config.teacher` set, the student learns from the teacher with the DistilBERT triple loss
(α_ce · L_ce + α_mlm · L_mlm + α_cos · L_cos [+ α_mse · L_mse]); without one, it trains by masked-LM alone
(to adapt or pretrain a teacher). The run resumes by itself from the newest checkpoint in the workdir.

One batch, from disk to the update: `data.make_batches` yields token ids of this process's rows →
`sharding.global_batch` makes global arrays split over the (data, fsdp) mesh axes → `train_step` masks them
(`masking.mask_tokens`, keyed by the step), runs the teacher (no gradient) and the student, computes the
losses (`losses.select_rows` + `losses.vocab_losses`, and L_cos) and applies AdamW (`trainer.apply_gradients`)
→ the new state stays on the devices, donated in place.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from distilbert_jax import (allocator, checkpoint, data, distributed, evaluate, losses, masking, metrics, sharding,
                            trainer, validation)
from distilbert_jax import model as model_lib
from distilbert_jax import student as student_lib

log = logging.getLogger("distilbert_jax.train")


# ------------------------------------------------------------------------------------------------ config

def default_config() -> ml_collections.ConfigDict:
  """Every setting of a run with the reference recipe's defaults; configs/*.py override what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 56
  # Teacher: a Hugging Face folder or hub name, or a JAX model folder (tools/convert.py hf2jax). Empty:
  # no teacher, plain masked-LM training of the student.
  c.teacher = ""
  # Masked-LM adaptation of the teacher before distilling (a teacher without a trained MLM head), in
  # WORKDIR/teacher, reused by later runs; masked as BERT was pretrained (uniformly, `smoothing` 0) on packed rows.
  c.teacher_mlm = ml_collections.ConfigDict(dict(steps=0, lr=2e-4, head_lr_scale=10.0, batch_size=0,
                                                 smoothing=0.0, strategy="pack"))

  c.student = ml_collections.ConfigDict()
  c.student.init = "teacher"  # "teacher" (copy layers), "random", or a model folder to start from
  c.student.layers = ()  # teacher layers copied; empty: student.default_layers (12 -> [0,2,4,7,9,11])
  c.student.copy_head = True
  # EncoderConfig fields of a randomly initialised student (e.g. num_layers); a teacher's config fills the rest.
  c.student.overrides = ml_collections.ConfigDict()

  # How the student computes (trainer.compute_config; a resume may change it). The teacher gets dtype and attention.
  c.compute = trainer.compute_config()

  c.data = ml_collections.ConfigDict()
  c.data.sources = ()  # text files/folders/globs, "hf:NAME[:CONFIG]", "tfds:NAME[:CONFIG]"
  c.data.demo_corpus = False  # State of the Union + Moby-Dick, fetched with npm (or read from corpus_dir)
  c.data.corpus_dir = ""  # a local copy of the demo corpus (tests/CI point this at the shared data)
  c.data.cache_dir = "~/.cache/distilbert_jax"
  c.data.tokenizer = ""  # default: the teacher's (or the student's) tokenizer
  c.data.text_field = "text"
  c.data.max_len = 128
  c.data.min_len = 12
  c.data.held_out_fraction = 0.05
  c.data.split_seed = 56  # draws the held-out documents, not `seed`: runs of any seed hold out the same ones
  c.data.strategy = "bucket"  # "pad", "bucket" or "pack"
  c.data.batch_size = 32  # global, over all processes
  c.data.eval_batches = 20  # held-out batches scored at the end (0: none)

  c.mlm = ml_collections.ConfigDict(dict(prob=0.15, scheme="distilbert", smoothing=0.7, word_mask=0.8,
                                         word_keep=0.1, word_rand=0.1))
  c.loss = ml_collections.ConfigDict(dict(alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, alpha_mse=0.0,
                                          temperature=2.0, restrict_ce_to_mask=False))
  # > 0: the vocabulary losses (losses.vocab_losses) take this many of the selected rows (all B·L of the
  # micro-batch, or the gathered masked ones with restrict_ce_to_mask; all devices together) at a time,
  # recomputing each chunk's logits in the backward pass. distilbert_base on a v5e-8 with 2048: peak 8.3 -> 4.2 GiB
  # per device for 14% more matmul FLOPs, so it is off (0) unless memory is what limits the batch.
  c.loss.chunk_size = 0
  # Layer losses beside the triple loss (losses.LayerLossConfig), each on when its weight is > 0 (with a teacher):
  # TinyBERT's hidden-state and embedding MSE (through learned projections), attention-distribution KL per head,
  # MiniLM's value relation, MiniLMv2's query/key/value relations over `relation_heads` heads (0: the teacher's).
  # `layer_map`: 1-based (student, teacher) layer pairs ((0, 0): embeddings); empty: TinyBERT's uniform map
  # m -> m·N/M; relation terms use the last pair (MiniLM: alpha_attention = alpha_value_relation = 1, ((M, N),)).
  # `projection`: "auto" (a learned D_s x D_t projection for the MSE terms when the widths differ), "always" or
  # "never" (the widths must agree); projections train with the student (in its state), never exported.
  c.layer_loss = ml_collections.ConfigDict(dict(
      alpha_hidden=0.0, alpha_embedding=0.0, alpha_attention=0.0, alpha_value_relation=0.0, alpha_relations=0.0,
      relation_heads=0, layer_map=(), projection="auto"))
  c.optim = ml_collections.ConfigDict(dict(lr=5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.0,
                                           warmup_frac=0.05, clip=5.0, grad_accum=1,
                                           head_lr_scale=1.0))
  c.train = ml_collections.ConfigDict(dict(steps=1000, log_every=10, ckpt_every=200, keep=3, async_checkpoint=True,
                                           allow_model_change=False, export=True, progress=True))
  # Dropout bits: "threefry" (JAX's default), "rbg" or "unsafe_rbg" (trainer.DROPOUT_RNGS; masking: threefry).
  c.train.dropout_rng = "threefry"
  # > 0: every this many steps, the student's held-out masked-LM accuracy and loss on data.eval_batches
  # batches (logged as heldout_mlm_accuracy / heldout_mlm_loss; a learning curve, at the cost of a pause).
  c.train.eval_every = 0
  # > 0: end the run (saved, evaluated, exported; a rerun trains no further) once that curve rose by less than
  # this many points over the last quarter of the steps so far (`PlateauStop`). Needs eval_every.
  c.train.stop_at_plateau = 0.0
  # At the end, with a teacher: score it beside the student on the held-out split (eval_teacher; the fidelity
  # study, whose students share one teacher, scores it once itself), and time both as deployed (encoder +
  # classification head, encoder + masked-LM head) at the speed_batches sizes (empty: not timed).
  c.train.eval_teacher = True
  c.train.speed_batches = ()
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), rules=dict(sharding.DEFAULT_RULES)))
  # Several processes (TPU pod slices, GPU hosts, CPU trials): see distributed.py; detected on Cloud TPU.
  c.distributed = distributed.default_config()
  return c


# A configuration that cannot run; raised before anything compiles (validation.py).
ConfigError = validation.ConfigError


# ------------------------------------------------------------------------------------------------ models

def model_configs(config, read_config=checkpoint.load_config
                  ) -> tuple[model_lib.EncoderConfig | None, model_lib.EncoderConfig]:
  """Step one of building a run's models: (teacher config or None, student config) from config files alone,
  no weights read (`aot` compiles from these; `jax.eval_shape` gives the parameters' shapes). `read_config`
  reads a model path's config (aot's also knows hub names offline)."""
  teacher_cfg = None
  if config.teacher:
    teacher_cfg = read_config(config.teacher).replace(dtype=config.compute.dtype, attention=config.compute.attention)
  return teacher_cfg, student_config(config, teacher_cfg, read_config)


def student_config(config, teacher_cfg: model_lib.EncoderConfig | None, read_config=checkpoint.load_config
                   ) -> model_lib.EncoderConfig:
  """The student's config for `config.student.init` ("teacher", "random" or a model path), with the run's
  compute options and `student.overrides`; refuses a pair the losses cannot compare."""
  init = config.student.init
  if init == "teacher":
    if teacher_cfg is None:
      raise ConfigError("student.init='teacher' needs config.teacher; for masked-LM training give "
                        "student.init a model folder or 'random'")
    base = student_lib.student_config(teacher_cfg, len(_student_layers(config, teacher_cfg)))
  elif init == "random":
    base = (student_lib.student_config(teacher_cfg, len(config.student.layers) or teacher_cfg.num_layers // 2)
            if teacher_cfg is not None else model_lib.EncoderConfig.distilbert())
  else:
    base = read_config(init)
  cfg = base.replace(**dict(config.compute), **dict(config.student.overrides))
  if init == "teacher":
    changed = [f"{k}={getattr(cfg, k)}" for k in _COPIED_SHAPE if getattr(cfg, k) != getattr(base, k)]
    if changed:
      raise ConfigError(f"student.init='teacher' copies the teacher's layers, which fixes the student's depth, "
                        f"vocabulary and positions, but student.overrides set {', '.join(changed)}: set "
                        "--config.student.init=random for such a student (student.layers picks the depth of a "
                        f"copied one; {', '.join(student_lib.NARROWABLE)} may narrow)")
    try:
      student_lib.check_narrower(base, cfg)
    except ValueError as e:
      raise ConfigError(f"--config.student.overrides: {e}; set --config.student.init=random for a wider "
                        "student") from None
  if teacher_cfg is not None:
    check_pair(teacher_cfg, cfg, config.loss)
    layer_loss_config(config.layer_loss, teacher_cfg, cfg)  # refuses a layer map or widths that cannot meet
  for name, model_cfg in (("teacher", teacher_cfg), ("student", cfg)):
    if model_cfg is not None and model_cfg.num_languages:
      raise ConfigError(f"the {name} has {model_cfg.num_languages} language embeddings, which need a language id per "
                        "token, but the data pipeline gives none: distil a one-language model (n_langs=1)")
  return cfg


# The shape a student copied from its teacher's layers inherits (overriding one needs a random student); its
# widths may narrow (student.select_weights).
_COPIED_SHAPE = ("num_layers", "vocab_size", "max_position_embeddings")


def _student_layers(config, teacher_cfg: model_lib.EncoderConfig) -> tuple[int, ...]:
  layers = tuple(config.student.layers) or student_lib.default_layers(teacher_cfg.num_layers)
  try:
    student_lib.check_layers(layers, teacher_cfg.num_layers)
  except ValueError as e:  # a layer map the teacher cannot give
    raise ConfigError(f"--config.student.layers: {e}") from None
  return layers


def build_models(config) -> tuple[model_lib.Encoder | None, Any, model_lib.Encoder, Any]:
  """Step two: (teacher, teacher_params, student, student_params) on the host, teacher None without one. The
  student's config is `student_config`'s; its weights are copied from the teacher's layers, initialised, or
  read from its folder."""
  teacher = teacher_params = None
  if config.teacher:
    teacher, teacher_params = checkpoint.load_any(config.teacher, dtype=config.compute.dtype,
                                                  attention=config.compute.attention)
  init = config.student.init
  read_config = checkpoint.load_config
  if init not in ("teacher", "random"):
    # Read once; its config is the weights' own (a Hugging Face folder tells whether it has a pooler only by
    # its weights), checked against the teacher by `student_config` like any other.
    loaded, student_params = checkpoint.load_any(init, **dict(config.compute), **dict(config.student.overrides))
    read_config = lambda _: loaded.cfg  # noqa: E731
  cfg = student_config(config, teacher.cfg if teacher is not None else None, read_config)
  if init == "teacher":
    widths = {k: getattr(cfg, k) for k in student_lib.NARROWABLE if getattr(cfg, k) != getattr(teacher.cfg, k)}
    _, student_params = student_lib.student_from_teacher(teacher, teacher_params, _student_layers(config, teacher.cfg),
                                                         copy_head=config.student.copy_head, seed=config.seed,
                                                         widths=widths)
  elif init == "random":
    student_params = jax.device_get(model_lib.init_params(model_lib.Encoder(cfg), jax.random.key(config.seed)))
  return teacher, teacher_params, model_lib.Encoder(cfg), student_params


def check_pair(teacher_cfg: model_lib.EncoderConfig, student_cfg: model_lib.EncoderConfig, loss_cfg):
  """Refuses a teacher/student pair the losses cannot compare, with the fix."""
  if teacher_cfg.vocab_size != student_cfg.vocab_size:
    raise ConfigError(f"teacher vocabulary ({teacher_cfg.vocab_size}) and student vocabulary "
                      f"({student_cfg.vocab_size}) differ: L_ce compares distributions over the same ids; "
                      "give the student the teacher's vocabulary (student.init='teacher' does)")
  if loss_cfg.alpha_cos > 0 and teacher_cfg.hidden_size != student_cfg.hidden_size:
    raise ConfigError(f"L_cos compares hidden states but the teacher is {teacher_cfg.hidden_size} wide and the "
                      f"student {student_cfg.hidden_size}: set --config.loss.alpha_cos=0 or match the widths")


# ------------------------------------------------------------------------------------------------ layer losses

# The top-level key of the train state's parameters under which the layer losses' projections live, beside the
# student's own subtrees; `student_params` drops it before anything evaluates or exports the student.
LOSS_PARAMS = "loss_projections"
PROJECTIONS = ("auto", "always", "never")


def layer_loss_config(layer_loss, teacher_cfg: model_lib.EncoderConfig | None,
                      student_cfg: model_lib.EncoderConfig) -> losses.LayerLossConfig:
  """`config.layer_loss` resolved for a teacher/student pair (the uniform map, the relation heads), refusing
  what the pair cannot give: a layer that does not exist, head counts or widths that cannot meet."""
  weights = {f"alpha_{name}": float(layer_loss[f"alpha_{name}"]) for name in losses.LayerLossConfig.TERMS}
  if not any(w > 0 for w in weights.values()):
    return losses.LayerLossConfig()
  if teacher_cfg is None:
    raise ConfigError("config.layer_loss compares the student with a teacher, but there is none: set "
                      "--config.teacher or set the layer_loss weights to 0")
  m, n = student_cfg.num_layers, teacher_cfg.num_layers
  pairs = tuple(tuple(p) for p in layer_loss.layer_map) or tuple((j, j * n // m) for j in range(1, m + 1))
  for pair in pairs:
    if len(pair) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair):
      raise ConfigError(f"--config.layer_loss.layer_map: {pair} is not a (student layer, teacher layer) pair of ints")
    s, t = pair
    if not 1 <= s <= m or not 1 <= t <= n:
      raise ConfigError(f"--config.layer_loss.layer_map pair {pair}: the student has layers 1..{m} and the teacher "
                        f"1..{n} (1-based layer outputs; the embeddings have their own term, alpha_embedding)")
  if (weights["alpha_attention"] or weights["alpha_value_relation"]) and student_cfg.num_heads != teacher_cfg.num_heads:
    raise ConfigError(f"the attention KL and the value relation compare head by head, but the student has "
                      f"{student_cfg.num_heads} heads and the teacher {teacher_cfg.num_heads}: match the head counts "
                      "or use MiniLMv2's relations (--config.layer_loss.alpha_relations, relation_heads)")
  r = layer_loss.relation_heads or teacher_cfg.num_heads
  if weights["alpha_relations"] and (student_cfg.hidden_size % r or teacher_cfg.hidden_size % r):
    raise ConfigError(f"--config.layer_loss.relation_heads={r} must divide both widths (student "
                      f"{student_cfg.hidden_size}, teacher {teacher_cfg.hidden_size})")
  if layer_loss.projection not in PROJECTIONS:
    raise ConfigError(f"--config.layer_loss.projection={layer_loss.projection!r}: use one of {PROJECTIONS}")
  if ((weights["alpha_hidden"] or weights["alpha_embedding"]) and layer_loss.projection == "never"
      and student_cfg.hidden_size != teacher_cfg.hidden_size):
    raise ConfigError(f"the hidden-state MSE compares a {student_cfg.hidden_size}-wide student with a "
                      f"{teacher_cfg.hidden_size}-wide teacher, which cannot meet without a projection: set "
                      "--config.layer_loss.projection=auto")
  return losses.LayerLossConfig(**weights, relation_heads=r, layer_map=pairs)


def projection_shapes(layer_loss, teacher_cfg, student_cfg) -> dict[str, tuple[int, int]]:
  """{"hidden" / "embedding": (D_s, D_t)}: the learned projections the MSE terms take (`config.layer_loss`)."""
  if teacher_cfg is None:
    return {}
  differ = student_cfg.hidden_size != teacher_cfg.hidden_size
  wanted = layer_loss.projection == "always" or (layer_loss.projection == "auto" and differ)
  return {name: (student_cfg.hidden_size, teacher_cfg.hidden_size) for name in ("hidden", "embedding")
          if wanted and layer_loss[f"alpha_{name}"] > 0}


def check_saved_projections(ckpts, config, teacher, student):
  """Refuses to resume checkpoints whose train state holds other layer-loss projections than this run's
  (switching alpha_hidden / alpha_embedding / projection between 0 and on changes the state's shape)."""
  _, saved = ckpts.saved_config()
  if saved is None or teacher is None:
    return
  saved_layer = default_config().layer_loss  # a run saved before layer losses existed had none
  saved_layer.update(saved.get("config", {}).get("layer_loss", {}))
  before = sorted(projection_shapes(saved_layer, teacher.cfg, student.cfg))
  now = sorted(projection_shapes(config.layer_loss, teacher.cfg, student.cfg))
  if before != now:
    raise ConfigError(
        f"{ckpts.directory} holds a run trained with layer-loss projections {before or 'none'}, this config needs "
        f"{now or 'none'}: resume with the saved run's --config.layer_loss settings (alpha_hidden, alpha_embedding, "
        "projection), or give another --workdir")


def init_projections(shapes: dict[str, tuple[int, int]], seed: int) -> dict:
  """LeCun-normal kernels (the projected student starts at the teacher's scale) and zero biases."""
  key = jax.random.fold_in(jax.random.key(seed), 0x10)
  out = {}
  for i, (name, (d_s, d_t)) in enumerate(sorted(shapes.items())):
    out[name] = {"kernel": jax.nn.initializers.lecun_normal()(jax.random.fold_in(key, i), (d_s, d_t), jnp.float32),
                 "bias": jnp.zeros((d_t,), jnp.float32)}
  return out


def student_params(params) -> dict:
  """The student's own parameters of a train state's `params` (the layer losses' projections left out)."""
  return {k: v for k, v in params.items() if k != LOSS_PARAMS}


# ------------------------------------------------------------------------------------------------ step

def _model_inputs(model, extra: dict) -> dict:
  """A packed batch's segment and position ids for `model`: the batches count positions from 0 in each example,
  a RoBERTa's start at pad_token_id + 1 (`first_position`)."""
  if "position_ids" in extra and model.cfg.first_position:
    return {**extra, "position_ids": extra["position_ids"] + model.cfg.first_position}
  return extra


def _loss_terms(student, params, teacher, teacher_params, masked, attention_mask, extra, dropout_rng,
                loss: losses.LossConfig, layer: losses.LayerLossConfig = losses.LayerLossConfig()
                ) -> tuple[jax.Array, dict]:
  """The weighted loss of one micro-batch and its terms; differentiable in `params` (the student's and the layer
  losses' projections, `LOSS_PARAMS`).

  The vocabulary losses (L_mlm, L_ce, L_mse) run on the rows `loss` selects: every token when soft targets are
  wanted everywhere, else only the masked ones. L_cos compares the hidden states at every non-pad token, and
  the layer losses (`layer`) the hidden states and attention of the mapped layers there.
  """
  projections = params.get(LOSS_PARAMS, {})
  params = student_params(params)
  # The scopes name the models in profiles (tools/profile_step.py); they change no computation.
  with jax.named_scope("student"):
    s_out = student.apply({"params": params}, masked.input_ids, attention_mask=attention_mask,
                          deterministic=False, rngs={"dropout": dropout_rng}, compute_logits=False,
                          output_qkv=layer.needs_qkv, **_model_inputs(student, extra))
  hs_BxLxD = s_out.last_hidden_state
  s_head = functools.partial(student.apply, {"params": params}, method=model_lib.Encoder.mlm_logits)
  distilling = teacher is not None
  if distilling:
    with jax.named_scope("teacher"):
      t_out = jax.lax.stop_gradient(teacher.apply({"params": teacher_params}, masked.input_ids,
                                                  attention_mask=attention_mask, compute_logits=False,
                                                  output_qkv=layer.needs_qkv, **_model_inputs(teacher, extra)))
    ht_BxLxD = t_out.last_hidden_state
  B, L = masked.input_ids.shape
  rows = losses.select_rows(hs_BxLxD, attention_mask, masked.mlm_weights, masked.targets,
                            slots=loss.slots(B, L, distilling), row_shards=loss.row_shards)
  t_head = ht_NxD = None
  if loss.soft(distilling):
    t_head = functools.partial(teacher.apply, {"params": teacher_params}, method=model_lib.Encoder.mlm_logits)
    ht_NxD = rows.take(ht_BxLxD)
  terms = losses.vocab_losses(s_head, t_head, rows, ht_NxD, temperature=loss.temperature,
                              chunk_size=loss.chunk_size, with_mse=loss.alpha_mse > 0)
  correct = terms.pop("mlm_correct")
  if distilling and loss.alpha_cos > 0:  # a student narrower than its teacher has no L_cos (check_pair)
    terms["cos"] = losses.cosine_loss(hs_BxLxD.reshape(B * L, -1), ht_BxLxD.reshape(B * L, -1),
                                      attention_mask.reshape(-1).astype(jnp.float32))
  total = loss.total(terms, distilling)
  if distilling and layer.active:
    attend_BxQxL = losses.attend_mask(attention_mask, extra.get("segment_ids"))
    layer_terms = layer.terms(s_out.hidden_states, t_out.hidden_states, s_out.qkv, t_out.qkv, projections,
                              attend_BxQxL, attention_mask)
    total = total + layer.total(layer_terms)
    terms.update({f"layer_{name}": value for name, value in layer_terms.items()})
  terms["mlm_accuracy"] = correct / jnp.maximum(jnp.sum(masked.mlm_weights), 1.0)
  return total, terms


def train_step(state: trainer.TrainState, teacher_params, batch: dict, token_probs_V: jax.Array, *, student, teacher,
               tx, schedule, mask_token_id: int, mlm: dict, loss: losses.LossConfig,
               grad_accum: int, layer: losses.LayerLossConfig = losses.LayerLossConfig(),
               dropout_rng: str = "threefry") -> tuple[trainer.TrainState, dict]:
  """One optimizer update from one global batch: pure, `(state, batch) -> (state, metrics)`.

  Masking covers the whole batch (exactly 15% of its non-pad tokens) and is keyed by (state.rng, step), as
  is dropout, so a resumed run repeats the same randomness. With `grad_accum` > 1, the batch is split into
  micro-batches whose gradients are averaged before the update. `mlm`: `config.mlm` (the masking); `loss`:
  the loss, built from `config.loss`, `config.mlm` and the mesh (`LossConfig.from_config`); `layer`: the layer
  losses (`layer_loss_config`), whose projections are in `state.params` under `LOSS_PARAMS`; `dropout_rng`: the
  dropout bits' generator (`trainer.DROPOUT_RNGS`; the masks always use threefry).
  """
  step_key = jax.random.fold_in(state.rng, state.step)
  mask_key, dropout_key = jax.random.split(step_key)
  with jax.named_scope("masking"):
    masked = masking.mask_tokens(
        mask_key, batch["input_ids"], batch["attention_mask"], token_probs_V, mask_token_id=mask_token_id,
        vocab_size=student.cfg.vocab_size, mlm_prob=mlm["prob"], word_mask=mlm["word_mask"],
        word_keep=mlm["word_keep"], word_rand=mlm["word_rand"], scheme=mlm["scheme"])
  extra_keys = [k for k in ("segment_ids", "position_ids") if k in batch]

  micro_batch = {"masked": masked, "attention_mask": batch["attention_mask"],
                 "extra": {k: batch[k] for k in extra_keys}}

  def loss_fn(params, m, key):
    return _loss_terms(student, params, teacher, teacher_params, m["masked"], m["attention_mask"], m["extra"], key,
                       loss, layer)

  state, out = trainer.apply_gradients(state, loss_fn, micro_batch, tx=tx, schedule=schedule,
                                       grad_accum=grad_accum, key=dropout_key, dropout_rng=dropout_rng)
  out["tokens"] = jnp.sum(batch["attention_mask"]).astype(jnp.float32)
  return state, out


def build_step(config, mesh, student, teacher, abstract_student_params, mask_token_id: int
               ) -> trainer.StepFunctions:
  """The optimizer, then `train_step` and the state functions jitted over `mesh` with shardings from the
  logical-axis rules (nothing compiles before the first call). With layer losses that learn projections, the
  state's parameters are the student's plus `LOSS_PARAMS`; `init` takes the student's alone and adds them."""
  tx, schedule = trainer.make_optimizer(config.optim, config.train.steps)
  teacher_cfg = teacher.cfg if teacher is not None else None
  layer = layer_loss_config(config.layer_loss, teacher_cfg, student.cfg)
  shapes = projection_shapes(config.layer_loss, teacher_cfg, student.cfg) if layer.active else {}
  extra_axes = None
  if shapes:
    make_projections = functools.partial(init_projections, shapes, config.seed)
    abstract_student_params = {**abstract_student_params, LOSS_PARAMS: jax.eval_shape(make_projections)}
    # The kernel maps the student's width onto the teacher's, like the pooler's (embed, embed_out).
    extra_axes = {LOSS_PARAMS: {name: {"kernel": jax.sharding.PartitionSpec("embed", "embed_out"),
                                       "bias": jax.sharding.PartitionSpec("embed_out")} for name in shapes}}
  abstract_teacher = None
  if teacher is not None:
    abstract_teacher = jax.eval_shape(lambda: model_lib.init_params(teacher, jax.random.key(0)))
  step_fn = functools.partial(train_step, student=student, teacher=teacher, tx=tx, schedule=schedule,
                              mask_token_id=mask_token_id, mlm=config.mlm.to_dict(),
                              loss=losses.LossConfig.from_config(config.loss.to_dict(), config.mlm.to_dict(),
                                                                 row_shards=sharding.data_parallel_size(mesh)),
                              grad_accum=config.optim.grad_accum, layer=layer, dropout_rng=config.train.dropout_rng)
  fns = trainer.jit_step(step_fn, mesh, dict(config.mesh.rules), student, abstract_student_params, tx, config.seed,
                         teacher=teacher, abstract_teacher_params=abstract_teacher, num_extra=1, extra_axes=extra_axes)
  if not shapes:
    return fns
  init = fns.init
  return dataclasses.replace(fns, init=lambda params: init({**params, LOSS_PARAMS: make_projections()}))


# ------------------------------------------------------------------------------------------------ data

def _tokenizer_path(config, teacher, student) -> str:
  path = config.data.tokenizer or (teacher.cfg.tokenizer if teacher is not None else None) or student.cfg.tokenizer
  if not path:
    raise ConfigError("no tokenizer: the models do not name one; set --config.data.tokenizer=DIR")
  return path


def _sources(config) -> list[str]:
  if config.data.demo_corpus:
    folders = data.demo_corpus(pathlib.Path(config.data.cache_dir).expanduser() / "corpus",
                               local_dir=config.data.corpus_dir or None)
    return [str(f) for f in folders]
  if not config.data.sources:
    raise ConfigError("no training data: set config.data.sources (files, folders, globs, hf:NAME, tfds:NAME) "
                      "or config.data.demo_corpus=True")
  return list(config.data.sources)


def prepare_data(config, tokenizer_path: str) -> pathlib.Path:
  """Tokenizes the sources once into the cache (reused by every later run with the same settings): the folder
  of `data.prepare_tokenized`, written by process 0 (and by any host that does not share its cache)."""
  try:
    return data.prepare_tokenized(_sources(config), tokenizer_path, config.data.cache_dir, max_len=config.data.max_len,
                                  min_len=config.data.min_len, held_out_fraction=config.data.held_out_fraction,
                                  seed=config.data.split_seed, text_field=config.data.text_field,
                                  process_index=jax.process_index(), sync=distributed.barrier)
  except data.EmptyCorpusError as e:
    raise ConfigError(f"--config.data.sources: {e}: give more text") from None


# ------------------------------------------------------------------------------------------------ the run

def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Trains (or resumes) in `workdir` until `config.train.steps`; returns the final summary.

  Bad settings and input raise `ConfigError` before anything is written or compiled. A SIGTERM at any
  moment (set-up, training, final evaluation, export) stops at the next safe point with what is done saved
  (the summary says "preempted"); the next run with the same settings finishes the job.
  """
  workdir = pathlib.Path(workdir).expanduser().absolute()
  config = config.copy_and_resolve_references()
  validate_run(config, workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with trainer.stop_signal() as stop:
    return _run(config, workdir, stop)


@dataclasses.dataclass
class _Inputs:
  """What a distillation run reads before it compiles anything (every refusal happens while reading it)."""
  teacher: model_lib.Encoder | None
  teacher_params: Any
  student: model_lib.Encoder
  student_params: Any
  tokenizer_path: str
  data_dir: pathlib.Path  # the tokenized corpus (train and held-out splits)
  train_ds: data.TokenizedDataset
  specials: dict  # special token ids
  probs_V: np.ndarray  # the masking's per-token probabilities


def _load_inputs(config) -> _Inputs:
  """The models, the tokenized corpus and the masking probabilities its token counts give."""
  teacher, teacher_params, student, student_params = build_models(config)
  validation.check_max_len(config.data.max_len, {"teacher": teacher, "student": student})
  tokenizer_path = _tokenizer_path(config, teacher, student)
  data_dir = prepare_data(config, tokenizer_path)
  train_ds = data.TokenizedDataset(data_dir, "train")
  if train_ds.vocab_size != student.cfg.vocab_size:
    raise ConfigError(f"the tokenizer {tokenizer_path} has {train_ds.vocab_size} ids but the student's vocabulary "
                      f"has {student.cfg.vocab_size}: use the model's own tokenizer (config.data.tokenizer)")
  specials = train_ds.special_ids
  probs_V = _token_probs(train_ds, specials, config.mlm.smoothing)
  return _Inputs(teacher, teacher_params, student, student_params, tokenizer_path, data_dir, train_ds, specials,
                 probs_V)


def _token_probs(train_ds: data.TokenizedDataset, specials: dict, smoothing: float) -> np.ndarray:
  return masking.token_probs(train_ds.counts(), [i for i in specials.values() if i is not None], smoothing)


def _run(config, workdir: pathlib.Path, stop) -> dict:
  if config.teacher and config.teacher_mlm.steps > 0:
    config.teacher = adapt_teacher(config, workdir)
    if config.teacher is None:  # preempted while adapting the teacher; the next run resumes it
      return {"step": 0, "preempted": True, "stage": "teacher_mlm"}
  x = _load_inputs(config)
  teacher, student = x.teacher, x.student
  mesh = sharding.make_mesh(config.mesh.shape)
  trainer.check_batch(config.data.batch_size, mesh, config.optim.grad_accum)
  try:
    batches = data.make_batches(x.train_ds, batch_size=config.data.batch_size, max_len=config.data.max_len,
                                seed=config.seed, strategy=config.data.strategy, process_index=jax.process_index(),
                                process_count=jax.process_count())
  except ValueError as e:  # a corpus too small for one global batch
    raise ConfigError(f"{e}: lower --config.data.batch_size or give more text") from None
  if stop.requested:
    return trainer.stopped_in_setup()
  fns = build_step(config, mesh, student, teacher, jax.eval_shape(lambda p: p, x.student_params), x.specials["mask"])
  teacher_params = jax.device_put(x.teacher_params, fns.teacher_sharding) if teacher is not None else None
  probs_V = jax.device_put(jnp.asarray(x.probs_V), fns.replicated)

  with trainer.run_checkpoints(workdir, config.train, student.cfg.to_dict()) as ckpts:
    check_saved_projections(ckpts, config, teacher, student)
    start, state = trainer.restore_or_init(ckpts, fns, x.student_params, batches)
    x.student_params = x.teacher_params = None
    is_main = jax.process_index() == 0
    has_heldout = bool(config.data.eval_batches and x.train_ds.meta["splits"]["heldout"]["examples"])

    def learning_curve(step_done, state):
      params = student_params(sharding.to_host(state.params))  # a collective: every process gathers
      if not is_main:
        return None
      score = _heldout_score(config, x.data_dir, x.probs_V, x.specials, student, params)
      return {"heldout_mlm_accuracy": score.accuracy, "heldout_mlm_loss": score.loss}

    plateau = PlateauStop(config.train.stop_at_plateau, is_main) if config.train.stop_at_plateau and has_heldout \
        else None
    flops_per_token = step_flops_per_token(config, teacher, student, config.data.max_len)
    with metrics.MetricsWriter(workdir, enabled=is_main) as writer:
      writer.truncate_after(start)
      ended = plateau is not None and plateau.ended_before(workdir, start)
      result = trainer.fit(
          state, lambda s, b: fns.step(s, teacher_params, b, probs_V), batches, mesh, ckpts=ckpts, writer=writer,
          start=start, total_steps=start if ended else config.train.steps, log_every=config.train.log_every,
          ckpt_every=config.train.ckpt_every, flops_per_token=flops_per_token, compute_dtype=config.compute.dtype,
          progress=config.train.progress, run_config={"config": config.to_dict(), "model": student.cfg.to_dict()},
          eval_every=config.train.eval_every if has_heldout else 0, evaluate_fn=learning_curve,
          stop_when=plateau)
    if result.preempted:
      return trainer.stopped_early(ckpts, result.step)

    summary = {"step": result.step, "workdir": str(workdir)}
    if plateau is not None and is_main:
      summary["plateau"] = plateau.state()
    # Collectives: every process gathers, process 0 uses them; the layer losses' projections are not the student's.
    final = student_params(sharding.to_host(result.state.params))
    if has_heldout:
      # The teacher's weights come to the host only when _evaluate scores or times it.
      scored = teacher if config.train.eval_teacher or config.train.speed_batches else None
      host_teacher = sharding.to_host(teacher_params) if scored is not None else None
      if is_main:
        maskings = {"": x.probs_V, "uniform_": _token_probs(x.train_ds, x.specials, 0.0)}
        summary.update(_evaluate(config, x.data_dir, maskings, x.specials, scored, host_teacher, student, final))
    if stop.requested:  # the final checkpoint is saved: the next run evaluates and exports
      return trainer.stopped_early(ckpts, result.step, stage="evaluation")
    return trainer.finish_run(workdir, student, final, x.tokenizer_path, summary, ckpts, export=config.train.export)


# train.stop_at_plateau judges a curve of at least this many held-out points: early on, the last quarter of
# the steps so far is one evaluation interval, and one flat point must not end a run while it still learns.
PLATEAU_MIN_POINTS = 4


class PlateauStop:
  """`train.stop_at_plateau`: the held-out curve so far (kept by process 0, which alone scores it) and whether
  it has flattened (metrics.plateau); every process gets process 0's answer (distributed.agree)."""

  def __init__(self, points: float, is_main: bool):
    self.points, self.is_main, self.curve = points, is_main, []

  def state(self) -> dict:
    return metrics.plateau(self.curve, self.points)

  def _reached(self) -> bool:
    return self.is_main and len(self.curve) >= PLATEAU_MIN_POINTS and self.state()["reached"]

  def ended_before(self, workdir: pathlib.Path, start: int) -> bool:
    """Reads the curve the workdir logged up to `start`; whether the run already stopped there."""
    if self.is_main:
      self.curve = metrics.read_curve(workdir)
    ended = distributed.agree(bool(start and self.curve and self.curve[-1]["step"] == start and self._reached()))
    if ended:
      log.info("the run stopped at its plateau at step %d before: evaluating and exporting it", start)
    return ended

  def __call__(self, step: int, scores: dict | None) -> bool:
    """trainer.fit's `stop_when`: after each held-out evaluation, whether to end the run here."""
    if self.is_main and scores:
      self.curve.append({"step": step, "accuracy": scores["heldout_mlm_accuracy"]})
    reached = self._reached()
    if reached:
      p = self.state()
      log.info("held-out accuracy rose %.2f points from step %d to %d (< %g): the plateau, stopping at step %d",
               p["rise_last_quarter_points"], p["from_step"], p["to_step"], self.points, step)
    return distributed.agree(reached)


def step_flops_per_token(config, teacher, student, seq_len: int) -> float:
  """Model FLOPs per token of the distillation step (metrics.py): the models, and the layer losses' relations
  and projections."""
  per_token = metrics.distillation_flops_per_token(student.cfg, teacher.cfg if teacher is not None else None,
                                                   seq_len, **logit_fractions(config, teacher is not None))
  if teacher is not None:
    per_token += metrics.layer_loss_flops_per_token(
        layer_loss_config(config.layer_loss, teacher.cfg, student.cfg), student.cfg, teacher.cfg, seq_len,
        projection_shapes(config.layer_loss, teacher.cfg, student.cfg))
  return per_token


def logit_fractions(config, distilling: bool) -> dict:
  masked_only = config.mlm.prob
  soft = distilling and (config.loss.alpha_ce > 0 or config.loss.alpha_mse > 0)
  student_fraction = 1.0 if soft and not config.loss.restrict_ce_to_mask else masked_only
  teacher_fraction = (student_fraction if soft else 0.0) if distilling else 0.0
  return dict(student_logit_fraction=student_fraction, teacher_logit_fraction=teacher_fraction)


def _heldout_score(config, data_dir, probs_V, specials, model, params) -> evaluate.MlmScore:
  heldout = data.TokenizedDataset(data_dir, "heldout")
  # Process 0 scores the whole global batch with host parameters: the same score for any process count.
  batches = data.heldout_batches(heldout, config.data.batch_size, config.data.max_len)
  return evaluate.mlm_score(model, params, batches, np.asarray(probs_V), mask_token_id=specials["mask"],
                            seed=config.seed, mlm_prob=config.mlm.prob, scheme=config.mlm.scheme,
                            max_batches=config.data.eval_batches)


def _evaluate(config, data_dir, probs_by_prefix: dict, specials, teacher, teacher_params, student,
              student_params) -> dict:
  """Held-out scores of the student (and, with train.eval_teacher, the teacher) under each masking of
  `probs_by_prefix` ({"": the run's own masking, "uniform_": BERT's uniform masking}), printed side by side;
  with `train.speed_batches`, their speed as deployed."""
  out, lines = {}, []
  for prefix, probs_V in probs_by_prefix.items():
    s = _heldout_score(config, data_dir, probs_V, specials, student, student_params)
    out[f"student_heldout_{prefix}mlm_accuracy"] = s.accuracy
    out[f"student_heldout_{prefix}mlm_loss"] = s.loss
    label = "the run's masking" if not prefix else prefix.rstrip("_") + " masking"
    line = f"held-out masked-LM accuracy, {label} ({s.num_predictions} predictions): student {s.accuracy:.2%}"
    if teacher is not None and config.train.eval_teacher:
      t = _heldout_score(config, data_dir, probs_V, specials, teacher, teacher_params)
      out[f"teacher_heldout_{prefix}mlm_accuracy"] = t.accuracy
      out[f"teacher_heldout_{prefix}mlm_loss"] = t.loss
      line += f", teacher {t.accuracy:.2%} (student/teacher {s.accuracy / max(t.accuracy, 1e-9):.2f})"
    lines.append(line)
  if teacher is not None and config.train.speed_batches:
    figures = evaluate.speed_report({"teacher": (teacher, teacher_params), "student": (student, student_params)},
                                    tuple(config.train.speed_batches), config.data.max_len)
    heads = {"cls": "encoder + classifier", "mlm": "encoder + masked-LM head"}
    speedups = []
    for key, value in figures["student"].items():
      head, _, batch = key.partition("_tokens_per_s_batch")
      out[f"student_speedup_{head}_batch{batch}"] = value / figures["teacher"][key]
      speedups.append(f"{heads[head]}, batch {batch}: {value / figures['teacher'][key]:.2f}x")
    lines.append(f"student speed-up over the teacher as deployed (same inputs, seq {config.data.max_len}): "
                 + "; ".join(speedups))
  print("\n".join(lines), flush=True)
  return out


def adapt_teacher(config, workdir: pathlib.Path) -> str | None:
  """Masked-LM adaptation of the teacher (its own run in WORKDIR/teacher); returns the adapted model folder,
  or None when a preemption signal stopped the adaptation (saved; the next run resumes it)."""
  sub = config.copy_and_resolve_references()
  sub.student.init = config.teacher
  sub.student.overrides = ml_collections.ConfigDict()
  sub.teacher = ""
  sub.teacher_mlm.steps = 0
  sub.train.steps = config.teacher_mlm.steps
  sub.optim.lr = config.teacher_mlm.lr
  sub.optim.head_lr_scale = config.teacher_mlm.head_lr_scale
  if config.teacher_mlm.batch_size:
    sub.data.batch_size = config.teacher_mlm.batch_size
  sub.mlm.smoothing = config.teacher_mlm.smoothing
  sub.data.strategy = config.teacher_mlm.strategy
  sub.train.export = True
  sub.data.eval_batches = 0
  sub.train.eval_every, sub.train.stop_at_plateau = 0, 0.0  # the run's curve and plateau are the student's
  folder = workdir / "teacher"
  if not checkpoint.is_model_dir(folder / "final"):
    _keep_saved_data_settings(sub, folder)
    print(f"adapting the teacher by masked-LM for {sub.train.steps} steps in {folder}", flush=True)
    if run(sub, folder).get("preempted"):
      return None
  return str(folder / "final")


def _keep_saved_data_settings(sub, folder: pathlib.Path) -> None:
  """An adaptation interrupted under other masking or batching settings (e.g. before they changed) resumes
  with the settings it was saved with: its data iterator's saved position is only valid for those."""
  if not (folder / "checkpoints").is_dir():
    return
  ckpts = checkpoint.RunCheckpoints(folder)
  try:
    _, saved = ckpts.saved_config()
  finally:
    ckpts.close()
  saved = (saved or {}).get("config", {})
  for section, key in (("mlm", "smoothing"), ("data", "strategy")):
    value = saved.get(section, {}).get(key)
    if value is not None and value != sub[section][key]:
      log.warning("the teacher's adaptation in %s was started with %s.%s=%r: resuming it so", folder, section, key,
                  value)
      sub[section][key] = value


# Every numeric setting of a run and its range (validation.RANGES).
RANGES = {
    "train.steps": ">0", "train.log_every": ">0", "train.ckpt_every": ">0", "train.keep": ">0",
    "train.eval_every": ">=0", "train.stop_at_plateau": ">=0",
    "data.batch_size": ">0", "data.max_len": ">0", "data.min_len": ">=0", "data.held_out_fraction": "[0,1)",
    "data.split_seed": ">=0", "data.eval_batches": ">=0",
    "mlm.prob": "(0,1]", "mlm.smoothing": ">=0", "mlm.word_mask": "[0,1]", "mlm.word_keep": "[0,1]",
    "mlm.word_rand": "[0,1]",
    "loss.temperature": ">0", "loss.alpha_ce": ">=0", "loss.alpha_mlm": ">=0", "loss.alpha_cos": ">=0",
    "loss.alpha_mse": ">=0", "loss.chunk_size": ">=0",
    **{f"layer_loss.alpha_{name}": ">=0" for name in losses.LayerLossConfig.TERMS}, "layer_loss.relation_heads": ">=0",
    **trainer.OPTIM_RANGES,
    "teacher_mlm.steps": ">=0", "teacher_mlm.lr": ">0", "teacher_mlm.head_lr_scale": ">0",
    "teacher_mlm.batch_size": ">=0", "teacher_mlm.smoothing": ">=0",
}


def validate_config(config):
  """Refuses settings that cannot run, each with the flag that fixes it; reads no file, compiles nothing."""
  validation.check_ranges(config, RANGES)
  if config.data.max_len < 3:
    raise ConfigError(f"--config.data.max_len={config.data.max_len} leaves no room for [CLS] text [SEP]: "
                      "set it to at least 3 (128 is usual)")
  if config.data.min_len > config.data.max_len:
    raise ConfigError(f"--config.data.min_len={config.data.min_len} exceeds --config.data.max_len="
                      f"{config.data.max_len}: every example would be dropped; lower min_len")
  split = (config.mlm.word_mask, config.mlm.word_keep, config.mlm.word_rand)
  if abs(sum(split) - 1.0) > 1e-6:
    raise ConfigError(f"--config.mlm.word_mask/word_keep/word_rand {split} must sum to 1 (default 0.8/0.1/0.1)")
  if not any(config.loss[k] > 0 for k in ("alpha_ce", "alpha_mlm", "alpha_cos", "alpha_mse")) and not any(
      config.layer_loss[f"alpha_{name}"] > 0 for name in losses.LayerLossConfig.TERMS):
    raise ConfigError("every loss weight (--config.loss.alpha_ce/alpha_mlm/alpha_cos/alpha_mse and "
                      "--config.layer_loss.alpha_*) is 0: nothing would be learned; give one a positive weight")
  if config.layer_loss.projection not in PROJECTIONS:
    raise ConfigError(f"--config.layer_loss.projection={config.layer_loss.projection!r}: use one of {PROJECTIONS}")
  trainer.check_compute(config)
  if config.train.stop_at_plateau and not (config.train.eval_every and config.data.eval_batches
                                           and config.data.held_out_fraction):
    raise ConfigError(f"--config.train.stop_at_plateau={config.train.stop_at_plateau} judges the held-out curve, "
                      "which is not measured: set --config.train.eval_every (e.g. 300), "
                      "--config.data.eval_batches (e.g. 40) and --config.data.held_out_fraction (e.g. 0.05), "
                      "or stop_at_plateau=0")
  strategies = (("data.strategy", config.data.strategy), ("teacher_mlm.strategy", config.teacher_mlm.strategy))
  for flag, strategy in strategies:
    if strategy not in data.STRATEGIES:
      raise ConfigError(f"{flag} {strategy!r}: use one of {data.STRATEGIES}")
  if config.mlm.scheme not in masking.SCHEMES:
    raise ConfigError(f"mlm.scheme {config.mlm.scheme!r}: use one of {masking.SCHEMES}")
  trainer.check_mesh_rules(config.mesh.rules)


def validate_run(config, workdir: pathlib.Path):
  """Everything about a run that can be checked before a model is read: the settings, the workdir, the
  mesh against the devices present, and that the data is configured."""
  validate_config(config)
  validation.check_workdir(workdir)
  sizes = validation.check_mesh(config.mesh.shape, jax.device_count())
  data_parallel = math.prod(sizes[a] for a in sharding.BATCH_AXES)
  validation.check_batch(config.data.batch_size, data_parallel, config.optim.grad_accum)
  if not config.data.demo_corpus:
    _sources(config)  # refuses a run without data
  elif config.data.corpus_dir:
    validation.check_existing_path(config.data.corpus_dir, "--config.data.corpus_dir", "folder")


def main(argv: list[str] | None = None) -> int:
  return trainer.cli(run, "a configs/*.py file", argv=argv, cache_dir=lambda config: config.data.cache_dir)


if __name__ == "__main__":
  allocator.reexec()  # tcmalloc where installed: a faster CPU step (allocator.py)
  sys.exit(main())
