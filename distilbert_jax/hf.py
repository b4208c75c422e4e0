"""Hugging Face I/O: `load_hf` and `save_hf` for BERT, DistilBERT, RoBERTa (and XLM-R) and XLM/FlauBERT
checkpoints (masked-LM and base models; BERT and DistilBERT also with the sequence-classification,
token-classification and question-answering heads).

The mapping between our parameter tree and Hugging Face keys is one table per family. Each row names our
parameter path, the Hugging Face key (relative to the base model, or `^`-anchored for head keys that live
outside it) and a hook, a pair of array transforms (to JAX, to Hugging Face). `{i}` stands for a layer index.

torch is imported only to read `pytorch_model.bin` files; safetensors checkpoints need nothing but numpy.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from distilbert_jax import model as model_lib

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = {
    "BertForMaskedLM": "bert", "BertForPreTraining": "bert", "BertModel": "bert",
    "BertForSequenceClassification": "bert", "BertForTokenClassification": "bert",
    "BertForQuestionAnswering": "bert",
    "DistilBertForMaskedLM": "distilbert", "DistilBertModel": "distilbert",
    "DistilBertForSequenceClassification": "distilbert", "DistilBertForTokenClassification": "distilbert",
    "DistilBertForQuestionAnswering": "distilbert",
    "RobertaForMaskedLM": "roberta", "RobertaModel": "roberta",
    "XLMRobertaForMaskedLM": "roberta", "XLMRobertaModel": "roberta",
    "FlaubertWithLMHeadModel": "flaubert", "FlaubertModel": "flaubert",
}
# A folder holding one of these has a tokenizer (WordPiece, byte-level BPE, XLM's Moses + BPE).
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "vocab.json")
_PREFIX = {"bert": "bert.", "distilbert": "distilbert.", "roberta": "roberta.", "flaubert": "transformer."}
# transformers' model_type -> our family (XLM-R is RoBERTa with another vocabulary).
_MODEL_TYPES = {"bert": "bert", "distilbert": "distilbert", "roberta": "roberta", "xlm-roberta": "roberta",
                "flaubert": "flaubert"}
# The architecture suffix of each task head (model.TASK_HEADS), and the key-table part that holds its rows.
HEAD_ARCHITECTURES = {"sequence": "ForSequenceClassification", "token": "ForTokenClassification",
                      "span": "ForQuestionAnswering"}
HEAD_TABLE_PARTS = {"sequence": "classifier", "token": "classifier", "span": "span_classifier"}


class ConversionError(ValueError):
  """A checkpoint or config that cannot be converted; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class Hook:
  """Array transforms between a Hugging Face tensor and our parameter; both take (array, config)."""
  to_jax: Callable[[np.ndarray, model_lib.EncoderConfig], np.ndarray]
  to_hf: Callable[[np.ndarray, model_lib.EncoderConfig], np.ndarray]


COPY = Hook(lambda x, c: x, lambda x, c: x)
# torch Linear stores (out, in); a flax kernel is (in, out).
LINEAR = Hook(lambda x, c: x.T, lambda x, c: x.T)
# q/k/v: (H*K, D) -> (D, H, K), and their biases (H*K,) -> (H, K).
HEADS_IN = Hook(lambda x, c: x.T.reshape(c.hidden_size, c.num_heads, c.head_size),
                lambda x, c: x.reshape(c.hidden_size, -1).T)
HEADS_IN_BIAS = Hook(lambda x, c: x.reshape(c.num_heads, c.head_size), lambda x, c: x.reshape(-1))
# attention output: (D, H*K) -> (H, K, D).
HEADS_OUT = Hook(lambda x, c: x.T.reshape(c.num_heads, c.head_size, c.hidden_size),
                 lambda x, c: x.reshape(-1, c.hidden_size).T)


def _dense_rows(ours: str, theirs: str, kernel: Hook = LINEAR, bias: Hook = COPY):
  return [(f"{ours}/kernel", f"{theirs}.weight", kernel), (f"{ours}/bias", f"{theirs}.bias", bias)]


def _norm_rows(ours: str, theirs: str):
  return [(f"{ours}/scale", f"{theirs}.weight", COPY), (f"{ours}/bias", f"{theirs}.bias", COPY)]


