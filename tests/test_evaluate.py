"""Held-out evaluation: the gathered-position scoring against a direct computation, and the command line."""
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import distilbert_jax
from distilbert_jax import checkpoint, data, evaluate, masking, train


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
  for label in ("masked-LM accuracy, rare-token masking", "masked-LM accuracy, uniform masking", "perplexity",
                "tokens/s, batch 1, encoder + classifier", "tokens/s, batch 32, encoder + masked-LM head",
                "student/teacher"):
    assert label in out
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["teacher"]["parameters"] > report["student"]["parameters"]
  assert report["student/teacher"]["parameters"] == report["student"]["parameters"] / report["teacher"]["parameters"]
  assert report["teacher"]["predictions"] == report["student"]["predictions"] > 0
  assert report["teacher"]["uniform_predictions"] == report["student"]["uniform_predictions"] > 0
  ratios = report["student/teacher"]
  assert {"accuracy_retained", "uniform_accuracy_retained"} <= set(ratios)  # random models: accuracy may be 0
  for key in ("cls_speedup_batch1", "cls_speedup_batch32", "mlm_speedup_batch1", "mlm_speedup_batch32"):
    assert ratios[key] > 0
  assert ratios["cls_speedup_batch32"] == (report["student"]["cls_tokens_per_s_batch32"]
                                           / report["teacher"]["cls_tokens_per_s_batch32"])
  assert evaluate.main(argv[:-2] + ["--json", str(tmp_path / "again.json")]) == 0  # cached text, same masks
  again = json.loads((tmp_path / "again.json").read_text())
  assert again["student"]["mlm_accuracy"] == report["student"]["mlm_accuracy"]
  assert again["teacher"]["mlm_loss"] == report["teacher"]["mlm_loss"]


def test_evaluation_text_shares_the_training_cache(tmp_path, minilm_path, test_data, monkeypatch):
  """Text given to evaluation is tokenized by training's own path: a training run's folder with the same
  settings (nothing held out) is the evaluation's, found without tokenizing again."""
  texts = [str(f) for f in sorted((test_data / "corpus" / "sotu").glob("*.txt"))[-2:]]
  config = train.default_config()
  config.data.sources, config.data.cache_dir = tuple(texts), str(tmp_path / "cache")
  config.data.max_len, config.data.held_out_fraction, config.seed = 64, 0.0, 0
  folder = train.prepare_data(config, str(minilm_path))
  tokenized = []
  monkeypatch.setattr(data, "tokenize_documents", lambda *a, **kw: tokenized.append(1))
  ds, counts_V = evaluate._dataset(texts, str(minilm_path), max_len=64, cache_dir=tmp_path / "cache")
  assert ds.data_dir == folder and ds.split == "train" and len(ds) > 0 and not tokenized
  np.testing.assert_array_equal(counts_V, data.TokenizedDataset(folder).counts())
  heldout, _ = evaluate._dataset([str(folder)], str(minilm_path), max_len=64, cache_dir=tmp_path / "elsewhere")
  assert heldout.data_dir == folder and heldout.split == "heldout"  # a preprocessed folder: its held-out split


def test_vocabulary_mismatch_is_refused(tmp_path, tiny_teacher, test_data, capsys):
  cfg = distilbert_jax.EncoderConfig.distilbert(vocab_size=500, hidden_size=16, num_layers=1, num_heads=2,
                                                intermediate_size=16, max_position_embeddings=64)
  model = distilbert_jax.Encoder(cfg)
  checkpoint.save_model(tmp_path / "m", model, distilbert_jax.init_params(model, jax.random.key(0)))
  text = sorted((test_data / "corpus" / "sotu").glob("*.txt"))[-1]
  code = evaluate.main(["--model", str(tmp_path / "m"), "--tokenizer", str(tiny_teacher), "--data", str(text),
                        "--max-len", "64", "--cache-dir", str(tmp_path / "cache")])
  assert code == 2 and "500-id vocabulary" in capsys.readouterr().err


def _constant_predictor(vocab_size: int, predicted: int):
  """A 1-layer model whose masked-LM head predicts `predicted` everywhere: the tied word embeddings are zero,
  so the logits are the output bias."""
  cfg = distilbert_jax.EncoderConfig.distilbert(vocab_size=vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                                                intermediate_size=16, max_position_embeddings=64)
  model = distilbert_jax.Encoder(cfg)
  params = jax.tree.map(np.asarray, distilbert_jax.init_params(model, jax.random.key(0)))
  params["embeddings"]["word_embeddings"]["embedding"] = np.zeros_like(params["embeddings"]["word_embeddings"]["embedding"])
  bias = np.zeros(vocab_size, np.float32)
  bias[predicted] = 10.0
  params["mlm_head"]["bias"] = bias
  return model, params


