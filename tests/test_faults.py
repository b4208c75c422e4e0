"""Faults during a run: damaged checkpoints, a full disk while saving, SIGTERM at any moment.

Every case ends like an undamaged, uninterrupted run: the same losses and bit-identical final parameters
(resuming from an older checkpoint repeats the same data, masks and dropout).
"""
import asyncio
import errno
import gc
import json
import logging
import os
import pathlib
import shutil
import signal
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from distilbert_jax import checkpoint, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
import tiny  # noqa: E402


def _config(tiny_teacher, data_cache, test_data):
  c = tiny.get_config(str(tiny_teacher))
  c.data.cache_dir, c.data.corpus_dir = str(data_cache), str(test_data / "corpus")
  c.train.update(steps=6, ckpt_every=3, log_every=1)  # checkpoints 3 and 6
  return c


def _losses(workdir):
  return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _params(workdir):
  return jax.tree.leaves(jax.device_get(checkpoint.load_model(workdir / "final")[1]))


def _steps(workdir) -> list[int]:
  ckpts = checkpoint.RunCheckpoints(workdir)
  try:
    return list(ckpts.manager.all_steps())
  finally:
    ckpts.close()


def _assert_same_run(workdir, reference):
  assert _losses(workdir) == _losses(reference)
  for a, b in zip(_params(workdir), _params(reference)):
    assert np.array_equal(a, b)
  assert json.loads((workdir / "summary.json").read_text())["step"] == 6


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_teacher, data_cache, test_data):
  workdir = tmp_path_factory.mktemp("reference")
  train.run(_config(tiny_teacher, data_cache, test_data), workdir)
  assert _steps(workdir) == [3, 6]
  return workdir


def _copy_unfinished(reference, workdir):
  """The reference run as it was after its last checkpoint, before the export."""
  shutil.copytree(reference, workdir)
  for name in ("final", "export", "summary.json"):
    path = workdir / name
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


def _damage(path: pathlib.Path, how: str):
  if how == "truncated":
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  elif how == "random bytes":
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
  else:
    path.unlink()


# ------------------------------------------------------------------------------------------------ damage

@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "random bytes", "deleted"])
def test_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_previous(
    how, reference, tmp_path, tiny_teacher, data_cache, test_data, caplog):
  workdir = tmp_path / "w"
  _copy_unfinished(reference, workdir)
  ckpt_dir = workdir / "checkpoints"
  (ckpt_dir / "6.damaged").mkdir()  # an earlier casualty: moving aside must not clash with it
  victim = _largest_array_file(ckpt_dir / "6")
  _damage(victim, how)
  damaged_bytes = victim.read_bytes() if victim.exists() else None
  with caplog.at_level(logging.WARNING, logger="distilbert_jax"):
    summary = train.run(_config(tiny_teacher, data_cache, test_data), workdir)
  assert summary["step"] == 6
  warnings = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
  assert len(warnings) == 1 and "checkpoint 6" in warnings[0] and "6.damaged-2" in warnings[0], warnings
  aside = ckpt_dir / "6.damaged-2" / victim.relative_to(ckpt_dir / "6")
  assert (aside.read_bytes() == damaged_bytes) if damaged_bytes is not None else not aside.exists()
  assert _steps(workdir) == [3, 6]  # 6 saved again, intact
  _assert_same_run(workdir, reference)


@pytest.mark.slow
def test_no_readable_checkpoint_is_one_line_and_nothing_moves(reference, tmp_path, tiny_teacher, data_cache,
                                                              test_data, capsys):
  workdir = tmp_path / "w"
  _copy_unfinished(reference, workdir)
  for step in (3, 6):
    _damage(_largest_array_file(workdir / "checkpoints" / str(step)), "random bytes")
  argv = ["train", f"--config={ROOT / 'configs' / 'tiny.py'}:{tiny_teacher}", f"--workdir={workdir}",
          f"--config.data.cache_dir={data_cache}", f"--config.data.corpus_dir={test_data / 'corpus'}",
          "--config.train.steps=6", "--config.train.ckpt_every=3", "--config.train.log_every=1"]
  assert train.main(argv) == 2
  gc.collect()  # Orbax's other failed reads of the damaged files, logged by asyncio when collected
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "no checkpoint in" in lines[0] and "can be read" in lines[0], err
  assert "another --workdir" in lines[0] and "Traceback" not in err
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]


