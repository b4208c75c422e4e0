"""Held-out masked-LM evaluation with deterministic masking, inference speed, teacher vs student.

  python -m distilbert_jax.evaluate --model STUDENT [--teacher TEACHER] --data SOURCE [SOURCE ...]

STUDENT/TEACHER: a training workdir (its newest checkpoint), a JAX model folder or a Hugging Face folder.
SOURCE: text files, folders or globs (tokenized once into the cache), or a folder written by the trainer's
preprocessing (its held-out split is scored). Every batch i is masked with `fold_in(key(seed), i)`, so
teacher and student (and two runs) are scored on exactly the same masked positions, under two maskings:
the reference's (15% of a batch's tokens, rare tokens more often: `masking.token_probs` with smoothing 0.7)
and BERT's uniform one (15% of the tokens, every non-special token equally likely). Prints masked-LM
accuracy and perplexity under both, inference tokens/s at batch 1 and 32 as deployed — encoder +
classification head (no vocabulary projection) and encoder + masked-LM head (logits at every position) —
both models timed on the same inputs, parameter counts and, with a teacher, the student/teacher ratios
(accuracy retained, speed-ups, size).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from distilbert_jax import allocator, checkpoint, data, hf, losses, masking, trainer, validation
from distilbert_jax import model as model_lib


@dataclasses.dataclass(frozen=True)
class MlmScore:
  accuracy: float  # share of masked positions whose original token is the arg-max prediction
  loss: float  # mean cross-entropy (nats) over masked positions
  num_predictions: int

  @property
  def perplexity(self) -> float:
    return math.exp(min(self.loss, 700.0))


@functools.partial(jax.jit, static_argnames=("model", "mask_token_id", "vocab_size", "mlm_prob", "scheme"))
def _score_batch(model: model_lib.Encoder, params, key, ids_BxL, mask_BxL, token_probs_V, *, mask_token_id,
                 vocab_size, mlm_prob, scheme):
  """(number right, number masked, summed cross-entropy in nats) over one batch's masked positions."""
  masked = masking.mask_tokens(key, ids_BxL, mask_BxL, token_probs_V, mask_token_id=mask_token_id,
                               vocab_size=vocab_size, mlm_prob=mlm_prob, scheme=scheme)
  out = model.apply({"params": params}, masked.input_ids, attention_mask=mask_BxL, compute_logits=False)
  # The training step's selection of the masked rows, and its masked-LM loss and correct count on them.
  rows = losses.select_rows(out.last_hidden_state, mask_BxL, masked.mlm_weights, masked.targets,
                            slots=losses.masked_slots(*ids_BxL.shape, mlm_prob, scheme))
  head = functools.partial(model.apply, {"params": params}, method=model_lib.Encoder.mlm_logits)
  terms = losses.vocab_losses(head, None, rows)
  count = jnp.sum(rows.mlm_N > 0, dtype=jnp.int32)
  return terms["mlm_correct"], count, terms["mlm"] * jnp.maximum(jnp.sum(rows.mlm_N), 1.0)


def mlm_score(model: model_lib.Encoder, params, batches, token_probs_V, *, mask_token_id: int,
              seed: int = 0, mlm_prob: float = 0.15, scheme: str = "distilbert", max_batches: int | None = None
              ) -> MlmScore:
  """Masked-LM accuracy and loss over `batches` (dicts with input_ids, attention_mask)."""
  correct = count = 0
  nll = 0.0
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    c, n, s = _score_batch(model, params, jax.random.fold_in(jax.random.key(seed), i),
                           jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                           jnp.asarray(token_probs_V), mask_token_id=mask_token_id,
                           vocab_size=model.cfg.vocab_size, mlm_prob=mlm_prob, scheme=scheme)
    correct, count, nll = correct + int(c), count + int(n), nll + float(s)
  if not count:
    raise ValueError("no masked positions to score: is the held-out split empty?")
  return MlmScore(accuracy=correct / count, loss=nll / count, num_predictions=count)


# How a model is deployed when timed: "cls" = encoder + sequence-classification head (pooled first token, no
# vocabulary projection), "mlm" = encoder + masked-LM head (logits at every position).
SPEED_HEADS = ("cls", "mlm")
# Masking schemes scored: "rare" = the reference's (smoothing 0.7, rare tokens more often), "uniform" = BERT's.
MASKINGS = {"rare": 0.7, "uniform": 0.0}


