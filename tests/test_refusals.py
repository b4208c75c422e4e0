"""Bad input to every command line: exit status 2, one line naming the problem and the fix, no traceback,
nothing compiled and an existing workdir's checkpoints byte-identical (validation.py).

The command lines run in-process (their `main(argv)` returns the exit status); each refusal must come
before anything compiles, which the `no_compile` fixture enforces.
"""
import hashlib
import json
import os
import pathlib
import re
import sys

import jax
import numpy as np
import pytest

import distilbert_jax
from distilbert_jax import checkpoint, evaluate, finetune, train, trainer, validation

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"
sys.path.insert(0, str(ROOT / "tools"))
import convert  # noqa: E402


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING) ")


def _hashes(folder: pathlib.Path) -> dict:
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workdir_with_checkpoints(tmp_path_factory) -> pathlib.Path:
  """A workdir holding two (small, hand-made) checkpoints; refusals must leave every byte as it is."""
  workdir = tmp_path_factory.mktemp("ckpts")
  ckpts = checkpoint.RunCheckpoints(workdir, async_save=False)
  for step in (3, 6):
    ckpts.save(step, {"params": {"w": np.full((4, 4), step, np.float32)}}, {"position": step}, {"model": {}})
  ckpts.close()
  (workdir / "metrics.jsonl").write_text('{"step": 3, "loss": 1.0}\n')
  return workdir


@pytest.fixture
def no_compile(monkeypatch):
  """Fails the test if a command gets as far as building the train step (the first compile)."""
  def refuse(*args, **kwargs):
    raise AssertionError("reached the compile: the bad input should have been refused before")
  monkeypatch.setattr(train, "build_step", refuse)
  monkeypatch.setattr(trainer, "state_functions", refuse)


def _assert_refused(code, capsys, phrase):
  out, err = capsys.readouterr()
  assert code == 2, out + err
  # Log records and a tokenizing progress bar (its "\r" redraws split into lines of their own, some empty) may
  # come before the refusal; the refusal is one line.
  lines = [line for line in err.strip().splitlines()
           if line.strip() and not LOG_LINE.match(line) and "preprocess ->" not in line]
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert "Traceback" not in err + out
  assert phrase in lines[0], lines[0]
  return lines[0]


# ------------------------------------------------------------------------------------------------ train

def _sources(tmp: pathlib.Path) -> dict:
  """Local corpora that cannot be trained on."""
  (tmp / "random.txt").write_bytes(np.random.default_rng(0).bytes(300_000))
  (tmp / "empty.txt").write_text("")
  (tmp / "no_txt").mkdir(exist_ok=True)
  (tmp / "no_txt" / "notes.md").write_text("not a .txt file\n")
  (tmp / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 100)
  (tmp / "small.txt").write_text("A short corpus of one document, long enough for one example of text but not "
                                 "for a whole batch of eight of them.\n")
  return {k.split(".")[0]: str(tmp / k) for k in ("random.txt", "empty.txt", "no_txt", "latin1.txt", "small.txt")}


def _corpus(name):
  return ("--config.data.demo_corpus=False", f"--config.data.sources=('{{{name}}}',)")


