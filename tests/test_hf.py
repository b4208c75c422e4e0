"""Conversion from and to Hugging Face: parity with transformers' PyTorch models, round trips, bad input."""
import json

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import distilbert_jax
from distilbert_jax import hf
from hf_helpers import BERT, DISTILBERT, FLAUBERT, ROBERTA, random_batch, torch_forward, write_hf

TOL = 1e-4

CONFIGS = [
    (BERT, dict(hidden=32, layers=2, heads=4, ffn=64, vocab=101), "mixed"),
    (BERT, dict(hidden=48, layers=3, heads=3, ffn=80, vocab=257, type_vocab=3), "left"),
    (BERT, dict(hidden=64, layers=1, heads=8, ffn=32, vocab=53), "none"),
    (DISTILBERT, dict(hidden=32, layers=2, heads=4, ffn=64, vocab=101), "mixed"),
    (DISTILBERT, dict(hidden=48, layers=3, heads=6, ffn=96, vocab=211), "left"),
    (DISTILBERT, dict(hidden=24, layers=1, heads=2, ffn=24, vocab=37), "none"),
    (ROBERTA, dict(hidden=32, layers=2, heads=4, ffn=64, vocab=101, type_vocab=1, pad=1), "mixed"),
    (ROBERTA, dict(hidden=48, layers=3, heads=3, ffn=80, vocab=257, type_vocab=1, pad=1), "left"),
    (ROBERTA, dict(hidden=24, layers=1, heads=2, ffn=24, vocab=53, type_vocab=2, pad=5, positions=40), "none"),
    # Post-norm XLM/FlauBERT against FlaubertWithLMHeadModel itself (pre-norm: test_pre_norm_flaubert_parity).
    (FLAUBERT, dict(hidden=32, layers=2, heads=4, vocab=101, pad=2), "mixed"),
    (FLAUBERT, dict(hidden=48, layers=3, heads=6, vocab=211, pad=2, langs=3, eps=1e-6), "left"),
    (FLAUBERT, dict(hidden=24, layers=1, heads=2, vocab=37, pad=0, gelu=False), "none"),
]
PAD_ID = {BERT: 0, DISTILBERT: 0}  # RoBERTa and FlauBERT: the config's `pad`


def _family_inputs(rng, family, cfg_kw, ids):
  """(token types, language ids) to feed both sides: BERT's and RoBERTa's token types index their own table,
  FlauBERT's the word table; FlauBERT's language ids where it has several languages."""
  types = langs = None
  if family in (BERT, ROBERTA):
    types = rng.integers(0, cfg_kw.get("type_vocab", 2), ids.shape)
  elif family == FLAUBERT:
    types = rng.integers(0, cfg_kw["vocab"], ids.shape)
    if cfg_kw.get("langs", 1) > 1:
      langs = rng.integers(0, cfg_kw["langs"], ids.shape)
  return types, langs


