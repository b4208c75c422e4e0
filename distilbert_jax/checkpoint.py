"""Orbax checkpoints.

A converted model is a folder with our `config.json` (an `EncoderConfig`) and an Orbax `params/` item.
Training checkpoints (a `CheckpointManager` over a workdir) live here too.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import pathlib

import jax
import orbax.checkpoint as ocp

from distilbert_jax import model as model_lib

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be written (disk full) or none that can be read; reported as one line."""


def _disk_full(error: BaseException) -> bool:
  """Whether `error` or an exception it was raised from is "no space left on device" (or over quota)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(error):  # TensorStore reports it as text
      return True
    error = error.__cause__ or error.__context__
  return False


def _reraise_disk_full(error: BaseException, what: str, folder: pathlib.Path):
  if _disk_full(error):
    raise CheckpointError(f"no space left on the device while writing {what} in {folder}: free disk space (or "
                          "give --workdir on a larger disk) and rerun; the run resumes from its newest complete "
                          "checkpoint") from error


class _DropDiskFullTracebacks(logging.Filter):
  """Orbax logs the traceback of a failed asynchronous save from its thread; a full disk is reported by
  `RunCheckpoints` as one line instead, so that record is dropped (any other error keeps it)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and record.exc_info[1] is not None and _disk_full(record.exc_info[1]))


_DISK_FULL_FILTER = _DropDiskFullTracebacks()


class _DropUnreadStepReads(logging.Filter):
  """A damaged checkpoint fails one of Orbax's parallel reads; the others fail too, after `restore` has caught
  the first and reported the step in its own words, and asyncio logs each of them with a traceback ("Task
  exception was never retrieved") whenever the garbage collector meets it, perhaps much later. Those records
  are dropped for the step folders `restore` could not read (`unreadable`); any other asyncio error keeps its."""

  def __init__(self):
    super().__init__()
    self.unreadable: set[str] = set()

  def filter(self, record: logging.LogRecord) -> bool:
    if not self.unreadable or "never retrieved" not in str(record.msg):
      return True
    text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info and record.exc_info[1] else "")
    return not any(folder in text for folder in self.unreadable)


_UNREAD_STEP_FILTER = _DropUnreadStepReads()


def free_path(path: pathlib.Path) -> pathlib.Path:
  """`path`, or `path-2`, `path-3`, ...: the first name not taken (moving a folder aside never clashes)."""
  candidate, n = path, 1
  while candidate.exists():
    n += 1
    candidate = path.with_name(f"{path.name}-{n}")
  return candidate


def _first_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  return f"{type(error).__name__}: {lines[0] if lines else ''}"


def save_model(folder: str | os.PathLike, model: model_lib.Encoder, params) -> pathlib.Path:
  """Writes `config.json` and the parameters (Orbax, standard format) to `folder`."""
  folder = pathlib.Path(folder).absolute()
  try:
    folder.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(folder / PARAMS_DIR, params, force=True)
    if jax.process_index() == 0:  # every process saves its shards above; one writes the config
      (folder / CONFIG_FILE).write_text(json.dumps(model.cfg.to_dict(), indent=2, sort_keys=True) + "\n")
  except Exception as e:  # pylint: disable=broad-except
    _reraise_disk_full(e, "the model", folder)
    raise
  return folder


def is_model_dir(folder: str | os.PathLike) -> bool:
  folder = pathlib.Path(folder)
  return (folder / CONFIG_FILE).is_file() and (folder / PARAMS_DIR).is_dir()


def load_model(folder: str | os.PathLike, sharding=None) -> tuple[model_lib.Encoder, dict]:
  """Reads what `save_model` wrote. `sharding`: an optional tree of shardings to restore onto."""
  folder = pathlib.Path(folder).absolute()
  if not is_model_dir(folder):
    raise FileNotFoundError(f"{folder} is not a converted model (expected {CONFIG_FILE} and {PARAMS_DIR}/): "
                            "create one with `python tools/convert.py hf2jax`")
  model = model_lib.Encoder(load_config(folder))
  abstract = jax.eval_shape(lambda: model_lib.init_params(model, jax.random.key(0)))
  if sharding is not None:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sharding)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(folder / PARAMS_DIR, abstract)
  return model, params


# ------------------------------------------------------------------------------------------ training runs

class ModelMismatchError(RuntimeError):
  """The workdir holds checkpoints of another model."""


