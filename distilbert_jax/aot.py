"""Ahead-of-time compilation of the train step for a TPU slice, on a machine without a TPU.

  python -m distilbert_jax.aot --config configs/distilbert_base.py --topology v5e-8 \
      [--config.key=value ...] [--batch N] [--seq N] [--search-batch]

Compiles exactly the step `train.py` runs (same models, shardings, optimizer, grad accumulation) for the
named topology with libtpu's compiler, and prints per-device memory against the chip's HBM, the compiled
FLOPs against the project's formula (`metrics.py`), and a verdict: "fits (...)" (exit 0) or "does not fit
(...)" (exit 1). Sharding mistakes and out-of-memory steps show up here, in a minute or two on a CPU,
instead of on a rented slice. Nothing is trained and no weights are read: the models are built from their
configurations alone (a hub teacher such as `bert-base-uncased` from a table of known shapes).

Needs libtpu (`pip install 'distilbert-jax[tpu]'`, ~200 MB); exit 2 without it or for a bad configuration.
`--search-batch` doubles the global batch from the config's until a step no longer fits and reports the
largest that does.

Topologies: Cloud TPU names (`v5e-8`, `v4-8`, `v5p-8`, `v6e-8`, `v4-32`, `v5e-32`, `v5litepod-16`, ...;
for v4 and v5p the number counts TensorCores, two per chip) or libtpu's own (`v5e:2x4`, `v4:2x2x1`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp

from distilbert_jax import checkpoint, hf, metrics, sharding, train, trainer, validation
from distilbert_jax import model as model_lib

GiB = 2 ** 30
INSTALL_HINT = "pip install 'distilbert-jax[tpu]'  (or: pip install 'jax[tpu]=={}')"
# [MASK] of the bert-base-uncased vocabulary; any id compiles to the same program.
MASK_TOKEN_ID = 103


# ------------------------------------------------------------------------------------------------ topologies

@dataclasses.dataclass(frozen=True)
class Chip:
  prefix: str  # libtpu's name of the generation: "v5e" in "v5e:2x4"
  cores_per_chip: int  # TensorCores counted per chip in Cloud TPU names (v4-8 is 4 chips)
  chip_config: str  # "megacore": one jax device per chip (two TensorCores fused), as a v4/v5p VM shows them
  ndim: int  # dimensions of the chip grid: 2 (v5e, v6e) or 3 (v4, v5p)
  hbm_gib: float  # HBM per chip, GiB
  accelerator_type: str  # Cloud TPU's accelerator-type prefix, for TPU_ACCELERATOR_TYPE


CHIPS = {
    "v4": Chip("v4", 2, "megacore", 3, 32, "v4"),
    "v5p": Chip("v5p", 2, "megacore", 3, 95, "v5p"),
    "v5e": Chip("v5e", 1, "default", 2, 16, "v5litepod"),
    "v6e": Chip("v6e", 1, "default", 2, 32, "v6e"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice as libtpu names it, and how it is split into hosts."""
  chip: Chip
  dims: tuple[int, ...]  # chip grid, e.g. (2, 4) or (2, 2, 1)
  name: str  # what the user typed

  @property
  def libtpu_name(self) -> str:
    return f"{self.chip.prefix}:{'x'.join(map(str, self.dims))}"

  @property
  def chips(self) -> int:
    return math.prod(self.dims)

  @property
  def host_bounds(self) -> tuple[int, int, int]:
    """Chips per host: a v5e/v6e slice of up to 8 chips is one host; larger slices and every v4/v5p host
    hold 2 × 2 chips (Cloud TPU's VM shapes)."""
    grid = tuple(self.dims) + (1,) * (3 - len(self.dims))
    if self.chip.ndim == 2 and self.chips <= 8:
      return grid
    return (min(grid[0], 2), min(grid[1], 2), 1)


def _grid(chips: int, ndim: int) -> tuple[int, ...]:
  """Cloud TPU's slice shape for `chips` chips: from 1x1 (2-D) or 2x2x1 (3-D), double the last of the
  smallest dimensions until the count is reached (2x4 -> 4x4 -> 4x8; 2x2x2 -> 2x2x4 -> 2x4x4 -> 4x4x4)."""
  dims = [1, 1] if ndim == 2 else [2, 2, 1]
  if chips < math.prod(dims) or chips & (chips - 1):
    raise validation.ConfigError(f"{chips} chips is not a Cloud TPU slice size (a power of two"
                                 f"{', at least 4' if ndim == 3 else ''})")
  while math.prod(dims) < chips:
    smallest = min(dims)
    last = max(i for i, d in enumerate(dims) if d == smallest)
    dims[last] *= 2
  return tuple(dims)