TRAIN_CASES = [  # (id, extra flags, phrase the one line must hold)
    ("unknown key", ("--config.train.stepz=3",), "unknown config key 'stepz' in --config.train.stepz=3: did you "
                                                 "mean --config.train.steps?"),
    ("unknown section", ("--config.trian.steps=3",), "did you mean --config.train.steps?"),
    ("not a number", ("--config.train.steps=abc",), "--config.train.steps"),
    ("steps 0", ("--config.train.steps=0",), "--config.train.steps must be > 0, got 0"),
    ("ckpt_every 0", ("--config.train.ckpt_every=0",), "--config.train.ckpt_every must be > 0"),
    ("dropout_rng", ("--config.train.dropout_rng=philox",), "--config.train.dropout_rng='philox' is not one of"),
    ("dropout_bits", ("--config.compute.dropout_bits=8",),
     "--config.compute: dropout_bits must be one of (16, 32), got 8"),
    ("remat_policy", ("--config.compute.remat_policy=foo",), "--config.compute: remat_policy must be one of"),
    ("log_every 0", ("--config.train.log_every=0",), "--config.train.log_every must be > 0"),
    ("eval_every -1", ("--config.train.eval_every=-1",), "--config.train.eval_every must be >= 0"),
    ("keep 0", ("--config.train.keep=0",), "--config.train.keep must be > 0"),
    ("plateau without a curve", ("--config.train.stop_at_plateau=0.5",),
     "--config.train.stop_at_plateau=0.5 judges the held-out curve, which is not measured: set "
     "--config.train.eval_every"),
    ("batch 0", ("--config.data.batch_size=0",), "--config.data.batch_size must be > 0"),
    ("batch vs devices", ("--config.data.batch_size=12",), "must divide by data-parallel size 8"),
    ("held-out 1.5", ("--config.data.held_out_fraction=1.5",), "--config.data.held_out_fraction must be in [0, 1)"),
    ("mlm.prob 1.5", ("--config.mlm.prob=1.5",), "--config.mlm.prob must be in (0, 1]"),
    ("mlm.prob 0", ("--config.mlm.prob=0.0",), "--config.mlm.prob must be in (0, 1]"),
    ("word split", ("--config.mlm.word_mask=0.5",), "must sum to 1"),
    ("temperature 0", ("--config.loss.temperature=0.0",), "--config.loss.temperature must be > 0"),
    ("alphas 0", ("--config.loss.alpha_ce=0.0", "--config.loss.alpha_mlm=0.0", "--config.loss.alpha_cos=0.0"),
     "every loss weight"),
    ("lr 0", ("--config.optim.lr=0.0",), "--config.optim.lr must be > 0"),
    ("lr negative", ("--config.optim.lr=-1e-4",), "--config.optim.lr must be > 0"),
    ("grad_accum 0", ("--config.optim.grad_accum=0",), "--config.optim.grad_accum must be > 0"),
    ("warmup 2", ("--config.optim.warmup_frac=2.0",), "--config.optim.warmup_frac must be in [0, 1]"),
    ("max_len 2", ("--config.data.max_len=2",), "no room for [CLS] text [SEP]"),
    ("min_len > max_len", ("--config.data.min_len=100",), "exceeds --config.data.max_len=64"),
    ("strategy", ("--config.data.strategy=packed",), "data.strategy 'packed'"),
    ("teacher strategy", ("--config.teacher_mlm.strategy=packed",), "teacher_mlm.strategy 'packed'"),
    ("teacher smoothing", ("--config.teacher_mlm.smoothing=-1.0",), "--config.teacher_mlm.smoothing must be >= 0"),
    ("mesh 3 on 8", ("--config.mesh.shape=(3,1,1)",), "--config.mesh.shape=(3, 1, 1) does not fit the 8 device"),
    ("mesh 16 on 8", ("--config.mesh.shape=(2,2,4)",), "needs 16 devices"),
    ("mesh two -1", ("--config.mesh.shape=(-1,-1,1)",), "at most one -1"),
    ("mesh rule", ("--config.mesh.rules.batch=('data','dp')",), "not mesh axes"),
    ("max_len > positions", ("--config.data.max_len=128",), "--config.data.max_len=128 exceeds the 64 positions of "
                                                            "the teacher"),
    ("layers", ("--config.student.layers=(5,)",), "--config.student.layers: layers [5] do not exist in a 2-layer "
                                                  "teacher"),
    ("random bytes", _corpus("random"), "is not UTF-8 text"),
    ("latin-1", _corpus("latin1"), "is not UTF-8 text"),
    ("empty file", _corpus("empty"), "is empty"),
    ("missing file", ("--config.data.demo_corpus=False", "--config.data.sources=('/nonexistent/corpus.txt',)"),
     "is not an existing file or folder"),
    ("folder without text", _corpus("no_txt"), "holds no *.txt files"),
    ("corpus < one batch", _corpus("small"), "fewer than one global batch of 8: lower --config.data.batch_size"),
    ("no sources", ("--config.data.demo_corpus=False",), "no training data"),
    ("missing corpus_dir", ("--config.data.corpus_dir=/nonexistent/corpus",), "does not exist"),
]


