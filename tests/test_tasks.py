"""Tests for distilbert_jax.tasks: metrics against scikit-learn/scipy, loading real and written files, encoding."""
import collections
import csv
import json
import warnings

import datasets
import numpy as np
import pytest
import scipy.stats
import transformers
from sklearn import metrics as skm

from distilbert_jax import tasks

SEEDS = (0, 1, 2, 3)
SENTIMENT = ("imdb", "amazon", "yelp")


# --------------------------------------------------------------------------------------------------------
# Registry


def test_registry_covers_glue_with_official_metrics():
  assert set(tasks.GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
  assert tasks.task_spec("qqp").text_fields == ("question1", "question2")
  assert tasks.task_spec("qnli").text_fields == ("question", "sentence")
  assert tasks.task_spec("mnli").text_fields == ("premise", "hypothesis")
  assert tasks.task_spec("mnli").validation_splits == ("validation_matched", "validation_mismatched")
  assert tasks.task_spec("mnli").num_labels == 3
  assert tasks.task_spec("stsb").is_regression and tasks.task_spec("stsb").num_labels == 1
  assert not tasks.task_spec("sst2").is_pair and tasks.task_spec("rte").is_pair
  assert tasks.task_spec("cola").metrics == ("matthews_corrcoef",)
  assert tasks.task_spec("mrpc").metrics == ("accuracy", "f1")
  assert tasks.task_spec("stsb").metrics == ("pearson", "spearman")
  assert tasks.task_spec("SST-2") is tasks.task_spec("sst2")
  for spec in tasks.GLUE_TASKS.values():
    assert set(spec.metrics) <= set(tasks.METRICS)
    assert len(spec.label_names) == (0 if spec.is_regression else spec.num_labels)


def test_unknown_task_lists_valid_ones():
  with pytest.raises(tasks.TaskError, match=r"unknown GLUE task 'sst3'.*cola, sst2, mrpc, qqp, stsb, mnli"):
    tasks.task_spec("sst3")
  with pytest.raises(tasks.TaskError, match=r"unknown GLUE task 'imbd'.*wnli.*or give a path"):
    tasks.load_task("imbd", split="train")


# --------------------------------------------------------------------------------------------------------
# Metrics against scikit-learn and scipy


def _class_cases(seed, num_classes):
  """Random predictions, constant ones, perfect ones and inverted ones: the usual and the degenerate."""
  rng = np.random.default_rng(seed)
  n = int(rng.integers(5, 200))
  labels = rng.integers(0, num_classes, n)
  yield rng.integers(0, num_classes, n), labels
  yield np.zeros(n, np.int64), labels  # constant prediction
  yield np.full(n, num_classes - 1), labels
  yield labels.copy(), labels  # perfect
  yield (num_classes - 1) - labels, labels  # inverted
  yield rng.integers(0, num_classes, n), np.zeros(n, np.int64)  # constant labels
  yield np.zeros(n, np.int64), np.zeros(n, np.int64)  # both constant


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num_classes", [2, 3])
def test_classification_metrics_match_sklearn(seed, num_classes):
  for predictions, labels in _class_cases(seed, num_classes):
    assert tasks.accuracy(predictions, labels) == pytest.approx(skm.accuracy_score(labels, predictions), abs=1e-12)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # scikit-learn warns on the degenerate cases it also scores 0.0
      expected_mcc = skm.matthews_corrcoef(labels, predictions)
    assert tasks.matthews_corrcoef(predictions, labels) == pytest.approx(expected_mcc, abs=1e-12)
    if num_classes == 2:
      expected_f1 = skm.f1_score(labels, predictions, pos_label=1, zero_division=0.0)
      assert tasks.f1(predictions, labels) == pytest.approx(expected_f1, abs=1e-12)


def test_degenerate_classification_behaviour():
  labels = np.array([0, 1, 1, 0, 1])
  assert tasks.matthews_corrcoef(np.ones(5, int), labels) == 0.0  # constant prediction: no information
  assert tasks.matthews_corrcoef(np.zeros(5, int), np.zeros(5, int)) == 0.0
  assert tasks.matthews_corrcoef(labels, labels) == pytest.approx(1.0)
  assert tasks.matthews_corrcoef(1 - labels, labels) == pytest.approx(-1.0)
  assert tasks.f1(np.zeros(5, int), np.zeros(5, int)) == 0.0  # no positives anywhere: 0/0 -> 0
  assert tasks.f1(np.zeros(5, int), labels) == 0.0
  with pytest.raises(ValueError, match="binary"):
    tasks.f1([0, 2], [0, 1])
  with pytest.raises(ValueError, match="same length"):
    tasks.accuracy([0, 1], [0, 1, 1])
  with pytest.raises(ValueError, match="empty"):
    tasks.accuracy([], [])


def _regression_cases(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(5, 300))
  labels = rng.uniform(0, 5, n)
  yield rng.normal(size=n), labels
  yield labels + rng.normal(scale=0.5, size=n), labels  # correlated
  yield np.round(rng.uniform(0, 5, n) * 2) / 2, np.round(labels)  # many ties on both sides
  yield rng.integers(0, 3, n).astype(np.float32), labels  # float32, heavy ties
  yield -labels * 3 + 1, labels  # perfect negative


@pytest.mark.parametrize("seed", SEEDS)
def test_correlations_match_scipy(seed):
  for predictions, labels in _regression_cases(seed):
    np.testing.assert_allclose(tasks.pearson(predictions, labels),
                               scipy.stats.pearsonr(predictions.astype(np.float64), labels).statistic,
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(tasks.spearman(predictions, labels),
                               scipy.stats.spearmanr(predictions, labels).statistic, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_rankdata_matches_scipy_average_ranks(seed):
  values = np.random.default_rng(seed).integers(0, 7, 50)
  np.testing.assert_array_equal(tasks.rankdata(values), scipy.stats.rankdata(values, method="average"))


def test_degenerate_correlation_behaviour():
  labels = np.array([0.5, 1.0, 3.0, 4.5])
  # 0.1 summed three times is not 3 x 0.1: the constancy test must be exact, not a rounding-noise correlation.
  for constant in (np.full(4, 0.1), np.full(4, 2.0, np.float32)):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      assert np.isnan(scipy.stats.pearsonr(constant, labels).statistic)  # undefined; we choose 0.0
    assert tasks.pearson(constant, labels) == 0.0
    assert tasks.spearman(constant, labels) == 0.0
    assert tasks.pearson(labels, constant) == 0.0
  assert np.isnan(tasks.pearson([1.0, np.nan, 2.0, 3.0], labels))
  assert np.isnan(tasks.spearman([1.0, np.inf, 2.0, 3.0], labels))
  with pytest.raises(ValueError, match="at least 2"):
    tasks.pearson([1.0], [2.0])


def test_compute_metrics_from_logits_ids_and_values():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 64)
  logits = rng.normal(size=(64, 2))
  ids = logits.argmax(-1)
  got = tasks.compute_metrics("mrpc", logits, labels)
  assert set(got) == {"accuracy", "f1"}
  assert got == tasks.compute_metrics("mrpc", ids, labels)
  assert got["f1"] == pytest.approx(skm.f1_score(labels, ids))
  assert tasks.compute_metrics("cola", ids.astype(np.float32), labels)["matthews_corrcoef"] == pytest.approx(
      skm.matthews_corrcoef(labels, ids))
  mnli = tasks.compute_metrics("mnli", rng.normal(size=(64, 3)), rng.integers(0, 3, 64))
  assert set(mnli) == {"accuracy"}
  values, targets = rng.uniform(0, 5, (64, 1)), rng.uniform(0, 5, 64)
  stsb = tasks.compute_metrics("stsb", values, targets)
  assert stsb["pearson"] == pytest.approx(scipy.stats.pearsonr(values[:, 0], targets).statistic)
  assert stsb["spearman"] == pytest.approx(scipy.stats.spearmanr(values[:, 0], targets).statistic)
  with pytest.raises(ValueError, match="3 classes, the task has 2"):
    tasks.compute_metrics("sst2", rng.normal(size=(64, 3)), labels)
  with pytest.raises(ValueError, match="class ids"):
    tasks.compute_metrics("sst2", rng.uniform(size=64), labels)


# --------------------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("domain", SENTIMENT)
def test_load_real_sentiment_file(test_data, domain, caplog):
  path = test_data / "sentiment" / f"{domain}.json"
  with caplog.at_level("WARNING", logger="distilbert_jax.tasks"):
    data = tasks.load_task(path, split="all", label_field="class")
  assert "dropped 1 of 1001 rows" in caplog.text
  assert len(data) == 1000 and data.num_dropped == 1
  assert data.texts_b is None and data.num_labels == 2 and not data.is_regression
  assert data.labels.dtype == np.int32 and np.bincount(data.labels).tolist() == [500, 500]
  assert all(isinstance(t, str) and t.strip() for t in data.texts_a)
  assert data.task.name == domain and data.task.metrics == ("accuracy", "f1")
  rows = json.loads(path.read_text())
  assert data.texts_a[0] == rows[0]["text"] and data.labels[-1] == rows[-2]["class"]


def test_local_train_validation_split_is_deterministic(test_data):
  path = test_data / "sentiment" / "yelp.json"
  train = tasks.load_task(path, split="train", label_field="class", validation_fraction=0.2, seed=3)
  validation = tasks.load_task(path, split="validation", label_field="class", validation_fraction=0.2, seed=3)
  assert (len(train), len(validation)) == (800, 200)
  assert train.split == "train" and validation.split == "validation"
  everything = tasks.load_task(path, split="all", label_field="class")
  # Disjoint and complete: yelp repeats a few sentences, so compare multisets of (text, label).
  def rows(data):
    return collections.Counter(zip(data.texts_a, data.labels.tolist()))
  assert rows(train) + rows(validation) == rows(everything)
  again = tasks.load_task(path, split="validation", label_field="class", validation_fraction=0.2, seed=3)
  assert again.texts_a == validation.texts_a
  other = tasks.load_task(path, split="validation", label_field="class", validation_fraction=0.2, seed=4)
  assert other.texts_a != validation.texts_a


def test_train_test_split():
  train, test = tasks.train_test_split(10, 0.3, seed=0)
  assert len(test) == 3 and sorted(np.r_[train, test].tolist()) == list(range(10))
  assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
  np.testing.assert_array_equal(tasks.train_test_split(10, 0.3, seed=0)[1], test)
  assert any(not np.array_equal(tasks.train_test_split(10, 0.3, seed=s)[1], test) for s in range(1, 5))
  for n, fraction in ((10, 0.0), (10, 1.0), (1, 0.5), (10, 0.01)):
    with pytest.raises(ValueError):
      tasks.train_test_split(n, fraction, seed=0)


PAIRS = [
    {"sentence1": "The cat sat on the mat.", "sentence2": "A cat, sitting, on a \"mat\".", "label": 1},
    {"sentence1": "Stocks fell sharply on Monday.", "sentence2": "It rained in Paris.", "label": 0},
    {"sentence1": "He left early, as usual.", "sentence2": "He did not stay late.", "label": 1},
]


def _write_csv(path, rows, fieldnames=None, delimiter=","):
  with path.open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fieldnames or list(rows[0]), delimiter=delimiter)
    writer.writeheader()
    writer.writerows(rows)
  return path


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json-lines-as-json", "json"])
def test_load_written_pair_files(tmp_path, fmt):
  if fmt in ("csv", "tsv"):
    path = _write_csv(tmp_path / f"pairs.{fmt}", PAIRS, delimiter="\t" if fmt == "tsv" else ",")
  elif fmt == "json":
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(PAIRS))
  else:
    path = _write_jsonl(tmp_path / ("pairs.jsonl" if fmt == "jsonl" else "pairs.json"), PAIRS)
  data = tasks.load_task(str(path), split="all")  # text columns guessed: sentence1 / sentence2
  assert data.texts_a == [r["sentence1"] for r in PAIRS] and data.texts_b == [r["sentence2"] for r in PAIRS]
  assert data.labels.tolist() == [1, 0, 1] and data.num_labels == 2 and data.task.is_pair
  explicit = tasks.load_task(path, split="all", text_fields=("sentence2", "sentence1"), num_labels=4)
  assert explicit.texts_a == data.texts_b and explicit.num_labels == 4