def _layer_rows(names: dict[str, str]):
  """Rows of one layer, given the Hugging Face module name of each of our sub-modules."""
  rows = []
  for ours in ("query", "key", "value"):
    rows += _dense_rows(f"layer_{{i}}/attention/{ours}", names[ours], HEADS_IN, HEADS_IN_BIAS)
  rows += _dense_rows("layer_{i}/attention/out", names["out"], HEADS_OUT)
  rows += _norm_rows("layer_{i}/attention_norm", names["attention_norm"])
  rows += _dense_rows("layer_{i}/mlp/wi", names["wi"])
  rows += _dense_rows("layer_{i}/mlp/wo", names["wo"])
  rows += _norm_rows("layer_{i}/mlp_norm", names["mlp_norm"])
  return rows


def _embedding_rows(with_type: bool):
  rows = [("embeddings/word_embeddings/embedding", "embeddings.word_embeddings.weight", COPY),
          ("embeddings/position_embeddings/embedding", "embeddings.position_embeddings.weight", COPY)]
  if with_type:
    rows.append(("embeddings/token_type_embeddings/embedding", "embeddings.token_type_embeddings.weight", COPY))
  return rows + _norm_rows("embeddings/layer_norm", "embeddings.LayerNorm")


_BERT_LAYER = _layer_rows({
    "query": "encoder.layer.{i}.attention.self.query", "key": "encoder.layer.{i}.attention.self.key",
    "value": "encoder.layer.{i}.attention.self.value", "out": "encoder.layer.{i}.attention.output.dense",
    "attention_norm": "encoder.layer.{i}.attention.output.LayerNorm",
    "wi": "encoder.layer.{i}.intermediate.dense", "wo": "encoder.layer.{i}.output.dense",
    "mlp_norm": "encoder.layer.{i}.output.LayerNorm"})
BERT_TABLE = {
    "embeddings": _embedding_rows(with_type=True),
    "layer": _BERT_LAYER,
    "pooler": _dense_rows("pooler", "pooler.dense"),
    "classifier": _dense_rows("classifier", "^classifier"),
    "span_classifier": _dense_rows("classifier", "^qa_outputs"),
    "head": (_dense_rows("mlm_head/transform", "^cls.predictions.transform.dense")
             + _norm_rows("mlm_head/transform_norm", "^cls.predictions.transform.LayerNorm")
             + [("mlm_head/bias", "^cls.predictions.bias", COPY)]),
}
DISTILBERT_TABLE = {
    "embeddings": _embedding_rows(with_type=False),
    "layer": _layer_rows({
        "query": "transformer.layer.{i}.attention.q_lin", "key": "transformer.layer.{i}.attention.k_lin",
        "value": "transformer.layer.{i}.attention.v_lin", "out": "transformer.layer.{i}.attention.out_lin",
        "attention_norm": "transformer.layer.{i}.sa_layer_norm",
        "wi": "transformer.layer.{i}.ffn.lin1", "wo": "transformer.layer.{i}.ffn.lin2",
        "mlp_norm": "transformer.layer.{i}.output_layer_norm"}),
    # DistilBERT's base model has no pooler; its sequence classifier's pre_classifier plays that part.
    "pooler": _dense_rows("pooler", "^pre_classifier"),
    "classifier": _dense_rows("classifier", "^classifier"),
    "span_classifier": _dense_rows("classifier", "^qa_outputs"),
    "head": (_dense_rows("mlm_head/transform", "^vocab_transform")
             + _norm_rows("mlm_head/transform_norm", "^vocab_layer_norm")
             + [("mlm_head/bias", "^vocab_projector.bias", COPY)]),
}
# RoBERTa names its encoder as BERT does; its MLM head is `lm_head` (RobertaLMHead) and only RobertaModel
# has a pooler (RobertaForMaskedLM has none).
ROBERTA_TABLE = {
    "embeddings": _embedding_rows(with_type=True),
    "layer": _BERT_LAYER,
    "pooler": _dense_rows("pooler", "pooler.dense"),
    "head": (_dense_rows("mlm_head/transform", "^lm_head.dense")
             + _norm_rows("mlm_head/transform_norm", "^lm_head.layer_norm")
             + [("mlm_head/bias", "^lm_head.bias", COPY)]),
}
# XLM/FlauBERT: flat lists per block kind; token types share the word table; the head (FlaubertPredLayer) is
# the tied projection and its bias. layer_norm1/2 sit after (post-norm) or before (pre-norm) their blocks.
FLAUBERT_TABLE = {
    "embeddings": [("embeddings/word_embeddings/embedding", "embeddings.weight", COPY),
                   ("embeddings/position_embeddings/embedding", "position_embeddings.weight", COPY),
                   *_norm_rows("embeddings/layer_norm", "layer_norm_emb")],
    "languages": [("embeddings/language_embeddings/embedding", "lang_embeddings.weight", COPY)],
    "layer": _layer_rows({
        "query": "attentions.{i}.q_lin", "key": "attentions.{i}.k_lin", "value": "attentions.{i}.v_lin",
        "out": "attentions.{i}.out_lin", "attention_norm": "layer_norm1.{i}", "wi": "ffns.{i}.lin1",
        "wo": "ffns.{i}.lin2", "mlp_norm": "layer_norm2.{i}"}),
    "head": [("mlm_head/bias", "^pred_layer.proj.bias", COPY)],
}
TABLES = {"bert": BERT_TABLE, "distilbert": DISTILBERT_TABLE, "roberta": ROBERTA_TABLE, "flaubert": FLAUBERT_TABLE}
# The tied decoder of each family (not loaded: checked against the word embeddings, `_check_tied`).
TIED_DECODERS = ("cls.predictions.decoder.weight", "vocab_projector.weight", "lm_head.decoder.weight",
                 "pred_layer.proj.weight")