@pytest.mark.parametrize("extra, phrase", [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_refuses(extra, phrase, tiny_teacher, data_cache, test_data, workdir_with_checkpoints, tmp_path,
                       capsys, no_compile):
  sources = _sources(tmp_path)
  argv = ["train", f"--config={TINY}:{tiny_teacher}", f"--workdir={workdir_with_checkpoints}",
          f"--config.data.cache_dir={data_cache}", f"--config.data.corpus_dir={test_data / 'corpus'}"]
  argv += [a.format(**sources) for a in extra]
  before = _hashes(workdir_with_checkpoints)
  _assert_refused(train.main(argv), capsys, phrase)
  assert _hashes(workdir_with_checkpoints) == before


def test_train_refuses_unusable_workdirs(tmp_path, tiny_teacher, capsys, no_compile, monkeypatch):
  base = ["train", f"--config={TINY}:{tiny_teacher}"]
  (tmp_path / "file").write_text("a file, not a folder\n")
  _assert_refused(train.main(base + [f"--workdir={tmp_path / 'file'}"]), capsys, "is an existing file, not a folder")
  _assert_refused(train.main(base + [f"--workdir={tmp_path / 'file' / 'sub'}"]), capsys, "is a file")
  _assert_refused(train.main(base), capsys, "--workdir")  # missing
  _assert_refused(train.main(["train", f"--config={ROOT / 'configs' / 'nope.py'}", f"--workdir={tmp_path}"]),
                  capsys, "cannot load the config file")
  # Read-only: simulated, since these tests may run as root (which writes anywhere).
  (tmp_path / "ro").mkdir()
  real_access = os.access
  monkeypatch.setattr(validation.os, "access",
                      lambda p, mode: False if pathlib.Path(p) == tmp_path / "ro" else real_access(p, mode))
  _assert_refused(train.main(base + [f"--workdir={tmp_path / 'ro'}"]), capsys, "is not writable")
  _assert_refused(train.main(base + [f"--workdir={tmp_path / 'ro' / 'new'}"]), capsys, "is not writable")
  assert not (tmp_path / "ro" / "new").exists()


def test_binary_sniffing():
  assert not validation.looks_binary(ROOT / "README.md")
  assert validation.looks_binary(pathlib.Path(sys.executable).resolve())


# ------------------------------------------------------------------------------------------------ finetune

FINETUNE_CASES = [
    ("unknown key", ("--config.train.batchsize=4",), "did you mean --config.train.batch_size?"),
    ("batch 0", ("--config.train.batch_size=0",), "--config.train.batch_size must be > 0"),
    ("eval batch 0", ("--config.train.eval_batch_size=0",), "--config.train.eval_batch_size must be > 0"),
    ("batch vs devices", ("--config.train.batch_size=12",), "global batch 12 must divide by data-parallel size 8"),
    ("steps -1", ("--config.train.steps=-1",), "--config.train.steps must be >= 0"),
    ("epochs 0", ("--config.train.steps=0", "--config.train.epochs=0.0"), "--config.train.epochs must be > 0"),
    ("ckpt_every 0", ("--config.train.ckpt_every=0",), "--config.train.ckpt_every must be > 0"),
    ("dropout_rng", ("--config.train.dropout_rng=philox",), "--config.train.dropout_rng='philox' is not one of"),
    ("dropout_bits", ("--config.compute.dropout_bits=8",),
     "--config.compute: dropout_bits must be one of (16, 32), got 8"),
    ("cudnn in float32", ("--config.compute.attention=cudnn",), "--config.compute: attention='cudnn' needs bfloat16"),
    ("log_every 0", ("--config.train.log_every=0",), "--config.train.log_every must be > 0"),
    ("max_len 0", ("--config.max_len=0",), "--config.max_len must be > 0"),
    ("max_len > positions", ("--config.max_len=512",), "--config.max_len=512 exceeds the 64 positions of the model"),
    ("lr 0", ("--config.optim.lr=0.0",), "--config.optim.lr must be > 0"),
    ("alpha 1.5", ("--config.distill.alpha=1.5",), "--config.distill.alpha must be in [0, 1]"),
    ("temperature 0", ("--config.distill.temperature=0.0",), "--config.distill.temperature must be > 0"),
    ("validation fraction 1", ("--config.validation_fraction=1.0",), "--config.validation_fraction must be in (0, 1)"),
    ("mesh 3 on 8", ("--config.mesh.shape=(3,1,1)",), "does not fit the 8 device"),
    ("unknown GLUE task", ("--config.task=sst3",), "unknown GLUE task 'sst3'"),
    ("missing task file", ("--config.task=/nonexistent/train.csv",), "--config.task /nonexistent/train.csv does not "
                                                                     "exist"),
    ("binary task file", ("--config.task={random}",), "is not UTF-8 text"),
    ("empty task file", ("--config.task={empty}",), "is empty"),
    ("missing model", ("--config.model=/nonexistent/model",), "--config.model /nonexistent/model does not exist"),
    ("missing teacher", ("--config.distill.teacher=./nonexistent",), "--config.distill.teacher ./nonexistent does not"),
    ("too few examples", ("--config.train.batch_size=2048",), "make no full batch of 2048"),
]


@pytest.mark.parametrize("extra, phrase", [c[1:] for c in FINETUNE_CASES], ids=[c[0] for c in FINETUNE_CASES])
def test_finetune_refuses(extra, phrase, tiny_teacher, test_data, workdir_with_checkpoints, tmp_path, capsys,
                          no_compile):
  (tmp_path / "random.jsonl").write_bytes(np.random.default_rng(0).bytes(10_000))
  (tmp_path / "empty.csv").write_text("")
  files = {"random": tmp_path / "random.jsonl", "empty": tmp_path / "empty.csv"}
  argv = ["finetune", f"--config={ROOT / 'configs' / 'finetune.py'}", f"--workdir={workdir_with_checkpoints}",
          f"--config.model={tiny_teacher}", "--config.task=sentiment:imdb",
          f"--config.sentiment_dir={test_data / 'sentiment'}", "--config.max_len=48", "--config.train.batch_size=16",
          "--config.train.steps=2"]
  argv += [a.format(**files) for a in extra]
  before = _hashes(workdir_with_checkpoints)
  _assert_refused(finetune.main(argv), capsys, phrase)
  assert _hashes(workdir_with_checkpoints) == before


# ------------------------------------------------------------------------------------------------ evaluate

EVALUATE_CASES = [
    ("max-len 0", ("--max-len", "0"), "--max-len must be > 0"),
    ("max-len 2", ("--max-len", "2"), "no room for [CLS] text [SEP]"),
    ("max-len > positions", ("--max-len", "128"), "--max-len 128 exceeds the 64 positions of the model"),
    ("max-len not a number", ("--max-len", "abc"), "argument --max-len: invalid int value: 'abc'"),
    ("batch 0", ("--batch-size", "0"), "--batch-size must be > 0"),
    ("max-batches 0", ("--max-batches", "0"), "--max-batches must be > 0"),
    ("step -1", ("--step", "-1"), "--step must be >= 0"),
    ("missing model", ("--model", "/nonexistent/model"), "--model /nonexistent/model does not exist"),
    ("missing teacher", ("--teacher", "/nonexistent/teacher"), "--teacher /nonexistent/teacher does not exist"),
    ("missing tokenizer", ("--tokenizer", "/nonexistent/tok"), "--tokenizer /nonexistent/tok does not exist"),
    ("binary data", ("--data", "{random}"), "is not UTF-8 text"),
    ("empty data", ("--data", "{empty}"), "is empty"),
    ("missing data", ("--data", "/nonexistent.txt"), "is not an existing file or folder"),
    ("folder without text", ("--data", "{no_txt}"), "holds no *.txt files"),
    ("too little text", ("--data", "{small}"), "no evaluation examples"),
    ("json is a folder", ("--json", "{folder}"), "is a folder: give a file path"),
    ("cache-dir is a file", ("--cache-dir", "{empty}"), "--cache-dir"),
]


@pytest.mark.parametrize("extra, phrase", [c[1:] for c in EVALUATE_CASES], ids=[c[0] for c in EVALUATE_CASES])
def test_evaluate_refuses(extra, phrase, tiny_teacher, test_data, tmp_path, capsys, no_compile):
  files = _sources(tmp_path)
  (tmp_path / "small.txt").write_text("Too short.\n")
  files["folder"] = str(tmp_path)
  text = sorted((test_data / "corpus" / "sotu").glob("*.txt"))[-1]
  args = {"--model": str(tiny_teacher), "--data": str(text), "--max-len": "64", "--cache-dir": str(tmp_path / "c")}
  args.update({extra[0]: extra[1].format(**files)})
  argv = [x for kv in args.items() for x in kv]
  _assert_refused(evaluate.main(argv), capsys, phrase)


def test_evaluate_refuses_missing_arguments(capsys):
  _assert_refused(evaluate.main(["--model", "m"]), capsys, "the following arguments are required: --data")


# ------------------------------------------------------------------------------------------------ convert

CONVERT_CASES = [
    ("missing src", ("hf2jax", "--src", "/nonexistent/hf", "--dst", "{out}"), "--src /nonexistent/hf does not exist"),
    ("src not a model", ("hf2jax", "--src", "{folder}", "--dst", "{out}"), "has no config.json"),
    ("dtype", ("hf2jax", "--src", "{teacher}", "--dst", "{out}", "--dtype", "float13"), "--dtype 'float13'"),
    ("dst is src", ("hf2jax", "--src", "{teacher}", "--dst", "{teacher}", "--overwrite"), "is --src"),
    ("dst is a file", ("hf2jax", "--src", "{teacher}", "--dst", "{file}"), "is an existing file"),
    ("dst not empty", ("hf2jax", "--src", "{teacher}", "--dst", "{workdir}"), "exists and is not empty"),
    ("architecture", ("jax2hf", "--src", "{workdir}", "--dst", "{out}", "--architecture", "GPT2LMHeadModel"),
     "--architecture 'GPT2LMHeadModel': use one of"),
    ("step -1", ("jax2hf", "--src", "{workdir}", "--dst", "{out}", "--step", "-1"), "--step must be >= 0"),
    ("step missing", ("jax2hf", "--src", "{workdir}", "--dst", "{out}", "--step", "5"), "no checkpoint of step 5"),
    ("tokenizer", ("jax2hf", "--src", "{workdir}", "--dst", "{out}", "--tokenizer", "/nonexistent/tok"),
     "--tokenizer /nonexistent/tok does not exist"),
    ("jax src not a model", ("jax2hf", "--src", "{folder}", "--dst", "{out}"), "is not a converted model"),
    ("no command", ("--src", "{teacher}"), "invalid choice"),
    ("unknown command", ("tf2jax", "--src", "{teacher}", "--dst", "{out}"), "invalid choice: 'tf2jax'"),
    ("missing dst", ("hf2jax", "--src", "{teacher}"), "the following arguments are required: --dst"),
]


@pytest.mark.parametrize("argv", [c[1] for c in CONVERT_CASES], ids=[c[0] for c in CONVERT_CASES])
def test_convert_refuses(argv, tiny_teacher, workdir_with_checkpoints, tmp_path, capsys, no_compile):
  phrase = {c[1]: c[2] for c in CONVERT_CASES}[argv]
  (tmp_path / "file").write_text("x\n")
  (tmp_path / "folder").mkdir()
  names = dict(out=tmp_path / "out", folder=tmp_path / "folder", file=tmp_path / "file", teacher=tiny_teacher,
               workdir=workdir_with_checkpoints)
  before, teacher_before = _hashes(workdir_with_checkpoints), _hashes(tiny_teacher)
  _assert_refused(convert.main([a.format(**names) for a in argv]), capsys, phrase)
  assert _hashes(workdir_with_checkpoints) == before and _hashes(tiny_teacher) == teacher_before
  assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ aot

AOT_CASES = [
    ("unknown key", ("--config.train.bach=3",), "unknown config key 'bach'"),
    ("topology", ("--topology=v9-8",), "unknown TPU topology 'v9-8'"),
    ("no topology", ("--topology=",), "topology"),
    ("batch 0", ("--batch=0",), "--batch must be > 0"),
    ("seq 0", ("--seq=0",), "--seq must be > 0"),
    ("seq > positions", ("--seq=128",), "--seq=128 exceeds the 64 positions of the teacher"),
    ("max_len > positions", ("--config.data.max_len=128",), "--config.data.max_len=128 exceeds the 64 positions"),
    ("steps 0", ("--config.train.steps=0",), "--config.train.steps must be > 0"),
    ("temperature 0", ("--config.loss.temperature=0.0",), "--config.loss.temperature must be > 0"),
    ("lr 0", ("--config.optim.lr=0.0",), "--config.optim.lr must be > 0"),
    ("mlm.prob 1.5", ("--config.mlm.prob=1.5",), "--config.mlm.prob must be in (0, 1]"),
    ("batch_size 0", ("--config.data.batch_size=0",), "--config.data.batch_size must be > 0"),
    ("layers", ("--config.student.layers=(5,)",), "layers [5] do not exist in a 2-layer teacher"),
    ("mesh rule", ("--config.mesh.rules.batch=('data','dp')",), "not mesh axes"),
    ("missing teacher", ("--config.teacher=/nonexistent/teacher",), "is neither a local folder nor a known hub model"),
]


@pytest.mark.parametrize("extra, phrase", [c[1:] for c in AOT_CASES], ids=[c[0] for c in AOT_CASES])
def test_aot_refuses(extra, phrase, tiny_teacher, capsys, no_compile, monkeypatch):
  from distilbert_jax import aot
  monkeypatch.setattr(aot, "compile_only_process", lambda: pytest.fail("got past validation to the compiler"))
  argv = ["aot", f"--config={TINY}:{tiny_teacher}", "--topology=v5e-8", *extra]
  _assert_refused(aot.main(argv), capsys, phrase)


def test_unexpected_errors_keep_their_traceback(tiny_teacher, data_cache, test_data, tmp_path, monkeypatch):
  """A bug is not bad input: it propagates (the interpreter prints its traceback, exit status 1)."""
  def bug(config):
    raise RuntimeError("a bug in the code")
  monkeypatch.setattr(train, "build_models", bug)
  with pytest.raises(RuntimeError, match="a bug in the code"):
    train.main(["train", f"--config={TINY}:{tiny_teacher}", f"--workdir={tmp_path}",
                f"--config.data.cache_dir={data_cache}", f"--config.data.corpus_dir={test_data / 'corpus'}"])


def test_train_refuses_a_workdir_of_another_model(tiny_teacher, data_cache, test_data, workdir_with_checkpoints,
                                                 capsys):
  """Refused once the student is known (after set-up): one line, the checkpoint manager closed quietly, every
  byte of the workdir as it was."""
  before = _hashes(workdir_with_checkpoints)
  argv = ["train", f"--config={TINY}:{tiny_teacher}", f"--workdir={workdir_with_checkpoints}",
          f"--config.data.cache_dir={data_cache}", f"--config.data.corpus_dir={test_data / 'corpus'}"]
  _assert_refused(train.main(argv), capsys, "holds checkpoints of another model")
  assert _hashes(workdir_with_checkpoints) == before


# ------------------------------------------------------------------------------------------------ families

def _flaubert_folder(folder: pathlib.Path, cls_name="FlaubertWithLMHeadModel", config_json=None,
                     **cfg_kw) -> pathlib.Path:
  """A tiny FlauBERT (or XLM) checkpoint with one option this encoder cannot honour, set on the config or, where
  transformers cannot build such a model, written into config.json (`config_json`)."""
  import json
  import transformers
  make_cfg = transformers.XLMConfig if cls_name.startswith("XLM") else transformers.FlaubertConfig
  cfg = make_cfg(emb_dim=16, n_layers=1, n_heads=2, vocab_size=40, max_position_embeddings=16, **cfg_kw)
  getattr(transformers, cls_name)(cfg).save_pretrained(str(folder))
  if config_json:
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, **config_json}))
  return folder