def _w(step):
  return np.random.default_rng(step).normal(size=(65536,)).astype(np.float32)


def _small_checkpoints(workdir, steps=(3, 6)):
  """Hand-made checkpoints of a small state (no training); `_w(step)` is the state of each (random values,
  which do not compress: the array file is the largest)."""
  ckpts = checkpoint.RunCheckpoints(workdir, async_save=False)
  for step in steps:
    ckpts.save(step, {"w": _w(step)}, {"position": step}, {"model": {}})
  ckpts.close()


def _restore_small(workdir):
  ckpts = checkpoint.RunCheckpoints(workdir)
  try:
    abstract = {"w": jax.ShapeDtypeStruct((65536,), np.float32)}
    step, state, data_state, _ = ckpts.restore(abstract)
  finally:
    ckpts.close()
  return step, np.asarray(state["w"]), data_state


def test_an_interrupted_save_is_never_taken_for_a_checkpoint(tmp_path):
  """Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete: a run killed
  before the rename leaves such a folder, which the manager ignores (and later removes)."""
  _small_checkpoints(tmp_path)
  partial = tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1733300000000000"
  shutil.copytree(tmp_path / "checkpoints" / "6", partial)
  step, w, data_state = _restore_small(tmp_path)
  assert step == 6 and np.array_equal(w, _w(6)) and data_state == {"position": 6}


@pytest.mark.parametrize("how", ["truncated", "random bytes", "deleted"])
def test_restore_moves_a_damaged_step_aside_and_takes_the_previous(how, tmp_path, caplog):
  _small_checkpoints(tmp_path)
  _damage(_largest_array_file(tmp_path / "checkpoints" / "6"), how)
  with caplog.at_level(logging.WARNING, logger="distilbert_jax"):
    step, w, data_state = _restore_small(tmp_path)
  assert step == 3 and np.array_equal(w, _w(3)) and data_state == {"position": 3}
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "6.damaged"]
  assert any("checkpoint 6 could not be read" in r.getMessage() for r in caplog.records)


def test_restore_with_nothing_readable_moves_nothing(tmp_path):
  _small_checkpoints(tmp_path)
  for step in (3, 6):
    _damage(_largest_array_file(tmp_path / "checkpoints" / str(step)), "random bytes")
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in .* can be read .*another --workdir"):
    _restore_small(tmp_path)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "6"]


def _abandoned_failed_read(path: pathlib.Path):
  """What Orbax leaves behind when one of its parallel reads fails: another read that failed too (the error
  names the file, as TensorStore's does) in a task nobody awaits, garbage-collected some time later."""
  async def read():
    raise ValueError(f'Error reading "x/0.0" in OCDBT database at local file "{path}/state/"')

  loop = asyncio.new_event_loop()
  task = loop.create_task(read())
  loop.run_until_complete(asyncio.sleep(0))
  loop.close()
  del task
  gc.collect()


def test_the_other_failed_reads_of_a_damaged_step_do_not_log_tracebacks_later(tmp_path, caplog):
  _small_checkpoints(tmp_path)
  _damage(_largest_array_file(tmp_path / "checkpoints" / "6"), "random bytes")
  _restore_small(tmp_path)
  caplog.clear()
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    _abandoned_failed_read(tmp_path / "checkpoints" / "6")  # the step reported in one line: quiet
    assert not caplog.records, caplog.text
    _abandoned_failed_read(tmp_path / "checkpoints" / "3")  # a step that read: a real error, kept
    assert [r.getMessage().splitlines()[0] for r in caplog.records] == ["Task exception was never retrieved"]


def test_moving_aside_never_clashes(tmp_path):
  (tmp_path / "6.damaged").mkdir()
  (tmp_path / "6.damaged-2").mkdir()
  assert checkpoint.free_path(tmp_path / "6.damaged") == tmp_path / "6.damaged-3"
  assert checkpoint.free_path(tmp_path / "7.damaged") == tmp_path / "7.damaged"