# Keys a checkpoint may hold that we deliberately do not load: tied decoders (checked against their
# source below), next-sentence prediction, and non-persistent buffers older checkpoints still wrote.
IGNORED_KEYS = re.compile(r"^(cls\.predictions\.decoder\.(weight|bias)|vocab_projector\.weight"
                          r"|cls\.seq_relationship\..*|lm_head\.decoder\.(weight|bias)|pred_layer\.proj\.weight"
                          r"|(bert\.|distilbert\.|roberta\.)?embeddings\.(position_ids|token_type_ids)"
                          r"|(transformer\.)?position_ids)$")


def writes_task_head(family: str, head: str = "sequence") -> bool:
  """Whether a `head` task head (model.TASK_HEADS) of `family` can be written (as transformers' ...For...)."""
  return HEAD_TABLE_PARTS[head] in TABLES[family]


def mapping(cfg: model_lib.EncoderConfig, *, head: bool = True, pooler: bool | None = None,
            classifier: bool | None = None, base_prefix: str = "") -> list[tuple[tuple[str, ...], str, Hook]]:
  """Every (our parameter path, Hugging Face key, hook) of a model with this config."""
  table = TABLES[cfg.family]

  def part(name: str, what: str):
    if name not in table:
      raise ConversionError(f"a {cfg.family} checkpoint has no {what}: this model cannot be written as {cfg.family}")
    return table[name]

  rows = list(table["embeddings"])
  for i in range(cfg.num_layers):
    rows += [(ours.format(i=i), theirs.format(i=i), hook) for ours, theirs, hook in table["layer"]]
  if cfg.num_languages:
    rows += part("languages", "language embeddings")
  if cfg.use_pooler if pooler is None else pooler:
    rows += part("pooler", "pooler")
  if bool(cfg.num_labels) if classifier is None else classifier:
    rows += part(HEAD_TABLE_PARTS[cfg.task_head], f"{cfg.task_head} head in this project")
  if head:
    rows += table["head"]
  out = []
  for ours, theirs, hook in rows:
    key = theirs[1:] if theirs.startswith("^") else base_prefix + theirs
    out.append((tuple(ours.split("/")), key, hook))
  return out


# ----------------------------------------------------------------------------------------------- configs

def _refuse(field, value, fix):
  raise ConversionError(f"config field {field}={value!r} is not supported: {fix}")


def _bert_like_fields(hf_cfg) -> dict:
  """BERT's and RoBERTa's shared config fields; refuses what neither implements."""
  if getattr(hf_cfg, "position_embedding_type", "absolute") != "absolute":
    _refuse("position_embedding_type", hf_cfg.position_embedding_type, "only 'absolute' positions are implemented")
  if getattr(hf_cfg, "is_decoder", False) or getattr(hf_cfg, "add_cross_attention", False):
    _refuse("is_decoder", True, "only bidirectional encoders are implemented")
  return dict(
      classifier_dropout_rate=(hf_cfg.classifier_dropout if getattr(hf_cfg, "classifier_dropout", None)
                               is not None else hf_cfg.hidden_dropout_prob),
      hidden_size=hf_cfg.hidden_size, num_layers=hf_cfg.num_hidden_layers,
      num_heads=hf_cfg.num_attention_heads, intermediate_size=hf_cfg.intermediate_size,
      type_vocab_size=hf_cfg.type_vocab_size, hidden_act=hf_cfg.hidden_act,
      layer_norm_eps=hf_cfg.layer_norm_eps, dropout_rate=hf_cfg.hidden_dropout_prob,
      attention_dropout_rate=hf_cfg.attention_probs_dropout_prob)


