"""The train step and the loop: sharding invariance, exact resume, preemption, refusals."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import distilbert_jax
from distilbert_jax import aot, checkpoint, masking, sharding, train, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
import tiny  # noqa: E402


def _step_config(**loss):
  c = tiny.get_config()
  c.train.steps = 10
  c.optim.warmup_frac = 0.0  # the first update of a warmup has learning rate 0
  c.loss.update(loss)
  return c


def _models(vocab=211):
  cfg = distilbert_jax.EncoderConfig.bert(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4,
                                          intermediate_size=64, max_position_embeddings=32)
  teacher = distilbert_jax.Encoder(cfg)
  tp = distilbert_jax.init_params(teacher, jax.random.key(1))
  student, sp = distilbert_jax.student_from_teacher(teacher, tp, layers=[1])
  return teacher, jax.device_get(tp), student, jax.device_get(sp)


def _batch(vocab=211):
  rng = np.random.default_rng(0)
  ids = rng.integers(5, vocab, (8, 32)).astype(np.int32)
  mask = np.ones_like(ids)
  for b in range(8):
    mask[b, 32 - 3 * b:] = 0
  ids[:, 0] = 1
  return {"input_ids": np.where(mask > 0, ids, 0), "attention_mask": mask}


def _one_step(config, mesh_shape, models, batch):
  teacher, tp, student, sp = models
  mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  fns = train.build_step(config, mesh, student, teacher, jax.eval_shape(lambda: sp), mask_token_id=4)
  counts = np.random.default_rng(1).integers(0, 100, 211)
  probs = jax.device_put(masking.token_probs(counts, [0, 1, 2, 3, 4]), fns.replicated)
  state = fns.init(sp)
  global_batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
  state, metrics = fns.step(state, jax.device_put(tp, fns.teacher_sharding), global_batch, probs)
  return jax.device_get(state), jax.device_get(metrics), state


# The plain step on every mesh kind; the variants on the mesh that splits all three axes (each mesh is a compile).
@pytest.mark.parametrize("restrict,grad_accum,chunk,shapes", [(False, 1, 0, [(8, 1, 1), (2, 2, 2), (1, 4, 2)]),
                                                              (True, 2, 0, [(2, 2, 2)]), (False, 1, 96, [(2, 2, 2)])])
def test_one_step_is_the_same_on_every_mesh(restrict, grad_accum, chunk, shapes):
  assert jax.device_count() == 8
  config, models, batch = _step_config(restrict_ce_to_mask=restrict, alpha_mse=0.5), _models(), _batch()
  config.optim.grad_accum = grad_accum
  config.loss.chunk_size = chunk  # 96 rows: 3 chunks of the 256, one padded
  ref_state, ref_metrics, _ = _one_step(config, (1, 1, 1), models, batch)
  assert np.isfinite(ref_metrics["loss"]) and ref_metrics["mlm"] > 0 and ref_metrics["cos"] > 0
  assert int(ref_state.step) == 1
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), ref_state.params, models[3])
  assert all(jax.tree.leaves(moved)), "every parameter should change after one AdamW step"
  for shape in shapes:
    state, metrics, on_device = _one_step(config, shape, models, batch)
    for key in ("loss", "ce", "mlm", "cos", "mse", "grad_norm"):
      np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-5, err_msg=f"{shape} {key}")
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
      np.testing.assert_allclose(a, b, atol=1e-5, err_msg=str(shape))
    if shape == (2, 2, 2):  # FSDP really splits the parameters and the Adam moments.
      kernel = on_device.params["layer_0"]["mlp"]["wi"]["kernel"]
      assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
      assert kernel.addressable_shards[0].data.shape == (16, 32)


def test_one_micro_batch_update_equals_adamw_by_hand_and_two_equal_halves():
  # grad_accum 1 runs without a loop: the same update as value_and_grad + the optimizer by hand (bit-exact),
  # and as grad_accum 2 over a batch of two identical halves (a scan; float rounding apart).
  import optax
  w = {"a": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "bias": np.ones(4, np.float32)}
  x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)

  def loss_fn(params, batch, key):
    y = batch["x"] @ params["a"] + params["bias"]
    return jax.numpy.mean(jax.numpy.tanh(y) ** 2), {"mean_y": jax.numpy.mean(y)}

  config = _step_config()
  tx, schedule = trainer.make_optimizer(config.optim, 10)
  state = trainer.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=w, opt_state=tx.init(w),
                             rng=jax.random.PRNGKey(0))
  new, out = jax.jit(lambda s, b: trainer.apply_gradients(s, loss_fn, b, tx=tx, schedule=schedule))(state, {"x": x})
  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(w, {"x": x}, None)
  updates, _ = tx.update(grads, state.opt_state, w)
  by_hand = optax.apply_updates(w, updates)
  for name in w:
    np.testing.assert_array_equal(new.params[name], by_hand[name])
  assert float(out["loss"]) == float(loss) and float(out["mean_y"]) == float(terms["mean_y"])
  assert float(out["grad_norm"]) == float(optax.tree.norm(grads)) and int(new.step) == 1
  # Rows i, i + 2, ... form micro-batch i: interleaving each row with its copy makes two equal halves.
  twice, out2 = jax.jit(lambda s, b: trainer.apply_gradients(s, loss_fn, b, tx=tx, schedule=schedule, grad_accum=2))(
      state, {"x": np.repeat(x, 2, axis=0)})
  for name in w:
    np.testing.assert_allclose(twice.params[name], new.params[name], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(out2["loss"], out["loss"], rtol=1e-6)


def test_dropout_keys_of_each_generator():
  key = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(trainer.dropout_keys(key, 3), jax.random.split(key, 3))  # threefry: as before
  for impl in ("rbg", "unsafe_rbg"):
    keys = trainer.dropout_keys(key, 3, impl)
    assert jax.random.key_impl(keys) == jax.random.key_impl(jax.random.key(0, impl=impl)) and keys.shape == (3,)
    data = np.asarray(jax.random.key_data(keys))
    np.testing.assert_array_equal(data, jax.random.key_data(trainer.dropout_keys(key, 3, impl)))  # reproducible
    assert len({row.tobytes() for row in data}) == 3  # one key per micro-batch
    bits = [np.asarray(jax.random.bernoulli(k, 0.5, (64,))) for k in keys]
    assert not np.array_equal(bits[0], bits[1]) and 10 < bits[0].sum() < 54
  with pytest.raises(ValueError, match="unknown dropout generator 'philox'"):
    trainer.dropout_keys(key, 1, "philox")


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_rbg_dropout_steps_are_reproducible_resume_exactly_and_match_across_meshes(impl):
  config, models, batch = _step_config(), _models(), _batch()
  config.train.dropout_rng = impl
  teacher, tp, student, sp = models
  assert student.cfg.dropout_rate > 0
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  fns = train.build_step(config, mesh, student, teacher, jax.eval_shape(lambda: sp), mask_token_id=4)
  probs = jax.device_put(masking.token_probs(np.random.default_rng(1).integers(0, 100, 211), [0, 1, 2, 3, 4]),
                         fns.replicated)
  batch_on = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
  tp_on = jax.device_put(tp, fns.teacher_sharding)

  def steps(state, n):
    for _ in range(n):
      state, metrics = fns.step(state, tp_on, batch_on, probs)
    return state, jax.device_get(metrics)

  straight, m_straight = steps(fns.init(sp), 2)
  straight = jax.device_get(straight)
  first, _ = steps(fns.init(sp), 1)
  resumed, m_resumed = steps(jax.device_put(jax.device_get(first), fns.state_sharding), 1)  # as a restore does
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed)), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(a, b)
  assert m_resumed["loss"] == m_straight["loss"]
  threefry = _step_config()
  _, ref_metrics, _ = _one_step(threefry, (1, 1, 1), models, batch)
  _, metrics, _ = _one_step(config, (1, 1, 1), models, batch)
  assert metrics["loss"] != ref_metrics["loss"]  # other dropout bits (the masks are threefry's either way)
  _, sharded, _ = _one_step(config, (2, 2, 2), models, batch)
  for key in ("loss", "ce", "mlm", "cos", "grad_norm"):
    np.testing.assert_allclose(sharded[key], metrics[key], rtol=1e-5, atol=1e-5, err_msg=key)


def _compiled_step_text(config, mesh_shape, models, batch) -> str:
  teacher, tp, student, sp = models
  mesh = sharding.make_mesh(mesh_shape)
  fns = train.build_step(config, mesh, student, teacher, jax.eval_shape(lambda: sp), mask_token_id=4)
  spec = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
  abstract_batch = {k: spec(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
  abstract_teacher = jax.tree.map(spec, tp, fns.teacher_sharding)
  probs = jax.ShapeDtypeStruct((211,), np.float32, sharding=fns.replicated)
  return fns.step.lower(fns.abstract_state, abstract_teacher, abstract_batch, probs).compile().as_text()


def test_fsdp_splits_the_batch_not_the_hidden_units():
  # 8 rows × 32 tokens × 32 hidden on (data 1, fsdp 8, tensor 1). Pinned residual stream (default rules):
  # each device computes one row, f32[1,32,32]. With the `batch` rule off, the compiler keeps activations
  # split like the weights: every device holds all 8 rows and 4 of the 32 hidden units, f32[8,32,4].
  config, models, batch = _step_config(), _models(), _batch()
  per_row, per_unit = "f32[1,32,32]", "f32[8,32,4]"
  pinned = _compiled_step_text(config, (1, 8, 1), models, batch)
  assert pinned.count(per_row) > 50 and per_unit not in pinned
  config.mesh.rules.batch = None
  unpinned = _compiled_step_text(config, (1, 8, 1), models, batch)
  assert unpinned.count(per_unit) > 50


def test_fsdp_splits_the_masked_positions_too():
  # restrict_ce_to_mask: ceil(0.15 · 8 · 32) = 39 gathered positions, rounded up to 40 = 8 devices × 5 rows;
  # each device projects its 5 onto the 211-word vocabulary instead of all 39.
  config, models, batch = _step_config(restrict_ce_to_mask=True), _models(), _batch()
  text = _compiled_step_text(config, (1, 8, 1), models, batch)
  assert text.count("f32[5,211]") > 20 and "f32[39,211]" not in text and "f32[40,211]" not in text


def test_vocabularies_that_differ_are_refused(tiny_teacher):
  c = tiny.get_config(str(tiny_teacher))
  c.student.init = "random"
  c.student.overrides.vocab_size = 1000
  with pytest.raises(train.ConfigError, match="vocabulary.*differ"):
    train.build_models(c)


def test_rules_naming_an_unknown_mesh_axis_are_refused():
  c = _step_config()
  c.mesh.rules.batch = ("data", "dp")
  with pytest.raises(train.ConfigError, match=r"rules\['batch'\] names \['dp'\], not mesh axes"):
    train.validate_config(c)


def test_widths_that_differ_with_cosine_are_refused(tiny_teacher):
  c = tiny.get_config(str(tiny_teacher))
  c.student.init = "random"
  c.student.overrides.update(hidden_size=32, num_heads=2)
  with pytest.raises(train.ConfigError, match="alpha_cos=0"):
    train.build_models(c)
  c.loss.alpha_cos = 0.0
  teacher, _, student, _ = train.build_models(c)
  assert student.cfg.hidden_size == 32 and teacher.cfg.hidden_size == 64


# ------------------------------------------------------------------------------------------------ runs

def _cli(workdir, teacher, cache, test_data, *extra):
  return [sys.executable, "-m", "distilbert_jax.train", f"--config={ROOT / 'configs' / 'tiny.py'}:{teacher}",
          f"--workdir={workdir}", f"--config.data.cache_dir={cache}",
          f"--config.data.corpus_dir={test_data / 'corpus'}", *extra]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu")


def _run_until(cmd, sentinel: pathlib.Path, sig):
  """Starts a run, sends `sig` once `sentinel` exists, and returns the exit code."""
  proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while not sentinel.exists():
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() < deadline
    time.sleep(0.02)
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=300)
  return proc.returncode, out


def _losses(workdir):
  return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _params(workdir):
  return jax.device_get(checkpoint.load_model(workdir / "final")[1])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_teacher, data_cache, test_data):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  extra = ("--config.train.steps=20", "--config.train.ckpt_every=5", "--config.train.log_every=1",
           "--config.train.speed_batches=(2,)")
  done = subprocess.run(_cli(workdir, tiny_teacher, data_cache, test_data, *extra), env=_env(), capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  return workdir, extra


@pytest.mark.slow  # the command-line reference run
def test_end_to_end_run_writes_everything(reference_run):
  workdir, _ = reference_run
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["step"] == 20 and 0 <= summary["student_heldout_mlm_accuracy"] <= 1
  assert "teacher_heldout_mlm_accuracy" in summary
  # BERT's uniform masking beside the run's own, and the speed-up as deployed (timed on the same inputs).
  for who in ("student", "teacher"):
    assert 0 <= summary[f"{who}_heldout_uniform_mlm_accuracy"] <= 1 and summary[f"{who}_heldout_uniform_mlm_loss"] > 0
  assert summary["student_speedup_cls_batch2"] > 0 and summary["student_speedup_mlm_batch2"] > 0
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in lines] == list(range(1, 21))
  for key in ("loss", "ce", "mlm", "cos", "lr", "grad_norm", "tokens_per_s"):
    assert key in lines[-1]
  assert list((workdir / "tb").glob("events.out.tfevents.*"))
  assert (workdir / "export" / "model.safetensors").exists() and (workdir / "export" / "tokenizer.json").exists()


@pytest.mark.slow  # two command-line runs (stopped, resumed); in-process exact resume stays in the default tier
def test_sigkill_then_resume_is_bit_exact(reference_run, tmp_path, tiny_teacher, data_cache, test_data):
  ref_dir, extra = reference_run
  cmd = _cli(tmp_path, tiny_teacher, data_cache, test_data, *extra)
  code, out = _run_until(cmd, tmp_path / "checkpoints" / "10", signal.SIGKILL)
  assert code == -signal.SIGKILL and not (tmp_path / "final").exists(), out
  done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  assert _losses(tmp_path) == _losses(ref_dir)  # same data order, same masks, same dropout: same losses
  for a, b in zip(jax.tree.leaves(_params(tmp_path)), jax.tree.leaves(_params(ref_dir))):
    assert np.array_equal(a, b)


@pytest.mark.slow  # two command-line runs (stopped, resumed); in-process exact resume stays in the default tier
def test_sigterm_saves_and_resumes(reference_run, tmp_path, tiny_teacher, data_cache, test_data):
  ref_dir, extra = reference_run
  cmd = _cli(tmp_path, tiny_teacher, data_cache, test_data, *extra)
  code, out = _run_until(cmd, tmp_path / "checkpoints" / "5", signal.SIGTERM)
  assert code == 0, out
  assert '"preempted": true' in out
  saved = checkpoint.RunCheckpoints(tmp_path).latest_step()
  assert 5 <= saved < 20 and not (tmp_path / "final").exists()
  done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  assert _losses(tmp_path) == _losses(ref_dir)
  for a, b in zip(jax.tree.leaves(_params(tmp_path)), jax.tree.leaves(_params(ref_dir))):
    assert np.array_equal(a, b)


@pytest.mark.slow  # two command-line runs
def test_a_second_run_loads_its_compiled_steps_from_the_cache(tmp_path, tiny_teacher, test_data):
  """The CLI keeps compiled programs under cache_dir/jax_compilation_cache: a second run of the same
  configuration in a fresh workdir compiles nothing the first did not (the cache gains no entry)."""
  cache = tmp_path / "cache"
  env = {k: v for k, v in _env().items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # also cache the tiny config's quick compiles
  extra = ("--config.train.steps=3", "--config.train.speed_batches=()")
  entries = []
  for name in ("first", "second"):
    done = subprocess.run(_cli(tmp_path / name, tiny_teacher, cache, test_data, *extra), env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    entries.append(sorted(p.name for p in (cache / "jax_compilation_cache").iterdir()))
  assert len(entries[0]) >= 3  # at least the state's init, the train step and the held-out scoring
  assert entries[1] == entries[0]


@pytest.mark.slow  # the command-line reference run
def test_workdir_of_another_model_is_refused(reference_run, tiny_teacher, data_cache, test_data):
  ref_dir, extra = reference_run
  cmd = _cli(ref_dir, tiny_teacher, data_cache, test_data, *extra, "--config.student.layers=(0,1)")
  done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
  assert done.returncode == 2
  assert "another model" in done.stderr and "allow_model_change" in done.stderr
  assert checkpoint.RunCheckpoints(ref_dir).latest_step() == 20


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_teacher, data_cache, test_data):
  c = tiny.get_config(str(tiny_teacher))
  c.data.cache_dir, c.data.corpus_dir = str(data_cache), str(test_data / "corpus")
  c.train.steps, c.train.ckpt_every = 12, 2
  c.optim.lr, c.optim.clip, c.optim.warmup_frac = 1e30, 1e30, 0.0
  with pytest.raises(trainer.NonFiniteLossError, match="became .* at step") as info:
    train.run(c, tmp_path)
  assert "last good checkpoint" in str(info.value)
  ckpts = checkpoint.RunCheckpoints(tmp_path)
  latest = ckpts.latest_step()
  ckpts.close()
  if latest is not None:  # whatever was saved holds finite numbers
    restored = checkpoint.RunCheckpoints(tmp_path).manager.restore(latest)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored["state"]) if np.asarray(x).dtype.kind == "f")


@pytest.mark.slow
def test_distillation_lowers_the_loss_and_beats_random_init(tmp_path, minilm_path, data_cache, test_data):
  """The real pretrained teacher, adapted by masked-LM (it has no MLM head); a 1-layer student from its first
  layer against a 1-layer student from random init: same steps, same data, same loss."""
  c = tiny.get_config(str(minilm_path))
  c.data.cache_dir, c.data.corpus_dir = str(data_cache), str(test_data / "corpus")
  c.data.batch_size = 16
  c.teacher_mlm.update(steps=150, lr=5e-4)
  c.train.update(steps=60, ckpt_every=60, log_every=1, export=False)
  c.data.eval_batches = 8
  distilled = train.run(c, tmp_path / "distilled")
  losses = [json.loads(x)["loss"] for x in (tmp_path / "distilled" / "metrics.jsonl").read_text().splitlines()]
  assert len(losses) == 60 and np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10])

  c.teacher = str(tmp_path / "distilled" / "teacher" / "final")  # the same adapted teacher
  c.teacher_mlm.steps = 0
  c.student.init = "random"
  scratch = train.run(c, tmp_path / "random")
  # The teacher adapts under BERT's uniform masking (train.adapt_teacher): it is judged there, well above the
  # ~6% of always predicting the commonest token.
  t = distilled["teacher_heldout_uniform_mlm_accuracy"]
  assert t == scratch["teacher_heldout_uniform_mlm_accuracy"] > 0.10, (distilled, scratch)
  for key in ("student_heldout_mlm_accuracy", "student_heldout_uniform_mlm_accuracy"):
    assert distilled[key] > scratch[key] + 0.01, (key, distilled, scratch)


def test_checkpoint_restores_onto_another_mesh(tmp_path, tiny_teacher, data_cache, test_data):
  c = tiny.get_config(str(tiny_teacher))
  c.data.cache_dir, c.data.corpus_dir = str(data_cache), str(test_data / "corpus")
  c.data.eval_batches = 0
  c.train.steps = 4
  c.mesh.shape = (8, 1, 1)
  train.run(c, tmp_path)
  saved = jax.device_get(checkpoint.load_model(tmp_path / "final")[1])
  c.mesh.shape = (1, 4, 2)  # the finished run restores its last checkpoint onto the new mesh and re-exports
  train.run(c, tmp_path)
  again = jax.device_get(checkpoint.load_model(tmp_path / "final")[1])
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(again)):
    assert np.array_equal(a, b)
  c.student.layers = (0, 1)  # another student in the same workdir is refused (the slow tier checks the CLI's exit 2)
  with pytest.raises(checkpoint.ModelMismatchError, match="another model.*allow_model_change"):
    train.run(c, tmp_path)
  assert checkpoint.RunCheckpoints(tmp_path).latest_step() == 4


def test_a_run_stops_at_the_plateau_and_stays_stopped(tmp_path, tiny_teacher, data_cache, test_data):
  """With a threshold no rise can reach, the fourth held-out point (train.PLATEAU_MIN_POINTS) is the plateau:
  the run saves, evaluates and exports there; run again it trains no further; without the threshold it
  carries on to train.steps."""
  c = tiny.get_config(str(tiny_teacher))
  c.data.cache_dir, c.data.corpus_dir = str(data_cache), str(test_data / "corpus")
  c.train.update(steps=6, eval_every=1, ckpt_every=100, stop_at_plateau=101.0)
  summary = train.run(c, tmp_path)
  assert train.PLATEAU_MIN_POINTS == 4 and summary["step"] == 4 and summary["plateau"]["reached"]
  assert (summary["plateau"]["from_step"], summary["plateau"]["to_step"]) == (3, 4)
  assert checkpoint.RunCheckpoints(tmp_path).latest_step() == 4
  assert checkpoint.is_model_dir(tmp_path / "final")
  def logged_steps():
    return [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert max(logged_steps()) == 4
  again = train.run(c, tmp_path)
  assert again["step"] == 4 and max(logged_steps()) == 4
  c.train.stop_at_plateau = 0.0
  assert train.run(c, tmp_path)["step"] == 6
  assert checkpoint.RunCheckpoints(tmp_path).latest_step() == 6


def test_bf16_and_remat_step_is_close_to_float32():
  models, batch = _models(), _batch()
  config = _step_config()
  _, ref, _ = _one_step(config, (1, 1, 1), models, batch)
  teacher, tp, student, sp = models
  half = (distilbert_jax.Encoder(teacher.cfg.replace(dtype="bfloat16")), tp,
          distilbert_jax.Encoder(student.cfg.replace(dtype="bfloat16", remat=True)), sp)
  state, metrics, on_device = _one_step(config, (2, 2, 2), half, batch)
  assert jax.tree.leaves(on_device.params)[0].dtype == np.float32  # float32 master weights
  np.testing.assert_allclose(metrics["loss"], ref["loss"], rtol=2e-2)
  assert metrics["loss"] != ref["loss"]


@pytest.mark.slow  # the command-line reference run
def test_export_from_a_training_workdir(reference_run, tmp_path, capsys):
  import safetensors.numpy
  sys.path.insert(0, str(ROOT / "tools"))
  import convert
  workdir, _ = reference_run
  assert convert.main(["jax2hf", "--src", str(workdir), "--dst", str(tmp_path / "latest")]) == 0
  assert "step 20 of the run" in capsys.readouterr().out
  latest = safetensors.numpy.load_file(str(tmp_path / "latest" / "model.safetensors"))
  final = safetensors.numpy.load_file(str(workdir / "export" / "model.safetensors"))
  assert set(latest) == set(final) and all(np.array_equal(latest[k], final[k]) for k in final)
  assert (tmp_path / "latest" / "tokenizer.json").exists()
  assert convert.main(["jax2hf", "--src", str(workdir), "--dst", str(tmp_path / "s10"), "--step", "10"]) == 0
  s10 = safetensors.numpy.load_file(str(tmp_path / "s10" / "model.safetensors"))
  assert any(not np.array_equal(s10[k], final[k]) for k in final)
  assert convert.main(["jax2hf", "--src", str(workdir), "--dst", str(tmp_path / "s7"), "--step", "7"]) == 2
  assert "no checkpoint of step 7" in capsys.readouterr().err


def test_preemption_during_teacher_adaptation_stops_and_resumes(tmp_path, tiny_teacher, data_cache, test_data,
                                                                 monkeypatch):
  c = tiny.get_config(str(tiny_teacher))
  c.data.cache_dir, c.data.corpus_dir = str(data_cache), str(test_data / "corpus")
  c.teacher_mlm.steps = 4
  c.train.update(steps=2, ckpt_every=2, export=False)
  c.data.eval_batches = 0
  with monkeypatch.context() as m:  # a preemption notice after the teacher's step 2
    m.setattr(checkpoint.RunCheckpoints, "reached_preemption", lambda self, step: step == 2)
    assert train.run(c, tmp_path) == {"step": 0, "preempted": True, "stage": "teacher_mlm"}
  assert checkpoint.RunCheckpoints(tmp_path / "teacher").latest_step() == 2
  assert not (tmp_path / "checkpoints").exists()  # the distillation itself has not started
  summary = train.run(c, tmp_path)
  assert summary["step"] == 2 and checkpoint.is_model_dir(tmp_path / "teacher" / "final")
  teacher_steps = [json.loads(x)["step"] for x in (tmp_path / "teacher" / "metrics.jsonl").read_text().splitlines()]
  assert teacher_steps == [2, 4]  # log_every 2: resumed at 3, not restarted


def test_the_teacher_adapts_with_berts_uniform_masking_on_packed_rows(tmp_path, monkeypatch):
  """The adaptation sub-run masks as BERT was pretrained and packs its rows, whatever the distillation uses."""
  c = tiny.get_config("/some/teacher")
  c.teacher_mlm.update(steps=7, lr=3e-4, batch_size=4)
  c.mlm.smoothing, c.data.strategy = 0.7, "bucket"
  c.train.update(eval_every=50, stop_at_plateau=0.5)  # the student's curve and plateau, not the sub-run's
  seen = {}
  monkeypatch.setattr(train, "run", lambda sub, folder: seen.update(config=sub, folder=folder) or {"step": 7})
  assert train.adapt_teacher(c, tmp_path) == str(tmp_path / "teacher" / "final")
  sub = seen["config"]
  assert (sub.mlm.smoothing, sub.data.strategy, sub.data.batch_size) == (0.0, "pack", 4)
  assert (sub.train.steps, sub.optim.lr, sub.teacher, sub.student.init) == (7, 3e-4, "", "/some/teacher")
  assert (sub.train.eval_every, sub.train.stop_at_plateau) == (0, 0.0)
  train.validate_config(sub)  # the sub-run is one the trainer accepts
  assert (c.mlm.smoothing, c.data.strategy) == (0.7, "bucket")  # the distillation's own settings are untouched


def test_an_adaptation_saved_under_other_data_settings_resumes_with_them(tmp_path, tiny_teacher, data_cache,
                                                                          test_data, monkeypatch):
  """Stopped before the adaptation's masking and batching became uniform / packed, it finishes as it began
  (its data iterator's saved position is only valid for those settings)."""
  c = tiny.get_config(str(tiny_teacher))
  c.data.cache_dir, c.data.corpus_dir = str(data_cache), str(test_data / "corpus")
  c.teacher_mlm.update(steps=4, smoothing=0.7, strategy="bucket")
  c.train.ckpt_every = 2
  real_run, seen = train.run, []

  def recording_run(sub, folder, steps=None):
    seen.append((sub.mlm.smoothing, sub.data.strategy))
    if steps:
      sub.train.steps = steps
    return real_run(sub, folder)

  monkeypatch.setattr(train, "run", lambda sub, folder: recording_run(sub, folder, steps=2))  # an interruption
  train.adapt_teacher(c, tmp_path)
  shutil.rmtree(tmp_path / "teacher" / "final")
  c.teacher_mlm.update(smoothing=0.0, strategy="pack")  # today's defaults
  monkeypatch.setattr(train, "run", recording_run)
  assert checkpoint.is_model_dir(train.adapt_teacher(c, tmp_path))
  assert seen == [(0.7, "bucket"), (0.7, "bucket")]
  assert checkpoint.RunCheckpoints(tmp_path / "teacher").latest_step() == 4


def test_a_corpus_without_examples_is_a_one_line_config_error(tmp_path, minilm_path):
  (tmp_path / "short.txt").write_text("Call me Ishmael.\n")
  config = train.default_config()
  config.data.sources, config.data.cache_dir = (str(tmp_path / "short.txt"),), str(tmp_path / "cache")
  with pytest.raises(train.ConfigError, match=r"^--config.data.sources: no training examples: .*: give more text$"):
    train.prepare_data(config, str(minilm_path))
  assert not list((tmp_path / "cache" / "tokenized").iterdir())  # nothing that looks like a finished folder


def test_compute_options_may_change_on_resume_but_not_the_model():
  cfg = distilbert_jax.EncoderConfig.bert(num_layers=2)
  faster = cfg.replace(dtype="bfloat16", remat=True, remat_policy="dots_saveable", attention="dot_product",
                       dropout_bits=32)
  assert checkpoint._same_model(cfg.to_dict(), faster.to_dict())  # pylint: disable=protected-access
  assert not checkpoint._same_model(cfg.to_dict(), cfg.replace(num_layers=3).to_dict())  # pylint: disable=protected-access
  assert not checkpoint._same_model(cfg.to_dict(), faster.replace(num_labels=2).to_dict())  # pylint: disable=protected-access


def test_config_compute_options_reach_the_student_and_teacher(tiny_teacher):
  c = tiny.get_config(str(tiny_teacher))
  c.compute.update(remat=True, remat_policy="dots_saveable", attention="dot_product")
  teacher, _, student, _ = train.build_models(c)
  assert (student.cfg.remat, student.cfg.remat_policy, student.cfg.attention) == (True, "dots_saveable", "dot_product")
  assert teacher.cfg.attention == "dot_product" and not teacher.cfg.remat


@pytest.mark.parametrize("family,strategy", [("roberta", "pack"), ("flaubert", "bucket")])
def test_a_few_distillation_steps_per_family(request, tmp_path, family, strategy, data_cache, test_data):
  """A small random teacher of each family, its own tokenizer, real text (English for RoBERTa; French, seven books
  of the Louis Segond Bible, for FlauBERT): a student of the teacher's family trains (finite, moving losses) and
  exports as that family's masked-LM model, which transformers loads."""
  import transformers
  teacher = request.getfixturevalue(f"tiny_{family}_teacher")
  c = tiny.get_config(str(teacher))
  c.data.cache_dir, c.data.corpus_dir = str(data_cache), str(test_data / "corpus")
  if family == "flaubert":  # its tokenizer is pure Python (Moses + BPE): Genèse and six short books, in seconds
    french = request.getfixturevalue("french_text")
    books = ("01", "08", "29", "31", "32", "36", "37")  # a file is a document: 30% of them held out
    c.data.demo_corpus, c.data.sources = False, tuple(str(french / f"{b}.txt") for b in books)
    c.data.held_out_fraction = 0.3
  c.data.strategy = strategy  # packed rows: RoBERTa's positions restart at pad_token_id + 1 in every example
  c.student.layers = ()  # every other teacher layer
  c.train.update(steps=4, ckpt_every=4, log_every=1)
  c.data.eval_batches = 1
  c.train.eval_teacher = family == "roberta"  # scored beside the student at the end, or not (the study's setting)
  summary = train.run(c, tmp_path)
  losses = _losses(tmp_path)
  assert len(losses) == 4 and np.all(np.isfinite(losses)) and losses[-1] != losses[0]
  assert 0 <= summary["student_heldout_mlm_accuracy"] <= 1
  assert ("teacher_heldout_mlm_accuracy" in summary) == ("teacher_heldout_uniform_mlm_accuracy" in summary) \
      == c.train.eval_teacher
  exported, info = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path / "export"),
                                                                     output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  assert exported.config.model_type == family and exported.config.num_hidden_layers == 2
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
  text = "Au commencement, Dieu créa les cieux" if family == "flaubert" else "the Union"
  assert tok(text)["input_ids"] == transformers.AutoTokenizer.from_pretrained(str(teacher))(text)["input_ids"]


