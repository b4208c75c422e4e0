"""Refusing bad input before anything compiles: one exception type, one line each, naming the fix.

Every command line (train, finetune, evaluate, aot, tools/convert.py) checks its settings and files here
first and reports a `ConfigError` as one line, `error: ...`, with exit status 2. Anything else that goes
wrong keeps its traceback: that is a bug, and must stay visible.
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import re
from typing import Iterable, Mapping

# How many bytes of each local text file are read to tell text from binary.
SNIFF_BYTES = 8192


class ConfigError(ValueError):
  """A configuration or input that cannot run; raised before anything compiles."""


# ------------------------------------------------------------------------------------------------ numbers

# Each range: (test, how the message states it).
RANGES = {
    ">0": (lambda v: v > 0, "> 0"),
    ">=0": (lambda v: v >= 0, ">= 0"),
    "[0,1)": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "(0,1)": (lambda v: 0 < v < 1, "in (0, 1)"),
    "(0,1]": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "[0,1]": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}


def _lookup(config, path: str):
  value = config
  for part in path.split("."):
    value = value[part]
  return value


def check_ranges(config, table: Mapping[str, str], *, flag_prefix: str = "--config."):
  """Refuses the first setting of `table` ({"train.steps": ">0", ...}) outside its range."""
  for path, kind in table.items():
    value = _lookup(config, path)
    check_number(f"{flag_prefix}{path}", value, kind)


def check_number(flag: str, value, kind: str):
  """One number against a named range of `RANGES`; `flag` is how the user sets it (used in the fix)."""
  test, wanted = RANGES[kind]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ConfigError(f"{flag} must be a number {wanted}, got {value!r}: set {flag}=<number {wanted}>")
  if not test(value):
    raise ConfigError(f"{flag} must be {wanted}, got {value!r}: set {flag} to a value {wanted}")


def check_choice(flag: str, value, choices):
  """One setting among named `choices`."""
  if value not in choices:
    raise ConfigError(f"{flag}={value!r} is not one of {', '.join(map(str, choices))}: set {flag} to one of them")


# ------------------------------------------------------------------------------------------------ files

def check_workdir(workdir: str | os.PathLike, flag: str = "--workdir"):
  """A folder that exists and is writable, or that can be created: refuses a file, a read-only folder."""
  path = pathlib.Path(workdir).expanduser().absolute()
  if path.exists() and not path.is_dir():
    raise ConfigError(f"{flag} {path} is an existing file, not a folder: give a folder path")
  probe = path
  while not probe.exists():  # the nearest existing ancestor is where the folder would be created
    probe = probe.parent
  if not probe.is_dir():
    raise ConfigError(f"{flag} {path} cannot be created: {probe} is a file; give another folder path")
  if not os.access(probe, os.W_OK | os.X_OK):
    what = "is not writable" if probe == path else f"cannot be created ({probe} is not writable)"
    raise ConfigError(f"{flag} {path} {what}: give a writable folder or fix its permissions")


def looks_binary(path: str | os.PathLike) -> bool:
  """True for a file whose first `SNIFF_BYTES` hold a NUL byte or are not UTF-8."""
  with open(path, "rb") as f:
    head = f.read(SNIFF_BYTES)
  if b"\0" in head:
    return True
  import codecs
  try:  # an incremental decoder: a character cut at the end of the sample is not an error
    codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
  except UnicodeDecodeError:
    return True
  return False


def check_text_files(files: Iterable[pathlib.Path], source: str, flag: str):
  """Refuses binary files and a source whose files are all empty."""
  files = list(files)
  for f in files:
    if looks_binary(f):
      raise ConfigError(f"{flag} {source!r}: {f} is not UTF-8 text (binary data?): give plain-text files")
  if files and all(f.stat().st_size == 0 for f in files):
    raise ConfigError(f"{flag} {source!r} is empty ({len(files)} file(s) of 0 bytes): give text to train on")


def check_local_sources(sources: Iterable[str], flag: str = "--config.data.sources"):
  """Local text sources (files, folders, globs) that exist and hold UTF-8 text; `hf:`/`tfds:` pass."""
  from distilbert_jax import data  # heavy imports (tokenizers): only when sources are checked
  for source in sources:
    text = os.fspath(source)
    if re.match(r"^(hf|tfds):", text):
      continue
    try:
      files = data.local_text_files(text)
    except FileNotFoundError as e:
      raise ConfigError(f"{flag}: {e}") from None
    check_text_files(files, text, flag)


def check_existing_path(path: str | os.PathLike, flag: str, what: str = "file or folder"):
  if not pathlib.Path(path).expanduser().exists():
    raise ConfigError(f"{flag} {path} does not exist: give an existing {what}")


# ------------------------------------------------------------------------------------------------ devices

def check_mesh(shape, num_devices: int, flag: str = "--config.mesh.shape") -> dict[str, int]:
  """A (data, fsdp, tensor) shape that fills `num_devices` (one -1 fills automatically); returns the axis
  sizes."""
  from distilbert_jax import sharding
  try:
    sizes = sharding.mesh_shape(shape, num_devices)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{flag}={tuple(shape)!r} does not fit the {num_devices} device(s) present ({e}): "
                      f"set {flag} to sizes whose product is {num_devices}, e.g. (-1,1,1)") from None
  return dict(zip(sharding.MESH_AXES, sizes))


def check_batch(batch_size: int, data_parallel: int, grad_accum: int = 1, flag: str = "--config.data.batch_size"):
  """A global batch that splits evenly over the data-parallel devices and the accumulation steps."""
  if batch_size % (data_parallel * grad_accum):
    raise ConfigError(f"global batch {batch_size} must divide by data-parallel size {data_parallel} × grad_accum "
                      f"{grad_accum}: change {flag}")


# ------------------------------------------------------------------------------------------------ flags

def flag_error(error: Exception, argv: list[str]) -> str:
  """One line for an error raised while parsing command-line flags (unknown `--config.` keys included)."""
  if isinstance(error, (KeyError, AttributeError)):
    inner = error.args[0] if error.args else error
    if isinstance(inner, KeyError):  # ml_collections wraps the KeyError in an AttributeError
      inner = inner.args[0] if inner.args else inner
    text = str(inner)
    key = text.split("\n", 1)[0].strip("'\"")
    hint = re.search(r'Did you mean "([^"]+)"', text)
    arg = next((a for a in argv if a.startswith("--config.") and re.search(rf"\.{re.escape(key)}(\.|=|$)", a)),
               None)
    where = f" in {arg}" if arg else ""
    fix = ""
    if arg and hint:
      name = arg.split("=", 1)[0]
      suggestion = re.sub(rf"(?<=\.){re.escape(key)}(?=\.|$)", hint.group(1), name, count=1)
      fix = f": did you mean {suggestion}?"
    elif hint:
      fix = f": did you mean {hint.group(1)!r}?"
    else:
      fix = ": check the spelling against the config file"
    return f"unknown config key {key!r}{where}{fix}"
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  if isinstance(error, OSError) and "Failed loading config file" in str(error):
    cause = next((line for line in lines if "[Errno" in line), lines[-1] if lines else "")
    return f"--config: cannot load the config file ({cause}): give an existing configs/*.py file"
  return lines[0] if lines else type(error).__name__


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose bad arguments raise `ConfigError` (one line, exit status 2, from the caller's handler)
  instead of printing the usage and exiting from inside `parse_args`."""

  def error(self, message):
    raise ConfigError(f"{message} (see --help)")


def looks_local(path: str | os.PathLike) -> bool:
  """A path rather than a hub name such as `bert-base-uncased` or `google-bert/bert-base-uncased`."""
  text = os.fspath(path)
  if text.startswith(("/", ".", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text:
    return True
  return "/" in text and pathlib.Path(text).parent.is_dir()  # runs/demo where ./runs exists: local


def check_model_path(path: str | os.PathLike, flag: str):
  """A local model folder or workdir that exists (hub names are left to the loader)."""
  if path and looks_local(path):
    check_existing_path(path, flag, "model folder or training workdir")


def check_max_len(max_len: int, models: dict, flag: str = "--config.data.max_len"):
  """Refuses sequences longer than a model's learned positions ({"teacher": Encoder or None, ...}); a RoBERTa's
  first pad_token_id + 1 positions are never used (`EncoderConfig.max_length`)."""
  for name, model in models.items():
    if model is not None and max_len > model.cfg.max_length:
      raise ConfigError(f"{flag}={max_len} exceeds the {model.cfg.max_length} positions of the "
                        f"{name}: set {flag} to at most {model.cfg.max_length}")
