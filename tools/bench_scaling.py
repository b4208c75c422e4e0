"""Scaling figures on fake CPU devices: per-device state memory under FSDP, and the step time of 1 vs 8 devices.

  .venv/bin/python tools/bench_scaling.py memory                   # bert-base -> DistilBERT, fsdp = 1, 2, 4, 8
  .venv/bin/python tools/bench_scaling.py time --config tiny       # 1 vs 8 devices, same global batch
  .venv/bin/python tools/bench_scaling.py time --config demo --rounds 5 --unpinned

The process gets 8 fake CPU devices (XLA's --xla_force_host_platform_device_count, set before jax starts);
a mesh of N devices uses the first N. Models come from their configurations alone (`aot.abstract_models`),
so no weights are read and nothing is downloaded.

`memory`: for each N, the real train step (`train.build_step`, configs/distilbert_base.py: teacher
bert-base-uncased, 6-layer bf16 student, AdamW, grad_accum 8) is built on a (data 1, fsdp N, tensor 1) mesh,
lowered with abstract arguments and compiled for the CPU; nothing runs. Two per-device figures: the bytes
of one shard of every leaf of the sharded abstract state (`NamedSharding.shard_shape`), split into student
parameters, Adam moments and teacher parameters, and the compiled step's `memory_analysis()` (arguments:
state + teacher + batch; temporaries). Each is printed with its ratio to (the N = 1 figure) / N: 1.00 is a
perfect 1/N fall; what stays above is the replicated remainder (vectors whose logical axis is not "embed",
such as biases of width 3072 or the 30,522-word output bias, and the batch-independent scalars).

`time`: the step of configs/tiny.py (a 2-layer, 64-wide BERT teacher -> 1-layer student, 8 × 64 tokens) or
configs/demo.py (MiniLM-L6 shapes -> 3 layers, 32 × 128 tokens), with random parameters, on 1 device and on 8
devices (all on the `data` axis and/or all on `fsdp`: --axes), the same global batch. Variants
alternate round by round (each round: --steps steps of every variant in turn, each timed to
`block_until_ready`), and the table gives the median seconds per step and the ratio to 1 device. The 8 fake
devices share the machine's cores (2 here), so no speed-up is possible: the ratio is the cost of
splitting the step into 8 SPMD programs (collectives, smaller matmuls), not a forecast for a real slice.

The package pins the residual stream to the batch sharding (`model.ACTIVATION_AXES`, rule `batch` ->
data and fsdp): each device computes its own rows and gathers the weights (true FSDP). `--unpinned` (both
parts) adds the step compiled with `config.mesh.rules.batch = None`, as the package was before: left to
itself, GSPMD keeps the hidden dimension split as the parameters are and the micro-batch whole on every
device, so on an fsdp mesh each device computes attention and vocabulary logits for the whole micro-batch.
Nothing here asserts on time or memory.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

FAKE_DEVICES = 8
# Before jax starts a backend; keeps an installed libtpu out of it too.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={FAKE_DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from distilbert_jax import aot, sharding, train  # noqa: E402
from distilbert_jax import model as model_lib  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_forward import CONFIGS, load_config  # noqa: E402
MiB = 2 ** 20
# A random 2-layer BERT as the tests build it (tests/conftest.py tiny_teacher): configs/tiny.py's teacher.
TINY_TEACHER = model_lib.EncoderConfig.bert(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                            max_position_embeddings=64)


def teacher_folder(cfg: model_lib.EncoderConfig, parent: pathlib.Path) -> str:
  """A model folder holding only config.json (our own format), which `aot.model_config` reads."""
  folder = parent / "teacher"
  folder.mkdir(exist_ok=True)
  (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
  return str(folder)


def mesh_of(shape, n: int):
  return sharding.make_mesh(shape, devices=jax.devices()[:n])


def _bytes(tree) -> int:
  """Bytes of one device's shard of every leaf (ShapeDtypeStructs with NamedShardings)."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def versions() -> str:
  import flax
  import optax
  return (f"jax/jaxlib {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, Python "
          f"{platform.python_version()}; {jax.device_count()} fake {jax.devices()[0].platform} devices on "
          f"{os.cpu_count()} cores ({platform.machine()})")


# ------------------------------------------------------------------------------------------------ memory