def test_packed_positions_start_where_each_model_counts():
  roberta = distilbert_jax.Encoder(distilbert_jax.EncoderConfig.roberta(pad_token_id=1))
  bert = distilbert_jax.Encoder(distilbert_jax.EncoderConfig.bert())
  extra = {"segment_ids": np.array([[1, 1, 2]]), "position_ids": np.array([[0, 1, 0]])}
  assert train._model_inputs(roberta, extra)["position_ids"].tolist() == [[2, 3, 2]]
  assert train._model_inputs(bert, extra) is extra


def test_family_configs_build_the_intended_students():
  """configs/distilroberta_base.py: roberta-base's 12 layers -> a 6-layer RoBERTa; configs/flaubert_small.py: a
  FlauBERT teacher -> a random student of flaubert_small_cased's shape (L_cos off: the widths differ)."""
  import distilroberta_base
  import flaubert_small
  from distilbert_jax import aot
  teacher, student = train.model_configs(distilroberta_base.get_config(), aot.model_config)
  assert (teacher.family, teacher.num_layers, student.family, student.num_layers) == ("roberta", 12, "roberta", 6)
  assert student.type_vocab_size == 1 and student.positions_skip_padding and not student.use_pooler
  base = distilbert_jax.EncoderConfig.flaubert(hidden_size=768, num_layers=12, num_heads=12, pre_norm=False)
  teacher, student = train.model_configs(flaubert_small.get_config(), lambda _: base)
  assert student == aot.model_config("flaubert/flaubert_small_cased").replace(dtype="bfloat16")


