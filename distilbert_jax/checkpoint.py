"""Orbax checkpoints.

A converted model is a folder with our `config.json` (an `EncoderConfig`) and an Orbax `params/` item.
Training checkpoints (a `CheckpointManager` over a workdir) live here too.
"""
from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from distilbert_jax import model as model_lib

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_model(folder: str | os.PathLike, model: model_lib.Encoder, params) -> pathlib.Path:
  """Writes `config.json` and the parameters (Orbax, standard format) to `folder`."""
  folder = pathlib.Path(folder).absolute()
  folder.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(folder / PARAMS_DIR, params, force=True)
  (folder / CONFIG_FILE).write_text(json.dumps(model.cfg.to_dict(), indent=2, sort_keys=True) + "\n")
  return folder


def is_model_dir(folder: str | os.PathLike) -> bool:
  folder = pathlib.Path(folder)
  return (folder / CONFIG_FILE).is_file() and (folder / PARAMS_DIR).is_dir()


def load_model(folder: str | os.PathLike, sharding=None) -> tuple[model_lib.Encoder, dict]:
  """Reads what `save_model` wrote. `sharding`: an optional tree of shardings to restore onto."""
  folder = pathlib.Path(folder).absolute()
  if not is_model_dir(folder):
    raise FileNotFoundError(f"{folder} is not a converted model (expected {CONFIG_FILE} and {PARAMS_DIR}/): "
                            "create one with `python tools/convert.py hf2jax`")
  cfg = model_lib.EncoderConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
  model = model_lib.Encoder(cfg)
  abstract = jax.eval_shape(lambda: model_lib.init_params(model, jax.random.key(0)))
  if sharding is not None:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sharding)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(folder / PARAMS_DIR, abstract)
  return model, params