def parse_topology(name: str) -> Topology:
  """`v5e-8`, `v4-32`, `v5litepod-16` (Cloud TPU names) or `v5e:2x4`, `v4:2x2x1` (libtpu names)."""
  raw = re.fullmatch(r"(v\w+?):(\d+(?:x\d+)+)", name.strip().lower())
  cloud = re.fullmatch(r"(v\w+?)-(\d+)", name.strip().lower())
  generation = (raw or cloud).group(1) if (raw or cloud) else None
  chip = CHIPS.get(ALIASES.get(generation, generation)) if generation else None
  if chip is None:
    raise validation.ConfigError(f"unknown TPU topology {name!r}: use a Cloud TPU name such as v5e-8, v4-8, v5p-8, "
                                 "v6e-8, v4-32, v5e-32, or a libtpu name such as v5e:2x4, v4:2x2x1 (generations: "
                                 f"{', '.join(CHIPS)})")
  if raw:
    dims = tuple(int(d) for d in raw.group(2).split("x"))
    if len(dims) != chip.ndim:
      raise validation.ConfigError(f"{name}: a {chip.prefix} grid has {chip.ndim} dimensions, e.g. "
                                   f"{chip.prefix}:{'x'.join(['2'] * chip.ndim)}")
  else:
    cores = int(cloud.group(2))
    if cores % chip.cores_per_chip:
      raise validation.ConfigError(f"{name}: {chip.prefix} names count TensorCores, {chip.cores_per_chip} per chip")
    dims = _grid(cores // chip.cores_per_chip, chip.ndim)
  return Topology(chip, dims, name)


def compile_only_process():
  """Sets up this process to compile for TPUs without using one; call before jax starts a backend.

  `python -m distilbert_jax.aot` has imported jax (through the package) before this module runs, but jax
  starts backends and libtpu lazily, so this is still in time. The settings:
    JAX_PLATFORMS=cpu      jax would otherwise start libtpu as a runtime, which fails without a chip or, on
                           a TPU VM, takes the chips from a training run. The compiler needs no chip. jax read
                           the variable at import, hence also the config update.
    TPU_SKIP_MDS_QUERY=1   libtpu otherwise asks the GCE metadata server what TPU it is on, and waits for an
                           answer that never comes off Google Cloud.
    ALLOW_MULTIPLE_LIBTPU_LOAD=1  once libtpu is installed, every jax process of the venv probes it and holds
                           /tmp/libtpu_lockfile while it runs (a test session, a training run on CPU), which
                           would abort us; we never open a chip, so sharing is safe.
    TPU_WORKER_HOSTNAMES=localhost, TPU_ACCELERATOR_TYPE (per topology, `get_topology`): one host and the
                           slice's type, else libtpu warns that it cannot find its host bounds.
  """
  from jax._src import xla_bridge  # no public way to ask; a jax without it simply skips the check
  if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
    raise RuntimeError("compile_only_process() must run before jax starts a backend (before jax.devices())")
  os.environ.update(JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
                    TPU_WORKER_HOSTNAMES="localhost")
  jax.config.update("jax_platforms", "cpu")


def get_topology(topo: Topology):
  """libtpu's description of the slice; `.devices` are abstract TPU devices to build a mesh on.

  Needs `compile_only_process()` first (see there)."""
  from jax.experimental import topologies
  os.environ["TPU_ACCELERATOR_TYPE"] = f"{topo.chip.accelerator_type}-{topo.chips * topo.chip.cores_per_chip}"
  return topologies.get_topology_desc(topology_name=topo.libtpu_name, platform="tpu",
                                      chip_config_name=topo.chip.chip_config,
                                      chips_per_host_bounds=topo.host_bounds, num_slices=1)


def has_libtpu() -> bool:
  return importlib.util.find_spec("libtpu") is not None


# ------------------------------------------------------------------------------------------------ models

# Hub checkpoints that cannot be fetched here, by their shapes (their config.json); anything else needs a
# local folder (or a copy in the Hugging Face cache).
_BERT_BASE = dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)
_BERT_LARGE = dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)
KNOWN_MODELS = {
    "bert-base-uncased": lambda: model_lib.EncoderConfig.bert(**_BERT_BASE),
    "bert-base-cased": lambda: model_lib.EncoderConfig.bert(**_BERT_BASE, vocab_size=28996),
    "bert-large-uncased": lambda: model_lib.EncoderConfig.bert(**_BERT_LARGE),
    "bert-large-cased": lambda: model_lib.EncoderConfig.bert(**_BERT_LARGE, vocab_size=28996),
    "distilbert-base-uncased": lambda: model_lib.EncoderConfig.distilbert(),
    "distilbert-base-cased": lambda: model_lib.EncoderConfig.distilbert(vocab_size=28996),
    "roberta-base": lambda: model_lib.EncoderConfig.roberta(),
    "distilroberta-base": lambda: model_lib.EncoderConfig.roberta(num_layers=6),
    # 6 layers, width 512, 8 heads, 68,729 words, pre-norm, eps 1e-6: EncoderConfig.flaubert's defaults.
    "flaubert/flaubert_small_cased": lambda: model_lib.EncoderConfig.flaubert(),
    # 12 layers, width 768, 12 heads, post-norm, the same vocabulary (its published config.json, as recalled:
    # not checkable offline; a compile needs only the shapes).
    "flaubert/flaubert_base_cased": lambda: model_lib.EncoderConfig.flaubert(
        hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, pre_norm=False),
}


