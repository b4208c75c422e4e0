"""Forward-pass (inference) throughput of the JAX encoder against transformers' PyTorch model.

  .venv/bin/python tools/bench_forward.py --config minilm --batch 8 --seq 128

Both frameworks run the SAME masked-LM model with the SAME weights: random parameters are built in JAX,
written with `save_hf` to a temporary folder, and that folder is loaded by `AutoModelForMaskedLM`. Before
any timing the two float32 logits must agree to 1e-3, so the figures never compare different computations.

JAX runs `jax.jit`-compiled (compilation excluded, every call ends in `block_until_ready`); PyTorch runs in
`eval()` under `torch.inference_mode()`. `--dtype bfloat16` computes in bfloat16 in both: the JAX config's
compute dtype, `torch.autocast('cpu', bfloat16)` for PyTorch; parameters stay float32 in both.

Each round times `--repeats` calls of one framework then of the other (swapping who goes first), so that
machine noise hits both alike; a round during which other processes took more than `--max-busy` of the CPUs
(read from /proc/stat) is dropped and run again. The table reports the median over the calls of the kept
rounds. Nothing here asserts on time.

Other commands:
  .venv/bin/python tools/bench_forward.py --config distilbert-base --batch 8 --seq 128
  .venv/bin/python tools/bench_forward.py --config bert-base --batch 1 --seq 128
  .venv/bin/python tools/bench_forward.py --config minilm --batch 8 --seq 128 --dtype bfloat16
  .venv/bin/python tools/bench_forward.py --config tiny --batch 2 --seq 16 --rounds 2   # smoke test
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import distilbert_jax

# Model shapes only; the family (and so the Hugging Face class) comes from the preset unless --family says.
PRESETS = {
    # The 6-layer, 384-wide BERT of the demo teacher (nreimers/MiniLM-L6-H384-uncased, all-MiniLM-L6-v2).
    "minilm": dict(family="bert", num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536),
    "distilbert-base": dict(family="distilbert", num_layers=6, hidden_size=768, num_heads=12,
                            intermediate_size=3072),
    "bert-base": dict(family="bert", num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072),
    # Small enough to check the script itself in seconds; its figures mean little.
    "tiny": dict(family="bert", num_layers=2, hidden_size=64, num_heads=4, intermediate_size=256,
                 vocab_size=1024, max_position_embeddings=128),
}
SANITY_ATOL = 1e-3
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(path, *args):
  """`get_config(*args)` of a config file, e.g. CONFIGS / "demo.py" (configs/ is a folder, not a package)."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", choices=sorted(PRESETS), default="minilm")
  p.add_argument("--family", choices=["bert", "distilbert"], default=None,
                 help="override the preset's family (BERT adds token-type embeddings)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--repeats", type=int, default=3, help="timed calls per framework per round")
  p.add_argument("--rounds", type=int, default=5, help="rounds, each timing JAX and PyTorch in turn")
  p.add_argument("--max-busy", type=float, default=0.05,
                 help="drop a round if other processes took more than this share of all CPUs during it")
  p.add_argument("--max-attempts", type=int, default=None, help="rounds to try in all (default 4 x --rounds)")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  args.max_attempts = args.max_attempts or 4 * args.rounds
  return args


def build_config(args) -> distilbert_jax.EncoderConfig:
  dims = dict(PRESETS[args.config])
  family = args.family or dims.pop("family")
  dims.pop("family", None)  # still there when --family overrode it
  make = distilbert_jax.EncoderConfig.bert if family == "bert" else distilbert_jax.EncoderConfig.distilbert
  # No pooler: the masked-LM models of transformers have none, and the JAX side must not do extra work.
  return make(**dims, use_pooler=False)


