"""Tests for distilbert_jax.qa: real SQuAD-format questions, windows and offsets, post-processing, official scores."""
import collections
import copy
import json
import re
import string

import numpy as np
import pytest
import transformers

from distilbert_jax import qa
from distilbert_jax.tasks import TaskError


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
  return transformers.AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def documents(task_samples) -> dict[str, dict]:
  return {name: json.loads(task_samples[name].read_text()) for name in ("squad", "quoref")}


@pytest.fixture(scope="module")
def examples(task_samples) -> list[qa.QAExample]:
  return qa.read_squad_json(task_samples["squad"]) + qa.read_squad_json(task_samples["quoref"])


# --------------------------------------------------------------------------------------------------------
# The official evaluation scripts, transcribed (SQuAD v1.1 evaluate-v1.1.py, v2.0 evaluate-v2.0.py)


def _official_normalize(s):
  def remove_articles(text):
    return re.sub(r"\b(a|an|the)\b", " ", text)

  def white_space_fix(text):
    return " ".join(text.split())

  def remove_punc(text):
    exclude = set(string.punctuation)
    return "".join(ch for ch in text if ch not in exclude)

  return white_space_fix(remove_articles(remove_punc(s.lower())))


def _official_v1(dataset, predictions):
  def f1_score(prediction, ground_truth):
    prediction_tokens = _official_normalize(prediction).split()
    ground_truth_tokens = _official_normalize(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
      return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)

  def exact_match_score(prediction, ground_truth):
    return _official_normalize(prediction) == _official_normalize(ground_truth)

  f1 = exact_match = total = 0
  for article in dataset:
    for paragraph in article["paragraphs"]:
      for qa_ in paragraph["qas"]:
        total += 1
        if qa_["id"] not in predictions:
          continue
        ground_truths = [x["text"] for x in qa_["answers"]]
        prediction = predictions[qa_["id"]]
        exact_match += max(exact_match_score(prediction, g) for g in ground_truths)
        f1 += max(f1_score(prediction, g) for g in ground_truths)
  return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


def _official_v2(dataset, preds, na_probs=None, na_prob_thresh=1.0):
  def get_tokens(s):
    return _official_normalize(s).split() if s else []

  def compute_f1(a_gold, a_pred):
    gold_toks, pred_toks = get_tokens(a_gold), get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
      return int(gold_toks == pred_toks)
    if num_same == 0:
      return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)

  qid_to_has_ans = {q["id"]: bool(q["answers"]) for a in dataset for p in a["paragraphs"] for q in p["qas"]}
  exact_scores, f1_scores = {}, {}
  for article in dataset:
    for p in article["paragraphs"]:
      for q in p["qas"]:
        gold_answers = [a["text"] for a in q["answers"] if _official_normalize(a["text"])] or [""]
        a_pred = preds[q["id"]]
        exact_scores[q["id"]] = max(int(_official_normalize(a) == _official_normalize(a_pred)) for a in gold_answers)
        f1_scores[q["id"]] = max(compute_f1(a, a_pred) for a in gold_answers)
  probs = na_probs or {k: 0.0 for k in preds}

  def apply(scores):
    return {q: float(not qid_to_has_ans[q]) if probs[q] > na_prob_thresh else s for q, s in scores.items()}

  exact_thresh, f1_thresh = apply(exact_scores), apply(f1_scores)

  def make_eval_dict(qid_list=None):
    qids = qid_list if qid_list is not None else list(exact_thresh)
    return {"exact": 100.0 * sum(exact_thresh[k] for k in qids) / len(qids),
            "f1": 100.0 * sum(f1_thresh[k] for k in qids) / len(qids), "total": len(qids)}

  out = make_eval_dict()
  for name, want in (("HasAns", True), ("NoAns", False)):
    qids = [k for k, v in qid_to_has_ans.items() if v == want]
    if qids:
      out.update({f"{name}_{k}": v for k, v in make_eval_dict(qids).items()})

  def find_best_thresh(scores):
    num_no_ans = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
    cur_score = best_score = num_no_ans
    best_thresh = 0.0
    for qid in sorted(probs, key=lambda k: probs[k]):
      if qid not in scores:
        continue
      if qid_to_has_ans[qid]:
        diff = scores[qid]
      else:
        diff = -1 if preds[qid] else 0
      cur_score += diff
      if cur_score > best_score:
        best_score, best_thresh = cur_score, probs[qid]
    return 100.0 * best_score / len(scores), best_thresh

  if na_probs is not None:
    out["best_exact"], out["best_exact_thresh"] = find_best_thresh(exact_scores)
    out["best_f1"], out["best_f1_thresh"] = find_best_thresh(f1_scores)
  return out


