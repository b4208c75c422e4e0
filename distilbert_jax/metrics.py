"""Accounting and reporting: FLOPs and MFU, metric files, the progress bar, throughput.

FLOPs are counted in one place (`encoder_flops_per_token`) and combined for distillation in another
(`distillation_flops_per_token`); MFU divides them by the advertised peak of the accelerator
(`peak_flops_per_device`). Metrics go to `workdir/metrics.jsonl` (one JSON object per line) and to
TensorBoard under `workdir/tb`.

Shapes: L sequence length, D hidden size, F feed-forward size, V vocabulary, N layers.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Iterable, Mapping

import numpy as np
import tensorboardX
import tqdm

from distilbert_jax.model import EncoderConfig

PEAK_FLOPS_ENV = "DISTILBERT_JAX_PEAK_FLOPS"


# ----------------------------------------------------------------------------------------------------------
# FLOPs


def _logit_fraction(with_logits: bool | float) -> float:
  # bool first: True is also an int, and True must mean "every position", not 1 by accident of arithmetic.
  if isinstance(with_logits, bool):
    return 1.0 if with_logits else 0.0
  fraction = float(with_logits)
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"the fraction of positions with logits must lie in [0, 1], got {with_logits!r}")
  return fraction


def encoder_flops_per_token(cfg: EncoderConfig, seq_len: int, *, with_logits: bool | float = True) -> float:
  """Forward FLOPs per token of one encoder (a multiply-add counts as 2 FLOPs).

  Only matrix multiplications count (the convention of MFU in PaLM and MaxText): softmax, LayerNorm, GELU,
  biases and the losses are elementwise, and the embeddings are lookups (0 FLOPs). With D = hidden size,
  F = intermediate size, V = vocabulary, L = `seq_len`, N = layers and p = the fraction of positions that
  go through the MLM head:

      per layer   = 3·2·D·D        (query, key, value projections)
                  + 2·L·D          (attention scores q·k over L keys, all heads together)
                  + 2·L·D          (probability-weighted sum of the values)
                  + 2·D·D          (attention output projection)
                  + 2·2·D·F        (MLP in and out)
                  = 8·D² + 4·L·D + 4·D·F
      MLM head    = p · (2·D·D + 2·D·V)   (transform dense, tied vocabulary projection)
      pooler      = 2·D·D / L      (BERT only: one dense on the [CLS] token of each sequence)
      total       = N · per layer + MLM head + pooler

  `with_logits` gives p: True (1.0) when every position is projected, False (0.0) when no logits are
  computed (`compute_logits=False`), or a float such as 0.15 when only the masked positions are gathered
  and projected. The transform scales with p as well, because `Encoder.mlm_logits` applies the whole head
  to the gathered positions only. With a fixed-size gather (`jnp.nonzero(..., size=K)`) p is K divided by
  the tokens counted in `flops_per_step`, since the hardware computes all K rows, valid or not.

  `seq_len` is the length the hardware computes, padding included: attention runs over every key. Activation
  recomputation (`cfg.remat`) is not counted: MFU counts the model's FLOPs, not the extra ones remat spends.

  Returns FLOPs per token (a float: the pooler and p make it fractional).
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  p = _logit_fraction(with_logits)
  d, f, v, n, l = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers, seq_len
  per_layer = 3 * 2 * d * d + 2 * l * d + 2 * l * d + 2 * d * d + 2 * 2 * d * f
  head = p * (2 * d * d + 2 * d * v)
  pooler = 2 * d * d / l if cfg.use_pooler else 0.0
  return float(n * per_layer + head + pooler)


def distillation_flops_per_token(student_cfg: EncoderConfig, teacher_cfg: EncoderConfig | None, seq_len: int,
                                 *, student_logit_fraction: bool | float,
                                 teacher_logit_fraction: bool | float) -> float:
  """FLOPs per token of one distillation training step.

      total = teacher forward (×1: frozen, no backward) + student forward and backward (×3)

  The backward pass costs twice the forward (a gradient for the activations and one for the weights of
  every matmul), hence 3 × the student's forward. `teacher_cfg=None` counts plain MLM training of the
  student alone. The logit fractions are each model's `with_logits` in `encoder_flops_per_token`: 1.0 when
  every position is projected, about 0.15 when only the masked positions are, 0 when a model computes no
  logits (e.g. a teacher used only for the cosine loss).
  """
  student = encoder_flops_per_token(student_cfg, seq_len, with_logits=student_logit_fraction)
  teacher = 0.0
  if teacher_cfg is not None:
    teacher = encoder_flops_per_token(teacher_cfg, seq_len, with_logits=teacher_logit_fraction)
  return teacher + 3.0 * student


