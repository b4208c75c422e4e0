"""FLOPs against a hand count and against XLA, peak table, MFU, metric files, progress and throughput."""
import json
import types

import jax
import jax.numpy as jnp
import pytest

import distilbert_jax
from distilbert_jax import metrics

# Matmuls dominate at this size, so XLA's count (which adds softmax, LayerNorm and GELU) stays close.
XLA_CFG = distilbert_jax.EncoderConfig.distilbert(vocab_size=1000, hidden_size=256, num_layers=2, num_heads=4,
                                                  intermediate_size=1024, max_position_embeddings=128)
TINY = distilbert_jax.EncoderConfig.distilbert(vocab_size=10, hidden_size=4, num_layers=2, num_heads=2,
                                               intermediate_size=8, max_position_embeddings=16)


def _xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per program
    cost = cost[0]
  return float(cost["flops"])


@pytest.fixture(scope="module")
def xla_model():
  model = distilbert_jax.Encoder(XLA_CFG)
  return model, distilbert_jax.init_params(model, jax.random.key(0)), jnp.zeros((2, 128), jnp.int32)


def test_flops_hand_count():
  # D=4, F=8, V=10, L=6, 2 layers. Per layer: qkv 3·2·16=96, scores 2·6·4=48, weighted sum 48,
  # out 2·16=32, mlp 2·2·4·8=128 -> 352. Head: 2·16 + 2·4·10 = 112.
  assert metrics.encoder_flops_per_token(TINY, 6) == 2 * 352 + 112
  assert metrics.encoder_flops_per_token(TINY, 6, with_logits=False) == 2 * 352
  assert metrics.encoder_flops_per_token(TINY, 6, with_logits=0.25) == 2 * 352 + 0.25 * 112
  # BERT's pooler: one 2·D·D dense per sequence, spread over its 6 tokens.
  bert = TINY.replace(family="bert", use_pooler=True, type_vocab_size=2)
  assert metrics.encoder_flops_per_token(bert, 6) == 2 * 352 + 112 + 32 / 6
  with pytest.raises(ValueError):
    metrics.encoder_flops_per_token(TINY, 6, with_logits=1.5)


def test_distillation_is_teacher_forward_plus_three_student_forwards():
  teacher = TINY.replace(num_layers=4)
  fwd = metrics.encoder_flops_per_token
  got = metrics.distillation_flops_per_token(TINY, teacher, 6, student_logit_fraction=0.15,
                                             teacher_logit_fraction=1.0)
  assert got == pytest.approx(fwd(teacher, 6) + 3 * fwd(TINY, 6, with_logits=0.15))
  alone = metrics.distillation_flops_per_token(TINY, None, 6, student_logit_fraction=True,
                                               teacher_logit_fraction=True)
  assert alone == 3 * fwd(TINY, 6)
  assert metrics.flops_per_step(alone, 2 * 6) == 12 * alone


def test_forward_flops_match_xla(xla_model):
  model, params, ids = xla_model
  xla = _xla_flops(lambda p, i: model.apply({"params": p}, i).logits, params, ids)
  ours = metrics.flops_per_step(metrics.encoder_flops_per_token(XLA_CFG, 128), ids.size)
  assert xla == pytest.approx(ours, rel=0.1)


def test_partial_logits_match_xla(xla_model):
  model, params, ids = xla_model

  def forward(p, i):  # project only the first quarter of the positions, as a masked-only head would
    h = model.apply({"params": p}, i, compute_logits=False).last_hidden_state[:, :32]
    return model.apply({"params": p}, h, method=distilbert_jax.Encoder.mlm_logits)

  ours = metrics.encoder_flops_per_token(XLA_CFG, 128, with_logits=0.25) * ids.size
  assert _xla_flops(forward, params, ids) == pytest.approx(ours, rel=0.1)


def test_backward_is_twice_the_forward_per_xla(xla_model):
  model, params, ids = xla_model
  grad = jax.value_and_grad(lambda p, i: jnp.sum(model.apply({"params": p}, i).logits))
  ours = metrics.distillation_flops_per_token(XLA_CFG, None, 128, student_logit_fraction=1.0,
                                              teacher_logit_fraction=0.0) * ids.size
  assert _xla_flops(grad, params, ids) == pytest.approx(ours, rel=0.1)


