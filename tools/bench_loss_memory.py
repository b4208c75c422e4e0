"""Memory and time of the soft-target losses with gradient: full (N, V) logits against chunked ones.

  .venv/bin/python tools/bench_loss_memory.py                      # 8 x 512 rows, D 768, V 30,522
  .venv/bin/python tools/bench_loss_memory.py --chunk-sizes 256,512,1024,2048 --rounds 5

The default shapes are what one chip of a v5e-8 holds of a 64-sequence micro-batch of 512 tokens (8 x 512 =
4,096 rows; configs/distilbert_base.py's micro-batch of 32 is --batch 4), with bert-base-uncased's vocabulary
and width. The rows here are one device's, so --chunk-sizes are too: `config.loss.chunk_size` counts the
rows of all devices together (2048 on a v5e-8 is 256 here).

Both variants compute what `train._loss_terms` does on its not-restricted path: every row of the batch
(`losses.select_rows`), then α_ce · L_ce over the non-pad rows plus α_mlm · L_mlm over the masked rows (and
α_mse · L_mse with --mse) from `losses.vocab_losses`, with the gradient with respect to the student's head
parameters and hidden states. "full" is `vocab_losses` in one chunk (every row projected at once, (N, V)
logits); "chunked" is the same function with `chunk_size` rows at a time. The heads are the model's own
`Encoder.mlm_logits` (DistilBERT's for the student, BERT's for the teacher) with random parameters.

For each variant the script lowers and compiles the jitted loss-and-gradient on the CPU, prints
`compiled.memory_analysis()` (temp: the buffers XLA allocates beyond arguments and outputs, which is where
the logits live), then checks that the variants agree and times them: one warm-up call each, then --rounds
rounds that call every variant in turn (so that other load on the machine hits all alike), each call ending
in `block_until_ready`; the table gives the median. Nothing here asserts on time or memory.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CPU is the point; also keeps an installed libtpu quiet

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from distilbert_jax import losses  # noqa: E402
from distilbert_jax import model as model_lib  # noqa: E402

ALPHA_CE, ALPHA_MLM, ALPHA_MSE = 5.0, 2.0, 1.0
TEMPERATURE = 2.0


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=8, help="sequences (of this device)")
  p.add_argument("--seq", type=int, default=512, help="tokens per sequence")
  p.add_argument("--dim", type=int, default=768, help="hidden width of student and teacher")
  p.add_argument("--vocab", type=int, default=30522)
  p.add_argument("--chunk-sizes", default="2048", help="comma-separated rows per chunk of the chunked variant")
  p.add_argument("--mse", action="store_true", help="also L_mse (alpha_mse > 0)")
  p.add_argument("--pad-fraction", type=float, default=0.1, help="rows that are padding (weight 0)")
  p.add_argument("--rounds", type=int, default=3, help="rounds, each timing every variant once (0: memory only)")
  return p.parse_args(argv)


def _head(family: str, dim: int, vocab: int, seed: int):
  """(fn h_NxD -> logits_NxV with the params closed over, params): a model's masked-LM head alone."""
  make = model_lib.EncoderConfig.bert if family == "bert" else model_lib.EncoderConfig.distilbert
  encoder = model_lib.Encoder(make(vocab_size=vocab, hidden_size=dim, num_heads=1))  # heads: unused here
  params = nn.meta.unbox(encoder.init(jax.random.key(seed), jnp.zeros((1, dim)), method=model_lib.Encoder.mlm_logits))
  return functools.partial(encoder.apply, method=model_lib.Encoder.mlm_logits), params["params"]


def _inputs(args):
  rng = np.random.default_rng(0)
  shape = (args.batch, args.seq)
  pad_BxL = (rng.random(shape) >= args.pad_fraction).astype(np.float32)
  return dict(hs_BxLxD=rng.standard_normal((*shape, args.dim)).astype(np.float32),
              ht_BxLxD=rng.standard_normal((*shape, args.dim)).astype(np.float32), pad_BxL=pad_BxL,
              mlm_BxL=pad_BxL * (rng.random(shape) < 0.15),
              targets_BxL=rng.integers(0, args.vocab, shape).astype(np.int32))


