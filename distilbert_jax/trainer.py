"""What every training run shares: the train state and optimizer, the sharded state and step functions, the
loop (`fit`: logging, checkpoints, preemption, NaN stop), restore, the end of a run and the command line.

Distillation (`train.py`) and fine-tuning (`finetune.py`) are a step function and a `_run` each on top of
this module; `aot.py` compiles the same jitted step for a TPU topology. A run's life:

  validate (validation.py) -> read models and data -> `jit_step` (state shardings from the logical-axis
  rules, the step jitted with them) -> `run_checkpoints` + `restore_or_init` -> `fit` -> `finish_run`
  (final JAX model, Hugging Face export, summary.json); a SIGTERM at any point stops at the next safe point
  (`stop_signal`, `stopped_early`), and the next run with the same settings finishes the job.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from distilbert_jax import allocator, checkpoint, distributed, hf, metrics, sharding, validation
from distilbert_jax import model as model_lib

log = logging.getLogger("distilbert_jax.trainer")
ConfigError = validation.ConfigError


# ------------------------------------------------------------------------------------------------ state

@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates applied so far
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 PRNG key; step keys are fold_in(rng, step)


# The optimizer settings (config.optim, read by `make_optimizer`) and their ranges (validation.RANGES).
OPTIM_RANGES = {
    "optim.lr": ">0", "optim.b1": "[0,1)", "optim.b2": "[0,1)", "optim.eps": ">=0", "optim.weight_decay": ">=0",
    "optim.warmup_frac": "[0,1]", "optim.clip": ">0", "optim.grad_accum": ">0", "optim.head_lr_scale": ">0",
}


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

# The dropout bits' generator (config.train.dropout_rng): jax.random's implementations. "threefry" is JAX's
# default; "rbg" / "unsafe_rbg" draw the bits with XLA's RngBitGenerator, cheaper on CPU (BENCHMARKS.md "Where
# the CPU step's time goes"). Either way the keys derive from (state.rng, step): reproducible, resumes bit-exact.
DROPOUT_RNGS = ("threefry", "rbg", "unsafe_rbg")


def dropout_keys(key, n: int, impl: str = "threefry") -> jax.Array:
  """`n` dropout keys from one raw key: threefry keys as `jax.random.split`, or typed keys of `impl` whose
  data are bits drawn from them (what rngs={"dropout": key} hands every Dropout layer)."""
  if impl not in DROPOUT_RNGS:
    raise ValueError(f"unknown dropout generator {impl!r}: use one of {DROPOUT_RNGS}")
  keys = jax.random.split(key, n)
  if impl == "threefry":
    return keys
  width = jax.random.key_data(jax.random.key(0, impl=impl)).shape
  return jax.random.wrap_key_data(jax.vmap(lambda k: jax.random.bits(k, width, jnp.uint32))(keys), impl=impl)


def apply_gradients(state: TrainState, loss_fn, batch, *, tx, schedule, grad_accum: int = 1, key=None,
                    dropout_rng: str = "threefry"):
  """One AdamW update from `loss_fn(params, batch, dropout_key) -> (loss, terms)`: -> (state, metrics).

  With `grad_accum` = n > 1 the batch (a tree of (B, ...) arrays) is dealt into n micro-batches of B/n rows
  whose gradients are averaged (a `lax.scan`, so one micro-batch's activations live at a time). Dropout keys
  are split from `key` (default: fold_in(state.rng, state.step)) by `dropout_keys(key, n, dropout_rng)`.
  Metrics: each term's mean over the micro-batches, `loss`, `grad_norm` and the learning rate `lr` of this
  update.
  """
  n = grad_accum
  if key is None:
    key = jax.random.fold_in(state.rng, state.step)
  keys = dropout_keys(key, n, dropout_rng)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if n == 1:  # no loop: XLA schedules the whole step as one program (same values as a scan of one)
    (total, terms), grads = grad_fn(state.params, batch, keys[0])
    terms = dict(terms, loss=total)
  else:
    # Micro-batch i takes rows i, i + n, i + 2n, ...: every device's share of the (row-sharded) batch is spread
    # over all micro-batches, so each micro-batch stays split over every device with no data movement.
    micro = lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)  # noqa: E731

    def accumulate(grads_sum, xs):
      m_batch, m_key = xs
      (total, terms), grads = grad_fn(state.params, m_batch, m_key)
      return jax.tree.map(jnp.add, grads_sum, grads), dict(terms, loss=total)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, terms = jax.lax.scan(accumulate, zeros, (jax.tree.map(micro, batch), keys))
    grads = jax.tree.map(lambda g: g / n, grads)
    terms = {k: jnp.mean(v) for k, v in terms.items()}
  with jax.named_scope("optimizer"):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
  out = dict(terms, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng), out


@dataclasses.dataclass(frozen=True)
class StateFunctions:
  """How a run's TrainState lives on the mesh: its shardings and the jitted function that creates it."""
  init: Any  # host params -> TrainState on the mesh
  abstract_state: Any  # ShapeDtypeStructs with shardings (restore target)
  state_sharding: Any


def state_functions(mesh, rules, model, abstract_params, tx, seed: int, extra_axes: dict | None = None
                    ) -> StateFunctions:
  """Shardings of the parameters (from their logical axes and `rules`) and of the optimizer state.

  `extra_axes`: the logical axes of top-level parameter subtrees trained beside the model's own (a loss's
  projections), a tree of `PartitionSpec`s shaped like them."""
  p_shard = sharding.param_shardings({**model_lib.logical_axes(model), **(extra_axes or {})}, abstract_params, mesh,
                                     rules)

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
  """A run's jitted, sharded step beside its state functions, and the shardings the step's callers need."""
  step: Any = None  # (state, teacher_params, batch, *extra) -> (state, metrics); the state is donated
  teacher_sharding: Any = None  # of the teacher's parameters (None without a teacher)
  replicated: NamedSharding | None = None


def jit_step(step_fn: Callable, mesh, rules, model: model_lib.Encoder, abstract_params, tx, seed: int, *,
             teacher: model_lib.Encoder | None = None, abstract_teacher_params=None, num_extra: int = 0,
             extra_axes: dict | None = None) -> StepFunctions:
  """`step_fn(state, teacher_params, batch, *extra) -> (state, metrics)` jitted over `mesh`: the state split by
  the logical-axis `rules` (donated), the teacher's parameters likewise, the batch rows over the (data, fsdp)
  axes, `num_extra` further arguments and the metrics replicated; activations pinned by the same rules.
  Nothing compiles here: the first call (or `.lower(...)`, as aot.py does) compiles. `extra_axes`: as
  `state_functions`."""
  fns = state_functions(mesh, rules, model, abstract_params, tx, seed, extra_axes)
  replicated = NamedSharding(mesh, P())
  t_shard = None
  if teacher is not None:
    t_shard = sharding.param_shardings(model_lib.logical_axes(teacher), abstract_teacher_params, mesh, rules)
  step = jax.jit(sharding.with_activation_sharding(step_fn, mesh, rules),
                 in_shardings=(fns.state_sharding, t_shard, sharding.batch_sharding(mesh)) + (replicated,) * num_extra,
                 out_shardings=(fns.state_sharding, replicated), donate_argnums=0)
  return StepFunctions(init=fns.init, abstract_state=fns.abstract_state, state_sharding=fns.state_sharding,
                       step=step, teacher_sharding=t_shard, replicated=replicated)


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
  converged: bool = False  # stopped early because `stop_when` said so after an evaluation (`step` is saved)


def fit(state: TrainState, step_fn, batches, mesh, *, ckpts: checkpoint.RunCheckpoints, writer: metrics.MetricsWriter,
        start: int, total_steps: int, log_every: int, ckpt_every: int, run_config: dict, flops_per_token: float,
        compute_dtype: str = "float32", progress: bool = True, eval_every: int = 0, evaluate_fn=None,
        stop_when=None) -> FitResult:
  """The loop shared by distillation and fine-tuning: steps, logging, checkpoints, preemption, NaN stop.

  `step_fn(state, global_batch) -> (state, metrics)` is the jitted step (state donated); its metrics hold at
  least `loss`, `grad_norm` and `tokens` (non-pad tokens of the batch). `batches` yields this process's
  rows and has `get_state()` (saved with each checkpoint). Metrics of step n are read while step n+1 runs,
  so the host never waits for the device except to log, save or, every `eval_every` steps, call
  `evaluate_fn(step, state) -> dict | None`, whose scalars are logged at that step. After each evaluation,
  `stop_when(step, scalars) -> bool` (called on every process, which must all answer alike) may end the run
  there: the step is saved and the result says `converged`. The caller owns (and closes) `writer` and `ckpts`.
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

  preempted = converged = False
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
          converged = stop_when is not None and stop_when(done, extra)
        must_save = done % ckpt_every == 0 or done == total_steps or converged
        preempted = stop.requested or ckpts.reached_preemption(done)
        if must_save or preempted:
          if pending is not None:
            finish(*pending)  # never save a state whose loss is not finite
          pending = None
          save(done, force=preempted or converged)
        if preempted or converged:
          break
      if pending is not None:
        finish(*pending)
    finally:
      bar.close()
      ckpts.wait()
  return FitResult(state=state, step=done, preempted=preempted, converged=converged)


# ------------------------------------------------------------------------------------------------ a run's start and end

def compute_config() -> ml_collections.ConfigDict:
  """A run's `config.compute`: the EncoderConfig fields that leave the parameters alone (model.COMPUTE_FIELDS:
  compute dtype, per-layer remat and its policy, attention via einsum or jax.nn.dot_product_attention
  ("dot_product"; "cudnn" on NVIDIA GPUs in bf16), random bits per dropout decision (16, or 32 as flax's
  nn.Dropout and runs before 2026-12-07)), at the model's defaults."""
  defaults = model_lib.EncoderConfig()
  return ml_collections.ConfigDict({f: getattr(defaults, f) for f in model_lib.COMPUTE_FIELDS})


