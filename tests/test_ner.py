"""Tests for distilbert_jax.ner: CoNLL reading on real data, labels on first word pieces, entity scores = seqeval's."""
import datasets
import numpy as np
import pytest
import transformers
from seqeval import metrics as sq
from seqeval.metrics.sequence_labeling import get_entities as seqeval_entities

from distilbert_jax import data, ner
from distilbert_jax.tasks import TaskError

# The conlleval sample output that seqeval's source archive tests with: CoNLL-2000 chunks of WSJ text,
# gold tags in the third column, a chunker's predictions in the fourth (IOB1 and IOB2 mixed).
SEQEVAL_SDIST = "seqeval==1.2.2"
SEQEVAL_SAMPLE = "tests/data/ground_truth.txt"


@pytest.fixture(scope="module")
def wnut(task_samples) -> ner.NERData:
  return ner.read_conll(task_samples["wnut16"])


@pytest.fixture(scope="module")
def conlleval_sample(task_samples) -> tuple[list[list[str]], list[list[str]]]:
  folder = data.fetch_pypi_files(SEQEVAL_SDIST, task_samples["wnut16"].parent.parent, (SEQEVAL_SAMPLE,), sdist=True)
  path = folder / "ground_truth.txt"
  return ner.read_conll(path, tag_column=-2).tags, ner.read_conll(path, tag_column=-1).tags


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
  return transformers.AutoTokenizer.from_pretrained(minilm_path)


# --------------------------------------------------------------------------------------------------------
# Reading


def test_reads_the_real_wnut16_training_tweets(wnut):
  assert len(wnut) == 2394
  assert sum(map(len, wnut.words)) == 46469
  assert wnut.words[0][:4] == ["@paulwalk", "It", "'s", "the"]
  assert wnut.tags[0][14:17] == ["B-facility", "I-facility", "I-facility"]  # Empire State Building
  assert all(len(w) == len(t) for w, t in zip(wnut.words, wnut.tags))
  labels = ner.label_list(wnut.tags)
  assert labels[0] == "O" and len(labels) == 21
  assert labels[1:5] == ["B-company", "I-company", "B-facility", "I-facility"]


def test_conll2003_columns_docstart_and_blank_lines(tmp_path):
  path = tmp_path / "eng.sample"
  path.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP B-MISC\n"
                  "\t \nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n\n\n-DOCSTART- -X- -X- O\nBRUSSELS NNP B-NP B-LOC\n")
  got = ner.read_conll(path)
  assert got.words == [["EU", "rejects", "German"], ["Peter", "Blackburn"], ["BRUSSELS"]]
  assert got.tags == [["B-ORG", "O", "B-MISC"], ["B-PER", "I-PER"], ["B-LOC"]]
  assert ner.read_conll(path, tag_column=2).tags[0] == ["B-NP", "B-VP", "B-NP"]  # the chunk column


@pytest.mark.parametrize("text, message", [
    ("", "no sentences"),
    ("-DOCSTART- -X- -X- O\n\n", "no sentences"),
    ("EU B-ORG\nrejects\n", r":2: expected a token and its tag"),
    ("EU PER\n", r"tag\(s\) \['PER'\] are not O, B-TYPE"),
    ("EU X-ORG\n", r"\['X-ORG'\]"),
])
def test_bad_files_are_refused(tmp_path, text, message):
  path = tmp_path / "bad.txt"
  path.write_text(text)
  with pytest.raises(TaskError, match=message):
    ner.read_conll(path)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError):
    ner.load_ner(tmp_path / "none.txt")


def test_datasets_class_label_ids_become_names(wnut):
  labels = ner.label_list(wnut.tags)
  features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                "ner_tags": datasets.Sequence(datasets.ClassLabel(names=labels))})
  rows = {"tokens": wnut.words[:50] + [[]], "ner_tags": [[labels.index(t) for t in row] for row in wnut.tags[:50]] + [[]]}
  got = ner.from_dataset(datasets.Dataset.from_dict(rows, features=features), source="mem")
  assert got.words == wnut.words[:50] and got.tags == wnut.tags[:50]  # the empty row is dropped
  with pytest.raises(TaskError, match=r"missing column\(s\) \['ner_tags'\]"):
    ner.from_dataset(datasets.Dataset.from_dict({"tokens": [["a"]], "tags": [["O"]]}))