# --------------------------------------------------------------------------------------------------------
# Metrics


@pytest.mark.parametrize("text, expected", [
    ("The  Denver Broncos!", "denver broncos"), ("an apple, a pear; the end.", "apple pear end"),
    ("Theatre", "theatre"), ("Ünïcode—dash", "ünïcode—dash"), ("", ""), ("A", ""),
])
def test_normalize_answer(text, expected):
  assert qa.normalize_answer(text) == expected == _official_normalize(text)


def _prediction_variants(examples, rng):
  """Gold answers, decorated ones, overlapping spans, wrong spans, empty answers: all the scoring paths."""
  for _ in range(4):
    predictions = {}
    for e in examples:
      kind = rng.integers(6)
      gold = e.answers[0] if e.answers else ""
      if kind == 0:
        predictions[e.id] = gold
      elif kind == 1:
        predictions[e.id] = f"the {gold.upper()}."
      elif kind in (2, 3):
        a, b = sorted(rng.integers(0, len(e.context), 2).tolist())
        predictions[e.id] = e.context[a:b + 20]
      elif kind == 4:
        words = gold.split()
        predictions[e.id] = " ".join(words[: max(1, len(words) // 2)] + ["extra"])
      else:
        predictions[e.id] = ""
    yield predictions


def test_v1_scores_equal_the_official_script(documents, examples):
  dataset = documents["squad"]["data"] + documents["quoref"]["data"]
  rng = np.random.default_rng(0)
  for predictions in _prediction_variants(examples, rng):
    assert qa.squad_v1_scores(examples, predictions) == pytest.approx(_official_v1(dataset, predictions))
  perfect = {e.id: e.answers[0] for e in examples}
  assert qa.squad_v1_scores(examples, perfect) == {"exact_match": 100.0, "f1": 100.0}
  # A missing prediction scores 0, as the official script counts it.
  partial = dict(list(perfect.items())[1:])
  assert qa.squad_v1_scores(examples, partial)["exact_match"] == pytest.approx(100.0 * 8 / 9)


def _as_v2(documents):
  """The real questions with every third one's answers removed (unanswerable, as SQuAD v2.0 marks them)."""
  dataset = copy.deepcopy(documents["squad"]["data"] + documents["quoref"]["data"])
  n = 0
  for article in dataset:
    for paragraph in article["paragraphs"]:
      for q in paragraph["qas"]:
        if n % 3 == 0:
          q["answers"], q["is_impossible"] = [], True
        n += 1
  return dataset


def test_v2_scores_equal_the_official_script(documents):
  dataset = _as_v2(documents)
  examples = qa.examples_from_squad_json({"data": dataset}, "v2")
  assert qa.is_version_2(examples) and sum(not e.has_answer for e in examples) == 3
  rng = np.random.default_rng(1)
  for predictions in _prediction_variants(examples, rng):
    assert qa.squad_v2_scores(examples, predictions) == pytest.approx(_official_v2(dataset, predictions))
    na_probs = {e.id: float(rng.normal()) for e in examples}
    ours = qa.squad_v2_scores(examples, predictions, na_probs, na_prob_thresh=0.3)
    assert ours == pytest.approx(_official_v2(dataset, predictions, na_probs, 0.3))
    assert {"HasAns_exact", "NoAns_f1", "best_f1_thresh"} <= set(ours)
  with pytest.raises(ValueError, match="no prediction"):
    qa.squad_v2_scores(examples, {})


def test_token_f1_by_hand():
  assert qa.token_f1("the Denver Broncos", "Denver Broncos") == 1.0
  assert qa.token_f1("Denver", "Denver Broncos") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
  assert qa.token_f1("", "") == 0.0 and qa.token_f1("", "", version_2=True) == 1.0
  assert qa.token_f1("a", "", version_2=True) == 1.0  # "a" normalises to nothing
  assert qa.exact_match("Broncos.", "broncos") == 1


# --------------------------------------------------------------------------------------------------------
# Loading and refusals


def test_reads_the_real_samples(examples, documents):
  assert len(examples) == 9
  assert examples[0].title == "University_of_Notre_Dame"
  assert examples[0].answers == ("Saint Bernadette Soubirous",)
  assert all(e.has_answer for e in examples) and not qa.is_version_2(examples)
  rows = qa.examples_from_columns({
      "id": [e.id for e in examples], "title": [e.title for e in examples],
      "context": [e.context for e in examples], "question": [e.question for e in examples],
      "answers": [{"text": list(e.answers), "answer_start": list(e.answer_starts)} for e in examples]})
  assert rows == examples  # the flat `datasets` layout reads the same


def _write(tmp_path, document, name="bad.json"):
  path = tmp_path / name
  path.write_text(document if isinstance(document, str) else json.dumps(document))
  return path


def _one(context="Denver won.", text="Denver", start=0, **qa_fields):
  q = {"id": "q1", "question": "Who won?", "answers": [{"text": text, "answer_start": start}], **qa_fields}
  return {"data": [{"title": "t", "paragraphs": [{"context": context, "qas": [q]}]}]}


@pytest.mark.parametrize("document, message", [
    ("", "empty file"),
    ({"version": "1.1"}, "missing field 'data'"),
    ({"data": [{"title": "t"}]}, r"data\[0\]: missing field 'paragraphs'"),
    ({"data": [{"paragraphs": [{"qas": []}]}]}, "missing field 'context'"),
    (_one(start=3), r"question 'q1': answer 'Denver' is not at its answer_start 3 in the context \(found 'ver wo'"),
    (_one(text="Boston"), "answer 'Boston' is not at its answer_start 0"),
    (_one(start=40), "not at its answer_start 40"),
    (_one(start=-1), "not at its answer_start -1"),
    (_one(start="0"), "integer answer_start"),
    (_one(is_impossible=True), "is_impossible is true but the question has answers"),
    ({"data": [{"paragraphs": [{"context": "c", "qas": []}]}]}, "no questions"),
])
def test_bad_files_are_refused(tmp_path, document, message):
  with pytest.raises(TaskError, match=message):
    qa.load_squad(_write(tmp_path, document))


def test_repeated_ids_and_bad_json_lines(tmp_path):
  doc = _one()
  doc["data"][0]["paragraphs"].append(doc["data"][0]["paragraphs"][0])
  with pytest.raises(TaskError, match=r"question id\(s\) \['q1'\] occur more than once"):
    qa.read_squad_json(_write(tmp_path, doc))
  with pytest.raises(TaskError, match=r"bad.jsonl:2: not valid JSON"):
    qa.read_squad_json(_write(tmp_path, '{"id": 1}\n{oops\n', "bad.jsonl"))
  with pytest.raises(TaskError, match="unknown QA sample 'sqaud'"):
    qa.sample_file("sqaud", tmp_path)


# --------------------------------------------------------------------------------------------------------
# Windows and offsets


@pytest.mark.parametrize("max_len, doc_stride", [(384, 128), (128, 32), (64, 16)])
def test_windows_recover_every_gold_answer(tokenizer, examples, max_len, doc_stride):
  features = qa.featurize(tokenizer, examples, max_len=max_len, doc_stride=doc_stride)
  assert features.input_ids.shape == features.attention_mask.shape == (len(features), max_len)
  assert sorted(set(features.example_index.tolist())) == list(range(len(examples)))
  for e, example in enumerate(examples):
    windows = np.flatnonzero(features.example_index == e)
    start_char = example.answer_starts[0]
    end_char = start_char + len(example.answers[0])
    # The windows cover the whole context, each shares doc_stride tokens with the next.
    covered = np.zeros(len(example.context), bool)
    spans = []
    for f in windows:
      offsets = features.offsets[f]
      context_tokens = np.flatnonzero(offsets[:, 0] >= 0)
      spans.append(context_tokens)
      for a, b in offsets[context_tokens]:
        covered[a:b] = True
      s, t = features.start_positions[f], features.end_positions[f]
      first, last = offsets[context_tokens[0], 0], offsets[context_tokens[-1], 1]
      if first <= start_char and end_char <= last:
        # The token span is the smallest one holding the answer, and gives back its text.
        assert s > 0 and offsets[s, 0] <= start_char < offsets[s, 1] and offsets[t, 0] < end_char <= offsets[t, 1]
        recovered = example.context[offsets[s, 0]:offsets[t, 1]]
        assert qa.normalize_answer(recovered) == qa.normalize_answer(example.answers[0])
      else:
        assert s == t == 0  # the [CLS] token
    assert all(covered[i] for i, ch in enumerate(example.context) if not ch.isspace())
    assert any(features.start_positions[f] > 0 for f in windows)
    for a, b in zip(features.offsets[windows[:-1]], features.offsets[windows[1:]]):
      shared = set(map(tuple, a[a[:, 0] >= 0].tolist())) & set(map(tuple, b[b[:, 0] >= 0].tolist()))
      assert len(shared) == doc_stride
  # Question, special and padding tokens have no offsets: they can never be part of an answer.
  type_ids, mask = features.token_type_ids, features.attention_mask
  assert ((features.offsets[..., 0] >= 0) == ((type_ids == 1) & (mask == 1) &
                                               (features.input_ids != tokenizer.sep_token_id))).all()


def test_a_question_too_long_for_any_window_is_refused(tokenizer, examples):
  long = qa.QAExample("long", "why " * 60, examples[0].context, examples[0].answers, examples[0].answer_starts)
  with pytest.raises(TaskError, match=r"question 'long' has 60 tokens: with max_len=96 and doc_stride=40"):
    qa.featurize(tokenizer, [long], max_len=96, doc_stride=40)


# --------------------------------------------------------------------------------------------------------
# Post-processing


def _logits_at(features, spans, cls_score=-5.0):
  """Logits that peak at the given (window, start, end) token spans; [CLS] gets `cls_score` per side."""
  start = np.full(features.input_ids.shape, -10.0, np.float32)
  end = start.copy()
  start[:, 0] = end[:, 0] = cls_score
  for f, s, t, score in spans:
    start[f, s] = end[f, t] = score
  return start, end


def test_postprocess_recovers_gold_answers_from_peaked_logits(tokenizer, examples):
  features = qa.featurize(tokenizer, examples, max_len=64, doc_stride=16)
  spans = [(f, s, t, 5.0) for f, (s, t) in enumerate(zip(features.start_positions, features.end_positions)) if s]
  predictions = qa.postprocess(examples, features, *_logits_at(features, spans), max_answer_len=64)
  assert predictions.answers == {e.id: e.answers[0] for e in examples}
  assert qa.squad_v1_scores(examples, predictions.answers) == {"exact_match": 100.0, "f1": 100.0}
  assert all(d < 0 for d in predictions.null_score_diff.values())
  # A stronger but invalid pair (start in the question) never wins; a longer span is cut by max_answer_len.
  start, end = _logits_at(features, spans)
  start[:, 2] = 50.0
  assert qa.postprocess(examples, features, start, end, max_answer_len=64).answers == predictions.answers


def test_postprocess_picks_the_best_window_and_respects_max_answer_len(tokenizer, examples):
  example = max(examples, key=lambda e: len(e.context))
  features = qa.featurize(tokenizer, [example], max_len=64, doc_stride=16)
  assert len(features) >= 3
  context = [np.flatnonzero(features.offsets[f, :, 0] >= 0) for f in range(len(features))]
  spans = [(0, context[0][0], context[0][1], 2.0), (2, context[2][3], context[2][5], 3.0)]
  got = qa.postprocess([example], features, *_logits_at(features, spans))
  offsets = features.offsets[2]
  assert got.answers[example.id] == example.context[offsets[context[2][3], 0]:offsets[context[2][5], 1]]
  assert got.nbest[example.id][0][1] == pytest.approx(6.0)
  short = qa.postprocess([example], features, *_logits_at(features, spans), max_answer_len=2)
  offsets = features.offsets[0]
  assert short.answers[example.id] == example.context[offsets[context[0][0], 0]:offsets[context[0][1], 1]]


def test_postprocess_v2_answers_nothing_when_the_null_score_wins(tokenizer, examples):
  features = qa.featurize(tokenizer, examples[:3], max_len=64, doc_stride=16)
  spans = [(f, s, t, 1.0) for f, (s, t) in enumerate(zip(features.start_positions, features.end_positions)) if s]
  start, end = _logits_at(features, spans, cls_score=-5.0)
  first = np.flatnonzero(features.example_index == 0)
  start[first, 0] = end[first, 0] = 4.0  # the first question now looks unanswerable in every window
  got = qa.postprocess(examples[:3], features, start, end, version_2=True)
  assert got.answers[examples[0].id] == "" and got.answers[examples[1].id] == examples[1].answers[0]
  assert got.null_score_diff[examples[0].id] == pytest.approx(8.0 - 2.0)
  assert got.null_score_diff[examples[1].id] == pytest.approx(-10.0 - 2.0)
  # A threshold above the difference answers after all; v1 never answers "".
  assert qa.postprocess(examples[:3], features, start, end, version_2=True, null_threshold=7.0).answers[
      examples[0].id] == examples[0].answers[0]
  assert qa.postprocess(examples[:3], features, start, end).answers[examples[0].id] == examples[0].answers[0]
  scores = qa.squad_v2_scores(examples[:3], got.answers, got.null_score_diff)
  assert scores["HasAns_exact"] == scores["best_exact"] == pytest.approx(200 / 3)  # all three have answers


def test_first_sentence_baseline_scores_low(examples):
  scores = qa.squad_v1_scores(examples, qa.first_sentence_baseline(examples))
  assert scores["exact_match"] < 50 and 0 < scores["f1"] < 50