def _total(terms) -> jax.Array:
  return ALPHA_CE * terms["ce"] + ALPHA_MLM * terms["mlm"] + ALPHA_MSE * terms.get("mse", 0.0)


def make_loss(chunk_size: int, with_mse: bool, s_apply, t_apply):
  """Jitted (student_params, teacher_params, hs_BxLxD, batch) -> ((total, (ce, mlm, correct)), gradients).

  As `train._loss_terms` on its not-restricted path; chunk_size 0: one chunk, full logits.
  """

  def loss(student_params, teacher_params, hs_BxLxD, batch):
    s_head = functools.partial(s_apply, {"params": student_params})
    t_head = functools.partial(t_apply, {"params": teacher_params})
    rows = losses.select_rows(hs_BxLxD, batch["pad_BxL"], batch["mlm_BxL"], batch["targets_BxL"])
    terms = losses.vocab_losses(s_head, t_head, rows, rows.take(batch["ht_BxLxD"]), temperature=TEMPERATURE,
                                chunk_size=chunk_size, with_mse=with_mse)
    return _total(terms), (terms["ce"], terms["mlm"], terms["mlm_correct"])

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 2), has_aux=True))


def _size(n: int) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def main(argv=None):
  args = parse_args(argv)
  s_apply, s_params = _head("distilbert", args.dim, args.vocab, seed=1)
  t_apply, t_params = _head("bert", args.dim, args.vocab, seed=2)
  batch = _inputs(args)
  hs_BxLxD = batch.pop("hs_BxLxD")
  n = args.batch * args.seq
  print(f"rows N = {args.batch} x {args.seq} = {n}, D = {args.dim}, V = {args.vocab}, "
        f"L_mse {'on' if args.mse else 'off'}; one (N, V) float32 array = {_size(n * args.vocab * 4)}")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores, {platform.machine()})")

  variants = [("full", 0)] + [(f"chunked {c}", c) for c in map(int, args.chunk_sizes.split(","))]
  compiled, memory, compile_s = {}, {}, {}
  for name, chunk_size in variants:
    start = time.perf_counter()
    compiled[name] = make_loss(chunk_size, args.mse, s_apply, t_apply).lower(s_params, t_params, hs_BxLxD,
                                                                             batch).compile()
    compile_s[name] = time.perf_counter() - start
    memory[name] = compiled[name].memory_analysis().temp_size_in_bytes

  seconds = {name: [] for name in compiled}
  if args.rounds:
    call = lambda name: jax.block_until_ready(compiled[name](s_params, t_params, hs_BxLxD, batch))  # noqa: E731
    (want_total, want_terms), want_grads = call("full")
    for name in list(compiled)[1:]:  # warm-up, and the figures must compare equal computations
      (total, terms), grads = call(name)
      np.testing.assert_allclose(total, want_total, rtol=1e-4)
      assert int(terms[2]) == int(want_terms[2]), name
      for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
    # Round by round, so that other load on the machine hits every variant alike.
    for _ in range(args.rounds):
      for name in compiled:
        start = time.perf_counter()
        call(name)
        seconds[name].append(time.perf_counter() - start)

  print(f"\n{'variant':<16}{'temp':>12}{'vs full':>9}{'compile':>10}{'time/call':>11}{'vs full':>9}")
  for name in compiled:
    ratio = memory[name] / memory["full"]
    if args.rounds:
      median = statistics.median(seconds[name])
      timing = f"{median:10.3f}s{median / statistics.median(seconds['full']):8.2f}x"
    else:
      timing = f"{'-':>11}{'-':>9}"
    print(f"{name:<16}{_size(memory[name]):>12}{ratio:8.1%} {compile_s[name]:9.1f}s{timing}")
  if args.rounds:
    print(f"(time: median of {args.rounds} rounds after a warm-up; every variant's loss, accuracy count and "
          "gradients agree with full's)")


if __name__ == "__main__":
  main()