FAMILY_CASES = [  # (id, checkpoint options, phrase of the one line)
    ("sinusoidal positions", dict(sinusoidal_embeddings=True), "sinusoidal_embeddings=True is not supported: only "
                                                               "learned position embeddings"),
    ("causal", dict(causal=True), "causal=True is not supported"),
    # transformers 5.25 cannot build an adaptive-softmax FlauBERT (it lacks asm_div_value): config.json says it.
    ("adaptive softmax", dict(config_json={"asm": True}), "asm=True is not supported"),
    ("XLM architecture", dict(cls_name="XLMWithLMHeadModel"), "holds XLMWithLMHeadModel, which is not supported"),
]


@pytest.mark.parametrize("options, phrase", [c[1:] for c in FAMILY_CASES], ids=[c[0] for c in FAMILY_CASES])
def test_convert_refuses_family_options(options, phrase, tmp_path, capsys, no_compile):
  src = _flaubert_folder(tmp_path / "src", **options)
  capsys.readouterr()  # transformers' progress bar while saving
  _assert_refused(convert.main(["hf2jax", "--src", str(src), "--dst", str(tmp_path / "out")]), capsys, phrase)
  assert not (tmp_path / "out").exists()


def test_train_refuses_several_languages_without_language_ids(tmp_path, data_cache, test_data, capsys, no_compile):
  teacher = _flaubert_folder(tmp_path / "teacher", n_langs=2, use_lang_emb=True)
  capsys.readouterr()
  argv = ["train", f"--config={TINY}:{teacher}", f"--workdir={tmp_path / 'run'}", f"--config.data.cache_dir={data_cache}",
          f"--config.data.corpus_dir={test_data / 'corpus'}", "--config.data.max_len=16"]
  _assert_refused(train.main(argv), capsys, "the teacher has 2 language embeddings, which need a language id per token")
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_finetune_refuses_a_classifier_it_cannot_export(tiny_roberta_teacher, test_data, tmp_path, capsys, no_compile):
  argv = ["finetune", f"--config={ROOT / 'configs' / 'finetune.py'}", f"--workdir={tmp_path}",
          f"--config.model={tiny_roberta_teacher}", "--config.task=sentiment:imdb",
          f"--config.sentiment_dir={test_data / 'sentiment'}", "--config.max_len=48", "--config.train.batch_size=16"]
  _assert_refused(finetune.main(argv), capsys, "is a roberta model, whose sequence head cannot be exported yet")