def test_load_regression_and_null_labels_from_csv(tmp_path):
  rows = [{"a": "one", "b": "uno", "score": "4.5"}, {"a": "two", "b": "dos", "score": ""},
          {"a": "three", "b": "tres", "score": "0.25"}]
  path = _write_csv(tmp_path / "sts.csv", rows)
  data = tasks.load_task(path, split="all", text_fields=("a", "b"), label_field="score", num_labels=1)
  assert data.is_regression and data.labels.dtype == np.float32
  assert data.labels.tolist() == [4.5, 0.25] and data.num_dropped == 1
  assert data.texts_b == ["uno", "tres"] and data.task.metrics == ("pearson", "spearman")


def test_errors_name_the_problem(tmp_path):
  path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "class": 0}, {"text": "b", "class": 1}])
  with pytest.raises(tasks.TaskError, match=r"missing column\(s\) \['label'\]; columns found: \['text', 'class'\]"):
    tasks.load_task(path, split="all")
  with pytest.raises(tasks.TaskError, match=r"missing column\(s\) \['body'\].*\['text', 'class'\]"):
    tasks.load_task(path, split="all", text_fields=("body",), label_field="class")
  no_text = _write_jsonl(tmp_path / "n.jsonl", [{"body": "a", "label": 0}])
  with pytest.raises(tasks.TaskError, match=r"no text column found among \['body', 'label'\]"):
    tasks.load_task(no_text, split="all")
  out_of_range = _write_jsonl(tmp_path / "r.jsonl", [{"text": t, "label": y} for t, y in
                                                     (("a", 0), ("b", 3), ("c", -1), ("d", 3), ("e", 1))])
  with pytest.raises(tasks.TaskError, match=r"0\.\.1 for 2 classes; found -1 \(1 rows\), 3 \(2 rows\)"):
    tasks.load_task(out_of_range, split="all", num_labels=2)
  with pytest.raises(tasks.TaskError, match=r"found -1 \(1 rows\)"):  # inferred num_labels: only -1 is bad
    tasks.load_task(out_of_range, split="all")
  fractional = _write_jsonl(tmp_path / "f.jsonl", [{"text": "a", "label": 0.5}, {"text": "b", "label": "pos"}])
  with pytest.raises(tasks.TaskError, match=r"whole-number class ids; found '0.5', 'pos'"):
    tasks.load_task(fractional, split="all")
  null_text = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 0}, {"text": None, "label": 1}])
  with pytest.raises(tasks.TaskError, match=r"'text' is null in row\(s\) 1"):
    tasks.load_task(null_text, split="all")
  all_null = _write_jsonl(tmp_path / "z.jsonl", [{"text": "a", "label": None}])
  with pytest.raises(tasks.TaskError, match="no row has a label"):
    tasks.load_task(all_null, split="all")
  with pytest.raises(tasks.TaskError, match="split must be one of all, train, validation"):
    tasks.load_task(path, split="test", label_field="class")
  with pytest.raises(tasks.TaskError, match="unsupported file type '.txt'"):
    tasks.load_task(tmp_path / "d.txt", split="all")
  with pytest.raises(FileNotFoundError):
    tasks.load_task(tmp_path / "missing.csv", split="all")
  bad_json = tmp_path / "b.jsonl"
  bad_json.write_text('{"text": "a", "label": 0}\n{"text": \n')
  with pytest.raises(tasks.TaskError, match=r"b.jsonl:2: not valid JSON"):
    tasks.load_task(bad_json, split="all")


