"""Fine-tuning the token-classification (NER) and span (question answering) heads on real data: labels that a
model can learn exactly (a small model memorises real questions and tagged tweets through the whole
path: reading, windows, labels, loss, post-processing, official scores), exports that transformers'
pipelines run with the same answers, distillation from a fine-tuned teacher, and a real NER fine-tune
beating the majority tag (slow)."""
import json
import pathlib

import jax
import numpy as np
import pytest
import torch
import transformers

import distilbert_jax
from distilbert_jax import checkpoint, finetune, ner, qa


def _config(model, task, head, **train_kw):
  c = finetune.default_config()
  c.model, c.task, c.task_head = str(model), str(task), head
  c.max_len = 64
  c.optim.update(lr=3e-3, warmup_frac=0.0)
  c.train.update(dict(batch_size=8, eval_batch_size=16, log_every=10, progress=False, async_checkpoint=False),
                 **train_kw)
  return c


@pytest.fixture(scope="module")
def tagged_tweets(tmp_path_factory, task_samples) -> tuple[pathlib.Path, ner.NERData]:
  """32 real WNUT-16 tweets with at least one entity each, as a CoNLL column file."""
  tweets = ner.load_ner(task_samples["wnut16"])
  rows = [i for i, tags in enumerate(tweets.tags) if any(t != "O" for t in tags)][:32]
  subset = tweets.subset(rows)
  path = tmp_path_factory.mktemp("ner") / "tweets.conll"
  path.write_text("".join("".join(f"{w}\t{t}\n" for w, t in zip(words, tags)) + "\n"
                          for words, tags in zip(subset.words, subset.tags)))
  return path, subset


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory, tiny_teacher, task_samples):
  """The tiny model trained 40 steps on the 5 real SQuAD questions (2 contexts of 516-695 characters, several
  64-token windows each) and scored on the same questions."""
  workdir = tmp_path_factory.mktemp("qa")
  squad = task_samples["squad"]
  c = _config(tiny_teacher, squad, "span", steps=40)
  c.validation_file = str(squad)
  c.qa.doc_stride = 24
  return finetune.run(c, workdir), workdir


def test_question_answering_learns_real_questions_exactly(qa_run, task_samples):
  """Exact match 100 on the questions it trained on is reachable only when the windows' start/end labels, the
  n-best search and the offsets back to the text all agree; the first-sentence baseline stays near 0."""
  summary, _ = qa_run
  assert summary["task_head"] == "span" and summary["eval_examples"] == 5
  assert summary["train_examples"] == 5
  assert summary["eval"] == {"exact_match": 100.0, "f1": 100.0}, summary
  assert summary["majority_baseline"]["exact_match"] == 0.0 and summary["baseline_name"] == "first sentence"


def test_question_answering_export_loads_in_transformers_with_our_answers(qa_run, task_samples):
  """The export is a BertForQuestionAnswering that transformers loads whole, with our start and end logits on
  the same windows, so its answers are ours. (transformers 5 removed the question-answering pipeline; the
  README records the pipeline of transformers 4.57 run on such an export.)"""
  summary, workdir = qa_run
  export = pathlib.Path(summary["export"])
  assert json.loads((export / "config.json").read_text())["architectures"] == ["BertForQuestionAnswering"]
  pt, info = transformers.AutoModelForQuestionAnswering.from_pretrained(export, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  model, params = checkpoint.load_model(workdir / "final")
  tok = transformers.AutoTokenizer.from_pretrained(export)
  examples = qa.load_squad(task_samples["squad"])
  features = qa.featurize(tok, examples, max_len=64, doc_stride=24)
  ours = model.apply({"params": params}, **features.model_inputs())
  with torch.no_grad():
    theirs = pt.eval()(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in features.model_inputs().items()})
  np.testing.assert_allclose(ours.start_logits, theirs.start_logits.numpy(), atol=1e-4)
  np.testing.assert_allclose(ours.end_logits, theirs.end_logits.numpy(), atol=1e-4)
  answers = qa.postprocess(examples, features, theirs.start_logits.numpy(), theirs.end_logits.numpy()).answers
  assert qa.squad_v1_scores(examples, answers)["exact_match"] == 100.0