def _flaubert_fields(hf_cfg) -> dict:
  """XLM/FlauBERT's config fields; refuses the options this encoder does not implement."""
  for field, fix in (("sinusoidal_embeddings", "only learned position embeddings are implemented"),
                     ("causal", "only bidirectional encoders are implemented"),
                     ("asm", "only the full softmax output layer is implemented (no adaptive softmax)")):
    if getattr(hf_cfg, field, False):
      _refuse(field, True, fix)
  if not getattr(hf_cfg, "is_encoder", True):
    _refuse("is_encoder", False, "only encoders are implemented")
  if getattr(hf_cfg, "layerdrop", 0.0):
    # Layerdrop skips layers at random in training only: the forward pass (a teacher's) is unaffected.
    log.warning("config layerdrop=%s: training here never drops layers (inference is unaffected)", hf_cfg.layerdrop)
  return dict(
      hidden_size=hf_cfg.emb_dim, num_layers=hf_cfg.n_layers, num_heads=hf_cfg.n_heads,
      intermediate_size=4 * hf_cfg.emb_dim, hidden_act="gelu" if hf_cfg.gelu_activation else "relu",
      layer_norm_eps=hf_cfg.layer_norm_eps, dropout_rate=hf_cfg.dropout,
      attention_dropout_rate=hf_cfg.attention_dropout, pre_norm=bool(getattr(hf_cfg, "pre_norm", False)),
      num_languages=hf_cfg.n_langs if hf_cfg.use_lang_emb and hf_cfg.n_langs > 1 else 0)


def config_from_hf(hf_cfg, family: str) -> model_lib.EncoderConfig:
  """Our config from a transformers config object; refuses fields we cannot honour."""
  if not getattr(hf_cfg, "tie_word_embeddings", True):
    _refuse("tie_word_embeddings", False, "this project ties the MLM decoder to the word embeddings")
  common = dict(vocab_size=hf_cfg.vocab_size, max_position_embeddings=hf_cfg.max_position_embeddings,
                initializer_range=getattr(hf_cfg, "initializer_range", getattr(hf_cfg, "init_std", 0.02)),
                pad_token_id=hf_cfg.pad_token_id or 0)
  try:
    if family == "bert":
      return model_lib.EncoderConfig.bert(**_bert_like_fields(hf_cfg), **common)
    if family == "roberta":
      return model_lib.EncoderConfig.roberta(**_bert_like_fields(hf_cfg), **common)
    if family == "flaubert":
      return model_lib.EncoderConfig.flaubert(**_flaubert_fields(hf_cfg), **common)
    if getattr(hf_cfg, "sinusoidal_pos_embds", False):
      _refuse("sinusoidal_pos_embds", True, "only learned position embeddings are implemented")
    return model_lib.EncoderConfig.distilbert(
        pooler_activation="relu", classifier_dropout_rate=hf_cfg.seq_classif_dropout, hidden_size=hf_cfg.dim,
        num_layers=hf_cfg.n_layers, num_heads=hf_cfg.n_heads,
        intermediate_size=hf_cfg.hidden_dim, hidden_act=hf_cfg.activation, layer_norm_eps=1e-12,
        dropout_rate=hf_cfg.dropout, attention_dropout_rate=hf_cfg.attention_dropout, **common)
  except ValueError as e:
    if isinstance(e, ConversionError):
      raise
    raise ConversionError(f"config.json cannot be honoured: {e}") from e


# What each family's Hugging Face model computes, as our config fields: a model that differs in one of them
# cannot be written as that family (`_config_to_hf` names the field).
_FAMILY_SWITCHES = {
    "bert": dict(positions_skip_padding=False, token_types_in_word_table=False, num_languages=0, pre_norm=False,
                 zero_padding=False, mlm_transform=True),
    "roberta": dict(positions_skip_padding=True, token_types_in_word_table=False, num_languages=0, pre_norm=False,
                    zero_padding=False, mlm_transform=True, mlm_head_act="gelu"),
    "flaubert": dict(positions_skip_padding=False, token_types_in_word_table=True, type_vocab_size=0,
                     use_pooler=False, zero_padding=True, mlm_transform=False),
}
_FAMILY_SWITCHES["distilbert"] = _FAMILY_SWITCHES["bert"]  # its token types and eps: `_config_to_hf`