def model_config(path: str) -> model_lib.EncoderConfig:
  """The EncoderConfig of a model folder, training workdir or hub name, with no weights read
  (`checkpoint.load_config`); hub names not in the local cache from `KNOWN_MODELS`."""
  folder = pathlib.Path(path).expanduser()
  if not folder.is_dir():
    name = re.sub(r"^(google-bert|distilbert|FacebookAI)/", "", str(path))
    cached = _hub_cache_config(str(path))
    if cached is not None:
      folder = cached.parent
    elif name in KNOWN_MODELS:
      return KNOWN_MODELS[name]()
    else:
      raise validation.ConfigError(f"{path!r} is neither a local folder nor a known hub model "
                                   f"({', '.join(KNOWN_MODELS)}): give a folder holding its config.json")
  try:
    return checkpoint.load_config(folder)
  except (hf.ConversionError, FileNotFoundError) as e:  # no config.json, a workdir with no checkpoint yet, ...
    raise validation.ConfigError(str(e)) from None


def _hub_cache_config(repo: str) -> pathlib.Path | None:
  try:
    import huggingface_hub
    found = huggingface_hub.try_to_load_from_cache(repo, "config.json")
  except Exception:  # not a valid repo name: not in the cache either  # pylint: disable=broad-except
    return None
  return pathlib.Path(found) if isinstance(found, str) else None


def abstract_models(config) -> tuple[model_lib.Encoder | None, model_lib.Encoder]:
  """(teacher or None, student) as `train.build_models` builds them, from configurations only
  (`train.model_configs`, with hub names resolved offline by `model_config`)."""
  teacher_cfg, student_cfg = train.model_configs(config, read_config=model_config)
  return (model_lib.Encoder(teacher_cfg) if teacher_cfg is not None else None), model_lib.Encoder(student_cfg)


def abstract_params(model: model_lib.Encoder, shardings=None):
  """ShapeDtypeStructs of the model's parameters (with shardings when given); nothing is allocated."""
  shapes = jax.eval_shape(lambda: model_lib.init_params(model, jax.random.key(0)))
  if shardings is None:
    return shapes
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


# ------------------------------------------------------------------------------------------------ compile

