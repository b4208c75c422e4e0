"""Several processes: distributed settings, the local launcher, and a 2-process run against a 1-process run."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from distilbert_jax import checkpoint, distributed, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
sys.path.insert(0, str(ROOT / "tools"))
import tiny  # noqa: E402

ENV3 = {"DISTILBERT_JAX_COORDINATOR": "localhost:1234", "DISTILBERT_JAX_NUM_PROCESSES": "3",
        "DISTILBERT_JAX_PROCESS_ID": "2"}


# ------------------------------------------------------------------------------------------------ settings

def test_one_process_unless_asked():
  assert distributed.resolve(None, {}) is None
  assert distributed.resolve(distributed.default_config(), {"DISTILBERT_JAX_LOCAL_DEVICE_IDS": "0"}) is None
  assert distributed.resolve(dict(mode="off"), ENV3) is None
  assert distributed.resolve(dict(num_processes=1, process_id=0, coordinator_address="h:1"), {}) is None
  assert distributed.initialize(None, {}) is False and not jax.distributed.is_initialized()


def test_settings_from_the_environment_and_the_config():
  s = distributed.resolve(None, dict(ENV3, DISTILBERT_JAX_LOCAL_DEVICE_IDS="0, 1"))
  assert s == distributed.Settings("localhost:1234", 3, 2, (0, 1))
  # The config wins over the environment, key by key.
  s = distributed.resolve(dict(process_id=0, coordinator_address="10.0.0.2:99", local_device_ids=(3,)), ENV3)
  assert s == distributed.Settings("10.0.0.2:99", 3, 0, (3,))
  # "on" passes what it has; JAX detects the rest (or says what it lacks).
  assert distributed.resolve(dict(mode="on"), {}) == distributed.Settings(None, None, None, None)


@pytest.mark.parametrize("config,env,match", [
    (dict(process_id=3), ENV3, "process_id 3 is not below num_processes 3"),
    ({}, dict(ENV3, DISTILBERT_JAX_COORDINATOR="localhost"), "needs a port"),
    ({}, {"DISTILBERT_JAX_NUM_PROCESSES": "2"}, r"needs coordinator_address .*, process_id"),
    ({}, {"DISTILBERT_JAX_PROCESS_ID": "1", "DISTILBERT_JAX_COORDINATOR": "h:1"}, r"needs num_processes"),
    ({}, {"DISTILBERT_JAX_NUM_PROCESSES": "two"}, "not an integer"),
    ({}, {"DISTILBERT_JAX_NUM_PROCESSES": "0"}, "at least 1"),
    ({}, dict(ENV3, DISTILBERT_JAX_LOCAL_DEVICE_IDS="a"), "device ids"),
    (dict(mode="yes"), {}, "use one of"),
])
def test_inconsistent_settings_are_refused(config, env, match):
  with pytest.raises(distributed.DistributedConfigError, match=match):
    distributed.resolve(config, env)


def test_cli_refuses_a_half_configured_run(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", DISTILBERT_JAX_NUM_PROCESSES="2")
  done = subprocess.run([sys.executable, "-m", "distilbert_jax.train", f"--config={ROOT / 'configs' / 'tiny.py'}",
                         f"--workdir={tmp_path}"], env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2, done.stdout + done.stderr
  assert "error: a multi-process run needs coordinator_address" in done.stderr
  assert not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------ launcher

def _launch(tmp_path, *command, timeout=600, processes=2):
  """Runs tools/launch_local.py in its own session (killed whole on a timeout): (exit status, output)."""
  cmd = [sys.executable, str(ROOT / "tools" / "launch_local.py"), "-n", str(processes), "--devices-per-process",
         "4", "--timeout", str(timeout), "--", *map(str, command)]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=timeout + 60)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every process it started
    out, _ = proc.communicate()
    pytest.fail(f"launch_local did not finish in {timeout + 60} s:\n{out[-20000:]}")
  return proc.returncode, out


def test_processes_share_one_mesh(tmp_path):
  """2 processes x 4 CPU devices: 8 global devices, each process's rows land in its part of a global batch."""
  script = tmp_path / "probe.py"
  script.write_text(textwrap.dedent(f"""
      import json, sys
      import jax, numpy as np
      from distilbert_jax import distributed, sharding
      assert distributed.initialize()
      mesh = sharding.make_mesh((1, 4, 2))
      rows = np.arange(4 * 3).reshape(4, 3) + 100 * jax.process_index()
      x = sharding.global_batch({{"x": rows}}, mesh)["x"]
      out = dict(index=jax.process_index(), count=jax.process_count(), devices=jax.device_count(),
                 local=jax.local_device_count(), gathered=sharding.to_host(x).tolist(),
                 total=float(jax.jit(lambda v: v.sum())(x)))
      open(r"{tmp_path}/p%d.json" % jax.process_index(), "w").write(json.dumps(out))
      """))
  code, out = _launch(tmp_path, script, timeout=300)
  assert code == 0, out
  expected = np.concatenate([np.arange(12).reshape(4, 3), np.arange(12).reshape(4, 3) + 100])
  for i in range(2):
    got = json.loads((tmp_path / f"p{i}.json").read_text())
    assert (got["index"], got["count"], got["devices"], got["local"]) == (i, 2, 8, 4)
    assert np.array_equal(got["gathered"], expected)  # process 0's rows first, then process 1's
    assert got["total"] == expected.sum()