def unpinned(config):
  """`config` with the residual stream left to the compiler (no `batch` rule for activations)."""
  config = config.copy_and_resolve_references()
  config.mesh.rules.batch = None
  return config


def _compile_memory(config, teacher, student, n: int, batch: int, seq: int, pinned: bool) -> dict:
  mesh = mesh_of((1, n, 1), n)
  config = config if pinned else unpinned(config)
  fns = train.build_step(config, mesh, student, teacher, aot.abstract_params(student), aot.MASK_TOKEN_ID)
  teacher_params = aot.abstract_params(teacher, fns.teacher_sharding)
  token_probs_V = jax.ShapeDtypeStruct((student.cfg.vocab_size,), jnp.float32, sharding=fns.replicated)
  start = time.perf_counter()
  lowered = fns.step.lower(fns.abstract_state, teacher_params,
                           aot.batch_arrays(mesh, batch, seq, config.data.strategy), token_probs_V)
  compiled = lowered.compile()
  stats = compiled.memory_analysis()
  return dict(n=n, pinned=pinned, params=_bytes(fns.abstract_state.params),
              opt=_bytes(fns.abstract_state.opt_state), teacher=_bytes(teacher_params),
              argument=stats.argument_size_in_bytes, temp=stats.temp_size_in_bytes,
              seconds=time.perf_counter() - start)


def memory(args):
  config = load_config(CONFIGS / "distilbert_base.py")
  teacher, student = aot.abstract_models(config)
  batch, seq = args.batch, args.seq
  millions = lambda m: model_lib.count_params(aot.abstract_params(m)) / 1e6  # noqa: E731
  print(f"configs/distilbert_base.py: teacher {config.teacher} ({millions(teacher):.1f}M), student "
        f"{student.cfg.num_layers} × {student.cfg.hidden_size} ({millions(student):.1f}M), {config.compute.dtype} "
        f"compute, grad_accum {config.optim.grad_accum}; global batch {batch} × {seq}")
  print(versions())
  sizes = [int(n) for n in args.sizes.split(",")]
  if sizes[0] != 1:
    raise SystemExit("--sizes must start with 1 (the reference of the 1/N ratios)")
  rows = []
  for pinned in (True, False) if args.unpinned else (True,):
    for n in sizes if pinned else sizes[1:]:  # on one device the pins change nothing
      rows.append(_compile_memory(config, teacher, student, n, batch, seq, pinned))
      print(f"  fsdp {n}{'' if pinned else ' unpinned'}: compiled in {rows[-1]['seconds']:.0f} s", flush=True)

  base = rows[0]
  cols = [("params", "student params"), ("opt", "Adam moments"), ("teacher", "teacher params"),
          ("argument", "compiled arguments"), ("temp", "compiled temporaries")]
  print("\nper device, MiB (ratio to the 1-device figure / N):")
  print(f"| devices (fsdp) | {' | '.join(title for _, title in cols)} |")
  print(f"|---:|{'---:|' * len(cols)}")
  for row in rows:
    cells = [f"{row[k] / MiB:.1f} ({row[k] / (base[k] / row['n']):.3f})" for k, _ in cols]
    print(f"| {row['n']}{'' if row['pinned'] else ', activations unpinned'} | {' | '.join(cells)} |")
  return rows


# ------------------------------------------------------------------------------------------------ time