@dataclasses.dataclass
class Result:
  """One compile of the step. Bytes are per device; FLOPs are for all devices together."""
  batch: int
  seq: int
  hbm_bytes: float
  seconds: float
  fits: bool
  memory: dict[str, int] = dataclasses.field(default_factory=dict)  # memory_analysis fields, per device
  peak_bytes: int | None = None
  peak_estimated: bool = False  # memory_analysis had no peak: arguments + outputs - aliased + temps + code
  formula_flops: float | None = None  # train.step_flops_per_token x tokens of the step
  traced_flops: float | None = None  # matmuls of the traced step, loop bodies x trip count
  compiled_flops: float | None = None  # cost_analysis, all devices: every op, loop bodies once
  compiled_loops: int = 0  # while loops left in the compiled program
  oom_message: str | None = None
  needed_bytes: float | None = None  # from the RESOURCE_EXHAUSTED message
  available_bytes: float | None = None  # HBM the compiler may use (a little under the chip's), same source

  def verdict(self) -> str:
    if self.fits:
      peak = self.peak_bytes
      return (f"fits (peak {peak / GiB:.2f} GiB of {self.hbm_bytes / GiB:.0f} GiB, "
              f"{(self.hbm_bytes - peak) / self.hbm_bytes:.0%} headroom)")
    if self.needed_bytes is None:
      return f"does not fit ({self.oom_message})"
    limit = self.available_bytes or self.hbm_bytes
    of = f" the {limit / GiB:.2f} GiB XLA may use" if self.available_bytes else ""
    over = (self.needed_bytes - limit) / GiB
    return f"does not fit (needs {self.needed_bytes / GiB:.2f} GiB, {over:.2f} GiB over{of})"


_SIZE = r"([\d.]+)\s*([KMGT])i?B?"


def _bytes(number: str, unit: str) -> float:
  return float(number) * 1024 ** "KMGT".index(unit) * 1024


def parse_oom(message: str) -> tuple[float | None, float | None]:
  """(bytes needed, bytes available) from XLA's RESOURCE_EXHAUSTED message, e.g. "Used 20.5G of 15.75G hbm"
  or "HLO temporaries (17.37G) exceeds available HBM (15.75G)" (XLA's G is GiB); None for what it omits."""
  for pattern in (rf"[Uu]sed {_SIZE} of {_SIZE} hbm", rf"\({_SIZE}\) exceeds available HBM \({_SIZE}\)"):
    m = re.search(pattern, message)
    if m:
      return _bytes(m.group(1), m.group(2)), _bytes(m.group(3), m.group(4))
  return None, None


def traced_matmul_flops(jaxpr) -> float:
  """FLOPs of every matrix multiplication in a jaxpr (2 per multiply-add), global shapes, a scan's body
  counted `length` times and the costliest branch of a cond; remat recomputation included (it is in the
  jaxpr). XLA's cost_analysis counts loop bodies once, so this is the figure to hold against the formula."""
  from jax.extend import core
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in contract)
    inner = [traced_matmul_flops(sub) for sub in core.jaxprs_in_params(eqn.params)]
    if eqn.primitive.name == "cond":
      total += max(inner, default=0.0)
    else:
      total += (eqn.params["length"] if eqn.primitive.name == "scan" else 1) * sum(inner)
  return total


def batch_arrays(mesh, batch: int, seq: int, strategy: str) -> dict[str, jax.ShapeDtypeStruct]:
  """The batch dict `data.make_batches` yields, as ShapeDtypeStructs split over the batch axes."""
  keys = ("input_ids", "attention_mask") + (("segment_ids", "position_ids") if strategy == "pack" else ())
  return {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sharding.batch_sharding(mesh)) for k in keys}


def check_shapes(config, mesh, teacher, student, batch: int, seq: int):
  """Refuses, before compiling, a batch the train loop would refuse or the models cannot take."""
  dp = sharding.data_parallel_size(mesh)
  accum = config.optim.grad_accum
  if batch < 1 or batch % (dp * accum):
    raise validation.ConfigError(f"global batch {batch} must be a multiple of data-parallel size {dp} × grad_accum "
                                 f"{accum}: change --batch or --config.data.batch_size")
  for model in filter(None, (teacher, student)):
    if not 0 < seq <= model.cfg.max_length:
      raise validation.ConfigError(f"sequence length {seq} must lie in 1..{model.cfg.max_length} (the "
                                   "model's positions)")


