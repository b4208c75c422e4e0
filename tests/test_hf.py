"""Conversion from and to Hugging Face: parity with transformers' PyTorch models, round trips, bad input."""
import json

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import distilbert_jax
from distilbert_jax import hf
from hf_helpers import BERT, DISTILBERT, random_batch, torch_forward, write_hf

TOL = 1e-4

CONFIGS = [
    (BERT, dict(hidden=32, layers=2, heads=4, ffn=64, vocab=101), "mixed"),
    (BERT, dict(hidden=48, layers=3, heads=3, ffn=80, vocab=257, type_vocab=3), "left"),
    (BERT, dict(hidden=64, layers=1, heads=8, ffn=32, vocab=53), "none"),
    (DISTILBERT, dict(hidden=32, layers=2, heads=4, ffn=64, vocab=101), "mixed"),
    (DISTILBERT, dict(hidden=48, layers=3, heads=6, ffn=96, vocab=211), "left"),
    (DISTILBERT, dict(hidden=24, layers=1, heads=2, ffn=24, vocab=37), "none"),
]


def _max_diff(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize("family,cfg_kw,pads", CONFIGS)
def test_parity_with_transformers(tmp_path, family, cfg_kw, pads):
  folder, ref_model = write_hf(tmp_path, family, **cfg_kw)
  model, params = distilbert_jax.load_hf(folder)
  rng = np.random.default_rng(len(tmp_path.name))
  ids, mask = random_batch(rng, cfg_kw["vocab"], pad_pattern=pads)
  types = rng.integers(0, cfg_kw.get("type_vocab", 2), ids.shape) if family == BERT else None
  ref = torch_forward(ref_model, ids, mask, types)
  out = model.apply({"params": params}, ids, attention_mask=mask, token_type_ids=types, deterministic=True)
  assert out.logits.shape == (*ids.shape, cfg_kw["vocab"])
  assert len(out.hidden_states) == cfg_kw["layers"] + 1 == len(ref.hidden_states)
  assert _max_diff(out.logits, ref.logits) < TOL
  for ours, theirs in zip(out.hidden_states, ref.hidden_states):
    assert _max_diff(ours, theirs) < TOL


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


@pytest.mark.parametrize("family,head", [(BERT, True), (BERT, False), (DISTILBERT, True), (DISTILBERT, False)])
def test_round_trip_is_bit_exact(tmp_path, family, head):
  src, _ = write_hf(tmp_path / "src", family, head=head)
  model, params = distilbert_jax.load_hf(src)
  arch = {(BERT, True): "BertForMaskedLM", (BERT, False): "BertModel", (DISTILBERT, True): "DistilBertForMaskedLM",
          (DISTILBERT, False): "DistilBertModel"}[family, head]
  distilbert_jax.save_hf(model, params, tmp_path / "dst", architecture=arch)
  before, after = _hf_tensors(src), _hf_tensors(tmp_path / "dst")
  assert set(before) == set(after)
  for key in before:
    assert before[key].dtype == after[key].dtype and np.array_equal(before[key], after[key]), key


def test_real_checkpoint_round_trip_is_bit_exact(tmp_path, minilm_path):
  model, params = distilbert_jax.load_hf(minilm_path)
  distilbert_jax.save_hf(model, params, tmp_path, architecture="BertModel")
  before, after = _hf_tensors(minilm_path), _hf_tensors(tmp_path)
  # The source also stores the non-persistent `embeddings.position_ids` buffer (0..511), which is no weight.
  buffers = {k for k in before if hf.IGNORED_KEYS.match(k)}
  assert buffers == {"embeddings.position_ids"}
  assert set(before) - buffers == set(after)
  assert all(np.array_equal(before[k], after[k]) for k in after)


@pytest.mark.parametrize("family", [BERT, DISTILBERT])
def test_export_loads_in_transformers_with_same_logits(tmp_path, family):
  cfg = (distilbert_jax.EncoderConfig.bert if family == BERT else distilbert_jax.EncoderConfig.distilbert)(
      vocab_size=89, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, max_position_embeddings=32)
  model = distilbert_jax.Encoder(cfg)
  params = distilbert_jax.init_params(model, __import__("jax").random.key(3))
  distilbert_jax.save_hf(model, params, tmp_path)
  ref_model, info = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  ids, mask = random_batch(np.random.default_rng(0), 89)
  ref = torch_forward(ref_model.eval(), ids, mask)
  out = model.apply({"params": params}, ids, attention_mask=mask)
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
  transformers.BertForQuestionAnswering(transformers.BertConfig(
      hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=30)
  ).save_pretrained(str(tmp_path))
  with pytest.raises(hf.ConversionError, match="BertForQuestionAnswering.*supported architectures are "
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