def _max_diff(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize("family,cfg_kw,pads", CONFIGS)
def test_parity_with_transformers(tmp_path, family, cfg_kw, pads):
  folder, ref_model = write_hf(tmp_path, family, **cfg_kw)
  model, params = distilbert_jax.load_hf(folder)
  assert model.cfg.family == family
  rng = np.random.default_rng(len(tmp_path.name))
  ids, mask = random_batch(rng, cfg_kw["vocab"], pad_pattern=pads, pad_id=PAD_ID.get(family, cfg_kw.get("pad")))
  types, langs = _family_inputs(rng, family, cfg_kw, ids)
  ref = torch_forward(ref_model, ids, mask, types, **({"langs": torch.tensor(langs)} if langs is not None else {}))
  out = model.apply({"params": params}, ids, attention_mask=mask, token_type_ids=types, language_ids=langs,
                    deterministic=True)
  assert out.logits.shape == (*ids.shape, cfg_kw["vocab"])
  assert len(out.hidden_states) == cfg_kw["layers"] + 1 == len(ref.hidden_states)
  assert _max_diff(out.logits, ref.logits) < TOL
  for ours, theirs in zip(out.hidden_states, ref.hidden_states):
    assert _max_diff(ours, theirs) < TOL


@pytest.mark.parametrize("family,cfg_kw", [(ROBERTA, dict(type_vocab=1, pad=1)), (FLAUBERT, dict(pad=2))])
def test_parity_without_token_types(tmp_path, family, cfg_kw):
  """Left out, token types are 0 in RoBERTa's own table and absent in FlauBERT's (which would otherwise add
  word 0's embedding), as in transformers."""
  folder, ref_model = write_hf(tmp_path, family, **cfg_kw)
  model, params = distilbert_jax.load_hf(folder)
  ids, mask = random_batch(np.random.default_rng(4), 101, pad_id=cfg_kw["pad"])
  ref = torch_forward(ref_model, ids, mask)
  out = model.apply({"params": params}, ids, attention_mask=mask)
  assert _max_diff(out.logits, ref.logits) < TOL


def _pre_norm_reference(hf_model, ids, mask, langs=None, types=None):
  """Pre-norm FlauBERT's forward pass assembled from transformers' own submodules, layer by layer, as
  FlaubertModel.forward writes it for `pre_norm=True` (transformers 5.25 cannot run that branch: it indexes
  an EncoderDecoderCache and raises). Returns (hidden states, logits)."""
  tf = hf_model.transformer
  ids, mask = torch.tensor(ids), torch.tensor(mask)
  positions = torch.arange(ids.shape[1])[None].expand_as(ids)
  with torch.no_grad():
    x = tf.embeddings(ids) + tf.position_embeddings(positions)
    if langs is not None:
      x = x + tf.lang_embeddings(torch.tensor(langs))
    if types is not None:
      x = x + tf.embeddings(torch.tensor(types))
    x = tf.layer_norm_emb(x) * mask[..., None].float()
    hidden = [x]
    for i in range(tf.n_layers):
      x = x + tf.attentions[i](tf.layer_norm1[i](x), mask)[0]
      x = x + tf.ffns[i](tf.layer_norm2[i](x))
      x = x * mask[..., None].float()
      hidden.append(x)
    return hidden, hf_model.pred_layer(x)[0]


@pytest.mark.parametrize("cfg_kw,pads", [
    (dict(hidden=32, layers=2, heads=4, vocab=101, pad=2, eps=1e-6), "mixed"),
    (dict(hidden=48, layers=3, heads=6, vocab=211, pad=2, langs=2), "left"),
    (dict(hidden=24, layers=1, heads=2, vocab=37, pad=0, gelu=False, eps=1e-6), "none")])
def test_pre_norm_flaubert_parity(tmp_path, cfg_kw, pads):
  """Pre-norm FlauBERT (flaubert_small_cased's kind) against a reference built from transformers' submodules
  (`_pre_norm_reference`), and against FlaubertWithLMHeadModel itself should a transformers version run it."""
  folder, ref_model = write_hf(tmp_path, FLAUBERT, pre_norm=True, **cfg_kw)
  model, params = distilbert_jax.load_hf(folder)
  assert model.cfg.pre_norm and model.cfg.num_languages == (cfg_kw.get("langs", 1) if cfg_kw.get("langs", 1) > 1 else 0)
  rng = np.random.default_rng(7)
  ids, mask = random_batch(rng, cfg_kw["vocab"], pad_pattern=pads, pad_id=cfg_kw["pad"])
  types, langs = _family_inputs(rng, FLAUBERT, cfg_kw, ids)
  hidden, logits = _pre_norm_reference(ref_model, ids, mask, langs, types)
  out = model.apply({"params": params}, ids, attention_mask=mask, token_type_ids=types, language_ids=langs)
  assert len(out.hidden_states) == len(hidden) == cfg_kw["layers"] + 1
  for ours, theirs in zip(out.hidden_states, hidden):
    assert _max_diff(ours, theirs) < TOL
  assert _max_diff(out.logits, logits) < TOL
  try:
    direct = torch_forward(ref_model, ids, mask, types, **({"langs": torch.tensor(langs)} if langs is not None else {}))
  except TypeError as e:  # transformers 5.25: 'EncoderDecoderCache' object is not subscriptable
    assert "not subscriptable" in str(e)
  else:
    assert _max_diff(out.logits, direct.logits) < TOL


def test_roberta_positions_follow_transformers():
  """Position ids skip pads wherever they are, counting from pad_token_id + 1; pads get pad_token_id."""
  cfg = distilbert_jax.EncoderConfig.roberta(pad_token_id=1)
  ids = np.array([[0, 5, 6, 2, 1, 1], [1, 1, 0, 7, 2, 1]])
  want = transformers.models.roberta.modeling_roberta.RobertaEmbeddings.create_position_ids_from_input_ids(
      torch.tensor(ids), padding_idx=1).numpy()
  assert np.array_equal(distilbert_jax.model.default_position_ids(cfg, ids), want)
  assert want[0].tolist() == [2, 3, 4, 5, 1, 1]
  assert cfg.first_position == 2 and cfg.max_length == 512


def test_attention_probabilities_match_eager_transformers(tmp_path):
  folder, _ = write_hf(tmp_path, BERT)
  ref_model = transformers.BertForMaskedLM.from_pretrained(str(folder), attn_implementation="eager").eval()
  model, params = distilbert_jax.load_hf(folder)
  ids, mask = random_batch(np.random.default_rng(1), 101)
  with torch.no_grad():
    ref = ref_model(torch.tensor(ids), attention_mask=torch.tensor(mask), output_attentions=True)
  out = model.apply({"params": params}, ids, attention_mask=mask, output_attentions=True)
  assert len(out.attentions) == len(ref.attentions) == 2
  for ours, theirs in zip(out.attentions, ref.attentions):
    assert _max_diff(ours, theirs) < TOL


def test_real_pretrained_checkpoint_matches_transformers(minilm_path, test_data):
  sentences = [row["text"] for row in json.loads((test_data / "sentiment" / "imdb.json").read_text())[:8]]
  tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path))
  batch = tok(sentences, padding=True, return_tensors="np")
  assert (batch["attention_mask"] == 0).any(), "want real padding in the batch"
  ref_model = transformers.BertModel.from_pretrained(str(minilm_path)).eval()
  with torch.no_grad():
    ref = ref_model(**{k: torch.tensor(v) for k, v in batch.items()}, output_hidden_states=True)
  model, params = distilbert_jax.load_hf(minilm_path)
  out = model.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"])
  assert len(out.hidden_states) == 7
  # Every real token within TOL. Padding positions carry no meaning (nothing reads them) and their values,
  # larger by the layer, differ by up to ~1.3e-4 between XLA's and PyTorch's float32 sums on some CPUs.
  real = batch["attention_mask"].astype(bool)
  for ours, theirs in zip(out.hidden_states, ref.hidden_states):
    assert np.max(np.abs(np.asarray(ours)[real] - theirs.numpy()[real])) < TOL
    assert _max_diff(ours, theirs) < 10 * TOL
  assert _max_diff(out.pooled, ref.pooler_output) < TOL