def layer_loss_flops_per_token(layer_loss, student_cfg: EncoderConfig, teacher_cfg: EncoderConfig, seq_len: int,
                               projections: Iterable[str] = ()) -> float:
  """Matmul FLOPs per token that the layer losses add to a distillation step (`losses.LayerLossConfig`).

  A relation softmax(a·bᵀ/√K) over L keys costs 2·L·W per token for features of width W (all heads
  together: W = D, whatever the head count); the student's side counts ×3 (forward and backward), the
  frozen teacher's ×1. A learned projection D_s → D_t is a trained matmul on the student's side: 3·2·D_s·D_t.

      attention KL        per (student, teacher) pair: q·kᵀ of both models
      value relation      the last pair: v·vᵀ of both
      MiniLMv2 relations  the last pair: q·qᵀ, k·kᵀ, v·vᵀ of both
      hidden-state MSE    per pair, when a "hidden" projection is in `projections` (else elementwise: 0)
      embedding MSE       when an "embedding" projection is in `projections`

  `projections`: the names of the learned projections the run has (`train.projection_shapes`).
  """
  l, d_s, d_t = seq_len, student_cfg.hidden_size, teacher_cfg.hidden_size
  relation = 3 * 2 * l * d_s + 2 * l * d_t
  pairs = len(layer_loss.layer_map)
  on = lambda name: layer_loss.weight(name) > 0  # noqa: E731
  projection = 3 * 2 * d_s * d_t
  return float(on("attention") * pairs * relation + on("value_relation") * relation + on("relations") * 3 * relation
               + on("hidden") * ("hidden" in projections) * pairs * projection
               + on("embedding") * ("embedding" in projections) * projection)


def flops_per_step(flops_per_token: float, tokens: int) -> float:
  """FLOPs of one step: `flops_per_token` (from the functions above) × `tokens` in the step.

  For MFU pass the padded token count (global batch × padded length): the hardware computes pad positions
  as it does real ones, so leaving them out would understate how busy the chips are. Pass the real
  (non-pad) count for "useful FLOPs", e.g. to compare padding or packing strategies.
  """
  if tokens < 0:
    raise ValueError(f"tokens must be non-negative, got {tokens}")
  return float(flops_per_token) * float(tokens)


# ----------------------------------------------------------------------------------------------------------
# Peak FLOP/s and MFU

# Advertised dense peak per chip (FLOP/s) for 16-bit matmuls (bfloat16; float16 is the same on all of these).
# TPU keys are exact `device_kind` strings: "TPU v4 lite" (v4i) is another chip and must not match "TPU v4".
_TPU_PEAK_BF16 = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e reports itself as "TPU v5 lite"
    "tpu v5e": 197e12,
    "tpu v5": 459e12,  # v5p reports itself as "TPU v5"
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
}
# GPU `device_kind`s carry memory and form factor ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"), so they
# match by substring, most specific first: the PCIe H100 has fewer SMs and a lower clock than the SXM one.
_GPU_PEAK_BF16 = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("a100", 312e12),
)


def peak_flops_per_device(device=None, dtype: str = "bfloat16") -> float | None:
  """Advertised peak FLOP/s of one device for matmuls in `dtype`, or None when unknown.

  `device` is a `jax.Device`, anything with a `device_kind` attribute, or a `device_kind` string; by default
  `jax.devices()[0]`. Known: TPU v4, v5e, v5p, v6e; NVIDIA A100, H100 (SXM and PCIe), H200 (dense, no
  sparsity). `dtype` is the compute dtype: "bfloat16" or "float16" give the 16-bit figure; "float32" gives
  the TF32 figure (half) on GPUs, where XLA runs float32 matmuls as TF32 by default, and the bfloat16 figure
  on TPUs, where the default precision runs them as bfloat16 passes.

  CPUs (and unknown accelerators) have no table entry: the result is None, and MFU is not reported, unless
  the environment variable DISTILBERT_JAX_PEAK_FLOPS holds a number (FLOP/s per device, e.g. "2e12"). When
  set, that variable wins on every device, so a measured peak can replace the advertised one.
  """
  if dtype not in ("bfloat16", "float16", "float32"):
    raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
  override = os.environ.get(PEAK_FLOPS_ENV)
  if override:
    try:
      return float(override)
    except ValueError:
      raise ValueError(f"{PEAK_FLOPS_ENV}={override!r} is not a number of FLOP/s") from None
  if device is None:
    import jax  # only here: the rest of this module needs no accelerator runtime
    device = jax.devices()[0]
  kind = (device if isinstance(device, str) else device.device_kind).strip().lower()
  if kind in _TPU_PEAK_BF16:
    return _TPU_PEAK_BF16[kind]
  for name, peak in _GPU_PEAK_BF16:
    if name in kind:
      return peak / 2 if dtype == "float32" else peak
  return None


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, peak: float | None) -> float | None:
  """Model FLOPs utilisation, a fraction in [0, 1]: achieved FLOP/s over the peak of all devices.

      mfu = flops_per_step / (step_seconds · num_devices · peak)

  `flops_per_step` in FLOPs for the whole (global) step, `step_seconds` in seconds per step, `peak` in FLOP/s
  per device. None when `peak` is None (no known peak, e.g. on CPU).
  """
  if peak is None:
    return None
  if step_seconds <= 0 or num_devices < 1 or peak <= 0:
    raise ValueError(f"need step_seconds > 0, num_devices >= 1 and peak > 0, got {step_seconds}, "
                     f"{num_devices}, {peak}")
  return float(flops_per_step) / (float(step_seconds) * num_devices * float(peak))