# A stand-in for the hub: `datasets.load_dataset` answers from in-memory GLUE-shaped splits, with the
# features (ClassLabel, float32 scores, idx) the real `nyu-mll/glue` configs declare.
_NLI = datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])
FAKE_GLUE = {
    ("mnli", "validation_matched"): datasets.Dataset.from_dict(
        {"premise": ["A man sleeps.", "Two dogs run.", "It is noon."],
         "hypothesis": ["Someone rests.", "Cats sit.", "It may be noon."], "label": [0, 2, 1], "idx": [0, 1, 2]},
        features=datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                    "label": _NLI, "idx": datasets.Value("int32")})),
    ("stsb", "train"): datasets.Dataset.from_dict(
        {"sentence1": ["A plane takes off.", "A man plays a flute."],
         "sentence2": ["An air plane is taking off.", "A man plays a guitar."], "label": [5.0, 1.6],
         "idx": [0, 1]},
        features=datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                                    "label": datasets.Value("float32"), "idx": datasets.Value("int32")})),
    ("sst2", "train"): datasets.Dataset.from_dict({"sentence": ["fine", "awful"], "label": [1, 5], "idx": [0, 1]}),
}


@pytest.fixture
def fake_hub(monkeypatch):
  calls = []

  def load_dataset(path, name, split):
    calls.append((path, name, split))
    return FAKE_GLUE[(name, split)]

  monkeypatch.setattr(datasets, "load_dataset", load_dataset)
  return calls