# ------------------------------------------------------------------------------------------------ finetune: QA, NER

def _task_files(tmp: pathlib.Path, squad: pathlib.Path) -> dict:
  """Bad QA and NER files, made from the real samples."""
  doc = json.loads(squad.read_text())
  moved = json.loads(json.dumps(doc))
  moved["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] += 3  # offset disagrees with the text
  (tmp / "moved.json").write_text(json.dumps(moved))
  absent = json.loads(json.dumps(doc))
  absent["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["text"] = "words that are nowhere in the context"
  (tmp / "absent.json").write_text(json.dumps(absent))
  (tmp / "no_answers.json").write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [
      {"id": "1", "question": "q"}]}]}]}))
  (tmp / "empty.conll").write_text("")
  (tmp / "badtag.conll").write_text("Obama\tPERSON\nspoke\tO\n\n")
  (tmp / "tags.conll").write_text("Obama\tB-PER\nspoke\tO\n\nin\tO\nParis\tB-LOC\n\n" * 20)
  return {"moved": tmp / "moved.json", "absent": tmp / "absent.json", "no_answers": tmp / "no_answers.json",
          "empty": tmp / "empty.conll", "badtag": tmp / "badtag.conll", "tags": tmp / "tags.conll"}


TASK_CASES = [  # (id, head, task, extra flags, phrase)
    ("answer offset moved", "span", "{moved}", (), "is not at its answer_start"),
    ("answer not in context", "span", "{absent}", (), "is not at its answer_start"),
    ("question without answers field", "span", "{no_answers}", (), "answers"),
    ("doc_stride >= max_len", "span", "{squad}", ("--config.qa.doc_stride=48",), "--config.qa.doc_stride (48) must be "
                                                                                   "below --config.max_len (48)"),
    ("n_best 0", "span", "{squad}", ("--config.qa.n_best=0",), "--config.qa.n_best must be > 0"),
    ("max_answer_len 0", "span", "{squad}", ("--config.qa.max_answer_len=0",), "--config.qa.max_answer_len must be > 0"),
    ("unknown QA sample", "span", "qa-sample:sqaud", (), "unknown QA sample 'sqaud'"),
    ("missing SQuAD file", "span", "/nonexistent/train.json", (), "--config.task /nonexistent/train.json does not exist"),
    ("empty CoNLL file", "token", "{empty}", (), "is empty"),
    ("malformed tag", "token", "{badtag}", (), "are not O, B-TYPE, I-TYPE, E-TYPE or S-TYPE"),
    ("unknown tag name", "token", "{tags}", ("--config.label_names=('O','B-PER','I-PER')",), "unknown tag(s) ['B-LOC']"),
    ("missing validation file", "token", "{tags}", ("--config.validation_file=/nonexistent/dev.conll",),
     "--config.validation_file /nonexistent/dev.conll does not exist"),
    ("unknown head", "tokens", "{tags}", (), "--config.task_head='tokens' is not a task head"),
    ("max_train_examples -1", "token", "{tags}", ("--config.max_train_examples=-1",),
     "--config.max_train_examples must be >= 0"),
    ("teacher for another task", "token", "{tags}", ("--config.distill.teacher={span_teacher}",),
     "has a question-answering (span) head but the task needs a token-classification head"),
    ("checkpoint of another head", "token", "{tags}", ("--config.model={span_teacher}",), "replace_head=True"),
]