COMPUTE_FIELDS = model_lib.COMPUTE_FIELDS  # a run may resume with others


def _same_model(saved: dict | None, current: dict) -> bool:
  """Compares as configs, so fields added to EncoderConfig since the save take their defaults; the
  compute-only fields (`COMPUTE_FIELDS`) are not compared."""
  try:
    a = model_lib.EncoderConfig.from_dict(saved or {})
    b = model_lib.EncoderConfig.from_dict(current)
  except (TypeError, ValueError):  # a field that no longer exists: another model
    return False
  return a.replace(**{f: getattr(b, f) for f in COMPUTE_FIELDS}) == b


class RunCheckpoints:
  """Checkpoints of a training run in `workdir/checkpoints/<step>/`: the train state (parameters, optimizer
  state, step, RNG), the data-iterator state and the run's config, saved together and asynchronously.

  Saves are atomic (Orbax writes to a temporary `<step>.orbax-checkpoint-tmp-*` folder and renames it when
  complete; the manager ignores such folders), so a run killed mid-save leaves the previous checkpoint
  intact and restores from it. A checkpoint damaged on disk afterwards is moved aside by `restore`, which
  then takes the newest one that reads.
  """

  def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    logging.getLogger("absl").addFilter(_DISK_FULL_FILTER)  # adding it again is a no-op
    logging.getLogger("asyncio").addFilter(_UNREAD_STEP_FILTER)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data", "config"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                             create=True, cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def check_model(self, model_config: dict, allow_change: bool = False):
    """Refuses to resume a run whose saved model config differs from `model_config`.

    With `allow_change`, the old checkpoints are moved aside (never deleted) and the run starts afresh.
    """
    step, saved = self.saved_config()
    if saved is None:
      return
    saved_model = saved.get("model")
    if _same_model(saved_model, model_config):
      return
    diff = sorted(k for k in set(saved_model or {}) | set(model_config)
                  if (saved_model or {}).get(k) != model_config.get(k) and k not in COMPUTE_FIELDS)
    if not allow_change:
      raise ModelMismatchError(
          f"{self.directory} holds checkpoints of another model (differs in {', '.join(diff)}): use another "
          "--workdir, or pass --config.train.allow_model_change=True to move them aside and start afresh")
    self.manager.wait_until_finished()
    self.manager.close()
    aside = free_path(self.directory.with_name(f"checkpoints.replaced-{step}"))
    self.directory.rename(aside)
    log.warning("moved the checkpoints of another model to %s", aside)
    self.__init__(self.directory.parent, keep=self.manager._options.max_to_keep,
                  async_save=self.manager._options.enable_async_checkpointing)

  def saved_config(self) -> tuple[int | None, dict | None]:
    """(step, run config) of the newest checkpoint whose config reads; (None, None) without one."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return step, self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
      except Exception:  # pylint: disable=broad-except  (a damaged step: `restore` deals with it)
        continue
    return None, None

  def save(self, step: int, state, data_state: dict, config: dict, *, force: bool = False) -> bool:
    """Starts saving `step` (asynchronously unless configured otherwise). A full disk, here or in the
    previous asynchronous save, raises `CheckpointError`; the checkpoints already complete stay intact."""
    try:
      return self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
          config=ocp.args.JsonSave(config)), force=force)
    except Exception as e:  # pylint: disable=broad-except
      _reraise_disk_full(e, f"the checkpoint of step {step}", self.directory)
      raise

  def _restore_step(self, step: int, abstract_state):
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore()))
    return step, restored["state"], restored["data"], restored["config"]

  def restore(self, abstract_state, step: int | None = None):
    """Returns (step, state, data_state, config); `abstract_state` holds ShapeDtypeStructs with the
    shardings to restore onto, which may belong to a different mesh than the one that saved.

    Without `step`: the newest checkpoint that reads. Newer ones that do not (a truncated, overwritten or
    missing file) are renamed to `<step>.damaged[-n]` (never deleted), each with a warning, once an older
    one has restored; when none reads, nothing is moved and `CheckpointError` says what to do.
    """
    if step is not None:
      return self._restore_step(step, abstract_state)
    failures = []
    for candidate in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self._restore_step(candidate, abstract_state)
      except Exception as e:  # pylint: disable=broad-except  (damage shows as Orbax, TensorStore or OS errors)
        failures.append((candidate, e))
        _UNREAD_STEP_FILTER.unreadable.add(str(self.directory / str(candidate)) + os.sep)
        continue
      if failures:
        self._move_damaged(failures, restored[0])
      return restored
    if failures:
      newest, error = failures[0]
      raise CheckpointError(
          f"no checkpoint in {self.directory} can be read (newest, step {newest}: {_first_line(error)}): move the "
          f"step folders out of {self.directory} to start afresh, or give another --workdir")
    raise CheckpointError(f"{self.directory} holds no checkpoint")

  def _move_damaged(self, failures: list[tuple[int, BaseException]], restored_step: int):
    """Renames the unreadable steps out of the manager's sight and tells it."""
    if jax.process_index() == 0:
      for step, error in failures:
        aside = free_path(self.directory / f"{step}.damaged")
        (self.directory / str(step)).rename(aside)
        log.warning("checkpoint %d could not be read (%s): moved it to %s; resuming from step %d", step,
                    _first_line(error), aside, restored_step)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("checkpoints moved aside")
    self.manager.reload()

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      _reraise_disk_full(e, "a checkpoint", self.directory)
      raise

  def close(self):
    self.wait()
    self.manager.close()

  def close_after_error(self):
    """Closes after the run failed: stops the background saves quietly (the first error is the one to
    report; a second from a failed asynchronous save only says the same)."""
    try:
      self.close()
    except Exception as e:  # pylint: disable=broad-except
      log.warning("closing the checkpoints after an error: %s", _first_line(e))
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except
        pass