def _check_family_switches(cfg: model_lib.EncoderConfig):
  wanted = dict(_FAMILY_SWITCHES[cfg.family])
  if cfg.mlm_transform:  # BERT's and DistilBERT's heads use hidden_act, RoBERTa's always exact GELU
    wanted.setdefault("mlm_head_act", cfg.hidden_act)
  for field, value in wanted.items():
    ours = getattr(cfg, field)
    if field == "mlm_head_act":
      ours = ours or cfg.hidden_act
    if ours != value:
      raise ConversionError(f"transformers' {cfg.family} model has {field}={value!r} but this model has {ours!r}: "
                            "it cannot be written in that family")


def _config_to_hf(cfg: model_lib.EncoderConfig, architecture: str):
  import transformers
  if cfg.family in ("bert", "roberta") and not cfg.type_vocab_size:
    raise ConversionError(f"transformers' {cfg.family} always has token-type embeddings but this model has none: "
                          "export it with family='distilbert'")
  if cfg.family == "distilbert" and cfg.layer_norm_eps != 1e-12:
    raise ConversionError(f"DistilBERT fixes LayerNorm eps at 1e-12 but this model uses {cfg.layer_norm_eps}: "
                          "export it as BERT (family='bert') instead")
  _check_family_switches(cfg)
  if cfg.family in ("bert", "roberta"):
    make = transformers.BertConfig
    extra = {}
    if cfg.family == "roberta":
      make = transformers.XLMRobertaConfig if architecture.startswith("XLMRoberta") else transformers.RobertaConfig
      extra = dict(bos_token_id=0, eos_token_id=2)
    return make(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps, hidden_dropout_prob=cfg.dropout_rate,
        attention_probs_dropout_prob=cfg.attention_dropout_rate, initializer_range=cfg.initializer_range,
        classifier_dropout=cfg.classifier_dropout_rate, pad_token_id=cfg.pad_token_id, architectures=[architecture],
        **extra)
  if cfg.family == "flaubert":
    if cfg.intermediate_size != 4 * cfg.hidden_size:
      raise ConversionError(f"XLM/FlauBERT's feed-forward width is always 4 × hidden_size = {4 * cfg.hidden_size} "
                            f"but this model's is {cfg.intermediate_size}: it cannot be written as FlauBERT")
    if cfg.hidden_act not in ("gelu", "relu"):
      raise ConversionError(f"FlauBERT uses exact GELU or ReLU but this model uses {cfg.hidden_act!r}")
    return transformers.FlaubertConfig(
        vocab_size=cfg.vocab_size, emb_dim=cfg.hidden_size, n_layers=cfg.num_layers, n_heads=cfg.num_heads,
        dropout=cfg.dropout_rate, attention_dropout=cfg.attention_dropout_rate,
        gelu_activation=cfg.hidden_act == "gelu", max_position_embeddings=cfg.max_position_embeddings,
        layer_norm_eps=cfg.layer_norm_eps, init_std=cfg.initializer_range, pre_norm=cfg.pre_norm,
        n_langs=max(cfg.num_languages, 1), use_lang_emb=cfg.num_languages > 1, pad_token_id=cfg.pad_token_id,
        architectures=[architecture])
  return transformers.DistilBertConfig(
      vocab_size=cfg.vocab_size, dim=cfg.hidden_size, n_layers=cfg.num_layers, n_heads=cfg.num_heads,
      hidden_dim=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
      activation=cfg.hidden_act, dropout=cfg.dropout_rate, attention_dropout=cfg.attention_dropout_rate,
      initializer_range=cfg.initializer_range, seq_classif_dropout=cfg.classifier_dropout_rate,
      qa_dropout=cfg.classifier_dropout_rate,
      pad_token_id=cfg.pad_token_id, architectures=[architecture])


# ----------------------------------------------------------------------------------------------- weights

def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  import safetensors.numpy
  try:
    return safetensors.numpy.load_file(str(path))
  except Exception as e:  # safetensors raises its own error types (and OSError on truncation).
    raise ConversionError(f"{path} is not a readable safetensors file ({e}): it may be truncated or "
                          "corrupt; download or export it again") from e