@pytest.fixture(scope="module")
def span_teacher(tmp_path_factory, tiny_teacher) -> pathlib.Path:
  """A Hugging Face BertForQuestionAnswering folder (random), as a fine-tuned QA teacher would be."""
  model, params = distilbert_jax.load_hf(tiny_teacher)
  cfg = model.cfg.replace(task_head="span", num_labels=2, use_pooler=False)
  qa_model = distilbert_jax.Encoder(cfg)
  folder = tmp_path_factory.mktemp("span_teacher")
  distilbert_jax.save_hf(qa_model, distilbert_jax.init_params(qa_model, jax.random.key(1)), folder, tokenizer=tiny_teacher)
  return folder


@pytest.mark.parametrize("head, task, extra, phrase", [c[1:] for c in TASK_CASES], ids=[c[0] for c in TASK_CASES])
def test_finetune_refuses_bad_qa_and_ner_input(head, task, extra, phrase, tiny_teacher, task_samples, span_teacher,
                                               workdir_with_checkpoints, tmp_path, capsys, no_compile):
  files = {k: str(v) for k, v in _task_files(tmp_path, task_samples["squad"]).items()}
  files.update(squad=str(task_samples["squad"]), span_teacher=str(span_teacher))
  argv = ["finetune", f"--config={ROOT / 'configs' / 'finetune.py'}", f"--workdir={workdir_with_checkpoints}",
          f"--config.model={tiny_teacher}", f"--config.task={task.format(**files)}", f"--config.task_head={head}",
          "--config.max_len=48", "--config.qa.doc_stride=16", "--config.train.batch_size=8", "--config.train.steps=2",
          f"--config.sample_dir={task_samples['squad'].parent}"]
  argv += [a.format(**files) for a in extra]
  before = _hashes(workdir_with_checkpoints)
  capsys.readouterr()
  _assert_refused(finetune.main(argv), capsys, phrase)
  assert _hashes(workdir_with_checkpoints) == before