# ------------------------------------------------------------------------------------------------ layer losses

def _narrow_models(vocab=211):
  """The 32-wide, 4-head, 2-layer teacher of `_models` and a random 16-wide, 4-head, 1-layer student."""
  teacher, tp, _, _ = _models(vocab)
  cfg = distilbert_jax.EncoderConfig.distilbert(vocab_size=vocab, hidden_size=16, num_layers=1, num_heads=4,
                                                intermediate_size=32, max_position_embeddings=32)
  student = distilbert_jax.Encoder(cfg)
  return teacher, tp, student, jax.device_get(distilbert_jax.init_params(student, jax.random.key(2)))


@pytest.mark.parametrize("term", ["hidden", "embedding", "attention", "value_relation", "relations"])
def test_one_step_with_each_layer_loss(term):
  """A 16-wide student learns from a 32-wide teacher through each layer loss alone (L_mlm beside it); the
  projections the MSE terms need are trained in the state and are not the student's."""
  config = _step_config(alpha_cos=0.0, alpha_ce=0.0)
  config.layer_loss[f"alpha_{term}"] = 1.0
  config.layer_loss.relation_heads = 8
  models = _narrow_models()
  state, metrics, _ = _one_step(config, (1, 1, 1), models, _batch())
  assert np.isfinite(metrics["loss"]) and metrics[f"layer_{term}"] > 0
  assert metrics["loss"] == pytest.approx(2.0 * metrics["mlm"] + metrics[f"layer_{term}"], rel=1e-5)
  has_projection = term in ("hidden", "embedding")
  assert (train.LOSS_PARAMS in state.params) == has_projection
  if has_projection:
    kernel = state.params[train.LOSS_PARAMS][term]["kernel"]
    assert kernel.shape == (16, 32)
    start = train.init_projections({term: (16, 32)}, config.seed)[term]["kernel"]
    assert not np.array_equal(kernel, start), "the projection learns"
  assert set(train.student_params(state.params)) == set(models[3])