def check_compute(config):
  """How the run computes, before anything is loaded: its dropout generator (`train.dropout_rng`) and
  `config.compute`, whose fields the model checks together (attention "cudnn" needs a 16-bit dtype)."""
  validation.check_choice("--config.train.dropout_rng", config.train.dropout_rng, DROPOUT_RNGS)
  try:
    model_lib.EncoderConfig(**config.compute)
  except ValueError as e:
    raise ConfigError(f"--config.compute: {e}") from None


def check_mesh_rules(rules):
  """config.mesh.rules naming only mesh axes (shared by distillation and fine-tuning)."""
  try:
    sharding.check_rules(rules)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_batch(batch_size: int, mesh, grad_accum: int = 1, flag: str = "--config.data.batch_size"):
  validation.check_batch(batch_size, sharding.data_parallel_size(mesh), grad_accum, flag)


@contextlib.contextmanager
def run_checkpoints(workdir: pathlib.Path, train_cfg, model_cfg: dict):
  """The run's checkpoints (`train_cfg`: keep, async_checkpoint, allow_model_change), refusing a workdir of
  another model; closed without waiting on an asynchronous save when the run fails. The caller closes them
  when the run ends (`finish_run`, `stopped_early`)."""
  ckpts = checkpoint.RunCheckpoints(workdir, keep=train_cfg.keep, async_save=train_cfg.async_checkpoint)
  try:
    ckpts.check_model(model_cfg, allow_change=train_cfg.allow_model_change)
    yield ckpts
  except BaseException:
    ckpts.close_after_error()  # no asynchronous save left running behind the error
    raise