def compile_step(config, mesh, teacher, student, batch: int, seq: int, hbm_bytes: float) -> Result:
  """Lowers and compiles `train.build_step`'s step for `batch` sequences of `seq` tokens."""
  check_shapes(config, mesh, teacher, student, batch, seq)
  fns = train.build_step(config, mesh, student, teacher, abstract_params(student), MASK_TOKEN_ID)
  teacher_params = abstract_params(teacher, fns.teacher_sharding) if teacher is not None else None
  token_probs_V = jax.ShapeDtypeStruct((student.cfg.vocab_size,), jnp.float32, sharding=fns.replicated)
  args = (fns.abstract_state, teacher_params, batch_arrays(mesh, batch, seq, config.data.strategy), token_probs_V)

  start = time.perf_counter()
  traced = fns.step.trace(*args)
  try:
    compiled = traced.lower().compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    message = str(e).strip()
    first = next((line for line in message.splitlines() if "hbm" in line.lower() or "memory" in line.lower()),
                 message.splitlines()[0])
    needed, available = parse_oom(message)
    return Result(batch, seq, hbm_bytes, time.perf_counter() - start, fits=False, oom_message=first.strip(),
                  needed_bytes=needed, available_bytes=available)
  seconds = time.perf_counter() - start

  stats = compiled.memory_analysis()
  fields = ("argument", "output", "alias", "temp", "generated_code")
  memory = {f: int(getattr(stats, f"{f}_size_in_bytes", 0) or 0) for f in fields}
  peak = getattr(stats, "peak_memory_in_bytes", None) or None
  estimated = peak is None
  if estimated:
    peak = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"] + memory["generated_code"]

  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per program
  # cost_analysis describes one device's SPMD program; the other two figures count the whole step.
  compiled_flops = float(cost["flops"]) * mesh.size if cost and "flops" in cost else None
  per_token = train.step_flops_per_token(config, teacher, student, seq)
  return Result(batch, seq, hbm_bytes, seconds, fits=peak <= hbm_bytes, memory=memory, peak_bytes=peak,
                peak_estimated=estimated, formula_flops=metrics.flops_per_step(per_token, batch * seq),
                traced_flops=traced_matmul_flops(traced.jaxpr.jaxpr), compiled_flops=compiled_flops,
                compiled_loops=len(re.findall(r"\bwhile\(", compiled.as_text() or "")))


# ------------------------------------------------------------------------------------------------ report

def describe(topo: Topology, devices, mesh, config, teacher, student, batch: int, seq: int) -> str:
  def model(m):
    params = model_lib.count_params(abstract_params(m)) / 1e6
    layers = f"{m.cfg.num_layers} layer{'s' if m.cfg.num_layers > 1 else ''}"
    return f"{m.cfg.family} {layers} × {m.cfg.hidden_size} ({params:.1f}M parameters)"

  accum = config.optim.grad_accum
  lines = [
      f"topology  {topo.name} = {topo.libtpu_name}: {len(devices)} × {devices[0].device_kind}, "
      f"{topo.chip.hbm_gib:g} GiB HBM each",
      f"mesh      {' × '.join(f'{a} {n}' for a, n in mesh.shape.items())}",
      f"models    {'teacher ' + model(teacher) + ', ' if teacher is not None else ''}student {model(student)}; "
      f"{config.compute.dtype} compute, remat {'on' if config.compute.remat else 'off'}",
      f"step      global batch {batch} × {seq} tokens, grad_accum {accum} (micro-batch {batch // accum})",
  ]
  return "\n".join(lines)


def report(result: Result) -> str:
  if not result.fits:
    return f"compile   {result.seconds:.0f} s: {result.oom_message}\nverdict   {result.verdict()}"
  m = result.memory
  gib = lambda b: f"{b / GiB:8.3f} GiB"  # noqa: E731
  lines = [
      f"compile   {result.seconds:.0f} s",
      "memory per device:",
      f"  arguments       {gib(m['argument'])}  (train state, teacher parameters, batch)",
      f"  outputs         {gib(m['output'])}",
      f"  aliased         {gib(m['alias'])}  (donated state reused as output)",
      f"  temporaries     {gib(m['temp'])}",
      f"  generated code  {gib(m['generated_code'])}",
      f"  peak            {gib(result.peak_bytes)}{'  (estimated: no peak from XLA)' if result.peak_estimated else ''}"
      f"  of {result.hbm_bytes / GiB:g} GiB HBM",
  ]
  formula, tokens = result.formula_flops, result.batch * result.seq
  lines += [
      "FLOPs per step, all devices:",
      f"  formula         {formula:.3e}  (train.step_flops_per_token × {tokens:,} tokens)",
      f"  traced matmuls  {result.traced_flops:.3e}  ({result.traced_flops / formula:.2f} × formula; loops × trip "
      "count, recomputation included)",
  ]
  if result.compiled_flops is not None:
    loops = (f"{result.compiled_loops} loop(s) left, each body counted once" if result.compiled_loops
             else "no loops left")
    lines.append(f"  XLA compiled    {result.compiled_flops:.3e}  ({result.compiled_flops / formula:.2f} × formula; "
                 f"every op, {loops})")
  lines.append(f"verdict   {result.verdict()}")
  return "\n".join(lines)