def machine_description(torch_model) -> str:
  import torch
  import transformers
  cpu = platform.processor() or platform.machine()
  # platform.processor() is often just 'x86_64' on Linux; the model name is what tells machines apart.
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    if names:
      cpu = f"{names[0]} ({cpu})"
  except OSError:
    pass
  return (f"machine: {cpu}, os.cpu_count()={os.cpu_count()}, python {platform.python_version()}\n"
          f"jax {jax.__version__} ({jax.default_backend()}: {jax.devices()[0].device_kind}), "
          f"torch {torch.__version__} (get_num_threads()={torch.get_num_threads()}, "
          f"attention {torch_model.config._attn_implementation}), transformers {transformers.__version__}")


def cpu_snapshot():
  """(wall s, CPU s busy machine-wide, CPU s of this process); machine-wide figure None off Linux."""
  try:
    with open("/proc/stat") as f:
      fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: all but idle and iowait is busy.
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    busy = None
  t = os.times()
  return time.perf_counter(), busy, t.user + t.system


def others_share(before, after) -> float | None:
  """Fraction of all CPUs' time spent busy outside this process between two snapshots."""
  if before[1] is None or after[1] is None:
    return None
  wall = after[0] - before[0]
  others = (after[1] - before[1]) - (after[2] - before[2])
  return max(0.0, others / (wall * os.cpu_count()))


def quiet(others: float | None, args) -> bool:
  return others is None or others <= args.max_busy


