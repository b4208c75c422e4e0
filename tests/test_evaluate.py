"""Held-out evaluation: the gathered-position scoring against a direct computation, and the command line."""
import json

import jax
import jax.numpy as jnp
import numpy as np

import distilbert_jax
from distilbert_jax import checkpoint, evaluate, masking


def _models(tiny_teacher):
  teacher, tp = distilbert_jax.load_hf(tiny_teacher)
  student, sp = distilbert_jax.student_from_teacher(teacher, tp, layers=[1])
  return teacher, tp, student, sp


def test_score_equals_direct_computation(tiny_teacher):
  teacher, tp, _, _ = _models(tiny_teacher)
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(3):
    ids = rng.integers(1000, 30000, (4, 32)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1:, 20:] = 0
    ids[:, 0], ids[mask == 0] = 101, 0
    batches.append({"input_ids": ids, "attention_mask": mask})
  probs = masking.token_probs(rng.integers(0, 50, 30522), [0, 100, 101, 102, 103])
  score = evaluate.mlm_score(teacher, tp, batches, probs, mask_token_id=103, seed=7)
  correct = total = 0
  nll = 0.0
  for i, b in enumerate(batches):  # the same masks, every position projected, numpy from there
    m = masking.mask_tokens(jax.random.fold_in(jax.random.key(7), i), jnp.asarray(b["input_ids"]),
                            jnp.asarray(b["attention_mask"]), jnp.asarray(probs), mask_token_id=103,
                            vocab_size=30522)
    logits = np.asarray(teacher.apply({"params": tp}, m.input_ids, attention_mask=b["attention_mask"]).logits,
                        np.float64)
    sel = np.asarray(m.mlm_weights) > 0
    targets = np.asarray(m.targets)[sel]
    chosen = logits[sel]
    correct += int((chosen.argmax(-1) == targets).sum())
    total += int(sel.sum())
    logz = np.log(np.exp(chosen - chosen.max(-1, keepdims=True)).sum(-1)) + chosen.max(-1)
    nll += float((logz - chosen[np.arange(len(targets)), targets]).sum())
  assert score.num_predictions == total == sum(int(np.ceil(0.15 * b["attention_mask"].sum())) for b in batches)
  assert score.accuracy == correct / total
  np.testing.assert_allclose(score.loss, nll / total, rtol=1e-5)


def test_command_line_side_by_side(tmp_path, tiny_teacher, test_data, capsys):
  teacher, tp, student, sp = _models(tiny_teacher)
  checkpoint.save_model(tmp_path / "student", student, sp)
  texts = sorted((test_data / "corpus" / "sotu").glob("*.txt"))[-2:]
  argv = ["--model", str(tmp_path / "student"), "--teacher", str(tiny_teacher), "--data", *map(str, texts),
          "--max-len", "64", "--batch-size", "8", "--max-batches", "3", "--cache-dir", str(tmp_path / "cache"),
          "--json", str(tmp_path / "report.json")]
  assert evaluate.main(argv) == 0
  out = capsys.readouterr().out
  for label in ("masked-LM accuracy", "perplexity", "tokens/s, batch 1", "tokens/s, batch 32", "student/teacher"):
    assert label in out
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["teacher"]["parameters"] > report["student"]["parameters"]
  assert report["student/teacher"]["parameters"] == report["student"]["parameters"] / report["teacher"]["parameters"]
  assert report["teacher"]["predictions"] == report["student"]["predictions"] > 0
  assert evaluate.main(argv[:-2] + ["--json", str(tmp_path / "again.json")]) == 0  # cached text, same masks
  again = json.loads((tmp_path / "again.json").read_text())
  assert again["student"]["mlm_accuracy"] == report["student"]["mlm_accuracy"]
  assert again["teacher"]["mlm_loss"] == report["teacher"]["mlm_loss"]


def test_vocabulary_mismatch_is_refused(tmp_path, tiny_teacher, test_data, capsys):
  cfg = distilbert_jax.EncoderConfig.distilbert(vocab_size=500, hidden_size=16, num_layers=1, num_heads=2,
                                                intermediate_size=16, max_position_embeddings=64)
  model = distilbert_jax.Encoder(cfg)
  checkpoint.save_model(tmp_path / "m", model, distilbert_jax.init_params(model, jax.random.key(0)))
  text = sorted((test_data / "corpus" / "sotu").glob("*.txt"))[-1]
  code = evaluate.main(["--model", str(tmp_path / "m"), "--tokenizer", str(tiny_teacher), "--data", str(text),
                        "--max-len", "64", "--cache-dir", str(tmp_path / "cache")])
  assert code == 2 and "500-id vocabulary" in capsys.readouterr().err