def _hf_tensors(folder):
  return safetensors.numpy.load_file(str(folder / "model.safetensors"))


ARCHITECTURES = {(BERT, True): "BertForMaskedLM", (BERT, False): "BertModel",
                 (DISTILBERT, True): "DistilBertForMaskedLM", (DISTILBERT, False): "DistilBertModel",
                 (ROBERTA, True): "RobertaForMaskedLM", (ROBERTA, False): "RobertaModel",
                 (FLAUBERT, True): "FlaubertWithLMHeadModel", (FLAUBERT, False): "FlaubertModel"}


@pytest.mark.parametrize("family,head,cfg_kw", [
    (BERT, True, {}), (BERT, False, {}), (DISTILBERT, True, {}), (DISTILBERT, False, {}),
    (ROBERTA, True, dict(type_vocab=1)), (ROBERTA, False, dict(type_vocab=1)),
    (FLAUBERT, True, dict(pad=2, pre_norm=True, eps=1e-6)), (FLAUBERT, False, dict(pad=2, langs=3)),
    (FLAUBERT, True, dict(pad=2, gelu=False))])
def test_round_trip_is_bit_exact(tmp_path, family, head, cfg_kw):
  src, _ = write_hf(tmp_path / "src", family, head=head, **cfg_kw)
  model, params = distilbert_jax.load_hf(src)
  arch = ARCHITECTURES[family, head]
  distilbert_jax.save_hf(model, params, tmp_path / "dst", architecture=arch)
  before, after = _hf_tensors(src), _hf_tensors(tmp_path / "dst")
  assert set(before) == set(after)
  for key in before:
    assert before[key].dtype == after[key].dtype and np.array_equal(before[key], after[key]), key
  # The config comes back as the same model: every field our encoder reads.
  again, _ = distilbert_jax.load_hf(tmp_path / "dst")
  assert again.cfg.replace(tokenizer=None) == model.cfg.replace(tokenizer=None)


