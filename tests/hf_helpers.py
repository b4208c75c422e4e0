"""Builders of small real transformers checkpoints for tests (written by transformers itself)."""
import pathlib

import numpy as np
import torch
import transformers

BERT = "bert"
DISTILBERT = "distilbert"
ROBERTA = "roberta"
FLAUBERT = "flaubert"


def hf_config(family: str, *, hidden=32, layers=2, heads=4, ffn=64, vocab=101, positions=64, type_vocab=2,
              pad=1, pre_norm=False, langs=1, eps=1e-12, gelu=True):
  """A small config; `pad` (RoBERTa, FlauBERT), `pre_norm`, `langs`, `eps`, `gelu` (FlauBERT) apply where the
  family has them (FlauBERT's feed-forward width is always 4 × hidden)."""
  if family == BERT:
    return transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                   intermediate_size=ffn, vocab_size=vocab, max_position_embeddings=positions,
                                   type_vocab_size=type_vocab)
  if family == ROBERTA:
    return transformers.RobertaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                      intermediate_size=ffn, vocab_size=vocab, max_position_embeddings=positions,
                                      type_vocab_size=type_vocab, pad_token_id=pad, bos_token_id=0, eos_token_id=2)
  if family == FLAUBERT:
    return transformers.FlaubertConfig(emb_dim=hidden, n_layers=layers, n_heads=heads, vocab_size=vocab,
                                       max_position_embeddings=positions, pad_index=pad, pre_norm=pre_norm,
                                       n_langs=langs, layer_norm_eps=eps, gelu_activation=gelu)
  return transformers.DistilBertConfig(dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=ffn, vocab_size=vocab,
                                       max_position_embeddings=positions)


TASK_CLASSES = {
    "sequence": {BERT: transformers.BertForSequenceClassification,
                 DISTILBERT: transformers.DistilBertForSequenceClassification},
    "token": {BERT: transformers.BertForTokenClassification, DISTILBERT: transformers.DistilBertForTokenClassification},
    "span": {BERT: transformers.BertForQuestionAnswering, DISTILBERT: transformers.DistilBertForQuestionAnswering},
}


def write_hf(folder: pathlib.Path, family: str, *, head=True, seed=0, safe=True, num_labels=0, task="sequence",
             label_names=(), **cfg_kw):
  """A randomly initialised transformers model saved with save_pretrained; returns (folder, torch model).

  head: masked-LM head or none; num_labels > 0: a `task` head instead (TASK_CLASSES; span: num_labels=2),
  with `label_names` as id2label where given."""
  torch.manual_seed(seed)
  cfg = hf_config(family, **cfg_kw)
  cls = {(BERT, True): transformers.BertForMaskedLM, (BERT, False): transformers.BertModel,
         (DISTILBERT, True): transformers.DistilBertForMaskedLM, (DISTILBERT, False): transformers.DistilBertModel,
         (ROBERTA, True): transformers.RobertaForMaskedLM, (ROBERTA, False): transformers.RobertaModel,
         (FLAUBERT, True): transformers.FlaubertWithLMHeadModel, (FLAUBERT, False): transformers.FlaubertModel}
  if num_labels:
    cfg.num_labels = num_labels
    if label_names:
      cfg.id2label = dict(enumerate(label_names))
      cfg.label2id = {name: i for i, name in enumerate(label_names)}
    cls = {(family, head): TASK_CLASSES[task][family]}
  model = cls[family, head](cfg).eval()
  # Random init leaves LayerNorms at 1/0 and biases at 0: perturb every tensor so nothing passes by accident.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  model.save_pretrained(str(folder), safe_serialization=safe)
  return folder, model


def random_batch(rng: np.random.Generator, vocab: int, batch=3, length=13, pad_pattern="mixed", pad_id=0):
  """(ids, mask): pads (id `pad_id`, mask 0) at the end of rows ("mixed"), at the start ("left") or nowhere;
  real tokens never take `pad_id` (RoBERTa derives positions from it)."""
  ids = rng.integers(0, vocab - 1, (batch, length))
  ids = ids + (ids >= pad_id)  # every id but pad_id
  mask = np.ones((batch, length), np.int64)
  if pad_pattern == "mixed":
    for b in range(1, batch):
      mask[b, length - 2 * b - 1:] = 0
  elif pad_pattern == "left":
    mask[:, :2] = 0
  ids = np.where(mask > 0, ids, pad_id)
  return ids, mask


def torch_forward(model, ids, mask, token_types=None, **kw):
  kw = dict(attention_mask=torch.tensor(mask), output_hidden_states=True, **kw)
  if token_types is not None:
    kw["token_type_ids"] = torch.tensor(token_types)
  with torch.no_grad():
    return model(torch.tensor(ids), **kw)
