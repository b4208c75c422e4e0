"""Fine-tuning: a real fine-tune beats the majority class, its export matches transformers, exact resume,
distillation during fine-tuning, and every bad input refused before anything compiles."""
import json
import pathlib

import jax
import numpy as np
import pytest

import distilbert_jax
from distilbert_jax import checkpoint, finetune, tasks, train, trainer


def _config(model, test_data, **train_kw):
  c = finetune.default_config()
  c.model = str(model)
  c.task = "sentiment:imdb"
  c.sentiment_dir = str(test_data / "sentiment")
  c.max_len = 48
  c.optim.lr = 1e-4
  c.train.update(dict(batch_size=16, eval_batch_size=32, log_every=1, progress=False, async_checkpoint=False),
                 **train_kw)
  return c


@pytest.fixture(scope="module")
def sentiment_run(tmp_path_factory, minilm_path, test_data):
  """all-MiniLM-L6-v2 fine-tuned for 24 steps of 16 IMDb sentences (about 0.4 epoch), on a 2×2×2 mesh."""
  workdir = tmp_path_factory.mktemp("sentiment")
  c = _config(minilm_path, test_data, steps=24, eval_every=12)
  c.mesh.shape = (2, 2, 2)
  return finetune.run(c, workdir), workdir


def test_short_finetune_beats_the_majority_class(sentiment_run):
  summary, workdir = sentiment_run
  assert summary["train_examples"] == 900 and summary["eval_examples"] == 100
  baseline = summary["majority_baseline"]["accuracy"]
  assert 0.4 <= baseline <= 0.6  # 500/500 sentences: the held-out 100 are near balanced
  assert summary["eval"]["accuracy"] >= baseline + 0.15, summary
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in logged if "eval_accuracy" in r] == [12, 24]
  losses = [r["loss"] for r in logged if "loss" in r]
  assert np.mean(losses[-6:]) < np.mean(losses[:6])


def test_masked_lm_head_is_frozen_and_new_head_trained(sentiment_run, minilm_path):
  _, workdir = sentiment_run
  model, params = checkpoint.load_model(workdir / "final")
  base, base_params = distilbert_jax.load_hf(minilm_path)
  assert model.cfg.num_labels == 2 and model.cfg.pooler_activation == "tanh"
  # MiniLM has no masked-LM head: load_hf initialised one; fine-tuning must not have touched it.
  fresh = finetune.with_head(base, base_params, 2)[1]
  for a, b in zip(jax.tree.leaves(params["mlm_head"]), jax.tree.leaves(fresh["mlm_head"])):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(params["pooler"]["kernel"], base_params["pooler"]["kernel"])  # the pretrained pooler trains
  assert not np.allclose(params["layer_0"]["mlp"]["wi"]["kernel"], base_params["layer_0"]["mlp"]["wi"]["kernel"])