def _traced_step_flops(config, models) -> float:
  teacher, tp, student, sp = models
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  fns = train.build_step(config, mesh, student, teacher, jax.eval_shape(lambda: sp), mask_token_id=4)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in _batch().items()}
  traced = fns.step.trace(fns.abstract_state, jax.eval_shape(lambda: tp), batch,
                          jax.ShapeDtypeStruct((211,), np.float32))
  return aot.traced_matmul_flops(traced.jaxpr.jaxpr)


@pytest.mark.parametrize("term,pairs", [("hidden", ((1, 1), (1, 2))), ("embedding", ()),
                                        ("attention", ((1, 1), (1, 2))), ("value_relation", ()), ("relations", ())])
def test_the_flops_formula_counts_each_layer_loss(term, pairs):
  """What each layer loss adds to the traced step's matrix products is what the formula (and so MFU) counts."""
  config = _step_config(alpha_cos=0.0, alpha_ce=0.0)
  models = _narrow_models()
  without = _traced_step_flops(config, models)
  config.layer_loss.update({f"alpha_{term}": 1.0, "relation_heads": 8, "layer_map": pairs})
  added = _traced_step_flops(config, models) - without
  teacher, _, student, _ = models
  per_token = train.step_flops_per_token(config, teacher, student, 32) - train.step_flops_per_token(
      _step_config(alpha_cos=0.0, alpha_ce=0.0), teacher, student, 32)
  assert added > 0 and per_token * 8 * 32 == pytest.approx(added, rel=1e-9)