# ------------------------------------------------------------------------------------------------ disk full

@pytest.mark.slow
def test_disk_full_while_saving_is_one_line_and_the_previous_checkpoint_restores(
    reference, tmp_path, tiny_teacher, data_cache, test_data, capsys, monkeypatch):
  workdir = tmp_path / "w"
  write = ocp.JsonCheckpointHandler._save_fn

  async def disk_full_at_step_6(self, x, directory):
    if pathlib.Path(directory).parent.name.startswith("6."):  # <workdir>/checkpoints/6.orbax-checkpoint-tmp-*/...
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return await write(self, x, directory)

  argv = ["train", f"--config={ROOT / 'configs' / 'tiny.py'}:{tiny_teacher}", f"--workdir={workdir}",
          f"--config.data.cache_dir={data_cache}", f"--config.data.corpus_dir={test_data / 'corpus'}",
          "--config.train.steps=6", "--config.train.ckpt_every=3", "--config.train.log_every=1"]
  with monkeypatch.context() as m:
    m.setattr(ocp.JsonCheckpointHandler, "_save_fn", disk_full_at_step_6)
    assert train.main(argv) == 2
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "no space left on the device" in lines[0] and "free disk space" in lines[0], err
  assert "Traceback" not in err
  assert _steps(workdir) == [3]
  assert not (workdir / "final").exists()
  train.run(_config(tiny_teacher, data_cache, test_data), workdir)  # space again: resumes from step 3
  _assert_same_run(workdir, reference)


# ------------------------------------------------------------------------------------------------ SIGTERM

def _sigterm_before(module, name, monkeypatch):
  """Sends this process a SIGTERM as `module.name` starts (once)."""
  original = getattr(module, name)

  def wrapped(*args, **kwargs):
    monkeypatch.setattr(module, name, original)
    os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

  monkeypatch.setattr(module, name, wrapped)


@pytest.mark.slow
@pytest.mark.parametrize("stage, module, name", [
    ("setup", train, "prepare_data"),
    ("evaluation", train, "_evaluate"),
    ("export", checkpoint, "save_model"),
])
def test_sigterm_at_any_moment_stops_cleanly_and_a_rerun_finishes(stage, module, name, reference, tmp_path,
                                                                  tiny_teacher, data_cache, test_data, monkeypatch):
  workdir = tmp_path / "w"
  config = _config(tiny_teacher, data_cache, test_data)
  previous = signal.getsignal(signal.SIGTERM)
  with monkeypatch.context() as m:
    _sigterm_before(module, name, m)
    stopped = train.run(config, workdir)
  assert signal.getsignal(signal.SIGTERM) is previous  # the handler is given back
  assert stopped["preempted"] and stopped["stage"] == stage, stopped
  assert not (workdir / "summary.json").exists()
  if stage == "setup":
    assert not (workdir / "checkpoints").exists()
  else:
    assert _steps(workdir) == [3, 6]
  train.run(config, workdir)
  _assert_same_run(workdir, reference)


def test_replaced_checkpoints_move_aside_without_clashing(tmp_path):
  import distilbert_jax
  ckpts = checkpoint.RunCheckpoints(tmp_path, async_save=False)
  ckpts.save(6, {"w": np.ones(2, np.float32)}, {}, {"model": distilbert_jax.EncoderConfig.bert().to_dict()})
  ckpts.close()
  (tmp_path / "checkpoints.replaced-6").mkdir()  # a folder from an earlier replacement
  ckpts = checkpoint.RunCheckpoints(tmp_path, async_save=False)
  try:
    ckpts.check_model(distilbert_jax.EncoderConfig.bert(num_layers=1).to_dict(), allow_change=True)
    assert ckpts.latest_step() is None
  finally:
    ckpts.close()
  assert (tmp_path / "checkpoints.replaced-6-2" / "6").is_dir()
  assert not any((tmp_path / "checkpoints.replaced-6").iterdir())