def _read_torch_bin(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ConversionError(f"{path} is a PyTorch pickle and reading it needs torch: "
                          "pip install 'distilbert-jax[torch]' (or convert it to safetensors)") from e
  try:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:
    raise ConversionError(f"{path} could not be read by torch.load(weights_only=True) ({e}): it may be truncated "
                          "or corrupt; download or export it again") from e
  # bf16 has no numpy dtype in torch: widen it; every other dtype round-trips as is.
  return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


def read_weights(folder: pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint folder (single or sharded safetensors, or pytorch_model.bin)."""
  for index_name, reader in (("model.safetensors.index.json", _read_safetensors),
                             ("pytorch_model.bin.index.json", _read_torch_bin)):
    if (folder / index_name).exists():
      shards = sorted(set(json.loads((folder / index_name).read_text())["weight_map"].values()))
      return {k: v for shard in shards for k, v in reader(folder / shard).items()}
  if (folder / "model.safetensors").exists():
    return _read_safetensors(folder / "model.safetensors")
  if (folder / "pytorch_model.bin").exists():
    return _read_torch_bin(folder / "pytorch_model.bin")
  raise ConversionError(f"{folder} has no model.safetensors or pytorch_model.bin: point at a folder written by "
                        "transformers' save_pretrained (or by distilbert_jax.save_hf)")


def _normalise_keys(state: dict[str, np.ndarray], family: str) -> tuple[dict[str, np.ndarray], str]:
  """Strip the base-model prefix and rename LayerNorm gamma/beta; returns (state, prefix found)."""
  prefix = _PREFIX[family]
  has_prefix = any(k.startswith(prefix) for k in state)
  out = {}
  for key, value in state.items():
    key = key[len(prefix):] if key.startswith(prefix) else key
    key = re.sub(r"(LayerNorm|layer_norm)\.gamma$", r"\1.weight", key)
    key = re.sub(r"(LayerNorm|layer_norm)\.beta$", r"\1.bias", key)
    out[key] = value
  return out, prefix if has_prefix else ""


def _set(tree: dict, path: tuple[str, ...], value):
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
  for name in path:
    tree = tree[name]
  return tree


# ----------------------------------------------------------------------------------------------- public

def _read_hf_config(folder: pathlib.Path):
  """(transformers config, family, architectures) of a checkpoint folder; refuses what is not supported."""
  import transformers
  try:
    hf_cfg = transformers.AutoConfig.from_pretrained(str(folder))
  except Exception as e:
    raise ConversionError(f"{folder}/config.json could not be read ({e}): is this a transformers checkpoint?") from e
  archs = list(getattr(hf_cfg, "architectures", None) or [])
  family = _MODEL_TYPES.get(hf_cfg.model_type)
  unsupported = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
  if family is None or unsupported:
    raise ConversionError(
        f"{folder} holds {', '.join(archs) or hf_cfg.model_type}, which is not supported: supported "
        f"architectures are {', '.join(SUPPORTED_ARCHITECTURES)}")
  return hf_cfg, family, archs


def _encoder_config(folder: pathlib.Path, hf_cfg, family: str, archs: list[str],
                    tensor_names: set[str] | None) -> model_lib.EncoderConfig:
  """Our config of a checkpoint: config.json, plus the tensor names (prefix-free) for whether it has a pooler
  (None: unknown, BERT gets one)."""
  pooler_key = {"bert": "pooler.dense.weight", "roberta": "pooler.dense.weight",
                "distilbert": "pre_classifier.weight"}.get(family)
  has_pooler = pooler_key in tensor_names if tensor_names is not None else family == "bert"
  heads = [h for h, suffix in HEAD_ARCHITECTURES.items() if any(a.endswith(suffix) for a in archs)]
  head = {}
  if heads:
    head = dict(task_head=heads[0], num_labels=hf_cfg.num_labels, label_names=_label_names(hf_cfg))
    if heads[0] == "span":
      head.update(num_labels=2, label_names=())
    if family == "distilbert" and heads[0] != "sequence":  # the dropout before DistilBERT's QA / token head
      head["classifier_dropout_rate"] = hf_cfg.qa_dropout if heads[0] == "span" else hf_cfg.dropout
  return config_from_hf(hf_cfg, family).replace(
      use_pooler=has_pooler, **head,
      tokenizer=str(folder) if any((folder / name).exists() for name in TOKENIZER_FILES) else None)


def _label_names(hf_cfg) -> tuple[str, ...]:
  """The class names of config.json's id2label, unless they are transformers' placeholders (LABEL_0, ...)."""
  id2label = {int(k): v for k, v in (getattr(hf_cfg, "id2label", None) or {}).items()}
  names = tuple(id2label.get(i, f"LABEL_{i}") for i in range(hf_cfg.num_labels))
  return () if names == tuple(f"LABEL_{i}" for i in range(hf_cfg.num_labels)) else names


def _tensor_names(folder: pathlib.Path, family: str) -> set[str] | None:
  """The (prefix-free) tensor names of a safetensors checkpoint, from its index or headers alone; None for a
  pytorch_model.bin (its names need the whole file)."""
  index = folder / "model.safetensors.index.json"
  if index.exists():
    names = json.loads(index.read_text())["weight_map"]
  elif (folder / "model.safetensors").exists():
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), framework="np") as f:
      names = list(f.keys())
  else:
    return None
  return set(_normalise_keys(dict.fromkeys(names), family)[0])


def read_config(path: str | os.PathLike, **config_overrides) -> model_lib.EncoderConfig:
  """The config `load_hf` gives a checkpoint, from config.json and the safetensors headers: no weights read
  (a pytorch_model.bin BERT is taken to have its pooler)."""
  folder = _resolve(path)
  hf_cfg, family, archs = _read_hf_config(folder)
  return _encoder_config(folder, hf_cfg, family, archs, _tensor_names(folder, family)).replace(**config_overrides)


def load_hf(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str = "float32", seed: int = 0,
            **config_overrides) -> tuple[model_lib.Encoder, dict]:
  """Reads a Hugging Face BERT, DistilBERT, RoBERTa (XLM-R) or XLM/FlauBERT checkpoint folder into (model, params).

  `path` holds `config.json` and `model.safetensors` (or `pytorch_model.bin`) of one of
  `SUPPORTED_ARCHITECTURES`. A hub name (`bert-base-uncased`)
  works too where the hub is reachable: it is resolved with `huggingface_hub.snapshot_download`.
  A checkpoint without an MLM head gets a freshly initialised one (from `seed`) and a warning naming it.
  `dtype` is the compute dtype, `param_dtype` the dtype the parameters are stored in.
  """
  folder = _resolve(path)
  hf_cfg, family, archs = _read_hf_config(folder)
  state, prefix = _normalise_keys(read_weights(folder), family)
  cfg = _encoder_config(folder, hf_cfg, family, archs, set(state)).replace(
      dtype=dtype, param_dtype=param_dtype, **config_overrides)
  model = model_lib.Encoder(cfg)
  shapes = jax.eval_shape(lambda: model_lib.init_params(model, jax.random.key(seed)))
  fresh = None  # initialised parameters, only for a missing masked-LM head

  params, used, initialised = {}, set(), []
  for ours, key, hook in mapping(cfg):
    expected = _get(shapes, ours)
    if key not in state:
      if ours[0] != "mlm_head":
        raise ConversionError(f"{folder} lacks tensor {prefix}{key}, which the config requires: the weights "
                              "and config.json do not belong together (or the file is incomplete)")
      if fresh is None:
        fresh = jax.device_get(model_lib.init_params(model, jax.random.key(seed)))
      initialised.append("/".join(ours))
      _set(params, ours, _get(fresh, ours))
      continue
    value = hook.to_jax(state[key], cfg) if state[key].size == math.prod(expected.shape) else state[key]
    if value.shape != expected.shape:
      raise ConversionError(f"tensor {prefix}{key} has shape {tuple(state[key].shape)} but config.json implies "
                            f"{_expected_hf_shape(expected, hook, cfg)}: fix config.json or the weights")
    _set(params, ours, np.asarray(value).astype(jnp.dtype(cfg.param_dtype)))
    used.add(key)

  _check_tied(state, folder)
  unused = sorted(k for k in state if k not in used and not IGNORED_KEYS.match(k))
  if unused:
    log.warning("%s: ignored %d tensors that this model does not use: %s", folder, len(unused), ", ".join(unused[:8]))
  if initialised:
    log.warning("%s has no masked-LM head: freshly initialised %s", folder, ", ".join(initialised))
  return model, params


def _expected_hf_shape(expected: np.ndarray, hook: Hook, cfg) -> tuple[int, ...]:
  return tuple(hook.to_hf(np.zeros(expected.shape, np.float32), cfg).shape)


def _check_tied(state: dict[str, np.ndarray], folder):
  """Refuses a checkpoint whose stored decoder differs from the word embeddings (we always tie)."""
  emb = state.get("embeddings.word_embeddings.weight", state.get("embeddings.weight"))
  for key in TIED_DECODERS:
    if key in state and emb is not None and not np.array_equal(state[key], emb):
      raise ConversionError(f"{folder}: {key} differs from the word embeddings, but this project ties them; "
                            "such an untied checkpoint cannot be converted exactly")


def _resolve(path) -> pathlib.Path:
  folder = pathlib.Path(path).expanduser()
  if folder.is_dir():
    if not (folder / "config.json").exists():
      raise ConversionError(f"{folder} has no config.json: point at a folder written by transformers' save_pretrained")
    return folder
  if folder.exists():
    raise ConversionError(f"{folder} is a file: point at the checkpoint's folder, not at one file in it")
  if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(path)):
    try:
      import huggingface_hub
      return pathlib.Path(huggingface_hub.snapshot_download(
          str(path), allow_patterns=["*.json", "*.txt", "*.safetensors", "pytorch_model.bin"]))
    except Exception as e:
      raise ConversionError(f"{path!r} is not a local folder and could not be fetched from the Hugging Face hub "
                            f"({type(e).__name__}): give a local checkpoint folder") from e
  raise ConversionError(f"{folder} does not exist: give a checkpoint folder with config.json and weights")


def save_hf(model: model_lib.Encoder, params, path: str | os.PathLike, tokenizer=None, *,
            architecture: str | None = None, overwrite: bool = True) -> pathlib.Path:
  """Writes a Hugging Face folder: config.json, model.safetensors and the tokenizer files.

  `architecture` defaults to the family's masked-LM model: `BertForMaskedLM`, `DistilBertForMaskedLM`,
  `RobertaForMaskedLM` (the pooler is left out: these have none) or `FlaubertWithLMHeadModel`; or, for a BERT
  or DistilBERT with a task head (`num_labels` > 0), to the head's `...ForSequenceClassification` (1 label is
  written as regression), `...ForTokenClassification` or `...ForQuestionAnswering`. `BertModel`,
  `DistilBertModel`, `RobertaModel`, `FlaubertModel` write the encoder (and the pooler, where the model has
  one) without a head; `XLMRoberta...` write a RoBERTa as XLM-R. Class names (`label_names`) are written as
  config.json's id2label / label2id.
  `tokenizer` is a transformers tokenizer or a folder; by default the one the model was loaded with.
  Tied weights are not written, as transformers does.
  """
  import safetensors.numpy
  cfg = model.cfg
  family_archs = [a for a, f in SUPPORTED_ARCHITECTURES.items() if f == cfg.family and a != "BertForPreTraining"]
  task_archs = {a: h for a in family_archs for h, suffix in HEAD_ARCHITECTURES.items() if a.endswith(suffix)}
  if architecture is None:
    heads = [a for a, h in task_archs.items() if h == cfg.task_head]
    architecture = heads[0] if cfg.num_labels and heads else family_archs[0]
  if architecture not in family_archs:
    raise ConversionError(f"architecture {architecture!r} does not fit a {cfg.family} model: use one of {family_archs}")
  with_head = architecture.endswith(("ForMaskedLM", "WithLMHeadModel"))
  classifies = architecture in task_archs
  if classifies and not (cfg.num_labels and task_archs[architecture] == cfg.task_head):
    have = f"a {cfg.task_head} head" if cfg.num_labels else "no task head (num_labels=0)"
    raise ConversionError(f"{architecture} needs a {task_archs[architecture]} head but this model has {have}")
  # The pooler is written where the Hugging Face model has one: the base models and the sequence classifiers.
  pooler = cfg.use_pooler and (architecture in ("BertModel", "RobertaModel", "XLMRobertaModel")
                               or (classifies and cfg.task_head == "sequence"))
  hf_cfg = _config_to_hf(cfg, architecture)  # refuses what the family cannot hold, before anything is written
  out = pathlib.Path(path)
  if out.exists() and any(out.iterdir()) and not overwrite:
    raise ConversionError(f"{out} is not empty: choose an empty folder or pass overwrite=True (--overwrite)")
  out.mkdir(parents=True, exist_ok=True)

  params = jax.device_get(params)
  prefix = _PREFIX[cfg.family] if with_head or classifies else ""
  tensors = {}
  for ours, key, hook in mapping(cfg, head=with_head, pooler=pooler, classifier=classifies, base_prefix=prefix):
    tensors[key] = np.ascontiguousarray(hook.to_hf(np.asarray(_get(params, ours)), cfg))
  safetensors.numpy.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  if classifies:
    hf_cfg.num_labels = cfg.num_labels
    if cfg.task_head == "sequence":
      hf_cfg.problem_type = "regression" if cfg.num_labels == 1 else "single_label_classification"
    if cfg.label_names:
      hf_cfg.id2label = dict(enumerate(cfg.label_names))
      hf_cfg.label2id = {name: i for i, name in enumerate(cfg.label_names)}
  hf_cfg.save_pretrained(str(out))

  tokenizer = tokenizer if tokenizer is not None else cfg.tokenizer
  if isinstance(tokenizer, (str, os.PathLike)):
    import transformers
    try:
      tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer))
    except Exception as e:
      log.warning("could not load the tokenizer %s (%s): %s has no tokenizer files", tokenizer, e, out)
      tokenizer = None
  if tokenizer is not None:
    tokenizer.save_pretrained(str(out))
  return out