def test_unknown_tags_are_refused():
  with pytest.raises(TaskError, match=r"unknown tag\(s\) \['B-MISC'\]"):
    ner.check_tags([["B-PER", "B-MISC"]], ["O", "B-PER", "I-PER"])


# --------------------------------------------------------------------------------------------------------
# Labels on first word pieces


def test_labels_sit_on_first_word_pieces(tokenizer, wnut):
  labels = ner.label_list(wnut.tags)
  words, tags = wnut.words[:200], wnut.tags[:200]
  enc = ner.encode(tokenizer, words, tags, labels, max_len=128)
  for i in range(len(words)):
    word_ids = enc["word_ids"][i]
    pieces = tokenizer(words[i], is_split_into_words=True, add_special_tokens=False)["input_ids"]
    assert (enc["attention_mask"][i].sum()) == min(len(pieces) + 2, 128)
    first = np.flatnonzero((word_ids >= 0) & (word_ids != np.r_[-1, word_ids[:-1]]))
    assert enc["labels"][i][first].tolist() == [labels.index(tags[i][w]) for w in word_ids[first]]
    rest = np.setdiff1d(np.arange(128), first)
    assert (enc["labels"][i][rest] == ner.IGNORE).all()
  # Predicting the labels back gives the gold tags, word by word.
  predicted = np.where(enc["labels"] == ner.IGNORE, 0, enc["labels"])
  assert ner.word_predictions(predicted, enc["word_ids"], [len(w) for w in words], labels) == tags


def test_words_cut_off_by_max_len_are_predicted_o(tokenizer, wnut, caplog):
  labels = ner.label_list(wnut.tags)
  longest = max(range(len(wnut)), key=lambda i: len(wnut.words[i]))
  enc = ner.encode(tokenizer, [wnut.words[longest]], [wnut.tags[longest]], labels, max_len=16)
  assert "cut off by max_len=16" in caplog.text
  tags = ner.word_predictions(np.ones((1, 16), np.int32), enc["word_ids"], [len(wnut.words[longest])], labels)[0]
  n_kept = int(enc["word_ids"].max()) + 1
  assert tags[:n_kept] == [labels[1]] * n_kept and set(tags[n_kept:]) == {"O"}


def test_encode_refuses_unknown_tags_and_slow_tokenizers(tokenizer):
  with pytest.raises(TaskError, match="unknown tag"):
    ner.encode(tokenizer, [["EU"]], [["B-ORG"]], ["O", "B-PER"], 8)

  class Slow:  # transformers 5 loads fast tokenizers only; a tokenizer without word ids must still be refused
    is_fast = False

  with pytest.raises(ValueError, match="fast tokenizer"):
    ner.encode(Slow(), [["EU"]], [["O"]], ["O"], 8)


# --------------------------------------------------------------------------------------------------------
# Entity scores against seqeval (default mode = conlleval)


def _seqeval(y_true, y_pred):
  return {"precision": sq.precision_score(y_true, y_pred), "recall": sq.recall_score(y_true, y_pred),
          "f1": sq.f1_score(y_true, y_pred), "accuracy": sq.accuracy_score(y_true, y_pred)}


def _assert_same_as_seqeval(y_true, y_pred):
  ours = ner.entity_scores(y_true, y_pred)
  assert ours == pytest.approx(_seqeval(y_true, y_pred), abs=1e-12)
  report = sq.classification_report(y_true, y_pred, output_dict=True, zero_division=0)
  by_type = ner.entity_scores_by_type(y_true, y_pred)
  types = {k for k in report if not k.endswith(" avg")}
  assert set(by_type) == types
  for type_, row in by_type.items():
    assert row["precision"] == pytest.approx(report[type_]["precision"], abs=1e-12)
    assert row["recall"] == pytest.approx(report[type_]["recall"], abs=1e-12)
    assert row["f1"] == pytest.approx(report[type_]["f1-score"], abs=1e-12)
    assert row["support"] == report[type_]["support"]
  return ours