def test_finetuned_classifier_export_matches_transformers(sentiment_run, test_data):
  import torch
  import transformers
  _, workdir = sentiment_run
  model, params = checkpoint.load_model(workdir / "final")
  rows = json.loads((test_data / "sentiment" / "imdb.json").read_text())[:8]
  texts = [r["text"] for r in rows]
  tok = transformers.AutoTokenizer.from_pretrained(workdir / "export")
  enc = tok(texts, padding=True, return_tensors="np")
  ours = np.asarray(finetune.predict(model, params, {k: enc[k] for k in ("input_ids", "attention_mask",
                                                                          "token_type_ids")}))[:, 0]
  pt = transformers.AutoModelForSequenceClassification.from_pretrained(workdir / "export").eval()
  with torch.no_grad():
    theirs = pt(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.numpy()
  assert pt.config.num_labels == 2
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  assert np.abs(ours).max() > 0.1  # a trained head, not zeros


def _tiny_classifier_folder(tmp_path, tiny_teacher, num_labels):
  model, params = distilbert_jax.load_hf(tiny_teacher)
  model, params, _ = finetune.with_head(model, params, num_labels)
  checkpoint.save_model(tmp_path / f"cls{num_labels}", model, params)
  return tmp_path / f"cls{num_labels}"


def test_preempted_run_resumes_exactly(tmp_path, tiny_teacher, test_data, monkeypatch):
  straight = finetune.run(_config(tiny_teacher, test_data, steps=6, ckpt_every=3), tmp_path / "a")
  with monkeypatch.context() as m:  # as when the TPU VM gets a preemption notice after step 3
    m.setattr(checkpoint.RunCheckpoints, "reached_preemption", lambda self, step: step == 3)
    stopped = finetune.run(_config(tiny_teacher, test_data, steps=6, ckpt_every=3), tmp_path / "b")
  assert stopped == {"step": 3, "preempted": True}
  resumed = finetune.run(_config(tiny_teacher, test_data, steps=6, ckpt_every=3), tmp_path / "b")
  assert resumed["step"] == straight["step"] == 6
  a = checkpoint.load_model(tmp_path / "a" / "final")[1]
  b = checkpoint.load_model(tmp_path / "b" / "final")[1]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  loss = lambda w: [json.loads(line)["loss"] for line in (w / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                    if '"loss"' in line]
  assert loss(tmp_path / "a") == loss(tmp_path / "b")


def test_distillation_during_finetuning(tmp_path, tiny_teacher, test_data):
  teacher_dir = _tiny_classifier_folder(tmp_path, tiny_teacher, 2)
  c = _config(tiny_teacher, test_data, steps=3, export=False)
  c.distill.teacher = str(teacher_dir)
  c.distill.alpha = 1.0
  summary = finetune.run(c, tmp_path / "d")
  logged = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
  steps = [r for r in logged if "loss" in r]
  assert len(steps) == 3 and all(r["distill"] > 0 for r in steps)
  for r in steps:  # alpha = 1: the loss is the soft-target term alone
    assert r["loss"] == pytest.approx(r["distill"], rel=1e-6)
  assert summary["step"] == 3


def test_example_batches_rows_by_hand():
  """Training: a permutation per (seed, epoch), the incomplete last batch dropped; evaluation: stored order, the
  last batch filled with copies of row 0 whose `valid` is 0; each process takes its block of every global batch."""
  n, length = 5, 3
  ids = np.arange(n * length, dtype=np.int32).reshape(n, length)
  arrays = finetune.TaskArrays(inputs={"input_ids": ids, "attention_mask": np.ones_like(ids),
                                       "token_type_ids": np.zeros_like(ids)},
                               labels=np.arange(n, dtype=np.int32)[:, None] * 10)

  def batches(**kw):
    out = list(finetune.example_batches(arrays, seed=7, **kw))
    for b in out:
      assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels", "valid"}
      np.testing.assert_array_equal(b["input_ids"], ids[b["labels"][:, 0] // 10])
    return [b["labels"][:, 0].tolist() for b in out], [b["valid"].tolist() for b in out]

  # np.random.default_rng([7, 0]).permutation(5) = [2 0 4 1 3], ([7, 1]) = [3 0 2 1 4].
  assert batches(batch_size=2, num_epochs=2) == ([[20, 0], [40, 10], [30, 0], [20, 10]], [[1, 1]] * 4)
  assert batches(batch_size=2, num_epochs=2, process_index=0, process_count=2) == ([[20], [40], [30], [20]],
                                                                                  [[1]] * 4)
  assert batches(batch_size=2, num_epochs=2, process_index=1, process_count=2) == ([[0], [10], [0], [10]], [[1]] * 4)
  assert batches(batch_size=4, shuffle=False, num_epochs=1) == ([[0, 10, 20, 30], [40, 0, 0, 0]],
                                                                [[1, 1, 1, 1], [1, 0, 0, 0]])
  assert batches(batch_size=4, shuffle=False, num_epochs=1, process_index=0, process_count=2) == (
      [[0, 10], [40, 0]], [[1, 1], [1, 0]])
  assert batches(batch_size=4, shuffle=False, num_epochs=1, process_index=1, process_count=2) == (
      [[20, 30], [0, 0]], [[1, 1], [0, 0]])


def test_soft_loss_matches_torch_kl():
  import torch
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=(6, 3)).astype(np.float32)
  w = np.array([1, 1, 1, 1, 0, 1], np.float32)
  ours = float(finetune.soft_loss(s, t, w, False, 2.0))
  keep = w > 0
  ref = torch.nn.functional.kl_div(torch.log_softmax(torch.from_numpy(s[keep]) / 2, -1),
                                   torch.softmax(torch.from_numpy(t[keep]) / 2, -1), reduction="batchmean") * 4
  assert ours == pytest.approx(float(ref), rel=1e-5)
  ce = float(finetune.task_loss(s, np.array([0, 1, 2, 0, 1, 2]), w, False))
  ref_ce = torch.nn.functional.cross_entropy(torch.from_numpy(s[keep]), torch.tensor([0, 1, 2, 0, 2]))
  assert ce == pytest.approx(float(ref_ce), rel=1e-5)


def test_regression_on_a_local_csv(tmp_path, tiny_teacher, test_data):
  rows = json.loads((test_data / "sentiment" / "yelp.json").read_text())[:200]
  csv = tmp_path / "scores.csv"
  csv.write_text("sentence,score\n" + "".join(
      f"\"{r['text'].replace(chr(34), chr(39))}\",{r['class'] * 4 + len(r['text']) % 2}\n" for r in rows))
  c = _config(tiny_teacher, test_data, steps=2, export=False)
  c.task, c.num_labels, c.label_field = str(csv), 1, "score"
  summary = finetune.run(c, tmp_path / "r")
  assert set(summary["eval"]) == {"pearson", "spearman"} and summary["eval_examples"] == 20
  assert summary["majority_baseline"] == {}


# ------------------------------------------------------------------------------------------------ bad input

@pytest.fixture
def no_compile(monkeypatch):
  """Fails the test if the run gets as far as building the sharded state (the first compile)."""
  def refuse(*args, **kwargs):
    raise AssertionError("reached the compile: the bad input should have been refused before")
  monkeypatch.setattr(trainer, "state_functions", refuse)


def test_unknown_glue_task_lists_the_valid_ones(tmp_path, tiny_teacher, test_data, no_compile):
  c = _config(tiny_teacher, test_data)
  c.task = "sst3"
  with pytest.raises(tasks.TaskError, match="unknown GLUE task 'sst3'.*sst2.*wnli"):
    finetune.run(c, tmp_path)


def test_rules_naming_an_unknown_mesh_axis(tmp_path, tiny_teacher, test_data, no_compile):
  c = _config(tiny_teacher, test_data)
  c.mesh.rules.batch = ("data", "dp")
  with pytest.raises(train.ConfigError, match=r"rules\['batch'\] names \['dp'\], not mesh axes"):
    finetune.run(c, tmp_path)


def test_missing_label_column_names_the_columns_found(tmp_path, tiny_teacher, test_data, no_compile):
  c = _config(tiny_teacher, test_data)
  c.task, c.label_field, c.text_fields = str(test_data / "sentiment" / "imdb.json"), "label", ("text",)
  with pytest.raises(tasks.TaskError, match=r"missing column\(s\) \['label'\]; columns found: \['text', 'class'\]"):
    finetune.run(c, tmp_path)


def test_labels_outside_the_head_range(tmp_path, tiny_teacher, test_data, no_compile):
  path = tmp_path / "three.jsonl"
  path.write_text("".join(json.dumps({"text": f"sentence {i}", "label": i % 3}) + "\n" for i in range(60)))
  c = _config(tiny_teacher, test_data)
  c.task, c.num_labels = str(path), 2
  with pytest.raises(tasks.TaskError, match="label"):
    finetune.run(c, tmp_path / "w")
  # Without num_labels the file decides (3 classes); a 2-class checkpoint then does not fit the task.
  c.num_labels = 0
  c.model = str(_tiny_classifier_folder(tmp_path, tiny_teacher, 2))
  with pytest.raises(finetune.HeadMismatchError, match="head of 2 classes but the task needs a sequence-classification head of 3 classes.*replace_head"):
    finetune.run(c, tmp_path / "w")


def test_checkpoint_head_that_does_not_match_the_task(tmp_path, tiny_teacher, test_data, no_compile):
  c = _config(_tiny_classifier_folder(tmp_path, tiny_teacher, 3), test_data)
  with pytest.raises(finetune.HeadMismatchError, match="head of 3 classes but the task needs a sequence-classification head of 2 classes"):
    finetune.run(c, tmp_path / "w")
  c.task, c.num_labels = str(test_data / "sentiment" / "imdb.json"), 1  # regression task, classifier checkpoint
  c.text_fields, c.label_field = ("text",), "class"
  with pytest.raises(finetune.HeadMismatchError, match="a regression output"):
    finetune.run(c, tmp_path / "w")


def test_replace_head_starts_a_new_head(tmp_path, tiny_teacher):
  model, params = checkpoint.load_model(_tiny_classifier_folder(tmp_path, tiny_teacher, 3))
  new_model, new_params, new = finetune.with_head(model, params, 2, replace=True)
  assert new == ["classifier"] and new_model.cfg.num_labels == 2
  assert new_params["classifier"]["kernel"].shape == (64, 2)
  np.testing.assert_array_equal(new_params["pooler"]["kernel"], params["pooler"]["kernel"])


def test_distillation_teacher_for_another_task_is_refused(tmp_path, tiny_teacher, test_data, no_compile):
  c = _config(tiny_teacher, test_data)
  c.distill.teacher = str(_tiny_classifier_folder(tmp_path, tiny_teacher, 3))
  with pytest.raises(finetune.HeadMismatchError, match="teacher .* has a sequence-classification head of 3 classes"):
    finetune.run(c, tmp_path / "w")


def test_cli_reports_bad_input_without_a_traceback(tmp_path, tiny_teacher, test_data):
  import subprocess
  import sys
  root = pathlib.Path(__file__).resolve().parents[1]
  done = subprocess.run([sys.executable, "-m", "distilbert_jax.finetune", f"--config={root / 'configs' / 'finetune.py'}:cola2",
                         f"--workdir={tmp_path}", f"--config.model={tiny_teacher}"], capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 2
  assert "error: unknown GLUE task 'cola2'" in done.stderr and "Traceback" not in done.stderr