def test_uniform_masking_accuracy_hand_checked():
  # One row: [CLS] A x18 B [SEP], A very frequent in the corpus, B seen once; the model always says A, and
  # ceil(15% of 21 tokens) = 4 positions are predicted per row. Uniform masking draws the 4 from the 19
  # eligible tokens alike: E[accuracy] = 18/19. The reference's masking (P ∝ count^-0.7) takes B first
  # almost surely, then 3 of the 18 A: E[accuracy] ≈ 3/4.
  a, b, vocab = 2000, 3000, 4000
  model, params = _constant_predictor(vocab, a)
  ids = np.array([[101] + [a] * 18 + [b] + [102]], np.int32)
  batches = [{"input_ids": ids, "attention_mask": np.ones_like(ids)}] * 200
  counts = np.ones(vocab, np.int64)
  counts[a] = 10**6
  specials = [0, 100, 101, 102, 103]
  scores = {}
  for name, smoothing in evaluate.MASKINGS.items():
    probs = masking.token_probs(counts, specials, smoothing=smoothing)
    scores[name] = evaluate.mlm_score(model, params, batches, probs, mask_token_id=103, seed=3)
    assert scores[name].num_predictions == 200 * 4
  assert abs(scores["uniform"].accuracy - 18 / 19) < 0.03  # binomial sd over 800 draws: 0.008
  assert abs(scores["rare"].accuracy - 3 / 4) < 0.01  # B is missed with probability 18·10^-4.2 ≈ 0.001


def test_speed_times_every_model_on_the_same_inputs_in_turns(tiny_teacher, monkeypatch):
  """Each round times every model once, on the same inputs, the order reversed every other round; a model's
  figure is the median of its rounds (one slow round, as when the machine is busy for a moment, drops out)."""
  teacher, tp, student, sp = _models(tiny_teacher)
  seen = []
  monkeypatch.setattr(evaluate, "forward_fn", lambda model, params, head: (model.cfg.num_layers, head))
  monkeypatch.setattr(evaluate, "_calls_to_fill", lambda forward, ids, min_seconds: 3)

  def fake_seconds(forward, ids, calls):
    seen.append((forward, ids, calls))
    layers = forward[0]
    slow = 10.0 if len(seen) == 3 else 1.0  # the teacher's second round at batch 1, cls
    return slow * (0.5 if layers == 2 else 0.25)

  monkeypatch.setattr(evaluate, "_seconds_per_call", fake_seconds)
  report = evaluate.speed_report({"teacher": (teacher, tp), "student": (student, sp)}, (1, 4), 16, repeats=3)
  assert len(seen) == 2 * 2 * 3 * 2  # batch sizes x heads x rounds x models
  assert all(calls == 3 for _, _, calls in seen)
  for group in range(0, len(seen), 6):  # one batch size and head: rounds alternate who goes first
    order = [forward[0] for forward, _, _ in seen[group:group + 6]]
    assert order == [2, 1, 1, 2, 2, 1]
    assert len({forward[1] for forward, _, _ in seen[group:group + 6]}) == 1
    assert len({id(ids) for _, ids, _ in seen[group:group + 6]}) == 1  # the very same inputs
  assert {ids.shape for _, ids, _ in seen} == {(1, 16), (4, 16)}
  assert report["student"]["cls_tokens_per_s_batch4"] == 2 * report["teacher"]["cls_tokens_per_s_batch4"] == 256
  assert report["teacher"]["cls_tokens_per_s_batch1"] == 16 / 0.5  # the slow round is not the median


def test_a_timing_lasts_long_enough_to_be_measured(tiny_teacher):
  _, _, student, sp = _models(tiny_teacher)
  forward = evaluate.forward_fn(student, sp, "cls")
  ids = evaluate.speed_inputs(1, 8, 30522)
  calls = evaluate._calls_to_fill(forward, ids, 0.5)
  assert calls > 1  # a tiny forward takes well under half a second
  start = time.perf_counter()
  evaluate._seconds_per_call(forward, ids, calls)
  assert time.perf_counter() - start >= 0.2  # the calls fill about the time asked (not a timed assertion on speed)
  assert evaluate._calls_to_fill(forward, ids, 0.0) == 1


def test_classifier_timing_runs_without_the_vocabulary_projection(tiny_teacher):
  _, _, student, sp = _models(tiny_teacher)
  cls_model, cls_params = evaluate.with_timing_head(student, sp)
  out = cls_model.apply({"params": cls_params}, evaluate.speed_inputs(2, 8, student.cfg.vocab_size),
                        compute_logits=False)
  assert out.logits is None and out.class_logits.shape == (2, 2)
  forward = evaluate.forward_fn(student, sp, "cls")  # what speed_report times: the same, with a random head
  assert forward(evaluate.speed_inputs(2, 8, student.cfg.vocab_size)).shape == (2, 2)