LAYER_METRICS = ("loss", "mlm", "ce", "layer_hidden", "layer_embedding", "layer_attention", "layer_value_relation",
                 "layer_relations", "grad_norm")


def test_layer_losses_are_the_same_on_every_mesh_with_bf16_remat_and_memory_lean_logits():
  """Every layer loss on at once with grad_accum 2; the projections split by their logical axes (embed,
  embed_out) on FSDP x tensor. Issue 14 at scale: with chunked (memory-lean) vocabulary logits too, the same
  figures; in bfloat16 with rematerialised layers, the same within bf16's precision."""
  config = _step_config(alpha_cos=0.0)
  config.layer_loss.update(alpha_hidden=1.0, alpha_embedding=0.5, alpha_attention=1.0, alpha_value_relation=1.0,
                           alpha_relations=1.0, relation_heads=4, layer_map=((1, 2),))
  config.optim.grad_accum = 2
  models, batch = _narrow_models(), _batch()
  ref_state, ref_metrics, _ = _one_step(config, (1, 1, 1), models, batch)
  state, metrics, on_device = _one_step(config, (2, 2, 2), models, batch)
  for key in LAYER_METRICS:
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  kernel = on_device.params[train.LOSS_PARAMS]["hidden"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")

  lean = config.copy_and_resolve_references()
  lean.loss.chunk_size = 48  # 256 rows per micro-batch: 6 chunks, the last one padded
  _, chunked, _ = _one_step(lean, (2, 2, 2), models, batch)
  for key in LAYER_METRICS:
    np.testing.assert_allclose(chunked[key], ref_metrics[key], rtol=1e-5, atol=1e-5, err_msg=key)
  teacher, tp, student, sp = models
  bf16 = lambda m: distilbert_jax.Encoder(m.cfg.replace(dtype="bfloat16", remat=True))  # noqa: E731
  _, low, _ = _one_step(lean, (2, 2, 2), (bf16(teacher), tp, bf16(student), sp), batch)
  for key in LAYER_METRICS:
    assert np.isfinite(low[key]), key
    np.testing.assert_allclose(low[key], ref_metrics[key], rtol=0.05, atol=0.02, err_msg=key)


@pytest.mark.parametrize("overrides,layer_loss,message", [
    (dict(num_layers=1), dict(alpha_hidden=1.0, layer_map=((1, 3),)),
     r"layer_map pair \(1, 3\): the student has layers 1..1 and the teacher 1..2"),
    (dict(num_layers=1), dict(alpha_attention=1.0, layer_map=((2, 2),)), "the student has layers 1..1"),
    (dict(num_layers=1), dict(alpha_hidden=1.0, layer_map=((0, 0),)), "alpha_embedding"),
    ({}, dict(alpha_hidden=1.0, projection="never"), "cannot meet without a projection"),
    ({}, dict(alpha_embedding=1.0, projection="never"), "cannot meet without a projection"),
    (dict(num_heads=2), dict(alpha_attention=1.0), "student has 2 heads and the teacher 4.*alpha_relations"),
    (dict(num_heads=2), dict(alpha_value_relation=1.0), "head by head"),
    ({}, dict(alpha_relations=1.0, relation_heads=3), "relation_heads=3 must divide both widths"),
])
def test_layer_maps_and_widths_that_cannot_meet_are_refused(overrides, layer_loss, message):
  """A 16-wide random student of the 32-wide, 2-layer teacher (configs alone, nothing read or built)."""
  teacher_cfg = _models()[0].cfg
  c = _step_config(alpha_cos=0.0)
  c.student.init = "random"
  c.student.overrides.update({**dict(hidden_size=16, num_heads=4, intermediate_size=32), **overrides})
  c.layer_loss.update(layer_loss)
  with pytest.raises(train.ConfigError, match=message) as info:
    train.student_config(c, teacher_cfg)
  assert "\n" not in str(info.value)


def test_a_copied_student_keeps_the_teacher_depth_may_narrow_and_cosine_needs_one_width():
  teacher_cfg = _models()[0].cfg
  c = _step_config()
  c.student.overrides.update(num_layers=3)
  with pytest.raises(train.ConfigError, match="student.init='teacher' copies.*num_layers=3.*init=random"):
    train.student_config(c, teacher_cfg)
  c.student.overrides = {"hidden_size": 64}
  with pytest.raises(train.ConfigError, match="can only be narrower, but hidden_size 64 > 32.*init=random"):
    train.student_config(c, teacher_cfg)
  c.student.overrides = {"hidden_size": 16, "num_heads": 4}
  with pytest.raises(train.ConfigError, match="alpha_cos=0"):
    train.student_config(c, teacher_cfg)
  c.loss.alpha_cos = 0.0
  assert train.student_config(c, teacher_cfg).hidden_size == 16  # narrowed from the teacher (weight selection)
  c.student.init = "random"
  c.layer_loss.alpha_hidden = 1.0
  assert train.student_config(c, teacher_cfg).hidden_size == 16
  c.teacher = ""
  with pytest.raises(train.ConfigError, match="there is none"):
    train.layer_loss_config(c.layer_loss, None, train.student_config(c, teacher_cfg))


def test_a_narrower_student_is_selected_from_the_teacher_and_trains():
  """Weight selection: 32 -> 16 hidden, 4 -> 2 heads of 8 -> 8 units, 64 -> 24 feed-forward; every tensor is the
  leading block of the teacher layer it comes from, and the student takes a distillation step."""
  teacher, tp, _, _ = _models()
  student, sp = distilbert_jax.student_from_teacher(
      teacher, tp, layers=[1], widths=dict(hidden_size=16, num_heads=2, intermediate_size=24))
  assert (student.cfg.hidden_size, student.cfg.num_heads, student.cfg.head_size) == (16, 2, 8)
  q_t, q_s = tp["layer_1"]["attention"]["query"]["kernel"], sp["layer_0"]["attention"]["query"]["kernel"]
  assert q_t.shape == (32, 4, 8) and q_s.shape == (16, 2, 8)
  np.testing.assert_array_equal(q_s, q_t[:16, :2, :])
  np.testing.assert_array_equal(sp["layer_0"]["mlp"]["wi"]["kernel"], tp["layer_1"]["mlp"]["wi"]["kernel"][:16, :24])
  np.testing.assert_array_equal(sp["embeddings"]["word_embeddings"]["embedding"],
                                tp["embeddings"]["word_embeddings"]["embedding"][:, :16])
  shapes = jax.eval_shape(lambda: distilbert_jax.init_params(student, jax.random.key(0)))
  assert jax.tree.map(lambda a: a.shape, sp) == jax.tree.map(lambda a: a.shape, shapes)
  config = _step_config(alpha_cos=0.0)
  config.layer_loss.update(alpha_hidden=1.0, alpha_relations=1.0, relation_heads=4)
  state, metrics, _ = _one_step(config, (1, 1, 1), (teacher, tp, student, jax.device_get(sp)), _batch())
  assert np.isfinite(metrics["loss"]) and metrics["layer_hidden"] > 0 and metrics["layer_relations"] > 0
  with pytest.raises(ValueError, match="can only be narrower, but num_heads 8 > 4"):
    distilbert_jax.student_from_teacher(teacher, tp, layers=[1], widths=dict(num_heads=8))
  with pytest.raises(ValueError, match=r"widths \['num_layers'\] cannot be narrowed"):
    distilbert_jax.student_from_teacher(teacher, tp, layers=[1], widths=dict(num_layers=1))


def test_uniform_layer_map_by_default():
  teacher_cfg = _models()[0].cfg.replace(num_layers=12)
  student_cfg = teacher_cfg.replace(num_layers=3)
  c = _step_config()
  c.layer_loss.alpha_hidden = 1.0
  assert train.layer_loss_config(c.layer_loss, teacher_cfg, student_cfg).layer_map == ((1, 4), (2, 8), (3, 12))
  c.layer_loss.update(alpha_relations=1.0, relation_heads=0)
  assert train.layer_loss_config(c.layer_loss, teacher_cfg, student_cfg).relation_heads == 4


def test_every_weight_zero_counts_the_layer_losses():
  c = _step_config(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0)
  with pytest.raises(train.ConfigError, match="every loss weight"):
    train.validate_config(c)
  c.layer_loss.alpha_relations = 1.0
  train.validate_config(c)
  c.layer_loss.projection = "sometimes"
  with pytest.raises(train.ConfigError, match="projection='sometimes'"):
    train.validate_config(c)


def test_a_narrow_student_distils_through_the_layer_losses_and_exports(tmp_path, tiny_teacher, data_cache, test_data):
  """A random 2-layer, 32-wide student of the 64-wide teacher, every layer loss on (no L_cos): a few steps, then
  the export is a DistilBertForMaskedLM without the projections, with the final model's logits."""
  import torch
  import transformers
  c = tiny.get_config(str(tiny_teacher))
  c.data.cache_dir, c.data.corpus_dir = str(data_cache), str(test_data / "corpus")
  c.data.eval_batches = 0
  c.train.update(steps=4, log_every=1, ckpt_every=4)
  c.student.init = "random"
  c.student.overrides.update(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64)
  c.loss.alpha_cos = 0.0
  c.layer_loss.update(alpha_hidden=1.0, alpha_embedding=1.0, alpha_attention=1.0, alpha_value_relation=1.0,
                      alpha_relations=1.0, relation_heads=8)
  summary = train.run(c, tmp_path)
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert len(logged) == 4 and all(np.isfinite(r[f"layer_{t}"]) and r[f"layer_{t}"] > 0 for r in logged
                                  for t in ("hidden", "embedding", "attention", "value_relation", "relations"))
  model, params = checkpoint.load_model(tmp_path / "final")
  assert train.LOSS_PARAMS not in params and model.cfg.hidden_size == 32
  ref, info = transformers.AutoModelForMaskedLM.from_pretrained(summary["export"], output_loading_info=True)
  assert type(ref).__name__ == "DistilBertForMaskedLM" and ref.config.dim == 32 and ref.config.n_layers == 2
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  ids = np.array([[101, 2023, 2003, 1037, 3231, 102, 0], [101, 7592, 2088, 102, 0, 0, 0]])
  mask = (ids != 0).astype(np.int64)
  ours = np.asarray(model.apply({"params": params}, ids, attention_mask=mask).logits)
  with torch.no_grad():
    theirs = ref.eval()(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  assert np.abs(ours - theirs)[mask > 0].max() < 1e-4
  # Resuming without the projections' terms would change the train state's shape: refused before any restore.
  before = {f: f.read_bytes() for f in (tmp_path / "checkpoints").rglob("*") if f.is_file()}
  c.train.steps = 6
  c.layer_loss.update(alpha_hidden=0.0, alpha_embedding=0.0)
  with pytest.raises(train.ConfigError, match=r"projections \['embedding', 'hidden'\], this config needs none"):
    train.run(c, tmp_path)
  assert {f: f.read_bytes() for f in (tmp_path / "checkpoints").rglob("*") if f.is_file()} == before


@pytest.mark.parametrize("recipe", ["tinybert", "minilm", "minilmv2"])
def test_layer_demo_recipes_build(recipe, minilm_path):
  """configs/layers_demo.py: each recipe is a valid run whose narrow student meets the 384-wide demo teacher."""
  layers_demo = trainer.sibling_config(str(ROOT / "configs" / "tiny.py"), "layers_demo.py", recipe)
  layers_demo.teacher = str(minilm_path)
  train.validate_config(layers_demo)
  teacher_cfg, student_cfg = train.model_configs(layers_demo)
  assert (student_cfg.num_layers, student_cfg.hidden_size, teacher_cfg.hidden_size) == (3, 192, 384)
  layer = train.layer_loss_config(layers_demo.layer_loss, teacher_cfg, student_cfg)
  assert layer.active and layer.layer_map[-1] == (3, 6)
  assert bool(train.projection_shapes(layers_demo.layer_loss, teacher_cfg, student_cfg)) == (recipe == "tinybert")


def test_compute_dropout_bits_reaches_the_student_and_the_step():
  """`compute.dropout_bits` is the student's (16 by default); 32 is flax's nn.Dropout: another loss from the same
  batch and keys, while without dropout the two steps are one."""
  teacher_cfg = _models()[0].cfg
  c = _step_config()
  assert train.student_config(c, teacher_cfg).dropout_bits == 16
  c.compute.dropout_bits = 32
  assert train.student_config(c, teacher_cfg).dropout_bits == 32
  models, batch = _models(), _batch()
  teacher, tp, student, sp = models
  flax_models = (teacher, tp, distilbert_jax.Encoder(student.cfg.replace(dropout_bits=32)), sp)
  _, ours, _ = _one_step(_step_config(), (1, 1, 1), models, batch)
  _, flax_dropout, _ = _one_step(_step_config(), (1, 1, 1), flax_models, batch)
  assert student.cfg.dropout_bits == 16 and ours["loss"] != flax_dropout["loss"]
  no_dropout = dict(dropout_rate=0.0, attention_dropout_rate=0.0)
  _, a, _ = _one_step(_step_config(), (1, 1, 1), (teacher, tp, distilbert_jax.Encoder(
      student.cfg.replace(**no_dropout)), sp), batch)
  _, b, _ = _one_step(_step_config(), (1, 1, 1), (teacher, tp, distilbert_jax.Encoder(
      student.cfg.replace(dropout_bits=32, **no_dropout)), sp), batch)
  assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
