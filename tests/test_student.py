"""student_from_teacher copies exactly what the reference's extract_distilbert.py copies."""
import jax
import numpy as np
import pytest

import distilbert_jax
from distilbert_jax import student as student_lib


def _teacher(num_layers, family="bert"):
  make = distilbert_jax.EncoderConfig.bert if family == "bert" else distilbert_jax.EncoderConfig.distilbert
  cfg = make(vocab_size=61, hidden_size=16, num_layers=num_layers, num_heads=2, intermediate_size=32,
             max_position_embeddings=24)
  model = distilbert_jax.Encoder(cfg)
  return model, distilbert_jax.init_params(model, jax.random.key(num_layers))


def _flat(tree):
  return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("n,expected", [(12, [0, 2, 4, 7, 9, 11]), (6, [0, 2, 4]), (4, [0, 2])])
def test_default_layer_map_copies_tensor_by_tensor(n, expected):
  teacher, tp = _teacher(n)
  student, sp = distilbert_jax.student_from_teacher(teacher, tp)
  assert student.cfg.family == "distilbert" and student.cfg.num_layers == len(expected)
  assert not student.cfg.type_vocab_size and not student.cfg.use_pooler
  t, s = _flat(tp), _flat(sp)
  # What the reference copies, key by key; nothing else may exist in the student.
  wanted = {f"embeddings/{name}": f"embeddings/{name}" for name in (
      "word_embeddings/embedding", "position_embeddings/embedding", "layer_norm/scale", "layer_norm/bias")}
  for j, i in enumerate(expected):
    for key in t:
      if key.startswith(f"layer_{i}/"):
        wanted[key.replace(f"layer_{i}/", f"layer_{j}/", 1)] = key
  for key in t:
    if key.startswith("mlm_head/"):
      wanted[key] = key
  assert set(s) == set(wanted)
  for s_key, t_key in wanted.items():
    assert np.array_equal(s[s_key], t[t_key]), s_key
  # The student's forward pass works and the student is a DistilBERT (no token types).
  out = student.apply({"params": sp}, np.ones((2, 5), np.int32))
  assert out.logits.shape == (2, 5, 61) and len(out.hidden_states) == len(expected) + 1


def test_custom_layers_and_fresh_head():
  teacher, tp = _teacher(6, family="distilbert")
  student, sp = distilbert_jax.student_from_teacher(teacher, tp, layers=[1, 5], copy_head=False)
  assert np.array_equal(sp["layer_1"]["mlp"]["wi"]["kernel"], tp["layer_5"]["mlp"]["wi"]["kernel"])
  assert np.array_equal(sp["mlm_head"]["bias"], tp["mlm_head"]["bias"])
  assert not np.array_equal(sp["mlm_head"]["transform"]["kernel"], tp["mlm_head"]["transform"]["kernel"])


def test_student_does_not_alias_teacher_buffers():
  teacher, tp = _teacher(4)
  _, sp = distilbert_jax.student_from_teacher(teacher, tp)
  assert sp["layer_0"]["mlp"]["wi"]["kernel"] is not tp["layer_0"]["mlp"]["wi"]["kernel"]


@pytest.mark.parametrize("layers,message", [
    ([], "non-empty"), ([0, 6], r"\[6\] do not exist in a 6-layer teacher"), ([2, 1], "strictly increasing"),
    ([1, 1], "strictly increasing"), ([0.5], "teacher layer indices"), ([-1], "do not exist")])
def test_bad_layer_lists(layers, message):
  teacher, tp = _teacher(6)
  with pytest.raises(ValueError, match=message):
    distilbert_jax.student_from_teacher(teacher, tp, layers=layers)


def test_default_layers_reference():
  assert student_lib.default_layers(12) == (0, 2, 4, 7, 9, 11)
  assert student_lib.default_layers(6) == (0, 2, 4)


@pytest.mark.parametrize("family,kw", [
    ("roberta", {}), ("flaubert", dict(pre_norm=True)), ("flaubert", dict(pre_norm=False, num_languages=3))])