def test_load_glue_through_datasets(fake_hub):
  mnli = tasks.load_task("mnli", split="validation_matched")
  assert fake_hub == [("nyu-mll/glue", "mnli", "validation_matched")]
  assert mnli.texts_a[0] == "A man sleeps." and mnli.texts_b[1] == "Cats sit."
  assert mnli.labels.tolist() == [0, 2, 1] and mnli.num_labels == 3 and mnli.task is tasks.task_spec("mnli")
  stsb = tasks.load_task("STS-B", split="train")
  assert stsb.is_regression and stsb.labels.dtype == np.float32
  np.testing.assert_allclose(stsb.labels, [5.0, 1.6], rtol=1e-6)
  with pytest.raises(tasks.TaskError, match=r"glue/sst2:train: labels must lie in 0\.\.1.*found 5 \(1 rows\)"):
    tasks.load_task("sst2", split="train")


def test_glue_split_errors_come_before_any_download(fake_hub):
  with pytest.raises(tasks.TaskError, match="unknown split 'validation'; valid: train, validation_matched"):
    tasks.load_task("mnli", split="validation")
  with pytest.raises(tasks.TaskError, match=r"labels of 'test' are hidden \(-1\); evaluate on validation"):
    tasks.load_task("rte", split="test[:10]")
  with pytest.raises(tasks.TaskError, match="stsb has 1 label"):
    tasks.load_task("stsb", split="train", num_labels=2)
  assert fake_hub == []