def test_real_checkpoint_round_trip_is_bit_exact(tmp_path, minilm_path):
  model, params = distilbert_jax.load_hf(minilm_path)
  distilbert_jax.save_hf(model, params, tmp_path, architecture="BertModel")
  before, after = _hf_tensors(minilm_path), _hf_tensors(tmp_path)
  # The source also stores the non-persistent `embeddings.position_ids` buffer (0..511), which is no weight.
  buffers = {k for k in before if hf.IGNORED_KEYS.match(k)}
  assert buffers == {"embeddings.position_ids"}
  assert set(before) - buffers == set(after)
  assert all(np.array_equal(before[k], after[k]) for k in after)


@pytest.mark.parametrize("family,kw", [
    (BERT, dict(intermediate_size=48)), (DISTILBERT, dict(intermediate_size=48)),
    (ROBERTA, dict(intermediate_size=48, max_position_embeddings=34)),
    (FLAUBERT, dict(pre_norm=False, layer_norm_eps=1e-5, num_languages=2))])
def test_export_loads_in_transformers_with_same_logits(tmp_path, family, kw):
  make = getattr(distilbert_jax.EncoderConfig, family)
  cfg = make(**{"vocab_size": 89, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 32,
                **kw})
  model = distilbert_jax.Encoder(cfg)
  params = distilbert_jax.init_params(model, __import__("jax").random.key(3))
  distilbert_jax.save_hf(model, params, tmp_path)
  ref_model, info = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  assert type(ref_model).__name__ == ARCHITECTURES[family, True]
  ids, mask = random_batch(np.random.default_rng(0), 89, pad_id=cfg.pad_token_id)
  langs = np.ones_like(ids) if cfg.num_languages else None
  ref = torch_forward(ref_model.eval(), ids, mask, **({"langs": torch.tensor(langs)} if langs is not None else {}))
  out = model.apply({"params": params}, ids, attention_mask=mask, language_ids=langs)
  assert _max_diff(out.logits, ref.logits) < TOL


def test_export_writes_loadable_tokenizer(tmp_path, minilm_path):
  model, params = distilbert_jax.load_hf(minilm_path)
  distilbert_jax.save_hf(model, params, tmp_path)  # the tokenizer is known from the source folder
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  ref = transformers.AutoTokenizer.from_pretrained(str(minilm_path))
  text = "The State of the Union is strong."
  assert tok(text)["input_ids"] == ref(text)["input_ids"]
  assert tok.mask_token_id == 103 and len(tok) == 30522
  assert transformers.AutoConfig.from_pretrained(str(tmp_path)).architectures == ["BertForMaskedLM"]


def test_bin_without_prefix_and_with_gamma_beta(tmp_path):
  """Older checkpoints: pytorch_model.bin, no `bert.` prefix, LayerNorm.gamma/beta."""
  src, ref_model = write_hf(tmp_path / "src", BERT, head=True)
  state = {k.removeprefix("bert."): v for k, v in ref_model.state_dict().items()}
  state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in state.items()}
  assert any(k.endswith("gamma") for k in state)
  (src / "model.safetensors").unlink()
  torch.save(state, src / "pytorch_model.bin")
  model, params = distilbert_jax.load_hf(src)
  ids, mask = random_batch(np.random.default_rng(0), 101)
  out = model.apply({"params": params}, ids, attention_mask=mask)
  assert _max_diff(out.logits, torch_forward(ref_model, ids, mask).logits) < TOL