def test_question_answering_distils_from_a_finetuned_teacher(qa_run, tiny_teacher, task_samples, tmp_path):
  """With distill.teacher (a span model) the loss gains the soft start/end term; with α = 1 the student
  learns the questions from the teacher's distributions alone."""
  _, teacher_dir = qa_run
  squad = task_samples["squad"]
  c = _config(tiny_teacher, squad, "span", steps=80, log_every=1)
  c.validation_file = str(squad)
  c.qa.doc_stride = 24
  c.distill.update(teacher=str(teacher_dir / "final"), alpha=1.0, temperature=1.0)
  summary = finetune.run(c, tmp_path / "student")
  logged = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
  steps = [r for r in logged if "distill" in r]
  assert len(steps) == 80 and steps[-1]["distill"] < 0.1 * steps[0]["distill"]
  assert summary["eval"]["exact_match"] >= 80.0, summary


def test_token_classification_learns_real_tags_exactly(tagged_tweets, tiny_teacher, tmp_path):
  """Entity F1 1.0 on the tweets it trained on needs every word's tag on its first word piece and the
  predictions mapped back word by word; the majority tag ("O") scores 0."""
  path, tweets = tagged_tweets
  c = _config(tiny_teacher, path, "token", steps=150)
  c.validation_file = str(path)
  summary = finetune.run(c, tmp_path / "ner")
  assert summary["eval"]["f1"] == 1.0 and summary["eval"]["accuracy"] == 1.0, summary
  assert summary["majority_baseline"]["f1"] == 0.0 and summary["baseline_name"] == "majority tag"
  labels = ner.label_list(tweets.tags)
  assert summary["num_labels"] == len(labels)

  # The export: a BertForTokenClassification with the tag names, our logits, and a pipeline that finds the
  # tweets' entities (grouped by type, character spans into the text).
  export = pathlib.Path(summary["export"])
  pt = transformers.AutoModelForTokenClassification.from_pretrained(export).eval()
  assert [pt.config.id2label[i] for i in range(len(labels))] == labels
  model, params = checkpoint.load_model(tmp_path / "ner" / "final")
  tok = transformers.AutoTokenizer.from_pretrained(export)
  enc = tok(tweets.words[:4], is_split_into_words=True, padding=True, return_tensors="np")
  ours = model.apply({"params": params}, enc["input_ids"], attention_mask=enc["attention_mask"],
                     token_type_ids=enc["token_type_ids"]).token_logits
  with torch.no_grad():
    theirs = pt(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  tagger = transformers.pipeline("token-classification", model=str(export), aggregation_strategy="simple")
  text = " ".join(tweets.words[0])
  found = tagger(text)
  gold_types = {t[2:] for t in tweets.tags[0] if t != "O"}
  assert found and {e["entity_group"] for e in found} <= {lab[2:] for lab in labels if lab != "O"}
  assert gold_types <= {e["entity_group"] for e in found}, (text, found)
  assert all(text[e["start"]:e["end"]].lower() == e["word"].replace(" ##", "").replace("##", "") for e in found)


def test_head_outputs_are_rows_with_one_label_each():
  """sequence (B, 1, C), token (B, L, C), span (B, 2, L): start row then end row."""
  out = distilbert_jax.EncoderOutput(logits=None, hidden_states=(), start_logits=jax.numpy.ones((2, 5)),
                                     end_logits=jax.numpy.zeros((2, 5)))
  rows = finetune.head_outputs(out)
  assert rows.shape == (2, 2, 5) and float(rows[:, 0].min()) == 1.0 and float(rows[:, 1].max()) == 0.0
  out = distilbert_jax.EncoderOutput(logits=None, hidden_states=(), class_logits=jax.numpy.ones((2, 3)))
  assert finetune.head_outputs(out).shape == (2, 1, 3)


def test_a_span_teacher_for_a_token_task_is_refused(qa_run, tagged_tweets, tiny_teacher, tmp_path, monkeypatch):
  _, teacher_dir = qa_run
  path, _ = tagged_tweets
  c = _config(tiny_teacher, path, "token", steps=2)
  c.distill.teacher = str(teacher_dir / "final")
  with pytest.raises(finetune.HeadMismatchError, match="teacher .* has a question-answering \\(span\\) head but the "
                     "task needs a token-classification head of"):
    finetune.run(c, tmp_path / "w")
  # ... and a span checkpoint fine-tuned further on a token task without replace_head.
  c.distill.teacher, c.model = "", str(teacher_dir / "final")
  with pytest.raises(finetune.HeadMismatchError, match="replace_head"):
    finetune.run(c, tmp_path / "w2")



@pytest.mark.parametrize("head", ["token", "span"])
def test_preempted_token_and_span_runs_resume_exactly(head, tagged_tweets, tiny_teacher, task_samples, tmp_path,
                                                      monkeypatch):
  """A preemption after step 3 of 6, then a rerun: the same parameters and losses as one straight run."""
  task = tagged_tweets[0] if head == "token" else task_samples["squad"]

  def run(workdir):
    c = _config(tiny_teacher, task, head, steps=6, ckpt_every=3, log_every=1)
    c.validation_file, c.qa.doc_stride = str(task), 24
    return finetune.run(c, workdir)

  straight = run(tmp_path / "a")
  with monkeypatch.context() as m:
    m.setattr(checkpoint.RunCheckpoints, "reached_preemption", lambda self, step: step == 3)
    assert run(tmp_path / "b") == {"step": 3, "preempted": True}
  assert run(tmp_path / "b")["step"] == straight["step"] == 6
  a = checkpoint.load_model(tmp_path / "a" / "final")[1]
  b = checkpoint.load_model(tmp_path / "b" / "final")[1]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  loss = lambda w: [json.loads(line)["loss"] for line in (w / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                    if '"loss"' in line]
  assert loss(tmp_path / "a") == loss(tmp_path / "b") and len(loss(tmp_path / "a")) == 6

@pytest.mark.slow
def test_real_encoder_on_real_tweets_beats_the_majority_tag(minilm_path, task_samples, tmp_path):
  """all-MiniLM-L6-v2 fine-tuned 150 steps of 16 on 2,155 WNUT-16 tweets, scored on the other 239: entity F1
  well above the majority tag's 0 (about 0.19 seen)."""
  c = _config(minilm_path, "wnut16", "token", steps=150, batch_size=16, eval_batch_size=64, export=False)
  c.sample_dir = str(task_samples["wnut16"].parent)
  c.optim.update(lr=1e-4, warmup_frac=0.1)
  summary = finetune.run(c, tmp_path / "wnut")
  assert summary["eval_examples"] == 239 and summary["train_examples"] == 2155
  assert summary["eval"]["f1"] >= 0.1 and summary["eval"]["accuracy"] > summary["majority_baseline"]["accuracy"]


@pytest.mark.parametrize("name", ["finetune_qa.py", "finetune_qa_demo.py", "finetune_ner.py", "finetune_ner_demo.py"])
def test_task_configs_load_with_valid_settings(name):
  import importlib.util
  from distilbert_jax import validation
  path = pathlib.Path(__file__).parent.parent / "configs" / name
  spec = importlib.util.spec_from_file_location(name[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  validation.check_ranges(c, finetune.RANGES)
  assert c.task_head == ("span" if "qa" in name else "token") and c.task
  assert c.task_head != "span" or c.qa.doc_stride < c.max_len


def test_hub_names_and_files_are_told_apart(tmp_path):
  (tmp_path / "tags").write_text("x\tO\n")
  assert not finetune.is_file_task("eriktks/conll2003") and not finetune.is_file_task("squad_v2")
  assert finetune.is_file_task(str(tmp_path / "tags")) and finetune.is_file_task("missing/train.json")
