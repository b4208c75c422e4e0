"""Orbax checkpoints.

A converted model is a folder with our `config.json` (an `EncoderConfig`) and an Orbax `params/` item.
Training checkpoints (a `CheckpointManager` over a workdir) live here too.
"""
from __future__ import annotations

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


def save_model(folder: str | os.PathLike, model: model_lib.Encoder, params) -> pathlib.Path:
  """Writes `config.json` and the parameters (Orbax, standard format) to `folder`."""
  folder = pathlib.Path(folder).absolute()
  folder.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(folder / PARAMS_DIR, params, force=True)
  if jax.process_index() == 0:  # every process saves its shards above; one writes the config
    (folder / CONFIG_FILE).write_text(json.dumps(model.cfg.to_dict(), indent=2, sort_keys=True) + "\n")
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
  cfg = model_lib.EncoderConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
  model = model_lib.Encoder(cfg)
  abstract = jax.eval_shape(lambda: model_lib.init_params(model, jax.random.key(0)))
  if sharding is not None:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sharding)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(folder / PARAMS_DIR, abstract)
  return model, params


# ------------------------------------------------------------------------------------------ training runs

class ModelMismatchError(RuntimeError):
  """The workdir holds checkpoints of another model."""


# EncoderConfig fields that change how the model computes, not its parameters: a run may resume with others.
COMPUTE_FIELDS = ("dtype", "remat", "remat_policy", "attention")


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

  Saves are atomic (Orbax writes to a temporary folder and renames it), so a run killed mid-save leaves
  the previous checkpoint intact and restores from it.
  """

  def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
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
    step = self.latest_step()
    if step is None:
      return
    saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
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
    aside = self.directory.with_name(f"checkpoints.replaced-{step}")
    self.directory.rename(aside)
    log.warning("moved the checkpoints of another model to %s", aside)
    self.__init__(self.directory.parent, keep=self.manager._options.max_to_keep,
                  async_save=self.manager._options.enable_async_checkpointing)

  def save(self, step: int, state, data_state: dict, config: dict, *, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config)),
        force=force)

  def restore(self, abstract_state, step: int | None = None):
    """Returns (step, state, data_state, config); `abstract_state` holds ShapeDtypeStructs with the
    shardings to restore onto, which may belong to a different mesh than the one that saved."""
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore()))
    return step, restored["state"], restored["data"], restored["config"]

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def is_run_dir(folder: str | os.PathLike) -> bool:
  return (pathlib.Path(folder) / "checkpoints").is_dir()


def load_run(workdir: str | os.PathLike, step: int | None = None) -> tuple[model_lib.Encoder, dict, int]:
  """The student of a training run at `step` (default: the newest checkpoint): (model, params, step)."""
  ckpts = RunCheckpoints(workdir, async_save=False)
  try:
    steps = ckpts.manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"{ckpts.directory} holds no checkpoint yet")
    step = max(steps) if step is None else step
    if step not in steps:
      raise FileNotFoundError(f"{ckpts.directory} has no checkpoint of step {step}; it has {sorted(steps)}")
    # No target: the arrays come back as saved, on the default device; only the parameters are kept.
    restored = ckpts.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
  finally:
    ckpts.close()
  model = model_lib.Encoder(model_lib.EncoderConfig.from_dict(restored["config"]["model"]))
  return model, restored["state"]["params"], step


def load_any(path: str | os.PathLike, step: int | None = None) -> tuple[model_lib.Encoder, dict]:
  """A JAX model folder, a training workdir (its newest or given checkpoint) or a Hugging Face folder/hub name."""
  if is_model_dir(path):
    return load_model(path)
  if is_run_dir(path):
    model, params, _ = load_run(path, step)
    return model, params
  from distilbert_jax import hf  # hf imports nothing of checkpoint: no cycle, and torch-free
  return hf.load_hf(path)
