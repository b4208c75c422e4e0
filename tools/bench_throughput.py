"""Throughput options of the distillation train step, each measured against a reference in the same run.

  .venv/bin/python tools/bench_throughput.py --part attention   # (a) einsum vs jax.nn.dot_product_attention
  .venv/bin/python tools/bench_throughput.py --part remat       # (b) remat off vs each policy: time, memory
  .venv/bin/python tools/bench_throughput.py --part data        # (c) pad vs bucket vs pack on the demo corpus
  .venv/bin/python tools/bench_throughput.py --part dtype       # (d) float32 vs bfloat16 compute
  .venv/bin/python tools/bench_throughput.py --part all --batch 4 --seq 32 --rounds 1 --repeats 1  # smoke test

Every figure times the REAL distillation step (`train.build_step`: masking, teacher forward, student
forward and backward, the losses, AdamW) of the demo (`configs/demo.py`): teacher all-MiniLM-L6-v2 (6 × 384)
-> student of teacher layers (0, 2, 4), 32 × 128 per step, L_ce at the masked positions only. The teacher
is not adapted first (its fresh masked-LM head changes no timing). Models come from `train.build_models`
and each variant replaces fields of their `EncoderConfig`s, the way `config.compute.*` keys would.

Timing: each variant's step is compiled once (ahead of time, so its `memory_analysis()` is read from the
very program that runs; compilation is never timed); then every round runs `--repeats` steps of each
variant in turn, the order reversed every other round, each step ending in `block_until_ready`. Each step
gets two clocks: wall time, and the CPU time of this process (all its threads, `time.process_time`). On a
machine that other processes load, wall time mostly measures how much of the CPUs they left, while CPU
time still measures the work the step took (it overstates it a little when XLA's idle threads spin). A
figure is the median over rounds of the variant's per-round median; a ratio is the median over rounds of
(reference time / variant time) within the round, so load that changes between rounds cancels. The share of
the CPUs other processes took during each round is printed. Nothing here asserts on time.

Parts (`--part`):
  attention  student AND teacher with `attention` = einsum or dot_product. The fused call has no dropout,
             so the student falls back to einsum while attention dropout is on: variants are einsum with
             the default attention dropout 0.1 (reference), einsum with 0, dot_product with 0.
  remat      student `remat` off (reference) and on with each `remat_policy`; also the compiled program's
             temporary memory (`memory_analysis().temp_size_in_bytes`), which holds the activations.
  data       `data.strategy` pad / bucket / pack on the demo corpus (State of the Union + Moby-Dick,
             tokenized once into --cache-dir by `train.prepare_data`). Share of pad tokens over one epoch of
             each strategy, then real (non-pad) tokens per second: step time is measured per batch shape
             (bucket pads to 64 or 128) and weighted by how often each shape occurs in the epoch.
  dtype      `model.dtype` float32 (reference) vs bfloat16 compute for both models (parameters stay float32).
  remat-tpu  no timing: the step of `--tpu-config` (default configs/distilbert_base.py: bert-base ->
             6 layers, 256 x 512, grad_accum 8, bf16) compiled for `--topology` (default v5e-8) with libtpu
             but no TPU (`distilbert_jax.aot`), remat off and each policy: per-device temporaries and peak,
             and the traced matmul FLOPs against the model formula (what the recomputation costs). Needs
             libtpu (`WITH_TPU=1 ./setup.sh`, or a venv with `jax[tpu]`); minutes per compile on 2 cores.

  .venv/bin/python tools/bench_throughput.py --part remat-tpu --topology v5e-8
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench_forward import CONFIGS, cpu_snapshot, load_config, others_share  # noqa: E402
from distilbert_jax import data, masking, sharding, train  # noqa: E402
from distilbert_jax import model as model_lib  # noqa: E402

PARTS = ("attention", "remat", "data", "dtype")  # "all" runs these; "remat-tpu" only when asked
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "corpus"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--part", choices=PARTS + ("all", "remat-tpu"), default="all")
  p.add_argument("--batch", type=int, default=32, help="global batch (demo: 32)")
  p.add_argument("--seq", type=int, default=128, help="data.max_len (demo: 128)")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--repeats", type=int, default=2, help="timed steps per variant per round")
  p.add_argument("--corpus-dir", default=os.environ.get("DISTILBERT_JAX_CORPUS", str(DEFAULT_CORPUS)),
                 help="a local copy of the demo corpus (sotu/, moby-dick/)")
  p.add_argument("--cache-dir", default="~/.cache/distilbert_jax", help="where the tokenized corpus is kept")
  p.add_argument("--topology", default="v5e-8", help="remat-tpu: the TPU slice to compile for")
  p.add_argument("--tpu-config", default=str(ROOT / "configs" / "distilbert_base.py"), help="remat-tpu: the run")
  return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ setup

def demo_config(args):
  config = load_config(CONFIGS / "demo.py")
  config.teacher_mlm.steps = 0
  config.data.corpus_dir = args.corpus_dir
  config.data.cache_dir = args.cache_dir
  config.data.batch_size = args.batch
  config.data.max_len = args.seq
  config.train.steps = 10_000  # only the learning-rate schedule sees it
  config.mesh.shape = (1, 1, 1)  # one device: the figures are per device
  return config


class Bench:
  """The models, data and compiled steps shared by the parts."""

  def __init__(self, args):
    self.args = args
    self.config = demo_config(args)
    self.teacher, teacher_params, self.student, self.student_params = train.build_models(self.config)
    self.teacher_params = jax.device_put(teacher_params)
    tokenizer = self.config.data.tokenizer or self.teacher.cfg.tokenizer
    self.data_dir = train.prepare_data(self.config, tokenizer)
    self.train_ds = data.TokenizedDataset(self.data_dir, "train")
    specials = self.train_ds.special_ids
    self.mask_id = specials["mask"]
    probs_V = masking.token_probs(self.train_ds.counts(), [i for i in specials.values() if i is not None],
                                  self.config.mlm.smoothing)
    self.probs_V = jax.device_put(np.asarray(probs_V, np.float32))
    self.mesh = sharding.make_mesh(self.config.mesh.shape)
    self.abstract_params = jax.eval_shape(lambda p: p, self.student_params)

  def batches(self, strategy: str, n: int) -> list[dict]:
    it = data.make_batches(self.train_ds, batch_size=self.args.batch, max_len=self.args.seq,
                           seed=self.config.seed, strategy=strategy)
    return [next(it) for _ in range(n)]

  def variant(self, student_kw: dict, teacher_kw: dict, batch: dict) -> "Variant":
    student = model_lib.Encoder(self.student.cfg.replace(**student_kw))
    teacher = model_lib.Encoder(self.teacher.cfg.replace(**teacher_kw))
    fns = train.build_step(self.config, self.mesh, student, teacher, self.abstract_params, self.mask_id)
    state = fns.init(self.student_params)
    teacher_params = jax.device_put(self.teacher_params, fns.teacher_sharding)
    global_batch = sharding.global_batch(batch, self.mesh)
    t0 = time.perf_counter()
    compiled = fns.step.lower(state, teacher_params, global_batch, self.probs_V).compile()
    compile_s = time.perf_counter() - t0
    return Variant(compiled, state, teacher_params, global_batch, self.probs_V, compile_s,
                   int(np.sum(batch["attention_mask"])))


class Variant:
  """One compiled step with its own train state (donated and replaced at every call)."""

  def __init__(self, compiled, state, teacher_params, batch, probs_V, compile_s, real_tokens):
    self.compiled, self.state, self.teacher_params, self.batch, self.probs_V = (
        compiled, state, teacher_params, batch, probs_V)
    self.compile_s, self.real_tokens = compile_s, real_tokens
    self.memory = compiled.memory_analysis()
    self.call()  # first call outside the clock: buffers, thread pools

  def call(self) -> tuple[float, float]:
    """One step: (wall s, CPU s of this process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    self.state, metrics = self.compiled(self.state, self.teacher_params, self.batch, self.probs_V)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - t0, time.process_time() - c0


def time_rounds(variants: dict[str, Variant], args) -> tuple[dict, list]:
  """({clock: {name: [per-round median s]}} for clock "wall" and "cpu", [others' CPU share per round])."""
  names = list(variants)
  per_round = {"wall": collections.defaultdict(list), "cpu": collections.defaultdict(list)}
  shares = []
  for r in range(args.rounds):
    before = cpu_snapshot()
    for name in (names if r % 2 == 0 else names[::-1]):
      calls = [variants[name].call() for _ in range(args.repeats)]
      per_round["wall"][name].append(statistics.median(w for w, _ in calls))
      per_round["cpu"][name].append(statistics.median(c for _, c in calls))
    shares.append(others_share(before, cpu_snapshot()))
  return per_round, shares


def ratio(per_round: dict, ref: str, name: str) -> float:
  """Median over rounds of (reference time / `name` time) in the same round: > 1 means `name` is faster."""
  return statistics.median(a / b for a, b in zip(per_round[ref], per_round[name]))


def print_shares(shares):
  known = [s for s in shares if s is not None]
  if known:
    print(f"other processes took {statistics.median(known):.0%} of the {os.cpu_count()} CPUs per round (median; "
          f"max {max(known):.0%}){'  <- a loaded machine: read the ratios, not the absolute times' if max(known) > 0.1 else ''}")


def table(variants: dict[str, Variant], args, *, memory: bool = False):
  per_round, shares = time_rounds(variants, args)
  wall, cpu = per_round["wall"], per_round["cpu"]
  ref = next(iter(variants))
  print(f"reference: {ref}; speed = reference time / variant time, per round (> 1: faster)")
  head = (f"{'variant':42} {'wall s/step':>11} {'min-max':>11} {'CPU s/step':>10} {'min-max':>11} "
          f"{'speed wall':>10} {'speed CPU':>9}")
  if memory:
    head += f" {'temp MiB':>9} {'vs ref':>6}"
  print(head)
  ref_temp = variants[ref].memory.temp_size_in_bytes if memory else None
  for name, v in variants.items():
    line = (f"{name:42} {statistics.median(wall[name]):11.2f} {f'{min(wall[name]):.1f}-{max(wall[name]):.1f}':>11} "
            f"{statistics.median(cpu[name]):10.2f} {f'{min(cpu[name]):.1f}-{max(cpu[name]):.1f}':>11} "
            f"{ratio(wall, ref, name):9.2f}x {ratio(cpu, ref, name):8.2f}x")
    if memory:
      temp = v.memory.temp_size_in_bytes
      line += f" {temp / 2**20:9.0f} {temp / ref_temp:6.2f}"
    print(line)
  print_shares(shares)
  print(f"compile s: {', '.join(f'{n} {v.compile_s:.0f}' for n, v in variants.items())}")


# ------------------------------------------------------------------------------------------------ parts

def part_attention(bench: Bench):
  print("\n## (a) attention: einsum vs jax.nn.dot_product_attention (teacher and student), pad batches "
        f"{bench.args.batch}x{bench.args.seq}")
  batch = bench.batches("pad", 1)[0]
  variants = {
      "einsum, attention dropout 0.1 (default)": bench.variant({}, {}, batch),
      "einsum, attention dropout 0": bench.variant({"attention_dropout_rate": 0.0}, {}, batch),
      "dot_product, attention dropout 0": bench.variant({"attention": "dot_product", "attention_dropout_rate": 0.0},
                                                        {"attention": "dot_product"}, batch),
  }
  table(variants, bench.args)


def part_remat(bench: Bench):
  print(f"\n## (b) student remat: off vs each policy, pad batches {bench.args.batch}x{bench.args.seq}")
  batch = bench.batches("pad", 1)[0]
  variants = {"remat off": bench.variant({"remat": False}, {}, batch)}
  for policy in model_lib.REMAT_POLICIES:
    variants[f"remat {policy}"] = bench.variant({"remat": True, "remat_policy": policy}, {}, batch)
  table(variants, bench.args, memory=True)
  ref = variants["remat off"].memory
  print(f"(arguments {ref.argument_size_in_bytes / 2**20:.0f} MiB and outputs {ref.output_size_in_bytes / 2**20:.0f} "
        "MiB are the same in every variant: parameters, optimizer state, batch)")


def epoch_stats(bench: Bench, strategy: str) -> dict:
  """Over one epoch of `strategy`: pad share, real tokens per batch, and how often each length L occurs."""
  ds = data.batch_dataset(bench.train_ds, batch_size=bench.args.batch, max_len=bench.args.seq,
                          seed=bench.config.seed, strategy=strategy, num_epochs=1)
  n = len(ds)
  pad_share = data.pad_fraction(iter(ds), n)
  real, lengths = [], collections.Counter()
  for batch in iter(ds):
    real.append(int(np.sum(batch["attention_mask"])))
    lengths[batch["input_ids"].shape[1]] += 1
  return dict(batches=n, pad_share=pad_share, real_per_batch=float(np.mean(real)),
              examples=bench.train_ds.lengths.size, length_share={k: c / n for k, c in sorted(lengths.items())})


def part_data(bench: Bench):
  args = bench.args
  print(f"\n## (c) batching strategy on the demo corpus, global batch {args.batch}, max_len {args.seq}")
  lengths = bench.train_ds.lengths
  print(f"corpus: {len(lengths)} training examples, length median {int(np.median(lengths))}, mean "
        f"{lengths.mean():.1f}, {np.mean(lengths == args.seq):.0%} at max_len")
  stats = {s: epoch_stats(bench, s) for s in data.STRATEGIES}
  # One program per (strategy, L): pad and bucket share the unpacked program at L = max_len.
  shapes = {}
  for strategy in data.STRATEGIES:
    for batch in bench.batches(strategy, 64 if strategy == "bucket" else 1):
      key = ("pack" if strategy == "pack" else "unpacked", batch["input_ids"].shape[1])
      shapes.setdefault(key, batch)
  variants = {f"{kind}, L={length}": bench.variant({}, {}, batch)
              for (kind, length), batch in sorted(shapes.items(), key=lambda kv: (kv[0][0] != "unpacked", -kv[0][1]))}
  per_round, shares = time_rounds(variants, args)
  print(f"{'program':22} {'wall s/step':>11} {'min-max':>11} {'CPU s/step':>10} {'min-max':>11}")
  for name in variants:
    w, c = per_round["wall"][name], per_round["cpu"][name]
    print(f"{name:22} {statistics.median(w):11.2f} {f'{min(w):.1f}-{max(w):.1f}':>11} "
          f"{statistics.median(c):10.2f} {f'{min(c):.1f}-{max(c):.1f}':>11}")
  print_shares(shares)

  def seconds_per_batch(strategy, clock, r):
    """Expected step time over the epoch's mix of lengths, from round r's per-program medians."""
    kind = "pack" if strategy == "pack" else "unpacked"
    return sum(share * per_round[clock][f"{kind}, L={length}"][r]
               for length, share in stats[strategy]["length_share"].items())

  def real_tokens_per_s(strategy, clock):
    """Per round: (real tokens per batch / expected seconds per batch); median over rounds and the
    per-round ratio to pad."""
    own = [stats[strategy]["real_per_batch"] / seconds_per_batch(strategy, clock, r) for r in range(args.rounds)]
    pad = [stats["pad"]["real_per_batch"] / seconds_per_batch("pad", clock, r) for r in range(args.rounds)]
    return statistics.median(own), statistics.median(a / b for a, b in zip(own, pad))

  print(f"\n{'strategy':9} {'batches/epoch':>13} {'L (share of batches)':>22} {'pad share':>9} "
        f"{'real tok/batch':>14} {'real tok/s wall':>15} {'vs pad':>6} {'real tok/CPU s':>14} {'vs pad':>6}")
  for strategy in data.STRATEGIES:
    st = stats[strategy]
    wall_tps, wall_ratio = real_tokens_per_s(strategy, "wall")
    cpu_tps, cpu_ratio = real_tokens_per_s(strategy, "cpu")
    lengths_txt = ", ".join(f"{k} ({v:.0%})" for k, v in st["length_share"].items())
    print(f"{strategy:9} {st['batches']:13d} {lengths_txt:>22} {st['pad_share']:9.1%} {st['real_per_batch']:14.0f} "
          f"{wall_tps:15.0f} {wall_ratio:5.2f}x {cpu_tps:14.0f} {cpu_ratio:5.2f}x")
  print("(pack rows hold several examples: more real tokens per batch, so fewer batches per epoch)")


def part_dtype(bench: Bench):
  print(f"\n## (d) compute dtype, teacher and student, pad batches {bench.args.batch}x{bench.args.seq}")
  batch = bench.batches("pad", 1)[0]
  variants = {"float32": bench.variant({}, {}, batch),
              "bfloat16": bench.variant({"dtype": "bfloat16"}, {"dtype": "bfloat16"}, batch)}
  table(variants, bench.args, memory=True)


def part_remat_tpu(args):
  """Compiles (never runs) the TPU step with each remat setting; must run before jax starts a backend."""
  from distilbert_jax import aot
  aot.compile_only_process()
  if not aot.has_libtpu():
    sys.exit("--part remat-tpu needs libtpu: WITH_TPU=1 ./setup.sh (or pip install 'jax[tpu]')")
  config = load_config(args.tpu_config)
  topo = aot.parse_topology(args.topology)
  devices = aot.get_topology(topo).devices
  mesh = sharding.make_mesh(config.mesh.shape, devices=devices)
  batch, seq = config.data.batch_size, config.data.max_len
  print(f"\n## (b') student remat compiled for {topo.name} ({len(devices)} x {devices[0].device_kind}, mesh "
        f"{dict(mesh.shape)}): {args.tpu_config}, global batch {batch} x {seq}, grad_accum {config.optim.grad_accum}, "
        f"{config.compute.dtype}; per device")
  print(f"{'variant':40} {'temp GiB':>9} {'vs off':>7} {'peak GiB':>9} {'traced/formula FLOPs':>21} {'compile s':>9}")
  ref = None
  for policy in (None,) + tuple(model_lib.REMAT_POLICIES):
    config.compute.remat = policy is not None
    config.compute.remat_policy = policy or "full"
    teacher, student = aot.abstract_models(config)
    result = aot.compile_step(config, mesh, teacher, student, batch, seq, topo.chip.hbm_gib * aot.GiB)
    name = "remat off" if policy is None else f"remat {policy}"
    if not result.fits and not result.memory:
      print(f"{name:40} {result.verdict()}")
      continue
    temp = result.memory["temp"]
    ref = ref or temp
    print(f"{name:40} {temp / aot.GiB:9.2f} {temp / ref:7.2f} {result.peak_bytes / aot.GiB:9.2f} "
          f"{result.traced_flops / result.formula_flops:20.2f}x {result.seconds:9.0f}", flush=True)


def describe_machine() -> str:
  import flax
  import jaxlib
  cpu = platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      lines = f.read().splitlines()
    names = [l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")]
    flags = next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), [])
    cpu = f"{names[0]}, {'avx512_bf16' if 'avx512_bf16' in flags else 'no avx512_bf16'}, " \
          f"{'amx' if any(f.startswith('amx') for f in flags) else 'no AMX'}"
  except (OSError, IndexError):
    pass
  return (f"machine: {cpu}; os.cpu_count()={os.cpu_count()}; python {platform.python_version()}; "
          f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__} "
          f"({jax.default_backend()}, {jax.device_count()} device(s))")


def main(argv=None):
  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("distilbert_jax").setLevel(logging.ERROR)  # the fresh-head warning of the teacher
  if args.part == "remat-tpu":
    part_remat_tpu(args)
    print(describe_machine())
    return
  bench = Bench(args)
  print(describe_machine())
  print(f"teacher {bench.teacher.cfg.num_layers} x {bench.teacher.cfg.hidden_size} -> student "
        f"{bench.student.cfg.num_layers} x {bench.student.cfg.hidden_size}, batch {args.batch} x {args.seq}; "
        f"{args.rounds} rounds x {args.repeats} steps per variant")
  for part in (PARTS if args.part == "all" else (args.part,)):
    {"attention": part_attention, "remat": part_remat, "data": part_data, "dtype": part_dtype}[part](bench)
    sys.stdout.flush()


if __name__ == "__main__":
  main()