# ----------------------------------------------------------------------------------------------------------
# Metric files


def _scalar(name: str, value: Any) -> int | float:
  """A Python int or float from a Python, NumPy or JAX scalar (JSON cannot hold NumPy types)."""
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f"metric {name!r} is not a scalar: shape {array.shape}")
  item = array.reshape(()).item()
  if isinstance(item, (bool, int)):
    return int(item)
  return float(item)


class MetricsWriter:
  """Scalars to `workdir/metrics.jsonl` and to TensorBoard (`workdir/tb`).

  Each `write(step, scalars)` appends one line `{"step": step, name: value, ...}` and flushes it, so a crash
  loses nothing already written. The file is only ever appended to; on resume call `truncate_after(step)`
  with the restored step to drop the lines of steps the restored state has not seen, so that steps are not
  written twice. TensorBoard event files cannot be edited: there the next writer is opened with
  `purge_step = step + 1`, which tells TensorBoard to hide the older events from that step on.

  Values must be host scalars (Python, NumPy, or JAX arrays of one element; the latter wait for the device).
  Non-finite floats are written as NaN / Infinity, which Python's `json` reads back.

  `enabled=False` makes every method a no-op and creates no file: in a multi-host run pass
  `enabled=jax.process_index() == 0`. Usable as a context manager, which closes it.
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self.tb_dir = pathlib.Path(workdir) / "tb"
    self._file = None
    self._tb = None
    self._purge_step: int | None = None
    if enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Append the scalars of `step`; names become JSON keys and TensorBoard tags."""
    if not self.enabled:
      return
    if "step" in scalars:
      raise ValueError("'step' is reserved for the step number")
    step = int(step)
    values = {name: _scalar(name, value) for name, value in scalars.items()}
    if self._file is None:
      self._file = open(self.path, "a", encoding="utf-8")
    self._file.write(json.dumps({"step": step, **values}) + "\n")
    self._file.flush()
    if self._tb is None:
      # Opened on first use so that a truncate_after before it can still pass purge_step.
      self._tb = tensorboardX.SummaryWriter(str(self.tb_dir), purge_step=self._purge_step)
    for name, value in values.items():
      self._tb.add_scalar(name, value, global_step=step)
    self._tb.flush()

  def truncate_after(self, step: int) -> int:
    """Drop every line with a step above `step` (and any torn last line); return the lines dropped.

    Call it when resuming from a checkpoint of `step`, before the first `write`.
    """
    if not self.enabled:
      return 0
    step = int(step)
    self._close_files()
    self._purge_step = step + 1
    if not self.path.exists():
      return 0
    kept, dropped = [], 0
    with open(self.path, encoding="utf-8") as f:
      for line in f:
        try:
          record = json.loads(line)
          keep = int(record["step"]) <= step
        except (ValueError, KeyError, TypeError):
          keep = False  # a line cut short by a crash mid-write
        if keep:
          kept.append(line if line.endswith("\n") else line + "\n")
        else:
          dropped += 1
    if dropped:
      # Write aside and rename: a crash now must not leave the history half rewritten.
      tmp = self.path.with_name(self.path.name + ".tmp")
      tmp.write_text("".join(kept), encoding="utf-8")
      os.replace(tmp, self.path)
    return dropped

  def _close_files(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def close(self) -> None:
    self._close_files()

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_curve(workdir: str | os.PathLike) -> list[dict]:
  """The held-out learning curve of a run's `metrics.jsonl`: step, accuracy, loss, and the training tokens
  and minutes up to that step (summed from the logged rates, so time spent evaluating is not counted)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
  curve, seconds, tokens, last_step = [], 0.0, 0.0, 0
  for row in rows:
    if "steps_per_s" in row:
      dt = (row["step"] - last_step) / row["steps_per_s"]
      seconds, tokens, last_step = seconds + dt, tokens + row["tokens_per_s"] * dt, row["step"]
    if "heldout_mlm_accuracy" in row:
      curve.append({"step": row["step"], "accuracy": row["heldout_mlm_accuracy"], "loss": row["heldout_mlm_loss"],
                    "tokens": tokens, "minutes": seconds / 60})
  return curve


def plateau(curve: list[dict], points: float) -> dict:
  """Whether held-out accuracy rose by less than `points` percentage points over the last quarter of the run
  (from the last point at or before 3/4 of the last point's step to the last point). A curve of fewer than
  two points has not plateaued."""
  if len(curve) < 2:
    return {"rise_last_quarter_points": None, "reached": False}
  last = curve[-1]
  quarter_start = last["step"] - last["step"] / 4
  before = [p for p in curve if p["step"] <= quarter_start] or curve[:1]
  rise = 100 * (last["accuracy"] - before[-1]["accuracy"])
  return {"rise_last_quarter_points": rise, "from_step": before[-1]["step"], "to_step": last["step"],
          "reached": rise < points}


def growth_per_doubling(curve: list[dict], from_step: int = 0) -> float | None:
  """Percentage points of held-out accuracy gained per doubling of the steps: the least-squares slope of
  accuracy against log2(step) over the curve's points from `from_step` on (None with fewer than 3). A curve
  that grows at a steady rate per doubling rises rate * log2(4/3) over the last quarter of a run of any
  length: such a run reaches `plateau` only once the curve bends."""
  points = [(math.log2(p["step"]), 100 * p["accuracy"]) for p in curve if p["step"] >= max(from_step, 1)]
  if len(points) < 3:
    return None
  mean_x = sum(x for x, _ in points) / len(points)
  mean_y = sum(y for _, y in points) / len(points)
  spread = sum((x - mean_x) ** 2 for x, _ in points)
  return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else None


# ----------------------------------------------------------------------------------------------------------
# Progress and throughput


def _si(x: float) -> str:
  """12345.6 -> '12.3k': short enough for a progress bar."""
  for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= factor:
      return f"{x / factor:.1f}{suffix}"
  return f"{x:.1f}"


class Progress:
  """Progress over steps `initial_step`..`total_steps`, with the loss and tokens/s.

  On a terminal or in a notebook, a tqdm bar. Elsewhere (a log file, `nohup`, CI), a bar's carriage returns make
  an unreadable log, so `lines` (the default there) prints a plain line instead, at most every `every_s`
  seconds and at the last step: the step, the share done, the loss, tokens/s and the time left. `enabled=False`
  (non-zero processes in a multi-host run) shows nothing.
  """

  def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True, *, lines: bool | None = None,
               every_s: float = 60.0, stream=None, clock=time.monotonic):
    self._stream = stream if stream is not None else sys.stderr
    if lines is None:  # a terminal, or a notebook's output (which draws carriage returns in place): the bar
      lines = not (getattr(self._stream, "isatty", lambda: False)() or "ipykernel" in sys.modules)
    self._lines = enabled and lines
    self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, disable=not enabled or self._lines, unit="step",
                          dynamic_ncols=True, smoothing=0.1, file=self._stream)
    self.step = initial_step
    self._total, self._every, self._clock = total_steps, every_s, clock
    self._began = (clock(), initial_step)
    self._printed = self._began[0]

  def update(self, step: int, loss: float | None = None, tokens_per_s: float | None = None) -> None:
    """Move to `step` (absolute, not an increment) and show the loss and tokens/s when given."""
    self._bar.update(step - self.step)
    self.step = step
    postfix = [f"step={step}"]
    if loss is not None:
      postfix.append(f"loss={float(loss):.4f}")
    if tokens_per_s is not None:
      postfix.append(f"tok/s={_si(float(tokens_per_s))}")
    self._bar.set_postfix_str(" ".join(postfix), refresh=False)
    now = self._clock()
    if self._lines and (now - self._printed >= self._every or step >= self._total):
      self._printed = now
      self._stream.write(self._line(step, now, postfix[1:]) + "\n")
      self._stream.flush()

  def _line(self, step: int, now: float, figures: list[str]) -> str:
    """"step 300/1,200 (25%) loss=… tok/s=…; 0.37 steps/s, 41 min left"."""
    line = f"step {step:,}/{self._total:,} ({step / max(self._total, 1):.0%})" + "".join(f" {f}" for f in figures)
    began_at, began_step = self._began
    if step > began_step and now > began_at:
      rate = (step - began_step) / (now - began_at)
      line += f"; {rate:.2f} steps/s"
      if step < self._total:
        left = (self._total - step) / rate
        line += f", {left / 60:.0f} min left" if left >= 60 else f", {left:.0f} s left"
    return line

  def close(self) -> None:
    self._bar.close()

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