def test_missing_head_is_initialised_with_a_warning(tmp_path, caplog):
  folder, _ = write_hf(tmp_path, DISTILBERT, head=False)
  with caplog.at_level("WARNING"):
    model, params = distilbert_jax.load_hf(folder)
  assert "mlm_head/transform/kernel" in caplog.text and "mlm_head/bias" in caplog.text
  assert params["mlm_head"]["transform"]["kernel"].shape == (32, 32)


# ----------------------------------------------------------------------------------------------- bad input

def test_folder_without_config(tmp_path):
  with pytest.raises(hf.ConversionError, match="no config.json"):
    distilbert_jax.load_hf(tmp_path)


def test_folder_without_weights(tmp_path):
  folder, _ = write_hf(tmp_path, BERT)
  (folder / "model.safetensors").unlink()
  with pytest.raises(hf.ConversionError, match="no model.safetensors or pytorch_model.bin"):
    distilbert_jax.load_hf(folder)


def test_unsupported_architecture(tmp_path):
  transformers.BertForMultipleChoice(transformers.BertConfig(
      hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=30)
  ).save_pretrained(str(tmp_path))
  with pytest.raises(hf.ConversionError, match="BertForMultipleChoice.*supported architectures are "
                                               ".*BertForMaskedLM"):
    distilbert_jax.load_hf(tmp_path)


def test_shape_disagreeing_with_config_is_named(tmp_path):
  folder, _ = write_hf(tmp_path, BERT)
  cfg = json.loads((folder / "config.json").read_text())
  cfg["intermediate_size"] = 80
  (folder / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf.ConversionError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight has shape "
                                               r"\(64, 32\) but config.json implies \(80, 32\)"):
    distilbert_jax.load_hf(folder)