def restore_or_init(ckpts: checkpoint.RunCheckpoints, fns: StateFunctions, params, batches) -> tuple[int, TrainState]:
  """(start step, state): the newest checkpoint (and the data iterator's position) or a fresh state."""
  if ckpts.latest_step() is None:
    return 0, fns.init(params)
  start, state, data_state, _ = ckpts.restore(fns.abstract_state)  # the newest that reads
  batches.set_state(data_state)
  log.info("resumed from step %d in %s", start, ckpts.directory)
  return start, state


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
  # No process returns before the export exists (adapt_teacher's caller then loads it).
  distributed.barrier("export")
  return summary


# ------------------------------------------------------------------------------------------------ command line

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


def enable_compilation_cache(cache_dir: str | pathlib.Path) -> pathlib.Path | None:
  """JAX's persistent compilation cache under `cache_dir`/jax_compilation_cache: a second run with the same
  programs (the same configuration, another workdir, a resume) loads its compiled steps instead of compiling
  them again. A cache already set (JAX_COMPILATION_CACHE_DIR, or the tests') is kept. Returns the folder."""
  if jax.config.jax_compilation_cache_dir:
    return pathlib.Path(jax.config.jax_compilation_cache_dir)
  folder = pathlib.Path(cache_dir).expanduser() / "jax_compilation_cache"
  jax.config.update("jax_compilation_cache_dir", str(folder))
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # JAX's default, 1 s, misses small models
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  log.info("compiled programs are cached in %s", folder)
  return folder


def sibling_config(config_file: str, name: str, *args):
  """`get_config(*args)` of the configs/*.py file `name` beside `config_file`: a config that builds on another
  (configs/ is a folder of files, not a package)."""
  import importlib.util
  path = pathlib.Path(config_file).with_name(name)
  spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def cli(run_fn, config_help: str, user_errors: tuple[type[Exception], ...] = (), argv: list[str] | None = None,
        cache_dir: Callable[[Any], str] | None = None) -> int:
  """`python -m ... --config FILE[:ARG] --workdir DIR [--config.key=value ...]` for `run_fn(config, workdir)`:
  initializes the distributed run first, keeps compiled programs in the persistent compilation cache under
  `cache_dir(config)`, prints the summary as JSON, and bad input as one line (`error: ...`, exit status 2,
  nothing written). Returns the exit status."""
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
  log.info(allocator.describe())
  try:
    distributed.initialize(config_flag.value.get("distributed"))  # before anything uses jax
    if cache_dir is not None:
      enable_compilation_cache(cache_dir(config_flag.value))
    summary = run_fn(config_flag.value, workdir_flag.value)
  except USER_ERRORS + tuple(user_errors) as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 2
  print(json.dumps(summary, indent=2))
  return 0


def _one_line(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return " ".join(line.strip() for line in lines) if lines else type(error).__name__
