"""Multi-process runs: `jax.distributed.initialize` from the config or the environment, once, before any jax use.

Every process runs the same program (`python -m distilbert_jax.train ...` on each host). They find each
other through a coordinator (process 0 at HOST:PORT); after that, `jax.devices()` lists the devices of all
processes, each process loads only its share of the data, and process 0 alone writes metrics and exports.

Where the settings come from (the config's `distributed` block wins over the environment):

  mode                    "auto" (default): initialize when several processes are configured, or on a Cloud
                          TPU VM that belongs to a multi-host slice (the TPU metadata then gives everything);
                          otherwise run as one process. "on": always initialize (what is not given, JAX
                          detects: TPU, Slurm, Open MPI). "off": never.
  coordinator_address     HOST:PORT of process 0; env DISTILBERT_JAX_COORDINATOR
  num_processes           env DISTILBERT_JAX_NUM_PROCESSES
  process_id              0 .. num_processes - 1; env DISTILBERT_JAX_PROCESS_ID
  local_device_ids        the devices this process uses (GPUs: one process per device); env
                          DISTILBERT_JAX_LOCAL_DEVICE_IDS ("0,1")
  cpu_collectives         collectives between CPU processes ("gloo"; "" leaves JAX's default)
  initialization_timeout  seconds to wait for every process to join

Two processes on one machine, 4 CPU devices each (tools/launch_local.py does this):

  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=4 DISTILBERT_JAX_COORDINATOR=localhost:12355 \\
    DISTILBERT_JAX_NUM_PROCESSES=2 DISTILBERT_JAX_PROCESS_ID=0 python -m distilbert_jax.train ...
  (the same with DISTILBERT_JAX_PROCESS_ID=1 in a second shell)
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Mapping

import jax
import ml_collections
import numpy as np

log = logging.getLogger("distilbert_jax.distributed")

MODES = ("auto", "on", "off")
ENV_COORDINATOR = "DISTILBERT_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "DISTILBERT_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "DISTILBERT_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "DISTILBERT_JAX_LOCAL_DEVICE_IDS"


class DistributedConfigError(ValueError):
  """Settings of a multi-process run that cannot work; raised before anything starts."""


def default_config() -> ml_collections.ConfigDict:
  """The `config.distributed` block of train and finetune (unset values: -1, 0 or empty)."""
  return ml_collections.ConfigDict(dict(
      mode="auto", coordinator_address="", num_processes=0, process_id=-1, local_device_ids=(),
      cpu_collectives="gloo", initialization_timeout=300))


@dataclasses.dataclass(frozen=True)
class Settings:
  """What `initialize` passes to `jax.distributed.initialize` (None: JAX detects it)."""
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  local_device_ids: tuple[int, ...] | None


def _env_int(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedConfigError(f"{name}={value!r} is not an integer") from None


def _device_ids(value, source: str) -> tuple[int, ...] | None:
  if isinstance(value, str):
    value = [v for v in value.replace(" ", "").split(",") if v]
  try:
    ids = tuple(int(v) for v in value)
  except (TypeError, ValueError):
    raise DistributedConfigError(f"{source}={value!r}: give device ids such as 0,1") from None
  return ids or None


def _block(config) -> ml_collections.ConfigDict:
  c = default_config()
  if config is not None:
    c.update(dict(config))
  return c


def resolve(config, env: Mapping[str, str] | None = None) -> Settings | None:
  """The settings to initialize with, or None for a single-process run; checks them.

  `config`: a `distributed` block (see `default_config`; None or missing keys take the defaults).
  `env`: the environment (default `os.environ`).
  """
  env = os.environ if env is None else env
  c = _block(config)
  if c.mode not in MODES:
    raise DistributedConfigError(f"distributed.mode {c.mode!r}: use one of {MODES}")
  if c.mode == "off":
    return None

  coordinator = c.coordinator_address or env.get(ENV_COORDINATOR, "").strip() or None
  num = c.num_processes if c.num_processes > 0 else _env_int(env, ENV_NUM_PROCESSES)
  pid = c.process_id if c.process_id >= 0 else _env_int(env, ENV_PROCESS_ID)
  local = (_device_ids(c.local_device_ids, "distributed.local_device_ids")
           or _device_ids(env.get(ENV_LOCAL_DEVICE_IDS, ""), ENV_LOCAL_DEVICE_IDS))
  if num is not None and num < 1:
    raise DistributedConfigError(f"num_processes must be at least 1, got {num}")
  if pid is not None and pid < 0:
    raise DistributedConfigError(f"process_id must be >= 0, got {pid}")
  if pid is not None and num is not None and pid >= num:
    raise DistributedConfigError(
        f"process_id {pid} is not below num_processes {num}: number the processes 0 .. {num - 1}")
  if coordinator is not None and not coordinator.rpartition(":")[2].isdigit():
    raise DistributedConfigError(
        f"coordinator address {coordinator!r} needs a port: HOST:PORT of process 0, e.g. 10.0.0.2:12355")
  settings = Settings(coordinator, num, pid, local)
  if c.mode == "on":
    return settings  # JAX detects what is missing (TPU, Slurm, Open MPI) or says what it lacks

  explicit = coordinator is not None or num is not None or pid is not None
  if not explicit:
    return settings if _multihost_tpu() else None  # on a TPU slice the metadata gives everything
  if num == 1:
    return None  # one process, asked for explicitly: nothing to coordinate
  missing = [f"{name} ({var})" for name, var, value in (
      ("coordinator_address", ENV_COORDINATOR, coordinator), ("num_processes", ENV_NUM_PROCESSES, num),
      ("process_id", ENV_PROCESS_ID, pid)) if value is None]
  if missing and not _multihost_tpu():
    raise DistributedConfigError(
        f"a multi-process run needs {', '.join(missing)} in config.distributed or the environment: every "
        "process gets the same coordinator HOST:PORT (on process 0's host) and num_processes, and its own "
        "process_id; on a Cloud TPU slice all three are detected")
  return settings


@functools.lru_cache(maxsize=1)
def _multihost_tpu() -> bool:
  """True on a Cloud TPU VM (GCE or GKE) whose slice has more than one host; False elsewhere.

  Uses JAX's own cluster detection (its TPU metadata queries run only on a TPU VM); a JAX that no longer
  has it makes this False, and `--config.distributed.mode=on` still initializes from the TPU metadata.
  """
  try:
    from jax._src import cloud_tpu_init
    if not cloud_tpu_init.running_in_cloud_tpu_vm:
      return False
    from jax._src.clusters import cloud_tpu_cluster
    for env in (cloud_tpu_cluster.GkeTpuCluster, cloud_tpu_cluster.GceTpuCluster):
      if env.is_env_present():
        return env.get_process_count() > 1
  except Exception as e:  # pylint: disable=broad-except  # detection is best-effort
    log.warning("could not detect a multi-host TPU slice (%s); pass --config.distributed.mode=on on a pod", e)
  return False


def initialize(config=None, env: Mapping[str, str] | None = None) -> bool:
  """Joins this process to the others (`jax.distributed.initialize`) if `config`/`env` ask for it.

  Call once per process, before anything else uses jax (the CLIs' `main()` do). Returns True when this
  process is part of a distributed run. A second call is a no-op.
  """
  settings = resolve(config, env)
  c = _block(config)
  if settings is None:
    return False
  if jax.distributed.is_initialized():
    return True
  if c.cpu_collectives:
    # Collectives between processes on CPU (the local trial, CPU clusters); TPU and GPU use their own.
    jax.config.update("jax_cpu_collectives_implementation", c.cpu_collectives)
  log.info("joining a distributed run: coordinator %s, process %s of %s",
           settings.coordinator_address or "(detected)", "(detected)" if settings.process_id is None
           else settings.process_id, settings.num_processes or "(detected)")
  try:
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address, num_processes=settings.num_processes,
        process_id=settings.process_id,
        local_device_ids=list(settings.local_device_ids) if settings.local_device_ids else None,
        initialization_timeout=int(c.initialization_timeout))
  except ValueError as e:
    raise DistributedConfigError(f"jax.distributed.initialize could not find its settings ({e}): give "
                                 f"distributed.coordinator_address, num_processes and process_id") from e
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
  return True


def barrier(name: str):
  """Waits until every process reaches the barrier `name` (returns at once with one process).

  For steps where process 0 writes something the others then read, e.g. the tokenized corpus
  (`data.prepare_tokenized(..., sync=barrier)`).
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def agree(flag: bool) -> bool:
  """Process 0's `flag` on every process: a yes/no that only process 0 can answer (it alone scores the
  held-out split) but every process must act on alike."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, dtype=np.int32)))