def _to_iob1(tags):
  """IOB2 -> IOB1: B- only where a chunk directly follows a chunk of the same type."""
  out, prev = [], "O"
  for tag in tags:
    if tag.startswith("B-") and not (prev != "O" and prev[2:] == tag[2:]):
      tag = "I-" + tag[2:]
    out.append(tag)
    prev = tag
  return out


def _corrupt(tag_rows, labels, rng, rate):
  """Predictions with realistic mistakes: wrong type, B/I swapped, missed and spurious tokens."""
  out = []
  for row in tag_rows:
    row = list(row)
    for i in range(len(row)):
      if rng.random() < rate:
        choice = rng.integers(4)
        if choice == 0:
          row[i] = str(rng.choice(labels))
        elif choice == 1 and row[i] != "O":
          row[i] = ("I-" if row[i][0] == "B" else "B-") + row[i][2:]
        elif choice == 2:
          row[i] = "O"
        else:
          row[i] = "I-" + str(rng.choice(labels[1:]))[2:]
    out.append(row)
  return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_equal_seqeval_on_real_wnut16_tags(wnut, seed):
  labels = ner.label_list(wnut.tags)
  rng = np.random.default_rng(seed)
  predicted = _corrupt(wnut.tags, labels, rng, rate=[0.02, 0.1, 0.3][seed])
  scores = _assert_same_as_seqeval(wnut.tags, predicted)
  assert 0 < scores["f1"] < 1
  # IOB1 versions of both: the same chunks, so the same scores, here and in seqeval.
  iob1_true, iob1_pred = [_to_iob1(r) for r in wnut.tags], [_to_iob1(r) for r in predicted]
  assert iob1_true != wnut.tags or seed  # the conversion changes tags
  assert _assert_same_as_seqeval(iob1_true, iob1_pred) == pytest.approx(
      {**scores, "accuracy": _seqeval(iob1_true, iob1_pred)["accuracy"]})


def test_scores_equal_seqeval_on_conlleval_sample(conlleval_sample):
  y_true, y_pred = conlleval_sample
  assert len(y_true) == 40
  scores = _assert_same_as_seqeval(y_true, y_pred)
  assert 0.5 < scores["f1"] < 1


@pytest.mark.filterwarnings("ignore:Precision is ill-defined")
def test_perfect_and_empty_predictions(wnut):
  assert ner.entity_scores(wnut.tags, wnut.tags) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "accuracy": 1.0}
  baseline = ner.majority_baseline(wnut.tags, wnut.tags)
  assert baseline["f1"] == 0.0 and baseline["precision"] == 0.0
  assert baseline == pytest.approx(_seqeval(wnut.tags, [["O"] * len(r) for r in wnut.tags]))


EDGE_CASES = [
    ["O", "I-PER", "I-PER", "O"],                        # IOB1: a chunk opened by I- after O
    ["B-PER", "I-LOC", "O"],                             # type change inside a chunk: two chunks
    ["I-PER", "B-PER", "I-PER"],                         # IOB1 B-: a second chunk of the same type
    ["B-PER", "B-PER"],
    ["I-PER", "I-LOC", "I-LOC", "B-LOC"],
    ["B-ORG", "I-ORG", "E-ORG", "S-PER", "I-PER"],       # IOBES end and single
    ["S-LOC", "E-LOC", "O", "E-MISC", "B-MISC", "E-PER"],
    ["O", "O", "O"],
    ["I-MISC"],
]


@pytest.mark.parametrize("tags", EDGE_CASES)
def test_chunks_equal_seqeval_on_edge_cases(tags):
  assert ner.get_entities(tags) == [tuple(e) for e in seqeval_entities(tags)]


def test_edge_cases_scored_against_each_other():
  for true in EDGE_CASES:
    for pred in EDGE_CASES:
      if len(true) == len(pred):
        _assert_same_as_seqeval([true, ["O", "B-X"]], [pred, ["I-X", "I-X"]])


def test_scores_refuse_mismatched_or_malformed_input():
  with pytest.raises(ValueError, match="1 true sentences but 2"):
    ner.entity_scores([["O"]], [["O"], ["O"]])
  with pytest.raises(ValueError, match="sentence 0: 2 true tags but 1"):
    ner.entity_scores([["O", "O"]], [["O"]])
  with pytest.raises(TaskError, match="predicted tags"):
    ner.entity_scores([["O"]], [["PER"]])