def test_truncated_safetensors(tmp_path):
  folder, _ = write_hf(tmp_path, BERT)
  data = (folder / "model.safetensors").read_bytes()
  (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(hf.ConversionError, match="truncated or corrupt"):
    distilbert_jax.load_hf(folder)


def test_config_field_we_cannot_honour(tmp_path):
  folder, _ = write_hf(tmp_path, BERT)
  cfg = json.loads((folder / "config.json").read_text())
  cfg["position_embedding_type"] = "relative_key"
  (folder / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf.ConversionError, match="position_embedding_type='relative_key' is not supported"):
    distilbert_jax.load_hf(folder)


def test_nonexistent_path(tmp_path):
  with pytest.raises(hf.ConversionError, match="does not exist"):
    distilbert_jax.load_hf(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------- classifiers

@pytest.mark.parametrize("family,num_labels", [(BERT, 3), (BERT, 1), (DISTILBERT, 2), (DISTILBERT, 1)])
def test_sequence_classifier_parity_and_round_trip(tmp_path, family, num_labels):
  src, ref_model = write_hf(tmp_path / "src", family, num_labels=num_labels)
  model, params = distilbert_jax.load_hf(src)
  assert model.cfg.num_labels == num_labels and model.cfg.use_pooler
  ids, mask = random_batch(np.random.default_rng(2), 101)
  ref = torch_forward(ref_model, ids, mask)
  out = model.apply({"params": params}, ids, attention_mask=mask)
  assert out.class_logits.shape == (3, num_labels)
  assert _max_diff(out.class_logits, ref.logits) < TOL
  distilbert_jax.save_hf(model, params, tmp_path / "dst")
  before, after = _hf_tensors(src), _hf_tensors(tmp_path / "dst")
  assert set(before) == set(after) and all(np.array_equal(before[k], after[k]) for k in before)



TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")


@pytest.mark.parametrize("family,task", [(BERT, "token"), (DISTILBERT, "token"), (BERT, "span"), (DISTILBERT, "span")])
def test_token_and_span_heads_parity_and_round_trip(tmp_path, family, task):
  """*ForTokenClassification and *ForQuestionAnswering read with their head (and class names), the same
  logits as transformers, and written back tensor for tensor (config.json's head fields included)."""
  num_labels = len(TAGS) if task == "token" else 2
  src, ref_model = write_hf(tmp_path / "src", family, num_labels=num_labels, task=task,
                            label_names=TAGS if task == "token" else ())
  model, params = distilbert_jax.load_hf(src)
  assert (model.cfg.task_head, model.cfg.num_labels) == (task, num_labels) and not model.cfg.use_pooler
  assert model.cfg.label_names == (TAGS if task == "token" else ())
  ids, mask = random_batch(np.random.default_rng(3), 101)
  ref = torch_forward(ref_model, ids, mask)
  out = model.apply({"params": params}, ids, attention_mask=mask)
  assert out.class_logits is None
  if task == "token":
    assert out.token_logits.shape == (*ids.shape, num_labels) and out.start_logits is None
    assert _max_diff(out.token_logits, ref.logits) < TOL
  else:
    assert out.start_logits.shape == out.end_logits.shape == ids.shape and out.token_logits is None
    assert _max_diff(out.start_logits, ref.start_logits) < TOL
    assert _max_diff(out.end_logits, ref.end_logits) < TOL
  dst = distilbert_jax.save_hf(model, params, tmp_path / "dst")
  before, after = _hf_tensors(src), _hf_tensors(dst)
  assert set(before) == set(after) and all(np.array_equal(before[k], after[k]) for k in before)
  written = json.loads((dst / "config.json").read_text())
  assert written["architectures"] == json.loads((src / "config.json").read_text())["architectures"]
  if task == "token":
    assert [written["id2label"][str(i)] for i in range(num_labels)] == list(TAGS)


@pytest.mark.parametrize("family,task", [(BERT, "token"), (DISTILBERT, "span")])
def test_jax_token_and_span_heads_export_with_the_same_logits(tmp_path, family, task):
  """A head made here (not read from transformers) loads in transformers' Auto class with no missing or
  unexpected keys and gives the same logits."""
  import jax
  make = distilbert_jax.EncoderConfig.bert if family == BERT else distilbert_jax.EncoderConfig.distilbert
  cfg = make(vocab_size=89, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
             max_position_embeddings=32, use_pooler=False, task_head=task,
             num_labels=len(TAGS) if task == "token" else 2, label_names=TAGS if task == "token" else ())
  model = distilbert_jax.Encoder(cfg)
  params = distilbert_jax.init_params(model, jax.random.key(6))
  distilbert_jax.save_hf(model, params, tmp_path)
  auto = (transformers.AutoModelForTokenClassification if task == "token"
          else transformers.AutoModelForQuestionAnswering)
  ref_model, info = auto.from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  ids, mask = random_batch(np.random.default_rng(0), 89)
  ref = torch_forward(ref_model.eval(), ids, mask)
  out = model.apply({"params": params}, ids, attention_mask=mask)
  if task == "token":
    assert ref_model.config.id2label[1] == "B-PER"
    assert _max_diff(out.token_logits, ref.logits) < TOL
  else:
    assert _max_diff(out.start_logits, ref.start_logits) < TOL and _max_diff(out.end_logits, ref.end_logits) < TOL


def test_a_head_the_architecture_cannot_hold_is_refused(tmp_path):
  import jax
  cfg = distilbert_jax.EncoderConfig.bert(vocab_size=89, hidden_size=32, num_layers=1, num_heads=4,
                                          intermediate_size=48, use_pooler=False, task_head="token", num_labels=3)
  model = distilbert_jax.Encoder(cfg)
  params = distilbert_jax.init_params(model, jax.random.key(0))
  with pytest.raises(hf.ConversionError, match="BertForQuestionAnswering needs a span head but this model has a token head"):
    distilbert_jax.save_hf(model, params, tmp_path, architecture="BertForQuestionAnswering")
  with pytest.raises(ValueError, match="a span head has 2 outputs"):
    cfg.replace(task_head="span")

@pytest.mark.parametrize("family", [BERT, DISTILBERT])
def test_jax_classifier_exports_with_the_same_logits(tmp_path, family):
  make = distilbert_jax.EncoderConfig.bert if family == BERT else distilbert_jax.EncoderConfig.distilbert
  cfg = make(vocab_size=89, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
             max_position_embeddings=32, use_pooler=True, num_labels=4,
             pooler_activation="tanh" if family == BERT else "relu")
  model = distilbert_jax.Encoder(cfg)
  params = distilbert_jax.init_params(model, __import__("jax").random.key(5))
  distilbert_jax.save_hf(model, params, tmp_path)
  ref_model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  ids, mask = random_batch(np.random.default_rng(0), 89)
  ref = torch_forward(ref_model.eval(), ids, mask)
  out = model.apply({"params": params}, ids, attention_mask=mask)
  assert _max_diff(out.class_logits, ref.logits) < TOL


# ------------------------------------------------------------------------------------------- family refusals

@pytest.mark.parametrize("make,kw,message", [
    ("flaubert", dict(intermediate_size=100), "feed-forward width is always 4 × hidden_size = 64"),
    ("roberta", dict(type_vocab_size=0), "always has token-type embeddings"),
    ("roberta", dict(positions_skip_padding=False), "positions_skip_padding=True but this model has False"),
    ("bert", dict(pre_norm=True), "pre_norm=False but this model has True"),
    ("distilbert", dict(mlm_head_act="relu"), "mlm_head_act='gelu' but this model has 'relu'"),
    ("bert", dict(num_languages=2), "num_languages=0 but this model has 2"),
    ("flaubert", dict(use_pooler=True), "use_pooler=False but this model has True"),
    ("flaubert", dict(hidden_act="gelu_new"), "exact GELU or ReLU"),
])
def test_export_refuses_what_the_family_cannot_hold(tmp_path, make, kw, message):
  cfg = getattr(distilbert_jax.EncoderConfig, make)(vocab_size=30, hidden_size=16, num_layers=1, num_heads=2,
                                                    intermediate_size=64, max_position_embeddings=16)
  model = distilbert_jax.Encoder(cfg.replace(**kw))
  params = distilbert_jax.init_params(model, __import__("jax").random.key(0))
  with pytest.raises(hf.ConversionError, match=message):
    distilbert_jax.save_hf(model, params, tmp_path)


def test_several_languages_need_language_ids():
  model = distilbert_jax.Encoder(distilbert_jax.EncoderConfig.flaubert(
      vocab_size=30, hidden_size=16, num_layers=1, num_heads=2, num_languages=3))
  params = distilbert_jax.init_params(model, __import__("jax").random.key(0))
  with pytest.raises(ValueError, match="3 language embeddings: pass language_ids"):
    model.apply({"params": params}, np.ones((1, 4), np.int32))


def test_xlm_roberta_is_read_and_written_as_roberta(tmp_path):
  """XLM-R computes what RoBERTa computes: it loads as the roberta family and writes back as XLM-R, bit-exact."""
  torch.manual_seed(0)
  cfg = transformers.XLMRobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                      vocab_size=101, max_position_embeddings=40, type_vocab_size=1)
  ref_model = transformers.XLMRobertaForMaskedLM(cfg).eval()
  ref_model.save_pretrained(str(tmp_path / "src"))
  model, params = distilbert_jax.load_hf(tmp_path / "src")
  assert model.cfg.family == "roberta"
  ids, mask = random_batch(np.random.default_rng(5), 101, pad_id=1)
  assert _max_diff(model.apply({"params": params}, ids, attention_mask=mask).logits,
                   torch_forward(ref_model, ids, mask).logits) < TOL
  distilbert_jax.save_hf(model, params, tmp_path / "dst", architecture="XLMRobertaForMaskedLM")
  assert transformers.AutoConfig.from_pretrained(str(tmp_path / "dst")).model_type == "xlm-roberta"
  before, after = _hf_tensors(tmp_path / "src"), _hf_tensors(tmp_path / "dst")
  assert set(before) == set(after) and all(np.array_equal(before[k], after[k]) for k in before)