def _random_inputs(teacher, student, batch: int, seq: int):
  """Token ids with random lengths from seq/2 to seq, a flat token distribution, random parameters."""
  rng = np.random.default_rng(0)
  ids = rng.integers(1000, student.cfg.vocab_size, (batch, seq)).astype(np.int32)
  lengths = rng.integers(seq // 2, seq + 1, batch)
  mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
  host = dict(input_ids=ids * mask, attention_mask=mask)
  probs_V = np.full((student.cfg.vocab_size,), 1.0 / student.cfg.vocab_size, np.float32)
  t_params = model_lib.init_params(teacher, jax.random.key(1)) if teacher is not None else None
  s_params = model_lib.init_params(student, jax.random.key(2))
  return host, probs_V, t_params, s_params


def timing(args):
  with tempfile.TemporaryDirectory() as tmp:
    if args.config == "tiny":
      config = load_config(CONFIGS / "tiny.py", teacher_folder(TINY_TEACHER, pathlib.Path(tmp)))
    else:
      config = load_config(CONFIGS / "demo.py")  # its teacher: the installed MiniLM's folder, of which only config.json is read
    teacher, student = aot.abstract_models(config)
  batch, seq = args.batch or config.data.batch_size, args.seq or config.data.max_len
  host, probs_V, t_params, s_params = _random_inputs(teacher, student, batch, seq)
  print(f"configs/{args.config}.py: teacher {teacher.cfg.num_layers} × {teacher.cfg.hidden_size}, student "
        f"{student.cfg.num_layers} × {student.cfg.hidden_size}, {config.compute.dtype}, global batch {batch} × {seq}, "
        f"grad_accum {config.optim.grad_accum}, random parameters")
  print(versions())

  variants = {"1 device": (1, (1, 1, 1), False)}
  for axis in args.axes.split(","):
    variants[f"{FAKE_DEVICES} devices, {axis}"] = (FAKE_DEVICES, {"data": (-1, 1, 1), "fsdp": (1, -1, 1)}[axis], True)
  if args.unpinned:
    variants[f"{FAKE_DEVICES} devices, fsdp, activations unpinned"] = (FAKE_DEVICES, (1, -1, 1), False)
  runs = {}
  for name, (n, shape, pinned) in variants.items():
    mesh = mesh_of(shape, n)
    fns = train.build_step(config if pinned else unpinned(config), mesh, student, teacher,
                             aot.abstract_params(student), aot.MASK_TOKEN_ID)
    state = fns.init(s_params)
    teacher_on = jax.device_put(t_params, fns.teacher_sharding) if teacher is not None else None
    batch_on = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in host.items()}
    probs_on = jax.device_put(probs_V, fns.replicated)
    start = time.perf_counter()
    step = fns.step.lower(state, teacher_on, batch_on, probs_on).compile()
    state, metrics = step(state, teacher_on, batch_on, probs_on)
    jax.block_until_ready(metrics)
    print(f"  {name}: mesh {dict(mesh.shape)}, compile + first step {time.perf_counter() - start:.1f} s, "
          f"loss {float(metrics['loss']):.4f}", flush=True)
    runs[name] = dict(state=state, args=(teacher_on, batch_on, probs_on), fn=step, seconds=[])

  load = os.getloadavg()[0]
  for _ in range(args.rounds):  # round by round, so that other load on the machine hits every variant alike
    for run in runs.values():
      for _ in range(args.steps):
        start = time.perf_counter()
        run["state"], metrics = run["fn"](run["state"], *run["args"])
        jax.block_until_ready(metrics)
        run["seconds"].append(time.perf_counter() - start)

  one = statistics.median(runs["1 device"]["seconds"])
  print(f"\nmedian of {args.rounds} rounds × {args.steps} steps (1-minute load average {load:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores):")
  print("| variant | s/step | tokens/s | vs 1 device |")
  print("|---|---:|---:|---:|")
  for name, run in runs.items():
    median = statistics.median(run["seconds"])
    print(f"| {name} | {median:.4f} | {batch * seq / median:.0f} | {median / one:.2f}× |")
  return runs


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="part", required=True)
  m = sub.add_parser("memory", help="per-device state memory for fsdp = 1, 2, 4, 8 (compile only)")
  m.add_argument("--sizes", default="1,2,4,8", help="device counts, starting with 1")
  m.add_argument("--batch", type=int, default=64, help="global batch (a multiple of 8 × grad_accum 8)")
  m.add_argument("--seq", type=int, default=128)
  m.add_argument("--unpinned", action="store_true", help="also with the activations left to the compiler")
  t = sub.add_parser("time", help="step time on 1 vs 8 fake devices, same global batch")
  t.add_argument("--config", choices=("tiny", "demo"), default="tiny")
  t.add_argument("--axes", default="data,fsdp", help="mesh axes the 8 devices go on, comma-separated")
  t.add_argument("--batch", type=int, default=0, help="global batch; default the config's")
  t.add_argument("--seq", type=int, default=0, help="tokens per sequence; default the config's max_len")
  t.add_argument("--unpinned", action="store_true", help="also fsdp with the activations left to the compiler")
  t.add_argument("--rounds", type=int, default=7)
  t.add_argument("--steps", type=int, default=3, help="steps of each variant per round")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  (memory if args.part == "memory" else timing)(args)


if __name__ == "__main__":
  sys.exit(main())