def test_launcher_stops_the_others_when_one_fails(tmp_path):
  """Process 1 dies; process 0 waits for it at a barrier: the launcher must stop it and report 3."""
  script = tmp_path / "fail.py"
  script.write_text(textwrap.dedent("""
      import os
      import jax
      from jax.experimental import multihost_utils
      from distilbert_jax import distributed
      distributed.initialize()
      if jax.process_index() == 1:
        os._exit(3)  # at once: a normal exit would first wait for the others in jax.distributed's shutdown
      multihost_utils.sync_global_devices("never reached by process 1")
      """))
  code, out = _launch(tmp_path, script, timeout=240)
  assert code == 3, out
  assert "a process exited with 3; stopping the others" in out


# ------------------------------------------------------------------------------------------------ training

def _config(teacher, data_cache, test_data, steps):
  c = tiny.get_config(str(teacher))
  c.data.cache_dir, c.data.corpus_dir = str(data_cache), str(test_data / "corpus")
  c.mesh.shape = (1, 4, 2)  # FSDP over 4 devices, which span both processes; tensor parallel over 2
  c.train.update(steps=steps, ckpt_every=2, log_every=1)
  return c


def _overrides(c) -> list[str]:
  return [f"--config.data.cache_dir={c.data.cache_dir}", f"--config.data.corpus_dir={c.data.corpus_dir}",
          "--config.mesh.shape=(1,4,2)", f"--config.train.steps={c.train.steps}", "--config.train.ckpt_every=2",
          "--config.train.log_every=1"]


def _lines(workdir):
  return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_train_resume_and_match_one_process(tmp_path, tiny_teacher, data_cache, test_data):
  """4 steps, a checkpoint, then a resume to 6 steps: 2 processes x 4 CPU devices against 1 process x 8 devices
  (this pytest process), same (1, 4, 2) mesh. Per-step losses and final parameters agree to 1e-5."""
  assert jax.device_count() == 8 and jax.process_count() == 1
  single, multi = tmp_path / "single", tmp_path / "multi"
  for steps in (4, 6):
    train.run(_config(tiny_teacher, data_cache, test_data, steps), single)
  for steps in (4, 6):
    c = _config(tiny_teacher, data_cache, test_data, steps)
    code, out = _launch(tmp_path, "-m", "distilbert_jax.train", f"--config={ROOT / 'configs' / 'tiny.py'}:{tiny_teacher}",
                        f"--workdir={multi}", *_overrides(c), timeout=900)
    assert code == 0, out
    assert checkpoint.RunCheckpoints(multi).latest_step() == steps, out
    if steps == 6:  # both processes restored their shards of step 4 from the checkpoint
      for i in range(2):
        assert any(line.startswith(f"[p{i}]") and "resumed from step 4" in line for line in out.splitlines()), out

  ref, got = _lines(single), _lines(multi)
  assert [x["step"] for x in got] == list(range(1, 7))  # process 0 alone writes, each step once
  np.testing.assert_allclose([x["loss"] for x in got], [x["loss"] for x in ref], rtol=1e-5)
  ref_params = jax.device_get(checkpoint.load_model(single / "final")[1])
  got_params = jax.device_get(checkpoint.load_model(multi / "final")[1])
  assert jax.tree.structure(ref_params) == jax.tree.structure(got_params)
  for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  initial = train.build_models(_config(tiny_teacher, data_cache, test_data, 6))[3]
  assert not any(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(initial)))
  s_ref = json.loads((single / "summary.json").read_text())
  s_got = json.loads((multi / "summary.json").read_text())
  for key in ("student_heldout_mlm_loss", "teacher_heldout_mlm_loss"):
    assert s_got[key] == pytest.approx(s_ref[key], rel=1e-5), key
  assert (multi / "export" / "model.safetensors").exists()


@pytest.mark.slow
def test_two_processes_stop_at_the_plateau_together(tmp_path, tiny_teacher, data_cache, test_data):
  """train.stop_at_plateau across 2 processes: process 0 alone scores the held-out split and judges the curve,
  and both must stop at the same step (one training on alone would hang in its next collective). Run again,
  both read that the run already stopped there and train no further."""
  workdir = tmp_path / "run"
  c = _config(tiny_teacher, data_cache, test_data, 6)
  command = ("-m", "distilbert_jax.train", f"--config={ROOT / 'configs' / 'tiny.py'}:{tiny_teacher}",
             f"--workdir={workdir}", *_overrides(c), "--config.train.eval_every=1",
             "--config.train.stop_at_plateau=101.0")  # no rise reaches it: the 4th held-out point is the plateau
  code, out = _launch(tmp_path, *command, timeout=900)
  assert code == 0, out
  assert "the plateau, stopping at step 4" in out, out
  assert checkpoint.RunCheckpoints(workdir).latest_step() == 4, out
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["step"] == 4 and summary["plateau"]["reached"]
  assert max(x["step"] for x in _lines(workdir)) == 4

  code, out = _launch(tmp_path, *command, timeout=900)
  assert code == 0, out
  for i in range(2):
    assert any(line.startswith(f"[p{i}]") and "stopped at its plateau at step 4 before" in line
               for line in out.splitlines()), out
  assert checkpoint.RunCheckpoints(workdir).latest_step() == 4
  assert max(x["step"] for x in _lines(workdir)) == 4