def is_run_dir(folder: str | os.PathLike) -> bool:
  return (pathlib.Path(folder) / "checkpoints").is_dir()


def load_run(workdir: str | os.PathLike, step: int | None = None) -> tuple[model_lib.Encoder, dict, int]:
  """The student of a training run at `step` (default: the newest checkpoint): (model, params, step)."""
  ckpts = RunCheckpoints(workdir, async_save=False)
  try:
    steps = ckpts.manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"{ckpts.directory} holds no checkpoint yet")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"{ckpts.directory} has no checkpoint of step {step}; it has {sorted(steps)}")
    # Read-only: a damaged checkpoint is skipped (the newest that reads is used), never moved.
    restored = None
    for candidate in [step] if step is not None else sorted(steps, reverse=True):
      try:
        # No target: the arrays come back as saved, on the default device; only the parameters are kept.
        restored = ckpts.manager.restore(candidate, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        log.warning("checkpoint %d in %s cannot be read (%s)", candidate, ckpts.directory, _first_line(e))
        error = e
        continue
      step = candidate
      break
    if restored is None:
      raise CheckpointError(f"no readable checkpoint in {ckpts.directory} ({_first_line(error)}): the folder "
                            "is damaged; use another workdir or checkpoint step")
  finally:
    ckpts.close()
  model = model_lib.Encoder(model_lib.EncoderConfig.from_dict(restored["config"]["model"]))
  return model, restored["state"]["params"], step


def load_any(path: str | os.PathLike, step: int | None = None, **overrides) -> tuple[model_lib.Encoder, dict]:
  """A JAX model folder, a training workdir (its newest or given checkpoint) or a Hugging Face folder/hub name.

  `overrides`: EncoderConfig fields given to the model (compute fields such as dtype and attention; on a
  Hugging Face folder also fields applied before its weights are read)."""
  if is_model_dir(path):
    model, params = load_model(path)
  elif is_run_dir(path):
    model, params, _ = load_run(path, step)
  else:
    from distilbert_jax import hf  # hf imports nothing of checkpoint: no cycle, and torch-free
    return hf.load_hf(path, **overrides)
  return model_lib.Encoder(model.cfg.replace(**overrides)), params


def load_config(path: str | os.PathLike) -> model_lib.EncoderConfig:
  """The config of the model `load_any(path)` reads, without reading its weights."""
  folder = pathlib.Path(path).expanduser()
  if is_model_dir(folder):
    return model_lib.EncoderConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
  if is_run_dir(folder):
    ckpts = RunCheckpoints(folder, async_save=False)
    try:
      _, saved = ckpts.saved_config()
    finally:
      ckpts.close()
    if saved is None:
      raise FileNotFoundError(f"{ckpts.directory} holds no readable checkpoint yet")
    return model_lib.EncoderConfig.from_dict(saved["model"])
  from distilbert_jax import hf
  return hf.read_config(path)