def speed_inputs(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> jax.Array:
  """Deterministic token ids (B, L) for timing: every model of a report is timed on these same inputs."""
  ids = jax.random.randint(jax.random.key(seed), (batch_size, seq_len), 1000, max(vocab_size, 1001), jnp.int32)
  return ids.at[:, 0].set(101 if vocab_size > 101 else 0)


def with_timing_head(model: model_lib.Encoder, params, num_labels: int = 2) -> tuple[model_lib.Encoder, dict]:
  """The model with a sequence-classification head (its own, or a random one: timing needs no trained head)."""
  if model.cfg.num_labels:
    return model, params
  activation = "relu" if model.cfg.family == "distilbert" else "tanh"
  cls_model = model_lib.Encoder(model.cfg.replace(num_labels=num_labels, use_pooler=True,
                                                  pooler_activation=activation))
  shapes = jax.eval_shape(lambda: model_lib.init_params(cls_model, jax.random.key(0)))
  head = {k: jax.tree.map(lambda x: jnp.full(x.shape, 0.01, x.dtype), v) for k, v in shapes.items() if k not in params}
  return cls_model, {**params, **head}


def forward_fn(model: model_lib.Encoder, params, head: str):
  """`ids_BxL -> output` for one way of deploying the model (SPEED_HEADS), jitted with its parameters."""
  if head == "cls":
    model, params = with_timing_head(model, params)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x, compute_logits=False).class_logits)
  elif head == "mlm":
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x).logits)
  else:
    raise ValueError(f"head must be one of {SPEED_HEADS}, got {head!r}")
  return functools.partial(forward, params)


def _seconds_per_call(forward, ids_BxL: jax.Array, calls: int) -> float:
  start = time.perf_counter()
  for _ in range(calls):
    out = forward(ids_BxL)
  out.block_until_ready()
  return (time.perf_counter() - start) / calls


def _calls_to_fill(forward, ids_BxL: jax.Array, min_seconds: float) -> int:
  """Compiles `forward` (the first call) and says how many calls in a row one timing needs to last
  `min_seconds` (doubling them until they do, as `timeit`'s autorange): a batch-1 forward of a few ms,
  timed alone, is mostly the timer's and the scheduler's noise."""
  forward(ids_BxL).block_until_ready()
  calls = 1
  while _seconds_per_call(forward, ids_BxL, calls) * calls < min_seconds:
    calls *= 2
  return calls


SPEED_ROUNDS, SPEED_MIN_SECONDS = 7, 0.2  # speed_report's defaults, and in words for reports:
SPEED_TIMING = f"median of {SPEED_ROUNDS} rounds taken in turn, each ≥ {SPEED_MIN_SECONDS} s of calls"


def speed_report(models: dict, batch_sizes: tuple[int, ...], seq_len: int, *, repeats: int = SPEED_ROUNDS,
                 min_seconds: float = SPEED_MIN_SECONDS) -> dict:
  """{name: {f"{head}_tokens_per_s_batch{b}": ...}} with every model timed on the same inputs, one batch size
  and head at a time. The models take turns: `repeats` rounds, each timing every model once (the order
  reversed every other round) over enough calls in a row to last `min_seconds`; a model's figure is its median
  over rounds. So a change in the machine's load hits the models alike, and a ratio of two figures holds at
  batch 1 too (a single call of a few ms is mostly timer noise)."""
  vocab = min(m.cfg.vocab_size for m, _ in models.values())
  out = {name: {} for name in models}
  for b in batch_sizes:
    ids = speed_inputs(b, seq_len, vocab)
    for head in SPEED_HEADS:
      forwards = {name: forward_fn(model, params, head) for name, (model, params) in models.items()}
      calls = {name: _calls_to_fill(f, ids, min_seconds) for name, f in forwards.items()}
      times = {name: [] for name in models}
      for r in range(repeats):
        for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
          times[name].append(_seconds_per_call(forwards[name], ids, calls[name]))
      for name in models:
        out[name][f"{head}_tokens_per_s_batch{b}"] = b * seq_len / float(np.median(times[name]))
  return out


