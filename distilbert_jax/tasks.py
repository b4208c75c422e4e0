"""Fine-tuning tasks: which columns to read, how to score, how to turn texts into model inputs.

No model code here; one task goes through four steps, each a section of this file:

1. `task_spec` looks a GLUE task up in `GLUE_TASKS`: its text column(s), number of labels (1 = regression),
   splits and official metrics.
2. The metrics (`accuracy`, `f1`, `matthews_corrcoef`, `pearson`, `spearman`) are plain numpy;
   `compute_metrics` applies a task's official set to logits or predicted values.
3. `load_task` reads one split of a GLUE task (through `datasets.load_dataset("nyu-mll/glue", ...)`) or a
   local CSV / TSV / JSON / JSON Lines file into a `TaskData`: texts, numpy labels, number of labels. Every
   problem with the data (missing column, label out of range, null text) is raised here, before anything is
   compiled. Rows with a null label are dropped and counted. `train_test_split` carves a deterministic
   validation part out of a local file that has none.
4. `encode` tokenizes texts (or text pairs) into int32 arrays, all of shape (N, max_len):
     input_ids_NxL, attention_mask_NxL, token_type_ids_NxL (0 for the first text, 1 for the second)
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


class TaskError(ValueError):
  """A task that does not exist, or data that cannot be used for it (raised before any compile)."""


# --------------------------------------------------------------------------------------------------------
# 1. Task registry
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """What fine-tuning needs to know about a task.

  Attributes:
    name: the task name (the `nyu-mll/glue` config name for GLUE tasks, the file stem for local files).
    text_fields: one column (single-sentence task) or two (sentence-pair task).
    num_labels: number of classes, or 1 for a regression task (one output, float labels).
    metrics: names of the official metrics, keys of `METRICS`.
    validation_splits: the labelled evaluation split(s); MNLI has two.
    test_splits: splits whose labels are hidden (-1 in `nyu-mll/glue`).
    label_names: class names by id, for reports (empty for regression and unnamed local labels).
  """
  name: str
  text_fields: tuple[str, ...]
  num_labels: int
  metrics: tuple[str, ...]
  validation_splits: tuple[str, ...] = ("validation",)
  test_splits: tuple[str, ...] = ("test",)
  label_names: tuple[str, ...] = ()

  @property
  def is_regression(self) -> bool:
    return self.num_labels == 1

  @property
  def is_pair(self) -> bool:
    return len(self.text_fields) == 2

  @property
  def splits(self) -> tuple[str, ...]:
    return ("train",) + self.validation_splits + self.test_splits


# Columns and label ids as the `nyu-mll/glue` dataset card gives them; metrics as the GLUE paper reports them.
GLUE_TASKS: dict[str, TaskSpec] = {
    spec.name: spec for spec in (
        TaskSpec("cola", ("sentence",), 2, ("matthews_corrcoef",),
                 label_names=("unacceptable", "acceptable")),
        TaskSpec("sst2", ("sentence",), 2, ("accuracy",), label_names=("negative", "positive")),
        TaskSpec("mrpc", ("sentence1", "sentence2"), 2, ("accuracy", "f1"),
                 label_names=("not_equivalent", "equivalent")),
        TaskSpec("qqp", ("question1", "question2"), 2, ("accuracy", "f1"),
                 label_names=("not_duplicate", "duplicate")),
        TaskSpec("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearman")),
        TaskSpec("mnli", ("premise", "hypothesis"), 3, ("accuracy",),
                 validation_splits=("validation_matched", "validation_mismatched"),
                 test_splits=("test_matched", "test_mismatched"),
                 label_names=("entailment", "neutral", "contradiction")),
        TaskSpec("qnli", ("question", "sentence"), 2, ("accuracy",), label_names=("entailment", "not_entailment")),
        TaskSpec("rte", ("sentence1", "sentence2"), 2, ("accuracy",), label_names=("entailment", "not_entailment")),
        # WNLI numbers its classes the other way round from RTE and QNLI.
        TaskSpec("wnli", ("sentence1", "sentence2"), 2, ("accuracy",), label_names=("not_entailment", "entailment")),
    )
}
GLUE_DATASET = "nyu-mll/glue"


def task_spec(name: str) -> TaskSpec:
  """The GLUE task `name` ("sst2", also "SST-2"); a `TaskError` listing the valid names otherwise."""
  key = str(name).lower().replace("-", "")
  if key not in GLUE_TASKS:
    raise TaskError(f"unknown GLUE task {name!r}; valid tasks: {', '.join(GLUE_TASKS)}")
  return GLUE_TASKS[key]


def default_metrics(num_labels: int) -> tuple[str, ...]:
  """Metrics for a task outside the registry: correlations for regression, accuracy (and F1 if binary)."""
  if num_labels == 1:
    return ("pearson", "spearman")
  return ("accuracy", "f1") if num_labels == 2 else ("accuracy",)


# --------------------------------------------------------------------------------------------------------
# 2. Metrics
# --------------------------------------------------------------------------------------------------------


def _pair(predictions, labels, dtype=None) -> tuple[np.ndarray, np.ndarray]:
  p, y = np.asarray(predictions, dtype), np.asarray(labels, dtype)
  if p.ndim != 1 or p.shape != y.shape:
    raise ValueError(f"predictions and labels must be 1-D of the same length, got {p.shape} and {y.shape}")
  if p.size == 0:
    raise ValueError("cannot score an empty set of predictions")
  return p, y


def accuracy(predictions, labels) -> float:
  """The fraction of predicted class ids equal to the labels."""
  p, y = _pair(predictions, labels)
  return float(np.mean(p == y))


def f1(predictions, labels) -> float:
  """Binary F1 of the positive class 1: 2·TP / (2·TP + FP + FN).

  With no positive prediction and no positive label the ratio is 0/0; we return 0.0 (scikit-learn's
  `zero_division=0`), since nothing of the positive class was found.
  """
  p, y = _pair(predictions, labels)
  if not np.isin(p, (0, 1)).all() or not np.isin(y, (0, 1)).all():
    raise ValueError("f1 is binary: predictions and labels must be 0 or 1")
  tp = np.sum((p == 1) & (y == 1))
  denominator = 2 * tp + np.sum(p != y)  # FP + FN are exactly the disagreements
  return float(2 * tp / denominator) if denominator else 0.0


def matthews_corrcoef(predictions, labels) -> float:
  """Matthews correlation of class ids, in its multi-class form (Gorodkin 2004; binary as a special case).

  From the confusion matrix C (rows: labels, columns: predictions) with s = N, c = trace(C),
  t = row sums, p = column sums:  MCC = (c·s - t·p) / sqrt((s² - p·p) (s² - t·t)).
  When every prediction (or every label) is one class the denominator is 0; we return 0.0, like
  scikit-learn: a constant predictor carries no information.
  """
  p, y = _pair(predictions, labels)
  p, y = p.astype(np.int64), y.astype(np.int64)
  if min(p.min(), y.min()) < 0:
    raise ValueError("class ids must be non-negative")
  k = int(max(p.max(), y.max())) + 1
  confusion = np.bincount(y * k + p, minlength=k * k).reshape(k, k).astype(np.float64)
  s, c = confusion.sum(), np.trace(confusion)
  t, q = confusion.sum(axis=1), confusion.sum(axis=0)
  denominator = math.sqrt((s * s - q @ q) * (s * s - t @ t))
  return float((c * s - t @ q) / denominator) if denominator else 0.0


def pearson(predictions, labels) -> float:
  """Pearson correlation, computed in float64.

  A constant input has no defined correlation (scipy returns NaN); we return 0.0 so that early, collapsed
  regression heads score as "no relation" and model selection stays finite. Non-finite inputs give NaN.
  """
  x, y = _pair(predictions, labels, np.float64)
  if x.size < 2:
    raise ValueError("a correlation needs at least 2 points")
  if not (np.isfinite(x).all() and np.isfinite(y).all()):
    return float("nan")
  # Exact test for constancy: the mean of equal floats need not equal them, so centring alone can leave
  # rounding noise whose "correlation" is meaningless.
  if np.ptp(x) == 0 or np.ptp(y) == 0:
    return 0.0
  x, y = x - x.mean(), y - y.mean()
  r = float(x @ y / math.sqrt((x @ x) * (y @ y)))
  return max(-1.0, min(1.0, r))


def rankdata(values) -> np.ndarray:
  """1-based ranks, float64, tied values sharing the average of their ranks (scipy's method="average")."""
  x = np.asarray(values)
  order = np.argsort(x, kind="stable")
  sorted_x = x[order]
  starts_group = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
  group = np.cumsum(starts_group) - 1
  starts = np.flatnonzero(starts_group)
  ends = np.r_[starts[1:], x.size]  # exclusive
  ranks = np.empty(x.size, np.float64)
  ranks[order] = ((starts + ends + 1) / 2)[group]  # mean of the 1-based ranks starts+1 .. ends
  return ranks


def spearman(predictions, labels) -> float:
  """Spearman rank correlation: Pearson of the average ranks (so the same 0.0 for a constant input)."""
  x, y = _pair(predictions, labels, np.float64)
  if not (np.isfinite(x).all() and np.isfinite(y).all()):
    return float("nan")
  return pearson(rankdata(x), rankdata(y))


METRICS: dict[str, Callable[[Any, Any], float]] = {
    "accuracy": accuracy, "f1": f1, "matthews_corrcoef": matthews_corrcoef, "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(task: str | TaskSpec, predictions, labels) -> dict[str, float]:
  """The task's official metrics, by name.

  Args:
    task: a GLUE task name or a `TaskSpec` (e.g. `TaskData.task` of a local file).
    predictions: classification: logits (N, C) or class ids (N,); regression: values (N,) or (N, 1).
    labels: (N,) class ids or floats.

  Returns:
    {metric name: value} for every metric in `task.metrics`.
  """
  spec = task if isinstance(task, TaskSpec) else task_spec(task)
  p = np.asarray(predictions)
  if spec.is_regression:
    if p.ndim == 2 and p.shape[1] == 1:
      p = p[:, 0]
  elif p.ndim == 2:
    if p.shape[1] != spec.num_labels:
      raise ValueError(f"{spec.name}: logits have {p.shape[1]} classes, the task has {spec.num_labels}")
    p = p.argmax(axis=-1)
  elif p.ndim == 1 and not np.issubdtype(p.dtype, np.integer):
    # A float vector is ambiguous (probabilities? one logit?): only whole numbers pass as class ids.
    if not np.all(np.mod(p, 1) == 0):
      raise ValueError(f"{spec.name}: 1-D predictions must be class ids; pass logits as (N, {spec.num_labels})")
    p = p.astype(np.int64)
  return {name: METRICS[name](p, labels) for name in spec.metrics}


# --------------------------------------------------------------------------------------------------------
# 3. Loading
# --------------------------------------------------------------------------------------------------------

LOCAL_FORMATS = (".csv", ".tsv", ".json", ".jsonl", ".ndjson")
LOCAL_SPLITS = ("all", "train", "validation")
# Tried in order when a local file is read without `text_fields`: the pair layouts first, so that a file
# with both "sentence1" and "sentence" columns is read as pairs.
TEXT_FIELD_GUESSES = (("sentence1", "sentence2"), ("text_a", "text_b"), ("premise", "hypothesis"),
                      ("question1", "question2"), ("question", "sentence"), ("text",), ("sentence",))


@dataclasses.dataclass(frozen=True)
class TaskData:
  """One split of a task, ready to encode.

  Attributes:
    texts_a: the first (or only) text of each example.
    texts_b: the second text of each example for pair tasks, else None.
    labels: (N,) int32 class ids in 0..num_labels-1, or float32 values for regression.
    task: the task's spec (columns, number of labels, metrics); `compute_metrics(data.task, ...)`.
    split: the split these examples come from.
    num_dropped: rows left out because their label was null.
  """
  texts_a: list[str] = dataclasses.field(repr=False)
  texts_b: list[str] | None = dataclasses.field(repr=False)
  labels: np.ndarray = dataclasses.field(repr=False)
  task: TaskSpec
  split: str
  num_dropped: int = 0

  @property
  def num_labels(self) -> int:
    return self.task.num_labels

  @property
  def is_regression(self) -> bool:
    return self.task.is_regression

  def __len__(self) -> int:
    return len(self.texts_a)

  def subset(self, indices: Sequence[int] | np.ndarray, split: str | None = None) -> TaskData:
    """The examples at `indices`, in that order (e.g. one part of `train_test_split`)."""
    indices = np.asarray(indices, np.int64)
    texts_b = None if self.texts_b is None else [self.texts_b[i] for i in indices]
    return dataclasses.replace(self, texts_a=[self.texts_a[i] for i in indices], texts_b=texts_b,
                               labels=self.labels[indices], split=split or self.split)


def train_test_split(n: int, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic split of range(n): (train indices, test indices), each sorted, disjoint, covering all.

  round(n · test_fraction) indices, drawn by a permutation seeded with `seed`, go to the test part; both
  parts must end up non-empty.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
  n_test = int(round(n * test_fraction))
  if not 0 < n_test < n:
    raise ValueError(f"cannot split {n} examples with test_fraction={test_fraction}: one part would be empty")
  permutation = np.random.default_rng(seed).permutation(n)
  return np.sort(permutation[n_test:]), np.sort(permutation[:n_test])


def _is_null(value: Any) -> bool:
  return (value is None or (isinstance(value, str) and not value.strip())
          or (isinstance(value, float) and math.isnan(value)))


def _few(values: Sequence[Any], limit: int = 5) -> str:
  shown = ", ".join(repr(v) for v in values[:limit])
  return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _parse_labels(raw: Sequence[Any], regression: bool, source: str, label_field: str) -> np.ndarray:
  """Numbers from JSON, CSV strings or datasets values; null labels must already be gone."""
  values, bad = [], []
  for value in raw:
    try:
      number = float(value)  # bool, int, float, numeric string
    except (TypeError, ValueError):
      bad.append(value)
      continue
    if not regression and not number.is_integer():
      bad.append(value)
    values.append(number)
  if bad:
    kind = "numbers" if regression else "whole-number class ids"
    distinct = list(dict.fromkeys(map(str, bad)))
    raise TaskError(f"{source}: label column {label_field!r} must hold {kind}; found {_few(distinct)}")
  return np.asarray(values, np.float32 if regression else np.int64)


def _check_range(labels: np.ndarray, num_labels: int, source: str) -> None:
  bad = (labels < 0) | (labels >= num_labels)
  if bad.any():
    values, counts = np.unique(labels[bad], return_counts=True)
    found = ", ".join(f"{v} ({c} rows)" for v, c in zip(values.tolist(), counts.tolist()))
    hint = ""
    if -1 in values:
      hint = " (-1 marks a hidden label, as in GLUE test splits: evaluate on a validation split)"
    raise TaskError(f"{source}: labels must lie in 0..{num_labels - 1} for {num_labels} classes; "
                    f"found {found}{hint}")


def _guess_text_fields(columns: Sequence[str], source: str) -> tuple[str, ...]:
  for fields in TEXT_FIELD_GUESSES:
    if all(f in columns for f in fields):
      return fields
  raise TaskError(f"{source}: no text column found among {list(columns)}; pass text_fields=('column',) or "
                  f"('first', 'second'). Recognised without it: {', '.join('/'.join(f) for f in TEXT_FIELD_GUESSES)}")


def from_columns(columns: Mapping[str, Sequence[Any]], *, task: TaskSpec | None = None,
                 text_fields: Sequence[str] | None = None, label_field: str = "label",
                 num_labels: int | None = None, split: str = "all", source: str = "data") -> TaskData:
  """Column-oriented data (a dict of equal-length lists, `datasets.Dataset.to_dict()`) -> `TaskData`.

  The one place where rows become examples, shared by GLUE and local files. Rows whose label is null (None,
  NaN, an empty string) are dropped and counted; every other problem raises `TaskError` naming `source`.

  Args:
    columns: column name -> values.
    task: a known task (GLUE): its text fields and number of labels are the defaults.
    text_fields: one or two text columns; default the task's, else guessed (`TEXT_FIELD_GUESSES`).
    label_field: the label column.
    num_labels: number of classes, 1 for regression; default the task's, else max(label) + 1 (at least 2).
    split: recorded in the result.
    source: names the data in error messages (a path, "glue/mrpc:train").
  """
  names = list(columns)
  if text_fields is None:
    text_fields = task.text_fields if task is not None else _guess_text_fields(names, source)
  text_fields = (text_fields,) if isinstance(text_fields, str) else tuple(text_fields)
  if len(text_fields) not in (1, 2):
    raise TaskError(f"{source}: text_fields must name one or two columns, got {text_fields}")
  missing = [f for f in (*text_fields, label_field) if f not in columns]
  if missing:
    raise TaskError(f"{source}: missing column(s) {missing}; columns found: {names}")
  if num_labels is None and task is not None:
    num_labels = task.num_labels
  if num_labels is not None and num_labels < 1:
    raise TaskError(f"{source}: num_labels must be >= 1 (1 = regression), got {num_labels}")

  raw_labels = list(columns[label_field])
  keep = [i for i, value in enumerate(raw_labels) if not _is_null(value)]
  num_dropped = len(raw_labels) - len(keep)
  if num_dropped:
    log.warning("%s: dropped %d of %d rows with a null %r label", source, num_dropped, len(raw_labels),
                label_field)
  if not keep:
    raise TaskError(f"{source}: no row has a label in column {label_field!r}")

  texts = []
  for field in text_fields:
    values = list(columns[field])
    nulls = [i for i in keep if values[i] is None]
    if nulls:
      raise TaskError(f"{source}: text column {field!r} is null in row(s) {_few(nulls)} (0-based)")
    texts.append([str(values[i]) for i in keep])

  regression = num_labels == 1
  labels = _parse_labels([raw_labels[i] for i in keep], regression, source, label_field)
  if not regression:
    if num_labels is None:
      # A file that happens to hold one class is still a classification task, never a regression.
      num_labels = max(2, int(labels.max()) + 1)
    _check_range(labels, num_labels, source)
    labels = labels.astype(np.int32)

  if task is None or (task.num_labels, task.text_fields) != (num_labels, text_fields):
    name = task.name if task is not None else pathlib.Path(source).stem
    task = TaskSpec(name, text_fields, num_labels, task.metrics if task else default_metrics(num_labels),
                    validation_splits=task.validation_splits if task else ("validation",),
                    test_splits=task.test_splits if task else (), label_names=task.label_names if task else ())
  return TaskData(texts_a=texts[0], texts_b=texts[1] if len(texts) == 2 else None, labels=labels, task=task,
                  split=split, num_dropped=num_dropped)


def _rows_to_columns(rows: Sequence[Any], source: str) -> dict[str, list[Any]]:
  if not all(isinstance(row, dict) for row in rows):
    raise TaskError(f"{source}: expected a list of JSON objects (one per example)")
  names = list(dict.fromkeys(key for row in rows for key in row))
  return {name: [row.get(name) for row in rows] for name in names}


def read_columns(path: PathLike) -> dict[str, list[Any]]:
  """A local CSV / TSV (header row), JSON (list of objects) or JSON Lines file, column by column.

  A ".json" file that is not one JSON document is read as JSON Lines, the format `datasets` writes.
  CSV values stay strings; an empty cell reads as "" and so counts as a null label.
  """
  path = pathlib.Path(path)
  suffix = path.suffix.lower()
  if suffix not in LOCAL_FORMATS:
    raise TaskError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(LOCAL_FORMATS)}")
  if not path.is_file():
    raise FileNotFoundError(f"no such data file: {path}")
  if suffix in (".csv", ".tsv"):
    # utf-8-sig: spreadsheets often save a byte-order mark, which would otherwise stick to the first header.
    with path.open(newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
      if not reader.fieldnames:
        raise TaskError(f"{path}: empty file, expected a header row")
      rows = list(reader)
      return {name: [row[name] for row in rows] for name in reader.fieldnames}
  text = path.read_text(encoding="utf-8")
  if suffix == ".json":
    try:
      document = json.loads(text)
    except json.JSONDecodeError:
      document = None  # JSON Lines under a .json name
    if isinstance(document, list):
      return _rows_to_columns(document, str(path))
    if document is not None:
      raise TaskError(f"{path}: expected a JSON list of objects (or JSON Lines), got a {type(document).__name__}")
  return _rows_to_columns(json_lines(text, path), str(path))


def json_lines(text: str, path: PathLike) -> list[Any]:
  """The JSON value of every non-blank line of `text` (JSON Lines); a line that does not parse is a TaskError."""
  rows = []
  for number, line in enumerate(text.splitlines(), 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise TaskError(f"{path}:{number}: not valid JSON ({e.msg})") from None
  return rows


def is_local(name_or_path: PathLike) -> bool:
  if isinstance(name_or_path, os.PathLike):
    return True
  name = str(name_or_path)
  return os.sep in name or pathlib.Path(name).suffix.lower() in LOCAL_FORMATS or os.path.isfile(name)


def load_task(name_or_path: PathLike, *, split: str, text_fields: Sequence[str] | None = None,
              label_field: str = "label", num_labels: int | None = None, validation_fraction: float = 0.1,
              seed: int = 0) -> TaskData:
  """One split of a GLUE task or of a local file, checked and ready to encode.

  GLUE (`name_or_path` a task name such as "mrpc"): reads `datasets.load_dataset("nyu-mll/glue", name,
  split=split)`, which downloads once into the Hugging Face cache (`HF_DATASETS_CACHE`; set
  `HF_DATASETS_OFFLINE=1` to use only the cache). `split` is one of `task_spec(name).splits`, optionally
  sliced the `datasets` way ("train[:1000]"). Test splits have hidden labels and are refused.

  Local files (`name_or_path` a path to .csv/.tsv/.json/.jsonl): `split="all"` is the whole file;
  "train" and "validation" are the two parts of `train_test_split(n, validation_fraction, seed)`, made
  after null-label rows are dropped, so the same arguments always give the same, disjoint parts.

  Args:
    name_or_path: GLUE task name or local file.
    split: see above.
    text_fields: text column(s); GLUE default: the task's; local default: guessed from common names.
    label_field: label column ("class" for the sentiment files).
    num_labels: local files only: number of classes (1 = regression); default max(label) + 1.
    validation_fraction, seed: the local train/validation split.

  Raises:
    TaskError: unknown task or split, missing column, label out of range or not a class id, null text.
  """
  if is_local(name_or_path):
    path = pathlib.Path(name_or_path)
    if split not in LOCAL_SPLITS:
      raise TaskError(f"{path}: split must be one of {', '.join(LOCAL_SPLITS)} for a local file, got {split!r}")
    data = from_columns(read_columns(path), text_fields=text_fields, label_field=label_field,
                        num_labels=num_labels, split=split, source=str(path))
    if split == "all":
      return data
    train, validation = train_test_split(len(data), validation_fraction, seed)
    return data.subset(train if split == "train" else validation, split)

  try:
    spec = task_spec(name_or_path)
  except TaskError as e:
    raise TaskError(f"{e}; or give a path to a {'/'.join(LOCAL_FORMATS)} file") from None
  if num_labels is not None and num_labels != spec.num_labels:
    raise TaskError(f"{spec.name} has {spec.num_labels} label(s); num_labels={num_labels} is for local files")
  base_split = split.split("[", 1)[0]
  if base_split in spec.test_splits:
    raise TaskError(f"glue/{spec.name}: the labels of {base_split!r} are hidden (-1); evaluate on "
                    f"{', '.join(spec.validation_splits)}")
  if base_split not in spec.splits:
    raise TaskError(f"glue/{spec.name}: unknown split {split!r}; valid: {', '.join(spec.splits)}")
  import datasets  # pylint: disable=g-import-not-at-top  (slow to import; only GLUE needs it)
  dataset = datasets.load_dataset(GLUE_DATASET, spec.name, split=split)
  return from_columns(dataset.to_dict(), task=spec, text_fields=text_fields, label_field=label_field,
                      split=split, source=f"glue/{spec.name}:{split}")


# --------------------------------------------------------------------------------------------------------
# 4. Encoding
# --------------------------------------------------------------------------------------------------------


def encode(tokenizer, texts_a: Sequence[str], texts_b: Sequence[str] | None, max_len: int,
           chunk_size: int = 8192) -> dict[str, np.ndarray]:
  """Tokenizes texts (or pairs) as the model's pretraining did: [CLS] a [SEP] (b [SEP]).

  Sequences are cut to `max_len` by "longest_first" (tokens come off the longer text of a pair first) and
  padded to `max_len`, so every batch has one shape and the step compiles once.

  Args:
    tokenizer: a Hugging Face tokenizer (`transformers.AutoTokenizer.from_pretrained(...)`).
    texts_a: N first texts.
    texts_b: N second texts, or None for single-text tasks.
    max_len: L, the padded length.
    chunk_size: texts tokenized per call; bounds the Python lists the tokenizer builds on large splits.

  Returns:
    {"input_ids", "attention_mask", "token_type_ids"}: int32 arrays of shape (N, L); token types are 0
    for [CLS], the first text and its [SEP], 1 for the second text and its [SEP], 0 on padding.
  """
  n = len(texts_a)
  if texts_b is not None and len(texts_b) != n:
    raise ValueError(f"texts_a has {n} texts but texts_b has {len(texts_b)}")
  specials = tokenizer.num_special_tokens_to_add(pair=texts_b is not None)
  if max_len <= specials:
    raise ValueError(f"max_len={max_len} leaves no room for text next to {specials} special tokens")
  out = {key: np.zeros((n, max_len), np.int32) for key in ("input_ids", "attention_mask", "token_type_ids")}
  for start in range(0, n, chunk_size):
    stop = min(start + chunk_size, n)
    batch = tokenizer(list(texts_a[start:stop]), None if texts_b is None else list(texts_b[start:stop]),
                      max_length=max_len, truncation="longest_first", padding="max_length",
                      return_attention_mask=True, return_token_type_ids=True, return_tensors="np")
    for key, array in out.items():
      array[start:stop] = batch[key]
  return out