def test_roberta_and_flaubert_students_keep_their_family(tmp_path, family, kw):
  """DistilRoBERTa = RoBERTa with every other layer (its one-row token-type table kept); a FlauBERT student is a
  FlauBERT (language embeddings kept). Tensor by tensor, then exported and read back by transformers."""
  import torch
  import transformers
  make = getattr(distilbert_jax.EncoderConfig, family)
  cfg = make(vocab_size=61, hidden_size=16, num_layers=6, num_heads=2, max_position_embeddings=24,
             **({"intermediate_size": 32} if family == "roberta" else {}), **kw)
  teacher = distilbert_jax.Encoder(cfg)
  tp = distilbert_jax.init_params(teacher, jax.random.key(1))
  student, sp = distilbert_jax.student_from_teacher(teacher, tp)
  assert student.cfg == cfg.replace(num_layers=3)
  t, s = _flat(tp), _flat(sp)
  wanted = {key: key for key in t if key.startswith(("embeddings/", "mlm_head/"))}
  for j, i in enumerate([0, 2, 4]):
    wanted.update({key.replace(f"layer_{i}/", f"layer_{j}/", 1): key for key in t if key.startswith(f"layer_{i}/")})
  assert set(s) == set(wanted)
  assert ("embeddings/token_type_embeddings/embedding" in s) == (family == "roberta")
  assert ("embeddings/language_embeddings/embedding" in s) == bool(kw.get("num_languages"))
  for s_key, t_key in wanted.items():
    assert np.array_equal(s[s_key], t[t_key]), s_key

  folder = distilbert_jax.save_hf(student, sp, tmp_path)
  ref, info = transformers.AutoModelForMaskedLM.from_pretrained(str(folder), output_loading_info=True)
  assert type(ref).__name__ == {"roberta": "RobertaForMaskedLM", "flaubert": "FlaubertWithLMHeadModel"}[family]
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  assert ref.config.num_hidden_layers == 3
  ids = np.array([[0, 5, 9, 2, cfg.pad_token_id], [0, 7, 8, 6, 2]])
  mask = (ids != cfg.pad_token_id).astype(np.int64)
  langs = np.ones_like(ids) if cfg.num_languages else None
  out = student.apply({"params": sp}, ids, attention_mask=mask, language_ids=langs)
  if not cfg.pre_norm:  # transformers 5.25 cannot run a pre-norm FlauBERT (tests/test_hf.py)
    with torch.no_grad():
      theirs = ref.eval()(torch.tensor(ids), attention_mask=torch.tensor(mask),
                          **({"langs": torch.tensor(langs)} if langs is not None else {})).logits.numpy()
    assert np.abs(np.asarray(out.logits) - theirs).max() < 1e-4


@pytest.mark.parametrize("family,expected", [("distilbert", "DistilBertForMaskedLM"), ("bert", "BertForMaskedLM")])
def test_students_of_any_depth_width_and_heads_export_with_logits_parity(tmp_path, family, expected):
  """A 3-layer, 24-wide, 3-head student (head size 8, feed-forward 40): a shape no teacher layer gives, so it is
  initialised randomly; exported, transformers reads every tensor and computes the same logits."""
  import torch
  import transformers
  make = getattr(distilbert_jax.EncoderConfig, family)
  cfg = make(vocab_size=61, hidden_size=24, num_layers=3, num_heads=3, intermediate_size=40,
             max_position_embeddings=24)
  student = distilbert_jax.Encoder(cfg)
  sp = distilbert_jax.init_params(student, jax.random.key(3))
  folder = distilbert_jax.save_hf(student, sp, tmp_path)
  ref, info = transformers.AutoModelForMaskedLM.from_pretrained(str(folder), output_loading_info=True)
  assert type(ref).__name__ == expected
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  ids = np.array([[2, 5, 9, 3, 0, 0], [2, 7, 8, 6, 11, 3]])
  mask = (ids != 0).astype(np.int64)
  ours = np.asarray(student.apply({"params": sp}, ids, attention_mask=mask).logits)
  with torch.no_grad():
    theirs = ref.eval()(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  assert np.abs(ours - theirs)[mask > 0].max() < 1e-4
