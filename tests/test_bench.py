"""tools/bench.py on tiny shapes: both sides compute the same step, the figures are sane; no timing asserts."""
import math
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
import bench  # noqa: E402

TINY = ["--config", "tiny", "--batch", "8", "--seq", "32", "--rounds", "1", "--steps", "1", "--max-busy", "1"]


def test_tiny_bench_agrees_and_reports(capsys):
  # L_ce at the masked positions: every side (JAX, PyTorch projecting every position, PyTorch gathering the
  # masked ones); the check of L_ce at every position is covered below.
  (result,) = bench.main(TINY + ["--ce", "masked"])
  assert result["restrict_ce_to_mask"]
  assert set(result["sides"]) == {"JAX", "PyTorch", "PyTorch-gather"}
  for term, by_side in result["check"].items():
    jax_value = by_side["JAX"]
    assert math.isfinite(jax_value) and jax_value > 0, (term, by_side)
    assert set(by_side) == {"JAX", "PyTorch", "PyTorch-gather"}
    for value in by_side.values():
      assert value == pytest.approx(jax_value, rel=bench.CHECK_RTOL[term]), (term, by_side)
  for side, f in result["sides"].items():
    for key in ("s_per_step", "cpu_s_per_step", "tokens_per_s", "padded_tokens_per_s"):
      assert math.isfinite(f[key]) and f[key] > 0, (side, key, f[key])
    assert f["padded_tokens_per_s"] > f["tokens_per_s"]  # the tiny batches have padding
    assert f["mfu"] is None  # a CPU has no known peak
    assert set(f["last_losses"]) == set(bench.LOSS_TERMS)
    assert all(math.isfinite(v) and v > 0 for v in f["last_losses"].values())
  assert set(result["ratios"]) == {"PyTorch", "PyTorch-gather"}
  assert all(math.isfinite(r) and r > 0 for r in result["ratios"].values())
  assert result["flops_per_token"] > 0
  out = capsys.readouterr().out
  assert "check (first step" in out and "JAX/this" in out and "n/a" in out


def test_mfu_when_the_peak_is_given(monkeypatch):
  monkeypatch.setenv("DISTILBERT_JAX_PEAK_FLOPS", "1e12")
  (result,) = bench.main(TINY + ["--ce", "all"])
  assert set(result["sides"]) == {"JAX", "PyTorch"}
  for f in result["sides"].values():
    # MFU = model FLOPs per step / (seconds per step · devices · peak).
    expected = result["flops_per_token"] * 8 * 32 / (f["s_per_step"] * f["devices"] * 1e12)
    assert f["mfu"] == pytest.approx(expected)


def test_check_refuses_a_different_student(tmp_path):
  """The check is what makes the timing meaningful: a PyTorch student with other weights must be refused."""
  import distilbert_jax
  args = bench.parse_args(TINY)
  setup = bench.build(args, tmp_path)
  params = dict(setup.student_params)
  # A small change of one matrix (a constant added to a bias would vanish in the next LayerNorm).
  mlp = params["layer_0"]["mlp"]
  kernel = np.asarray(mlp["wi"]["kernel"])
  noise = np.random.default_rng(0).normal(0.0, 1e-2, kernel.shape).astype(kernel.dtype)
  params["layer_0"] = {**params["layer_0"], "mlp": {**mlp, "wi": {**mlp["wi"], "kernel": kernel + noise}}}
  distilbert_jax.save_hf(setup.student, params, setup.folders["student"])
  with pytest.raises(bench.MismatchError, match="first steps differ"):
    bench.check(setup, setup.config, ["full"])


@pytest.mark.parametrize("scheme", ["distilbert", "bernoulli"])
def test_mask_torch_selects_like_the_reference(scheme):
  import torch
  rng = np.random.default_rng(0)
  batch = bench.make_batches(1, 16, 40, 1024, 0.5, seed=1)[0]
  ids = torch.tensor(batch["input_ids"], dtype=torch.long)
  mask = torch.tensor(batch["attention_mask"], dtype=torch.long)
  probs_V = torch.tensor(rng.uniform(0.1, 1.0, 1024), dtype=torch.float32)
  probs_V[[bench.PAD, bench.UNK, bench.CLS, bench.SEP, bench.MASK]] = 0.0
  mlm = dict(prob=0.15, scheme=scheme, word_mask=0.8, word_keep=0.1, word_rand=0.1)
  out, labels = bench.mask_torch(ids, mask, probs_V, mlm, generator=torch.Generator().manual_seed(0))
  chosen = labels >= 0
  if scheme == "distilbert":
    assert int(chosen.sum()) == math.ceil(0.15 * int(mask.sum()))
  else:
    assert 0 < int(chosen.sum()) < int(mask.sum())
  assert not chosen[mask == 0].any()  # never padding
  assert not chosen[(ids == bench.CLS) | (ids == bench.SEP)].any()  # never special tokens
  assert torch.equal(labels[chosen], ids[chosen])  # labels are the original ids
  assert torch.equal(out[~chosen], ids[~chosen])  # only chosen positions change
  assert (out[chosen] == bench.MASK).float().mean() > 0.5  # 80% become [MASK]


