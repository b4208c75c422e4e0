"""Where the distillation step's time goes, JAX beside PyTorch: per phase and per kind of operation.

  .venv/bin/python tools/profile_step.py                      # the demo config on this CPU (a few minutes)
  .venv/bin/python tools/profile_step.py --ce all --steps 2   # soft targets at every position
  .venv/bin/python tools/profile_step.py --config tiny --batch 8 --seq 32 --steps 1   # smoke test

Both sides run what tools/bench.py times (same weights, same synthetic batches; PyTorch as "PyTorch-gather",
the heads on the masked rows only, when L_ce covers masked positions; the reference's full heads otherwise).

JAX: `jax.profiler` traces --steps compiled steps after warm-up. On the CPU every XLA thunk (a fusion, a
library dot, a loop) is one trace event, and thunks run concurrently on the runtime's threads, so each
instant of the step is shared equally among the thunks running then: the shares add up to the wall time.
A thunk is named by its HLO instruction, whose `op_name` metadata (the JAX name stack: `student`, `teacher`,
`masking`, `optimizer` scopes from train.py and trainer.py, Flax module paths, `transpose(...)` for the
backward pass) says where it comes from. A fusion is named after its root operation; one that holds a matrix
product (marked "[dot]") counts as "matmul" whatever its root (a product fused with its bias, residual and the
next LayerNorm's mean is mostly the product).

PyTorch: the step's phases are timed with the clock (each phase ends synchronised; a CPU runs ops in
order) and `torch.profiler` gives each aten operation's self time.

Nothing here asserts on time: it prints tables (and writes them with --json).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench  # noqa: E402  (sets the environment JAX needs before importing it)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from distilbert_jax import sharding, train  # noqa: E402

PHASES = ("masking", "teacher forward", "student forward", "heads + losses forward", "student backward",
          "heads + losses backward", "optimizer", "other")
KINDS = ("matmul", "attention (softmax, mask)", "layernorm", "gelu", "dropout bits", "dropout apply",
         "embedding", "loss (softmax, KL, CE, cos)", "optimizer update", "masking", "other")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", choices=sorted(bench.PRESETS), default="demo")
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--seq", type=int, default=None)
  p.add_argument("--ce", choices=["config", "masked", "all"], default="config",
                 help="L_ce positions: the config's restrict_ce_to_mask, masked only, or every non-pad position")
  p.add_argument("--steps", type=int, default=3, help="steps traced per side, after two warm-up steps")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a run-config setting for the JAX side (e.g. train.dropout_rng=rbg); repeatable")
  p.add_argument("--top", type=int, default=12, help="operations listed per side")
  p.add_argument("--json", default="", help="also write the figures to this file")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  preset = bench.PRESETS[args.config]
  args.batch, args.seq = args.batch or preset["batch"], args.seq or preset["seq"]
  args.settings = bench.parse_variant("set:" + ",".join(args.set))[1] if args.set else {}
  return args


# ------------------------------------------------------------------------------------------------ JAX

def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """{instruction name: its op_name metadata} for every instruction of a compiled module's text; the name of a
  fusion that contains a matrix product gets the suffix " [dot]" (its root may be a reduction or an add)."""
  with_dot, current = set(), None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(", line)
    if head:
      current = head.group(1)
    elif current and re.search(r" (dot|convolution)\(", line):
      with_dot.add(current)
  names = {}
  for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?metadata=\{[^}\n]*?op_name="([^"]*)"', hlo_text, re.M):
    calls = re.search(r"calls=%([\w.\-]+)", m.group(0))
    dot = " [dot]" if calls and calls.group(1) in with_dot else ""
    names.setdefault(m.group(1), m.group(2) + dot)
  return names


def shared_durations(events: list[tuple[str, float, float]]) -> dict[str, float]:
  """{name: seconds} from (name, start, end) intervals, each instant split equally among the intervals open
  then (so concurrent thunks share the wall time instead of counting it twice)."""
  edges = sorted({t for _, s, e in events for t in (s, e)})
  out = collections.Counter()
  if not edges:
    return out
  index = {t: i for i, t in enumerate(edges)}
  # Per elementary segment: how many events cover it; then each event adds segment length / count.
  cover = [0] * len(edges)
  for _, s, e in events:
    cover[index[s]] += 1
    cover[index[e]] -= 1
  running, active = 0, []
  for i in range(len(edges)):
    running += cover[i]
    active.append(running)
  prefix = [0.0]  # prefix sums of length / active over segments
  for i in range(len(edges) - 1):
    prefix.append(prefix[-1] + ((edges[i + 1] - edges[i]) / active[i] if active[i] else 0.0))
  for name, s, e in events:
    out[name] += prefix[index[e]] - prefix[index[s]]
  return out


def _scope(name: str, op: str) -> bool:
  """Whether the name stack `op` passes through scope `name` (under jvp it reads "jvp(name)/...")."""
  return re.search(rf"(^|[/(]){name}([)/]|$)", op) is not None


def jax_phase(op: str) -> str:
  backward = "transpose(" in op
  if "masking" in op and "jvp(" not in op:
    return "masking"
  if "optimizer" in op:
    return "optimizer"
  if _scope("teacher", op):
    return "teacher forward"
  if _scope("student", op):
    return "student backward" if backward else "student forward"
  if "jvp(" in op:
    return "heads + losses backward" if backward else "heads + losses forward"
  return "other"


def jax_kind(op: str) -> str:
  leaf = op.rsplit("/", 1)[-1]
  lower = op.lower()
  if "masking" in op and "jvp(" not in op:
    return "masking"
  if "optimizer" in op:
    return "optimizer update"
  if "_uniform" in op or "_bernoulli" in op or "random_bits" in op or "threefry" in lower or "rng_bit" in lower:
    return "dropout bits"
  if "dropout" in lower:
    return "dropout apply"
  if leaf == "dot_general" or leaf.startswith("dot") or op.endswith(" [dot]"):
    return "matmul"
  if "norm" in op:
    return "layernorm"
  if "/mlp/" in op or "erf" in leaf:
    return "gelu"
  if "/attention/" in op:
    return "attention (softmax, mask)"
  if "embeddings" in op:
    return "embedding"
  if "jvp(" in op:
    return "loss (softmax, KL, CE, cos)"
  return "other"


def profile_jax(setup, config, steps: int, trace_dir: pathlib.Path) -> dict:
  fns = train.build_step(config, setup.mesh, setup.student, setup.teacher,
                         jax.eval_shape(lambda p: p, setup.student_params), bench.MASK)
  teacher_params = jax.device_put(setup.teacher_params, fns.teacher_sharding)
  probs_V = jax.device_put(jnp.asarray(setup.probs_V), fns.replicated)
  batches = [sharding.global_batch(b, setup.mesh) for b in setup.batches]
  state = fns.init(setup.student_params)
  names = hlo_op_names(fns.step.lower(state, teacher_params, batches[0], probs_V).compile().as_text())
  for i in range(2):
    state, out = fns.step(state, teacher_params, batches[i % len(batches)], probs_V)
  jax.block_until_ready((state, out))
  jax.profiler.start_trace(str(trace_dir))
  start = time.perf_counter()
  for i in range(steps):
    state, out = fns.step(state, teacher_params, batches[i % len(batches)], probs_V)
  jax.block_until_ready((state, out))
  wall = (time.perf_counter() - start) / steps
  jax.profiler.stop_trace()
  trace = sorted(glob.glob(str(trace_dir / "**" / "*.trace.json.gz"), recursive=True))[-1]
  events = [(e["name"], e["ts"], e["ts"] + e.get("dur", 0)) for e in json.load(gzip.open(trace))["traceEvents"]
            if e.get("ph") == "X" and e["name"] in names]
  shares = shared_durations(events)
  ops = {name: seconds / 1e6 / steps for name, seconds in shares.items()}
  return dict(wall=wall, phases=_sum_by(ops, lambda n: jax_phase(names[n])),
              kinds=_sum_by(ops, lambda n: jax_kind(names[n])),
              top=[(f"{n}: {names[n]}", s) for n, s in sorted(ops.items(), key=lambda kv: -kv[1])])


def _sum_by(ops: dict[str, float], key) -> dict[str, float]:
  out = collections.Counter()
  for name, seconds in ops.items():
    out[key(name)] += seconds
  return dict(out)


# ------------------------------------------------------------------------------------------------ PyTorch

TORCH_KINDS = [  # (aten name pattern, kind); the first match wins
    (r"mm|matmul|linear|addmm|bmm|baddbmm|_scaled_dot_product.*attention.*", "matmul"),
    (r"layer_norm", "layernorm"), (r"gelu", "gelu"),
    (r"dropout|bernoulli|native_dropout", "dropout apply"),
    (r"softmax|masked_fill|_softmax", "attention (softmax, mask)"),
    (r"embedding|index_select|index_put|embedding_dense_backward", "embedding"),
    (r"adam|_foreach|lerp|addcdiv|addcmul", "optimizer update"),
    (r"multinomial|randint|rand\b|nonzero|where", "masking"),
    (r"log_softmax|kl_div|xlogy|cross_entropy|nll_loss|cosine|div|exp|log", "loss (softmax, KL, CE, cos)"),
]


def torch_kind(name: str) -> str:
  bare = name.split("::")[-1].lower()
  for pattern, kind in TORCH_KINDS:
    if re.search(pattern, bare):
      return kind
  return "other"


class TimedTorchStep(bench.TorchStep):
  """bench.TorchStep with each phase clocked (CPU: ops run in order, so a phase ends when its call returns)."""

  def __call__(self, ids_BxL, mask_BxL, masked=None):
    clock = self.clock
    t = time.perf_counter()
    ids_BxL, labels_BxL = self.mask(ids_BxL, mask_BxL)
    clock["masking"] += time.perf_counter() - t
    t = time.perf_counter()
    total, _ = self.losses(ids_BxL, mask_BxL, labels_BxL)
    clock["forward (teacher, student, heads, losses)"] += time.perf_counter() - t
    t = time.perf_counter()
    total.backward()
    clock["student backward (heads included)"] += time.perf_counter() - t
    t = time.perf_counter()
    self.torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.clip)
    self.opt.step()
    self.sched.step()
    self.opt.zero_grad(set_to_none=True)
    clock["optimizer"] += time.perf_counter() - t
    return total


def profile_torch(setup, config, steps: int, head: str) -> dict:
  import torch
  dev = setup.device
  step = TimedTorchStep(bench.load_torch(setup.folders["student"], dev).train(),
                        bench.load_torch(setup.folders["teacher"], dev), config, setup.probs_V, device=dev,
                        bf16=config.compute.dtype == "bfloat16", head=head)
  batches = [{k: torch.as_tensor(v, dtype=torch.long, device=dev) for k, v in b.items()} for b in setup.batches]
  step.clock = collections.Counter()
  for i in range(2):
    step(batches[i % len(batches)]["input_ids"], batches[i % len(batches)]["attention_mask"])
  step.clock = collections.Counter()
  start = time.perf_counter()
  for i in range(steps):  # clocked, unprofiled: the profiler's own overhead stays out of the phases
    step(batches[i % len(batches)]["input_ids"], batches[i % len(batches)]["attention_mask"])
  wall = (time.perf_counter() - start) / steps
  phases = {k: v / steps for k, v in step.clock.items()}
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for i in range(steps):
      step(batches[i % len(batches)]["input_ids"], batches[i % len(batches)]["attention_mask"])
  ops = {e.key: e.self_cpu_time_total / 1e6 / steps for e in prof.key_averages() if e.self_cpu_time_total > 0}
  profiled = sum(ops.values())
  # Self times under the profiler run slower than the clocked steps: scale them onto the clocked wall time.
  ops = {k: v * wall / profiled for k, v in ops.items()} if profiled else ops
  return dict(wall=wall, phases=phases, kinds=_sum_by(ops, torch_kind),
              top=sorted(ops.items(), key=lambda kv: -kv[1]))


# ------------------------------------------------------------------------------------------------ report

def table(title: str, rows: list[str], sides: dict[str, dict], key: str) -> None:
  print(f"\n{title}")
  print(f"  {'':42}" + "".join(f"{name:>18}" for name in sides))
  for row in rows:
    cells = []
    for figures in sides.values():
      seconds = figures[key].get(row)
      cells.append(f"{seconds * 1e3:9.0f} ms {seconds / figures['wall']:4.0%}" if seconds else f"{'':>18}")
    if any(c.strip() for c in cells):
      print(f"  {row:42}" + "".join(f"{c:>18}" for c in cells))
  print(f"  {'step (wall)':42}" + "".join(f"{f['wall'] * 1e3:9.0f} ms {'':>4}" for f in sides.values()))


def main(argv=None) -> dict:
  args = parse_args(argv)
  import transformers
  transformers.logging.set_verbosity_error()
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    bench_args = bench.parse_args(["--config", args.config, "--batch", str(args.batch), "--seq", str(args.seq),
                                   "--seed", str(args.seed)])
    setup = bench.build(bench_args, tmp)
    config = bench.with_settings(setup.config, args.settings)
    if args.ce != "config":
      config.loss.restrict_ce_to_mask = args.ce == "masked"
    head = "gather" if config.loss.restrict_ce_to_mask else "full"
    print(bench.describe(setup))
    print(f"L_ce over {'masked positions only' if head == 'gather' else 'every non-pad position'}; "
          f"{args.steps} step(s) per side after 2 warm-up steps" + (f"; JAX settings {args.settings}"
                                                                     if args.settings else ""), flush=True)
    jax_figures = profile_jax(setup, config, args.steps, tmp / "trace")
    torch_figures = profile_torch(setup, config, args.steps, head)
  side = bench.side_name(head)
  table("By phase (JAX: thunk time by name scope; PyTorch: clocked)", list(PHASES), {"JAX": jax_figures}, "phases")
  table("", list(torch_figures["phases"]), {side: torch_figures}, "phases")
  table("By kind of operation (JAX: XLA thunks; PyTorch: aten self time, scaled to the step)", list(KINDS),
        {"JAX": jax_figures, side: torch_figures}, "kinds")
  for name, figures in (("JAX", jax_figures), (side, torch_figures)):
    print(f"\nlongest operations, {name} (per step):")
    for op, seconds in figures["top"][:args.top]:
      print(f"  {seconds * 1e3:8.1f} ms  {op[:150]}")
  result = {"config": vars(args) | {"settings": args.settings}, "JAX": jax_figures, side: torch_figures}
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1, default=str))
  return result


if __name__ == "__main__":
  main()