def _dataset(sources: list[str], tokenizer: str, *, max_len: int, cache_dir: pathlib.Path):
  """(dataset, token counts for the masking probabilities): a preprocessed folder's held-out split, or the
  whole of the text sources, tokenized once into the cache by `data.prepare_tokenized` (training's own path,
  with nothing held out: the same settings give the same folder as a training run's)."""
  if len(sources) == 1 and (pathlib.Path(sources[0]) / "meta.json").exists():
    folder = pathlib.Path(sources[0])
    return data.TokenizedDataset(folder, "heldout"), data.TokenizedDataset(folder, "train").counts()
  folder = data.prepare_tokenized(sources, tokenizer, cache_dir, max_len=max_len, held_out_fraction=0.0,
                                  flag="--data")
  ds = data.TokenizedDataset(folder, "train")  # the whole evaluation text
  return ds, ds.counts()


def evaluate_models(models: dict, sources: list[str], *, tokenizer: str | None = None, max_len: int = 128,
                    batch_size: int = 32, max_batches: int | None = 50, seed: int = 0,
                    speed_batches: tuple[int, ...] = (1, 32), cache_dir="~/.cache/distilbert_jax",
                    maskings: tuple[str, ...] = tuple(MASKINGS)) -> dict:
  """Scores each of `models` ({name: (model, params)}) on the same masked positions; returns a report.

  Per model: `mlm_accuracy`, `mlm_loss`, `perplexity`, `predictions` under the reference's masking ("rare")
  and the same with a `uniform_` prefix under BERT's uniform masking; `parameters`; `{cls,mlm}_tokens_per_s_
  batch{b}`. With a "teacher" and a "student": their ratios under "student/teacher".
  """
  tokenizer = tokenizer or next((m.cfg.tokenizer for m, _ in models.values() if m.cfg.tokenizer), None)
  if not tokenizer:
    raise validation.ConfigError("no tokenizer: the models do not name one; pass --tokenizer DIR")
  unknown = set(maskings) - set(MASKINGS)
  if unknown:
    raise validation.ConfigError(f"unknown masking {sorted(unknown)}; valid: {', '.join(MASKINGS)}")
  for name, (model, _) in models.items():
    if max_len > model.cfg.max_length:
      raise validation.ConfigError(f"--max-len {max_len} exceeds the {model.cfg.max_length} positions "
                                   f"of the {name}: pass --max-len {model.cfg.max_length} or less")
  try:
    ds, counts = _dataset(sources, tokenizer, max_len=max_len, cache_dir=pathlib.Path(cache_dir).expanduser())
  except data.EmptyCorpusError:
    ds = None
  if ds is None or len(ds) == 0:
    raise validation.ConfigError(f"no evaluation examples in {sources}: give more text (examples need at least "
                                 "12 tokens)")
  specials = ds.special_ids
  special_list = [i for i in specials.values() if i is not None]
  report = {}
  for name, (model, params) in models.items():
    if model.cfg.vocab_size != ds.vocab_size:
      raise validation.ConfigError(
          f"{name} has a {model.cfg.vocab_size}-id vocabulary but the tokenizer {ds.vocab_size}: "
          "evaluate with the model's own tokenizer (--tokenizer)")
    report[name] = {"parameters": model_lib.count_params(params)}
    for masking_name in maskings:
      probs_V = masking.token_probs(counts, special_list, smoothing=MASKINGS[masking_name])
      score = mlm_score(model, params, data.heldout_batches(ds, batch_size, max_len), probs_V,
                        mask_token_id=specials["mask"], seed=seed, max_batches=max_batches)
      prefix = "" if masking_name == "rare" else f"{masking_name}_"
      report[name].update({f"{prefix}mlm_accuracy": score.accuracy, f"{prefix}mlm_loss": score.loss,
                           f"{prefix}perplexity": score.perplexity, f"{prefix}predictions": score.num_predictions})
  if speed_batches:
    for name, figures in speed_report(models, tuple(speed_batches), max_len).items():
      report[name].update(figures)
  if "teacher" in report and "student" in report:
    s, t = report["student"], report["teacher"]
    ratios = {"parameters": s["parameters"] / t["parameters"]}
    for key in s:
      if key.endswith("mlm_accuracy"):
        ratios[key.replace("mlm_accuracy", "accuracy_retained")] = s[key] / max(t[key], 1e-12)
      elif "_tokens_per_s_batch" in key:
        ratios[key.replace("tokens_per_s", "speedup")] = s[key] / t[key]
    report["student/teacher"] = ratios
  return report