def main(argv=None):
  args = parse_args(argv)
  import torch
  import transformers
  # transformers logs every unused tensor and init detail; the benchmark only needs its own lines.
  transformers.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  logging.getLogger("distilbert_jax").setLevel(logging.ERROR)

  cfg = build_config(args)
  if args.seq > cfg.max_length:
    sys.exit(f"--seq {args.seq} exceeds the {cfg.max_length} positions of the model")
  model32 = distilbert_jax.Encoder(cfg)
  params = distilbert_jax.init_params(model32, jax.random.key(args.seed))

  with tempfile.TemporaryDirectory() as tmp:
    distilbert_jax.save_hf(model32, params, tmp)
    torch_model, info = transformers.AutoModelForMaskedLM.from_pretrained(
        tmp, dtype=torch.float32, output_loading_info=True)
  # A tensor transformers had to initialise itself would make the two models differ in a way the
  # logits check below might miss at small scale; refuse it outright.
  if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
    sys.exit(f"transformers did not load the saved weights cleanly: {info}")
  torch_model.eval()

  rng = np.random.default_rng(args.seed)
  # Ids above the special tokens; the full mask is passed explicitly to both, as a real caller would.
  ids_np = rng.integers(5, cfg.vocab_size, size=(args.batch, args.seq), dtype=np.int64)
  mask_np = np.ones_like(ids_np)
  ids_j, mask_j = jnp.asarray(ids_np, jnp.int32), jnp.asarray(mask_np, jnp.int32)
  ids_t, mask_t = torch.from_numpy(ids_np), torch.from_numpy(mask_np)
  params = jax.device_put(params)

  def jax_forward_fn(model):
    # Parameters are arguments, not closed-over constants: XLA would otherwise fold 100+ MB into the program.
    @jax.jit
    def forward(p, ids, mask):
      return model.apply({"params": p}, ids, attention_mask=mask, deterministic=True).logits
    return forward

  def torch_forward(bf16: bool):
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      return torch_model(input_ids=ids_t, attention_mask=mask_t).logits

  # Sanity check in float32 whatever --dtype says: it proves the weights and the computation are the same.
  logits_j = np.asarray(jax_forward_fn(model32)(params, ids_j, mask_j))
  logits_t = torch_forward(False).float().numpy()
  diff32 = float(np.max(np.abs(logits_j - logits_t)))
  assert logits_j.shape == logits_t.shape, (logits_j.shape, logits_t.shape)
  assert diff32 <= SANITY_ATOL, f"JAX and PyTorch logits differ by {diff32:.3g} > {SANITY_ATOL}: not the same model"

  bf16 = args.dtype == "bfloat16"
  model = distilbert_jax.Encoder(cfg.replace(dtype="bfloat16")) if bf16 else model32
  jax_fwd = jax_forward_fn(model)
  # Warm-up outside the clock: compilation for JAX, allocator and kernel selection for PyTorch.
  out_j = jax_fwd(params, ids_j, mask_j).block_until_ready()
  out_t = torch_forward(bf16)
  diff = float(np.max(np.abs(np.asarray(out_j, np.float32) - out_t.float().numpy())))
  scale = float(np.max(np.abs(logits_t)))

  def time_jax():
    t0 = time.perf_counter()
    jax_fwd(params, ids_j, mask_j).block_until_ready()
    return time.perf_counter() - t0

  def time_torch():
    t0 = time.perf_counter()
    torch_forward(bf16)  # eager PyTorch on CPU returns only when the logits are computed
    return time.perf_counter() - t0

  # Other processes on a small machine distort everything, PyTorch's OpenMP barriers most of all (on 2
  # cores shared with a test run PyTorch slowed 4x, JAX 1.5x). So each round notes the CPU time others took
  # meanwhile; a round they disturbed is dropped and run again, up to --max-attempts rounds in all.
  rounds = []  # (share of the CPUs others took or None, {framework: [seconds per call]})
  while sum(quiet(o, args) for o, _ in rounds) < args.rounds and len(rounds) < args.max_attempts:
    # Swap who goes first each round so neither always runs right after the other's memory traffic.
    order = [("JAX", time_jax), ("PyTorch", time_torch)]
    before = cpu_snapshot()
    round_times = {name: [fn() for _ in range(args.repeats)]
                   for name, fn in (order if len(rounds) % 2 == 0 else order[::-1])}
    rounds.append((others_share(before, cpu_snapshot()), round_times))
  undisturbed = [t for o, t in rounds if quiet(o, args)]
  dropped = [o for o, _ in rounds if not quiet(o, args)]
  kept = undisturbed or [t for _, t in rounds]  # nothing undisturbed: report them all, flagged below
  times = {name: [x for t in kept for x in t[name]] for name in ("JAX", "PyTorch")}

  tokens = args.batch * args.seq
  print(machine_description(torch_model))
  print(f"config {args.config}: {cfg.family}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_heads} heads, ffn {cfg.intermediate_size}, vocab {cfg.vocab_size}, "
        f"{distilbert_jax.count_params(params) / 1e6:.1f}M params; batch {args.batch}, seq {args.seq}, "
        f"{args.dtype}")
  print(f"sanity: max |logits JAX - PyTorch| float32 = {diff32:.2g} (<= {SANITY_ATOL})"
        + (f", bfloat16 = {diff:.2g} (max |logit| {scale:.2g})" if bf16 else ""))
  print(f"timing: {len(kept)} round(s) x {args.repeats} calls per framework, alternating; median over calls")
  if dropped:
    print(f"dropped {len(dropped)} round(s) in which other processes took more than {args.max_busy:.0%} of the "
          f"{os.cpu_count()} CPUs ({', '.join(f'{o:.0%}' for o in dropped)})")
  if len(undisturbed) < args.rounds:
    print(f"WARNING: only {len(undisturbed)} undisturbed round(s) of {args.rounds} wanted"
          + ("; these figures come from disturbed rounds and are unreliable" if not undisturbed else "")
          + "; rerun when the machine is quiet")
  print()
  print(f"{'':10} {'median s/batch':>15} {'min-max s':>15} {'tokens/s':>10}")
  med = {}
  for name, ts in times.items():
    med[name] = statistics.median(ts)
    print(f"{name:10} {med[name]:15.4f} {f'{min(ts):.3f}-{max(ts):.3f}':>15} {tokens / med[name]:10.0f}")
  print(f"ratio JAX/PyTorch (tokens/s): {med['PyTorch'] / med['JAX']:.2f}")


if __name__ == "__main__":
  main()