def test_peak_table(monkeypatch):
  monkeypatch.delenv(metrics.PEAK_FLOPS_ENV, raising=False)
  fake = lambda kind: types.SimpleNamespace(device_kind=kind)
  assert metrics.peak_flops_per_device(fake("TPU v4")) == 275e12
  assert metrics.peak_flops_per_device(fake("TPU v5 lite")) == 197e12
  assert metrics.peak_flops_per_device(fake("TPU v5")) == 459e12
  assert metrics.peak_flops_per_device(fake("TPU v6 lite")) == 918e12
  assert metrics.peak_flops_per_device(fake("TPU v4 lite")) is None  # v4i, another chip
  assert metrics.peak_flops_per_device(fake("NVIDIA H100 80GB HBM3")) == 989e12
  assert metrics.peak_flops_per_device(fake("NVIDIA H100 PCIe")) == 756e12
  assert metrics.peak_flops_per_device(fake("NVIDIA H200")) == 989e12
  assert metrics.peak_flops_per_device("NVIDIA A100-SXM4-40GB") == 312e12
  assert metrics.peak_flops_per_device("NVIDIA A100-SXM4-40GB", dtype="float32") == 156e12
  assert metrics.peak_flops_per_device(fake("cpu")) is None
  monkeypatch.setenv(metrics.PEAK_FLOPS_ENV, "2e12")
  assert metrics.peak_flops_per_device(fake("cpu")) == 2e12
  assert metrics.peak_flops_per_device() == 2e12


def test_mfu():
  # 1e15 FLOPs in 2 s on 4 devices of 250e12 FLOP/s peak: 1e15 / (2 · 4 · 250e12) = 0.5.
  assert metrics.mfu(1e15, 2.0, 4, 250e12) == pytest.approx(0.5)
  assert metrics.mfu(1e15, 2.0, 4, None) is None
  with pytest.raises(ValueError):
    metrics.mfu(1e15, 0.0, 4, 250e12)


def _lines(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_writer_and_resume(tmp_path):
  with metrics.MetricsWriter(tmp_path) as writer:
    for step in (1, 2, 3):
      writer.write(step, {"loss": jnp.float32(step / 2), "tokens": step * 10})
  rows = _lines(tmp_path / "metrics.jsonl")
  assert rows == [{"step": s, "loss": s / 2, "tokens": s * 10} for s in (1, 2, 3)]
  assert type(rows[0]["loss"]) is float and type(rows[0]["tokens"]) is int
  assert list((tmp_path / "tb").glob("events.out.tfevents.*"))

  # Resume from step 1: steps 2 and 3 go, a torn last line goes too, and new steps append.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "lo')
  with metrics.MetricsWriter(tmp_path) as writer:
    assert writer.truncate_after(1) == 3
    writer.write(2, {"loss": 0.25})
  assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2]

  with pytest.raises(ValueError):
    metrics.MetricsWriter(tmp_path).write(5, {"x": jnp.zeros(3)})


def test_disabled_writer_writes_nothing(tmp_path):
  with metrics.MetricsWriter(tmp_path / "w", enabled=False) as writer:
    writer.write(1, {"loss": 1.0})
    assert writer.truncate_after(0) == 0
  assert not (tmp_path / "w").exists()


def test_progress(capsys):
  with metrics.Progress(10, initial_step=2, lines=False) as bar:
    bar.update(5, loss=1.23456, tokens_per_s=12345.0)
    assert bar._bar.n == 5
    assert "loss=1.2346" in bar._bar.postfix and "tok/s=12.3k" in bar._bar.postfix
  with metrics.Progress(10, enabled=False) as quiet:
    quiet.update(3, loss=1.0)
  assert quiet.step == 3


def test_progress_without_a_terminal_prints_plain_lines_now_and_then():
  """A log file gets a line at most every `every_s` seconds and at the last step, with the time left."""
  import io
  stream, now = io.StringIO(), [100.0]
  with metrics.Progress(1200, initial_step=200, stream=stream, every_s=60, clock=lambda: now[0]) as bar:
    assert bar._bar.disable  # a StringIO is not a terminal: no bar
    now[0] = 130.0
    bar.update(250, loss=11.09034, tokens_per_s=1234.0)  # 30 s since the start: too soon for a line
    now[0] = 200.0
    bar.update(300, loss=10.5, tokens_per_s=1500.0)  # 100 steps in 100 s: 900 left, 15 min
    now[0] = 220.0
    bar.update(350, loss=10.4)  # 20 s since the last line
    now[0] = 1100.0
    bar.update(1200, loss=9.0)  # the last step: always
  assert stream.getvalue().splitlines() == [
      "step 300/1,200 (25%) loss=10.5000 tok/s=1.5k; 1.00 steps/s, 15 min left",
      "step 1,200/1,200 (100%) loss=9.0000; 1.00 steps/s"]
  quiet = io.StringIO()
  with metrics.Progress(10, stream=quiet, enabled=False, every_s=0) as bar:
    bar.update(10, loss=1.0)
  assert quiet.getvalue() == ""
