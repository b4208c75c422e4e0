"""Held-out masked-LM evaluation with deterministic masking, inference speed, teacher vs student.

  python -m distilbert_jax.evaluate --model STUDENT [--teacher TEACHER] --data SOURCE [SOURCE ...]

STUDENT/TEACHER: a training workdir (its newest checkpoint), a JAX model folder or a Hugging Face folder.
SOURCE: text files, folders or globs (tokenized once into the cache), or a folder written by the trainer's
preprocessing (its held-out split is scored). Every batch i is masked with `fold_in(key(seed), i)`, so
teacher and student (and two runs) are scored on exactly the same masked positions. Prints masked-LM
accuracy and perplexity, forward-pass tokens/s at batch 1 and 32, parameter counts and, with a teacher,
the student/teacher ratios (accuracy retained, speed-up, size).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from distilbert_jax import checkpoint, data, hf, losses, masking, validation
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
  masked = masking.mask_tokens(key, ids_BxL, mask_BxL, token_probs_V, mask_token_id=mask_token_id,
                               vocab_size=vocab_size, mlm_prob=mlm_prob, scheme=scheme)
  out = model.apply({"params": params}, masked.input_ids, attention_mask=mask_BxL, compute_logits=False)
  k = ids_BxL.size if scheme == "bernoulli" else losses.num_gather_slots(*ids_BxL.shape, mlm_prob)
  h_KxD, w_K, index_K = losses.gather_positions(out.last_hidden_state, masked.mlm_weights, k)
  logits_KxV = model.apply({"params": params}, h_KxD, method=model_lib.Encoder.mlm_logits)
  targets_K = masked.targets.reshape(-1)[index_K]
  correct, count = losses.mlm_accuracy(logits_KxV, targets_K, w_K)
  nll = losses.mlm_loss(logits_KxV, targets_K, w_K) * jnp.maximum(jnp.sum(w_K), 1.0)
  return correct, count, nll


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


def forward_tokens_per_s(model: model_lib.Encoder, params, batch_size: int, seq_len: int, *, repeats: int = 5
                         ) -> float:
  """Inference speed: tokens/s of a jitted forward pass with logits (median of `repeats`, compile excluded)."""
  ids = jnp.ones((batch_size, seq_len), jnp.int32)
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x).logits)
  forward(params, ids).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    forward(params, ids).block_until_ready()
    times.append(time.perf_counter() - start)
  return batch_size * seq_len / float(np.median(times))


def _dataset(sources: list[str], tokenizer: str, *, max_len: int, cache_dir: pathlib.Path):
  """(held-out dataset, token counts for the masking probabilities) from a preprocessed folder or text."""
  if len(sources) == 1 and (pathlib.Path(sources[0]) / "meta.json").exists():
    folder = pathlib.Path(sources[0])
    return data.TokenizedDataset(folder, "heldout"), data.TokenizedDataset(folder, "train").counts()
  key = hashlib.sha256(json.dumps([sources, tokenizer, max_len]).encode()).hexdigest()[:12]
  folder = cache_dir / "eval" / f"{max_len}-{key}"
  texts = (doc for src in sources for doc in data.iter_texts(src, unit="document"))
  data.preprocess(texts, tokenizer, folder, max_len=max_len, held_out_fraction=0.0, source=json.dumps(sources))
  ds = data.TokenizedDataset(folder, "train")  # the whole evaluation text
  return ds, ds.counts()


def evaluate_models(models: dict, sources: list[str], *, tokenizer: str | None = None, max_len: int = 128,
                    batch_size: int = 32, max_batches: int | None = 50, seed: int = 0,
                    speed_batches: tuple[int, ...] = (1, 32), cache_dir="~/.cache/distilbert_jax") -> dict:
  """Scores each of `models` ({name: (model, params)}) on the same masked positions; returns a report."""
  tokenizer = tokenizer or next((m.cfg.tokenizer for m, _ in models.values() if m.cfg.tokenizer), None)
  if not tokenizer:
    raise validation.ConfigError("no tokenizer: the models do not name one; pass --tokenizer DIR")
  for name, (model, _) in models.items():
    if max_len > model.cfg.max_position_embeddings:
      raise validation.ConfigError(f"--max-len {max_len} exceeds the {model.cfg.max_position_embeddings} positions "
                                   f"of the {name}: pass --max-len {model.cfg.max_position_embeddings} or less")
  try:
    ds, counts = _dataset(sources, tokenizer, max_len=max_len, cache_dir=pathlib.Path(cache_dir).expanduser())
  except data.EmptyCorpusError:
    ds = None
  if ds is None or len(ds) == 0:
    raise validation.ConfigError(f"no evaluation examples in {sources}: give more text (examples need at least "
                                 "12 tokens)")
  specials = ds.special_ids
  probs_V = masking.token_probs(counts, [i for i in specials.values() if i is not None])
  report = {}
  for name, (model, params) in models.items():
    if model.cfg.vocab_size != ds.vocab_size:
      raise validation.ConfigError(f"{name} has a {model.cfg.vocab_size}-id vocabulary but the tokenizer {ds.vocab_size}: "
                       "evaluate with the model's own tokenizer (--tokenizer)")
    score = mlm_score(model, params, data.eval_batches(ds, batch_size, max_len), probs_V,
                      mask_token_id=specials["mask"], seed=seed, max_batches=max_batches)
    report[name] = {"mlm_accuracy": score.accuracy, "mlm_loss": score.loss, "perplexity": score.perplexity,
                    "predictions": score.num_predictions, "parameters": model_lib.count_params(params),
                    **{f"tokens_per_s_batch{b}": forward_tokens_per_s(model, params, b, max_len)
                       for b in speed_batches}}
  if "teacher" in report and "student" in report:
    s, t = report["student"], report["teacher"]
    report["student/teacher"] = {
        "accuracy_retained": s["mlm_accuracy"] / max(t["mlm_accuracy"], 1e-12),
        "parameters": s["parameters"] / t["parameters"],
        **{f"speedup_batch{b}": s[f"tokens_per_s_batch{b}"] / t[f"tokens_per_s_batch{b}"] for b in speed_batches}}
  return report


def format_report(report: dict) -> str:
  names = [n for n in ("teacher", "student") if n in report] or list(report)
  rows = [("masked-LM accuracy", "mlm_accuracy", "{:.2%}"), ("perplexity", "perplexity", "{:.1f}"),
          ("masked predictions", "predictions", "{:,}"), ("parameters", "parameters", "{:,}")]
  rows += [(f"tokens/s, batch {k.rsplit('batch', 1)[1]}", k, "{:,.0f}")
           for k in report[names[0]] if k.startswith("tokens_per_s")]
  ratio = report.get("student/teacher", {})
  ratio_of = {"mlm_accuracy": "accuracy_retained", "parameters": "parameters",
              **{k: "speedup_" + k.rsplit("_", 1)[1] for k in report[names[0]] if k.startswith("tokens_per_s")}}
  header = ["", *names] + (["student/teacher"] if ratio else [])
  lines = [header]
  for label, key, fmt in rows:
    line = [label, *(fmt.format(report[n][key]) for n in names)]
    if ratio:
      line.append(f"{ratio[ratio_of[key]]:.2f}" if ratio_of.get(key) in ratio else "")
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
  sys.exit(main())