def test_hidden_glue_labels_get_a_hint():
  columns = {"sentence": ["a", "b"], "label": [-1, -1]}
  with pytest.raises(tasks.TaskError, match="-1 marks a hidden label"):
    tasks.from_columns(columns, task=tasks.task_spec("sst2"))


# --------------------------------------------------------------------------------------------------------
# Encoding


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
  return transformers.AutoTokenizer.from_pretrained(str(minilm_path))


@pytest.fixture(scope="module")
def sentences(test_data):
  data = tasks.load_task(test_data / "sentiment" / "amazon.json", split="all", label_field="class")
  return data.texts_a[:40]


@pytest.mark.parametrize("max_len", [16, 48])
def test_encode_pairs_matches_tokenizer(tokenizer, sentences, max_len):
  texts_a, texts_b = sentences[:20], sentences[20:]
  enc = tasks.encode(tokenizer, texts_a, texts_b, max_len, chunk_size=7)  # chunks must not change anything
  assert set(enc) == {"input_ids", "attention_mask", "token_type_ids"}
  for array in enc.values():
    assert array.dtype == np.int32 and array.shape == (20, max_len)
  cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
  for i, (a, b) in enumerate(zip(texts_a, texts_b)):
    own = tokenizer(a, b, max_length=max_len, truncation="longest_first", padding="max_length")
    np.testing.assert_array_equal(enc["input_ids"][i], own["input_ids"])
    np.testing.assert_array_equal(enc["token_type_ids"][i], own["token_type_ids"])
    np.testing.assert_array_equal(enc["attention_mask"][i], own["attention_mask"])
    # The layout, independently of the tokenizer: [CLS] a' [SEP] b' [SEP] pad..., a' and b' prefixes of the
    # full tokenizations, the longer cut first.
    ids, n = enc["input_ids"][i], int(enc["attention_mask"][i].sum())
    full_a = tokenizer(a, add_special_tokens=False)["input_ids"]
    full_b = tokenizer(b, add_special_tokens=False)["input_ids"]
    first_sep = list(ids).index(sep)
    kept_a, kept_b = ids[1:first_sep].tolist(), ids[first_sep + 1:n - 1].tolist()
    assert ids[0] == cls and ids[n - 1] == sep and (ids[n:] == pad).all()
    assert kept_a == full_a[:len(kept_a)] and kept_b == full_b[:len(kept_b)]
    assert n == min(max_len, len(full_a) + len(full_b) + 3)
    if len(kept_a) < len(full_a) or len(kept_b) < len(full_b):
      assert len(kept_a) == len(full_a) or len(kept_b) == len(full_b) or abs(len(kept_a) - len(kept_b)) <= 1
    assert enc["token_type_ids"][i].tolist() == [0] * (first_sep + 1) + [1] * (n - first_sep - 1) + [0] * (
        max_len - n)
  assert (enc["attention_mask"].sum(1) == max_len).any()  # some pairs really were truncated


def test_encode_single_texts(tokenizer, sentences):
  enc = tasks.encode(tokenizer, sentences, None, 24)
  assert (enc["token_type_ids"] == 0).all()
  for i, text in enumerate(sentences):
    own = tokenizer(text, max_length=24, truncation=True, padding="max_length")
    np.testing.assert_array_equal(enc["input_ids"][i], own["input_ids"])
    np.testing.assert_array_equal(enc["attention_mask"][i], own["attention_mask"])
  with pytest.raises(ValueError, match="texts_b has 1"):
    tasks.encode(tokenizer, sentences[:2], sentences[:1], 24)
  with pytest.raises(ValueError, match="no room"):
    tasks.encode(tokenizer, sentences[:2], sentences[:2], 3)
