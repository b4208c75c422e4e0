"""Converts between Hugging Face PyTorch checkpoints and this project's JAX format.

  python tools/convert.py hf2jax --src HF_DIR --dst JAX_DIR     # config.json + model.safetensors/.bin -> Orbax
  python tools/convert.py jax2hf --src JAX_DIR --dst HF_DIR     # -> folder transformers loads
  python tools/convert.py jax2hf --src WORKDIR --dst HF_DIR [--step N]   # a training run's student

`HF_DIR` is a local folder (or a hub name where the hub is reachable). `jax2hf` takes a converted model
folder or a training workdir (its newest checkpoint, or `--step N`), and writes a masked-LM model by
default (`--architecture BertModel` / `DistilBertModel` for the bare encoder) and the tokenizer files when the
source model knows its tokenizer (or `--tokenizer DIR`). Neither command writes into a non-empty `--dst`
without `--overwrite`.
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import shutil
import sys

import distilbert_jax
from distilbert_jax import checkpoint, hf, validation

DTYPES = ("float32", "bfloat16", "float16")


def _prepare_dst(dst: pathlib.Path, overwrite: bool):
  if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
    if not overwrite:
      raise distilbert_jax.ConversionError(f"{dst} exists and is not empty: choose another --dst or pass --overwrite")
    shutil.rmtree(dst) if dst.is_dir() else dst.unlink()


def check_args(args):
  """Refuses, before anything is read or written, arguments that cannot work."""
  validation.check_model_path(args.src, "--src")
  src = pathlib.Path(args.src).expanduser()
  if src.exists() and src.resolve() == args.dst.expanduser().resolve():
    raise validation.ConfigError(f"--dst {args.dst} is --src: give another --dst (the source must survive)")
  if args.dst.expanduser().exists() and not args.dst.is_dir() and not args.overwrite:
    raise validation.ConfigError(f"--dst {args.dst} is an existing file: choose another --dst or pass --overwrite")
  validation.check_workdir(args.dst.parent if args.dst.is_file() else args.dst, "--dst")
  if args.command == "hf2jax":
    if args.dtype not in DTYPES:
      raise validation.ConfigError(f"--dtype {args.dtype!r}: use one of {', '.join(DTYPES)}")
    return
  names = [a for a in hf.SUPPORTED_ARCHITECTURES if a != "BertForPreTraining"]  # save_hf writes these
  if args.architecture is not None and args.architecture not in names:
    raise validation.ConfigError(f"--architecture {args.architecture!r}: use one of {', '.join(names)}")
  if args.tokenizer:
    validation.check_existing_path(args.tokenizer, "--tokenizer", "tokenizer folder")
  if args.step is not None:
    validation.check_number("--step", args.step, ">=0")


def main(argv=None) -> int:
  parser = validation.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  for name, help_ in (("hf2jax", "Hugging Face folder -> JAX folder"), ("jax2hf", "JAX folder -> Hugging Face")):
    p = sub.add_parser(name, help=help_)
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True, type=pathlib.Path)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
  sub.choices["hf2jax"].add_argument("--dtype", default="float32", help="parameter dtype stored (default float32)")
  sub.choices["jax2hf"].add_argument("--architecture", default=None,
                                     help="an architecture of the model's family (hf.SUPPORTED_ARCHITECTURES; "
                                     "default: its masked-LM model)")
  sub.choices["jax2hf"].add_argument("--tokenizer", default=None, help="tokenizer folder to copy (default: the "
                                     "model's own)")
  sub.choices["jax2hf"].add_argument("--step", type=int, default=None, help="checkpoint step of a training "
                                     "workdir (default: the newest)")
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax narrates every read and write at INFO
  try:
    args = parser.parse_args(argv)
    check_args(args)
    # Read the source completely before touching --dst: a bad source never costs an existing folder.
    if args.command == "hf2jax":
      model, params = distilbert_jax.load_hf(args.src, param_dtype=args.dtype)
    elif checkpoint.is_run_dir(args.src):
      model, params, step = checkpoint.load_run(args.src, args.step)
      print(f"step {step} of the run in {args.src}")
    else:
      model, params = checkpoint.load_model(args.src)
    _prepare_dst(args.dst, args.overwrite)
    if args.command == "hf2jax":
      checkpoint.save_model(args.dst, model, params)
    else:
      distilbert_jax.save_hf(model, params, args.dst, tokenizer=args.tokenizer, architecture=args.architecture)
  except (distilbert_jax.ConversionError, validation.ConfigError, checkpoint.CheckpointError, FileNotFoundError,
          ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  cfg = model.cfg
  print(f"wrote {args.dst}: {cfg.family}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{distilbert_jax.count_params(params) / 1e6:.1f}M parameters")
  return 0


if __name__ == "__main__":
  sys.exit(main())