def test_jax_variants_are_timed_beside_the_default():
  (result,) = bench.main(TINY + ["--ce", "masked", "--torch-head", "gather", "--jax-variant",
                                 "rbg:train.dropout_rng=rbg", "--jax-variant",
                                 "nodrop:model.dropout_rate=0.0,model.attention_dropout_rate=0.0"])
  assert set(result["sides"]) == {"JAX", "JAX[rbg]", "JAX[nodrop]", "PyTorch-gather"}
  losses = {side: result["sides"][side]["last_losses"]["loss"] for side in ("JAX", "JAX[rbg]", "JAX[nodrop]")}
  assert len(set(losses.values())) == 3, losses  # other dropout bits; no dropout at all
  assert set(result["ratios"]) == {"JAX[rbg]", "JAX[nodrop]", "PyTorch-gather"}
  assert bench.parse_variant("a:x.y=3,z=rbg") == ("a", {"x.y": 3, "z": "rbg"})
  with pytest.raises(ValueError, match="NAME:KEY=VALUE"):
    bench.parse_variant("no-settings")


def test_model_settings_of_a_variant_change_both_models_or_the_teacher_and_nothing_else():
  import ml_collections
  from distilbert_jax import model as model_lib
  settings = {"model.dropout_rate": 0.0, "model.hidden_act": "gelu_new", "train.steps": 7}
  model = model_lib.Encoder(model_lib.EncoderConfig.bert(hidden_size=32, num_layers=1, num_heads=2))
  changed = bench.with_model_settings(model, settings)
  assert (changed.cfg.dropout_rate, changed.cfg.hidden_act) == (0.0, "gelu_new")
  assert changed.cfg.replace(dropout_rate=0.1, hidden_act="gelu") == model.cfg
  assert bench.with_model_settings(model, {"train.steps": 7}) is model
  config = bench.with_settings(ml_collections.ConfigDict({"train": {"steps": 1}}), settings)
  assert config.train.steps == 7 and "model" not in config
  with pytest.raises(SystemExit, match="no field drop_rate"):
    bench.with_model_settings(model, {"model.drop_rate": 0.0})
  # teacher.FIELD: the teacher's alone (bench passes its prefixes for the teacher only).
  teacher_only = {"teacher.dtype": "bfloat16", "model.dropout_rate": 0.0, "train.steps": 7}
  assert bench.with_model_settings(model, teacher_only).cfg == model.cfg.replace(dropout_rate=0.0)
  teacher = bench.with_model_settings(model, teacher_only, ("model.", "teacher."))
  assert teacher.cfg == model.cfg.replace(dropout_rate=0.0, dtype="bfloat16")
  config = bench.with_settings(ml_collections.ConfigDict({"train": {"steps": 1}}), teacher_only)
  assert config.train.steps == 7 and "teacher" not in config


def test_profile_shares_concurrent_time_and_names_each_phase(tmp_path):
  import profile_step
  # A alone for 2 s, A and B together for 2 s, B alone for 2 s: 6 s of wall time, 3 s each.
  shares = profile_step.shared_durations([("A", 0.0, 4.0), ("B", 2.0, 6.0), ("C", 7.0, 8.0)])
  assert shares == {"A": 3.0, "B": 3.0, "C": 1.0}
  assert profile_step.jax_phase("jit(traced)/jvp(teacher)/Encoder/layer_1/mlp/wi/dot_general") == "teacher forward"
  assert profile_step.jax_phase("jit(traced)/transpose(jvp(student))/Encoder/layer_0/mlp") == "student backward"
  assert profile_step.jax_phase("jit(traced)/jvp(Encoder.mlm_logits)/mlm_head/dot_general") == "heads + losses forward"
  assert profile_step.jax_kind("jit(traced)/jvp(teacher)/Encoder/layer_2/mlp_norm/reduce_sum [dot]") == "matmul"
  assert profile_step.jax_kind("jit(traced)/jvp(student)/Encoder/layer_0/Dropout_1/jit(_bernoulli)/jit(_uniform)"
                               "/while") == "dropout bits"
  result = profile_step.main(["--config", "tiny", "--batch", "8", "--seq", "32", "--steps", "1", "--ce", "masked",
                              "--json", str(tmp_path / "p.json")])
  jax_side, torch_side = result["JAX"], result["PyTorch-gather"]
  for side in (jax_side, torch_side):
    assert side["wall"] > 0 and side["top"]
    assert 0 < sum(side["kinds"].values()) <= side["wall"] * 1.05
  for phase in ("teacher forward", "student forward", "student backward", "optimizer"):
    assert jax_side["phases"].get(phase, 0) > 0, phase
  assert set(jax_side["phases"]) <= set(profile_step.PHASES) and set(jax_side["kinds"]) <= set(profile_step.KINDS)
  assert (tmp_path / "p.json").exists()