def _rows(report: dict, name: str) -> list[tuple[str, str, str, str | None]]:
  """(label, key, format, ratio key) of every figure the report holds."""
  rows = []
  for prefix, label in (("", "rare-token masking"), ("uniform_", "uniform masking")):
    if f"{prefix}mlm_accuracy" in report[name]:
      rows += [(f"masked-LM accuracy, {label}", f"{prefix}mlm_accuracy", "{:.2%}", f"{prefix}accuracy_retained"),
               (f"perplexity, {label}", f"{prefix}perplexity", "{:.1f}", None),
               (f"masked predictions, {label}", f"{prefix}predictions", "{:,}", None)]
  rows.append(("parameters", "parameters", "{:,}", "parameters"))
  heads = {"cls": "encoder + classifier", "mlm": "encoder + masked-LM head"}
  for key in report[name]:
    head, _, rest = key.partition("_tokens_per_s_batch")
    if rest:
      rows.append((f"tokens/s, batch {rest}, {heads[head]}", key, "{:,.0f}", f"{head}_speedup_batch{rest}"))
  return rows


def format_report(report: dict) -> str:
  names = [n for n in ("teacher", "student") if n in report] or list(report)
  ratio = report.get("student/teacher", {})
  header = ["", *names] + (["student/teacher"] if ratio else [])
  lines = [header]
  for label, key, fmt, ratio_key in _rows(report, names[0]):
    line = [label, *(fmt.format(report[n][key]) for n in names)]
    if ratio:
      line.append(f"{ratio[ratio_key]:.2f}" if ratio_key in ratio else "")
    lines.append(line)
  widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
  return "\n".join("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                   for row in lines)


# Bad input the command line reports as one line (exit status 2); anything else keeps its traceback.
USER_ERRORS = (validation.ConfigError, hf.ConversionError, FileNotFoundError, checkpoint.CheckpointError)


def check_args(args):
  """Refuses, before any model is read, arguments that cannot work."""
  validation.check_number("--max-len", args.max_len, ">0")
  if args.max_len < 3:
    raise validation.ConfigError(f"--max-len {args.max_len} leaves no room for [CLS] text [SEP]: pass 3 or more")
  validation.check_number("--batch-size", args.batch_size, ">0")
  validation.check_number("--max-batches", args.max_batches, ">0")
  if args.step is not None:
    validation.check_number("--step", args.step, ">=0")
  validation.check_model_path(args.model, "--model")
  validation.check_model_path(args.teacher, "--teacher")
  if args.tokenizer:
    validation.check_model_path(args.tokenizer, "--tokenizer")
  if not (len(args.data) == 1 and (pathlib.Path(args.data[0]) / "meta.json").exists()):
    validation.check_local_sources(args.data, "--data")
  validation.check_workdir(args.cache_dir, "--cache-dir")
  if args.json is not None:
    if args.json.is_dir():
      raise validation.ConfigError(f"--json {args.json} is a folder: give a file path")
    validation.check_workdir(args.json.parent, "--json's folder")


def main(argv=None) -> int:
  parser = validation.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, help="the student (or the only model): workdir, JAX or HF folder")
  parser.add_argument("--teacher", help="a teacher to compare with")
  parser.add_argument("--data", nargs="+", required=True, help="held-out text (files/folders/globs) or a "
                      "preprocessed folder")
  parser.add_argument("--tokenizer", help="default: the model's own")
  parser.add_argument("--max-len", type=int, default=128)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--max-batches", type=int, default=50)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--step", type=int, help="checkpoint step when --model is a workdir")
  parser.add_argument("--cache-dir", default="~/.cache/distilbert_jax")
  parser.add_argument("--json", type=pathlib.Path, help="also write the report here")
  logging.basicConfig(level=logging.WARNING, force=True)
  try:
    args = parser.parse_args(argv)
    check_args(args)
    trainer.enable_compilation_cache(args.cache_dir)
    models = {"student" if args.teacher else "model": checkpoint.load_any(args.model, args.step)}
    if args.teacher:
      models["teacher"] = checkpoint.load_any(args.teacher)
    report = evaluate_models(models, args.data, tokenizer=args.tokenizer, max_len=args.max_len,
                             batch_size=args.batch_size, max_batches=args.max_batches, seed=args.seed,
                             cache_dir=args.cache_dir)
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_report(report))
  if args.json:
    args.json.write_text(json.dumps(report, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  allocator.reexec()  # tcmalloc where installed: a faster CPU step (allocator.py)
  sys.exit(main())