def search_batch(config, mesh, teacher, student, start: int, seq: int, hbm_bytes: float) -> Result | None:
  """Largest global batch that fits, doubling from `start` (halving first if `start` does not fit)."""
  step = sharding.data_parallel_size(mesh) * config.optim.grad_accum
  best, batch = None, start
  while batch >= step and batch % step == 0:
    result = compile_step(config, mesh, teacher, student, batch, seq, hbm_bytes)
    print(f"  batch {batch:6d}: {result.verdict()}  [{result.seconds:.0f} s]", flush=True)
    if result.fits:
      best = result
      if batch < start:
        break  # halving: the first that fits is the largest below start
      batch *= 2
    elif best is not None:
      break
    else:
      batch //= 2
  return best


def main(argv: list[str] | None = None) -> int:
  """Exit status: 0 the step fits, 1 it does not, 2 bad input (one line, refused before libtpu starts)."""
  from absl import flags
  from ml_collections import config_flags
  argv = list(sys.argv if argv is None else argv)

  def define(fv):
    return (config_flags.DEFINE_config_file("config", None, "a configs/*.py file", flag_values=fv, lock_config=True,
                                            sys_argv=argv),
            flags.DEFINE_string("topology", None, "v5e-8, v4-8, v5p-8, v6e-8, v4-32, ... or v5e:2x4", flag_values=fv),
            flags.DEFINE_integer("batch", None, "global batch (sequences); default config.data.batch_size",
                                 flag_values=fv),
            flags.DEFINE_integer("seq", None, "sequence length (tokens); default config.data.max_len", flag_values=fv),
            flags.DEFINE_bool("search-batch", False, "double the global batch until it no longer fits",
                              flag_values=fv))

  def required(fv):
    held = define(fv)
    flags.mark_flags_as_required(["config", "topology"], flag_values=fv)
    return held

  parsed = trainer.parse_flags(argv, required)
  if parsed is None:
    return 2
  config_flag, topology_flag, batch_flag, seq_flag, search_flag = parsed
  config = config_flag.value.copy_and_resolve_references()
  try:
    # What needs no compiler first: bad input is refused whether libtpu is there or not.
    train.validate_config(config)
    topo = parse_topology(topology_flag.value)
    for flag, value in (("--batch", batch_flag.value), ("--seq", seq_flag.value)):
      if value is not None:
        validation.check_number(flag, value, ">0")
    teacher, student = abstract_models(config)
    batch = batch_flag.value or config.data.batch_size
    seq = seq_flag.value or config.data.max_len
    validation.check_max_len(seq, {"teacher": teacher, "student": student}, "--seq" if seq_flag.value else
                        "--config.data.max_len")
    compile_only_process()
    if not has_libtpu():
      print(f"error: compiling for a TPU needs libtpu: {INSTALL_HINT.format(jax.__version__)}", file=sys.stderr)
      return 2
    devices = get_topology(topo).devices
    validation.check_mesh(config.mesh.shape, len(devices))
    mesh = sharding.make_mesh(config.mesh.shape, devices=devices)
    check_shapes(config, mesh, teacher, student, batch, seq)
    print(describe(topo, devices, mesh, config, teacher, student, batch, seq), flush=True)
    hbm = topo.chip.hbm_gib * GiB
    if search_flag.value:
      print("searching the largest global batch that fits:", flush=True)
      best = search_batch(config, mesh, teacher, student, batch, seq, hbm)
      if best is None:
        print("verdict   no global batch fits: try --config.compute.remat=True or a larger slice")
        return 1
      print(f"largest   global batch {best.batch} fits "
            f"({best.batch // sharding.data_parallel_size(mesh)} sequences per data-parallel device)")
      print(report(best))
      return 0
    result = compile_step(config, mesh, teacher, student, batch, seq, hbm)
  except (validation.ConfigError, hf.ConversionError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(report(result))
  return 0 if result.fits else 1


if __name__ == "__main__":
  sys.exit(main())
