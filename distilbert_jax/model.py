"""One Transformer encoder, configured as BERT, DistilBERT, RoBERTa or XLM/FlauBERT, with a masked-LM head and
an optional task head.

The families share one layer and one embedding block; configuration switches pick what differs:
- BERT: token-type embeddings and a pooler. DistilBERT: neither, fewer layers.
- RoBERTa: one token type, position ids counted from `pad_token_id + 1` over the non-pad tokens
  (`positions_skip_padding`), an MLM head whose activation is always exact GELU (`mlm_head_act`).
- XLM/FlauBERT: post-norm or pre-norm layers (`pre_norm`), token-type ids looked up in the word table and
  added only when given (`token_types_in_word_table`), optional language embeddings (`num_languages`), the
  residual stream zeroed at padding after the embeddings and after every layer (`zero_padding`), and an MLM
  head that is only the tied projection plus a bias (`mlm_transform=False`).
Hugging Face key names do not live here (see `hf.py`); this module knows nothing of files.

Task heads (`num_labels` > 0; `task_head` says which, `TASK_HEADS`), each dropout then one dense layer:
- "sequence": on the pooled first token -> `class_logits` (B, num_labels) (1 label: regression);
- "token": on every token -> `token_logits` (B, L, num_labels) (named-entity recognition);
- "span": on every token, two outputs -> `start_logits`, `end_logits` (B, L) (extractive question answering).

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`, ...), and the residual
stream is pinned to `ACTIVATION_AXES` after the embeddings and after every layer; `sharding.py` maps the
names to mesh axes, so the model never mentions a mesh (outside `sharding.activation_sharding` the pins
do nothing).

Throughput options (configuration only; the parameters and the results do not change):
- `attention`: "einsum" computes softmax(QKᵀ/√K + mask)·V explicitly; "dot_product" calls
  `jax.nn.dot_product_attention` (JAX picks the implementation: XLA today, on every backend); "cudnn"
  forces cuDNN's fused flash attention (NVIDIA GPUs, bfloat16/float16 compute only). The fused call has no
  dropout and returns no probabilities, so a layer takes the explicit einsum path whenever attention dropout
  is active (`deterministic=False` and `attention_dropout_rate > 0`) or `output_attentions=True`; set
  `attention_dropout_rate=0` to train through the fused kernel (the teacher, run deterministically, always
  uses it).
- `remat` with `remat_policy`: recompute each layer in the backward pass, saving what the policy names
  (`REMAT_POLICIES`).
- `dropout_bits`: 16 (default) draws each dropout decision from 16 random bits, two per 32-bit word of the
  generator (`Dropout`); 32 is flax's `nn.Dropout`, one 32-bit draw per element, as runs made before
  2026-12-07 drew them. The two drop other elements (the same distribution, up to the keep probability's
  rounding to a multiple of 2⁻¹⁶), so a training run's figures change with it; evaluation does not.

Shapes: B batch, L length, D hidden size, H heads, K head size, F feed-forward size, V vocabulary.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FAMILIES = ("bert", "distilbert", "roberta", "flaubert")
TASK_HEADS = ("sequence", "token", "span")


def gelu(x: jax.Array) -> jax.Array:
  """BERT's and DistilBERT's exact GELU, x · Φ(x) with Φ(x) = (1 + erf(x / √2)) / 2, as PyTorch computes it.

  In float32 whatever the input (as PyTorch's bf16 kernels do). `jax.nn.gelu(approximate=False)` takes Φ
  through erfc, more exact in the negative tail, where the GELU is near 0 anyway (it, this and PyTorch's agree
  to float32 rounding, < 1e-6), and XLA's CPU code for it is 2.5x slower forward and 1.9x with the gradient
  (BENCHMARKS.md "GELU and the accuracy count").
  """
  x32 = x.astype(jnp.float32)
  return (x32 * (0.5 + 0.5 * jax.lax.erf(x32 * np.float32(np.sqrt(0.5))))).astype(x.dtype)


ACTIVATIONS = {
    "gelu": gelu,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}
POOLER_ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}
# attention -> `implementation` of jax.nn.dot_product_attention; "einsum" is this module's explicit path.
ATTENTIONS = {"einsum": None, "dot_product": None, "cudnn": "cudnn"}
DROPOUT_BITS = (16, 32)  # random bits per dropout decision (`Dropout`)
# EncoderConfig fields that change how the model computes, not its parameters: a run's `config.compute`, which a
# resumed run may change.
COMPUTE_FIELDS = ("dtype", "remat", "remat_policy", "attention", "dropout_bits")
# What a rematerialised layer keeps from its forward pass (see jax.checkpoint_policies); the rest is
# recomputed in the backward pass. "full" keeps only the layer's inputs (nn.remat's default).
REMAT_POLICIES = {
    "full": None,
    # Every matmul output, the attention scores (B, H, L, L) included: only elementwise work is recomputed.
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    # The dense layers' outputs only (matmuls without batch dimensions): attention, softmax, GELU and
    # LayerNorm are recomputed (MaxText's "minimal").
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# Logical axes of the (B, L, D) residual stream between blocks (sharding.DEFAULT_RULES maps them).
ACTIVATION_AXES = ("batch", "length", "act_embed")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Hyperparameters of the encoder. Defaults are BERT-base.

  `family` only decides the Hugging Face naming and the defaults of the constructors (`bert`, `distilbert`,
  `roberta`, `flaubert`); what the model computes is decided by the fields alone.
  `dtype` is the compute dtype (bfloat16 on TPUs), `param_dtype` the storage dtype of the parameters. Matrix
  products take their operands in `dtype` and accumulate in float32 (`accumulate_f32`), as TPUs and
  PyTorch's autocast do; the masked-LM logits stay float32.
  `attention`, `remat` and `remat_policy` change how the model computes, not what (module docstring).
  """
  family: str = "bert"
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2  # 0: no token-type embeddings (DistilBERT)
  use_pooler: bool = True  # dense + activation on the first token (BERT's pooler, DistilBERT's pre_classifier)
  pooler_activation: str = "tanh"  # BERT: tanh; DistilBERT's sequence classifier: relu
  num_labels: int = 0  # > 0: a task head (`task_head`) with this many outputs (span: 2, start and end)
  task_head: str = "sequence"  # with num_labels > 0: "sequence", "token" or "span" (TASK_HEADS)
  label_names: tuple[str, ...] = ()  # the task's class names by id, when known (written as id2label)
  classifier_dropout_rate: float = 0.1
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  initializer_range: float = 0.02
  pad_token_id: int = 0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False  # recompute each layer's activations in the backward pass
  remat_policy: str = "full"  # with remat: what each layer saves (REMAT_POLICIES); ignored without remat
  dropout_bits: int = 16  # random bits per dropout decision: 16 (`Dropout`) or 32 (flax's nn.Dropout)
  attention: str = "einsum"  # "einsum", "dot_product" or "cudnn" (ATTENTIONS, module docstring)
  tokenizer: str | None = None  # folder or hub name of the tokenizer that goes with the vocabulary
  # Family switches (module docstring); the defaults are BERT's.
  positions_skip_padding: bool = False  # RoBERTa: position ids count non-pad tokens from pad_token_id + 1
  token_types_in_word_table: bool = False  # XLM: given token-type ids index the word embeddings
  num_languages: int = 0  # > 0: language embeddings, and every call must give language_ids (XLM)
  pre_norm: bool = False  # LayerNorm before attention and MLP (pre-norm FlauBERT); else after the residual sum
  zero_padding: bool = False  # XLM: the residual stream is multiplied by the padding mask after every block
  mlm_transform: bool = True  # the MLM head's dense + activation + LayerNorm before the tied projection
  mlm_head_act: str | None = None  # the MLM transform's activation; None: hidden_act (RoBERTa: always "gelu")

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    for name, act in (("hidden_act", self.hidden_act), ("mlm_head_act", self.mlm_head_act or self.hidden_act)):
      if act not in ACTIVATIONS:
        raise ValueError(f"{name} {act!r} is not supported; use one of {sorted(ACTIVATIONS)}")
    if self.dropout_bits not in DROPOUT_BITS:
      raise ValueError(f"dropout_bits must be one of {DROPOUT_BITS}, got {self.dropout_bits!r}")
    if self.num_languages == 1:
      raise ValueError("num_languages=1 gives every token the same language embedding: use 0 (no language "
                       "embeddings) or the number of languages")
    if self.positions_skip_padding and self.max_position_embeddings <= self.first_position:
      raise ValueError(f"positions_skip_padding starts positions at pad_token_id + 1 = {self.first_position}, "
                       f"beyond max_position_embeddings={self.max_position_embeddings}")
    if self.pooler_activation not in POOLER_ACTIVATIONS:
      raise ValueError(f"pooler_activation must be one of {sorted(POOLER_ACTIVATIONS)}, got {self.pooler_activation!r}")
    if self.task_head not in TASK_HEADS:
      raise ValueError(f"task_head must be one of {TASK_HEADS}, got {self.task_head!r}")
    if self.num_labels and self.task_head == "sequence" and not self.use_pooler:
      raise ValueError("a sequence classification head (num_labels > 0) sits on the pooler: set use_pooler=True")
    if self.num_labels and self.task_head == "span" and self.num_labels != 2:
      raise ValueError(f"a span head has 2 outputs (start, end), got num_labels={self.num_labels}")
    if self.label_names and len(self.label_names) != self.num_labels:
      raise ValueError(f"{len(self.label_names)} label_names for num_labels={self.num_labels}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {self.remat_policy!r}")
    if self.attention not in ATTENTIONS:
      raise ValueError(f"attention must be one of {sorted(ATTENTIONS)}, got {self.attention!r}")
    if self.attention == "cudnn" and self.dtype == "float32":
      raise ValueError("attention='cudnn' needs bfloat16 or float16 compute (cuDNN's fused attention has no "
                       "float32 kernel): set dtype='bfloat16', or use attention='dot_product'")

  @classmethod
  def bert(cls, **kw) -> "EncoderConfig":
    return cls(**{"family": "bert", "type_vocab_size": 2, "use_pooler": True, **kw})

  @classmethod
  def distilbert(cls, **kw) -> "EncoderConfig":
    return cls(**{"family": "distilbert", "num_layers": 6, "type_vocab_size": 0, "use_pooler": False, **kw})

  @classmethod
  def roberta(cls, **kw) -> "EncoderConfig":
    """RoBERTa-base's shape and switches (DistilRoBERTa: `num_layers=6`)."""
    return cls(**{"family": "roberta", "vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 1,
                  "use_pooler": False, "layer_norm_eps": 1e-5, "pad_token_id": 1, "positions_skip_padding": True,
                  "mlm_head_act": "gelu", **kw})

  @classmethod
  def flaubert(cls, **kw) -> "EncoderConfig":
    """XLM/FlauBERT switches with flaubert_small_cased's shape (6 layers, width 512, 8 heads, pre-norm, eps
    1e-6); the feed-forward width is always 4 × hidden_size, as in XLM."""
    kw = {"family": "flaubert", "vocab_size": 68729, "hidden_size": 512, "num_layers": 6, "num_heads": 8,
          "type_vocab_size": 0, "use_pooler": False, "layer_norm_eps": 1e-6, "pad_token_id": 2, "pre_norm": True,
          "token_types_in_word_table": True, "zero_padding": True, "mlm_transform": False, **kw}
    return cls(**{"intermediate_size": 4 * kw["hidden_size"], **kw})

  @property
  def head_size(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def first_position(self) -> int:
    """The position id of a sequence's first token: 0, or pad_token_id + 1 with positions_skip_padding."""
    return self.pad_token_id + 1 if self.positions_skip_padding else 0

  @property
  def max_length(self) -> int:
    """The longest sequence the learned positions cover."""
    return self.max_position_embeddings - self.first_position

  def replace(self, **kw) -> "EncoderConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "EncoderConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
      raise ValueError(f"unknown EncoderConfig fields {sorted(unknown)}")
    if "label_names" in d:  # JSON gives a list
      d = {**d, "label_names": tuple(d["label_names"])}
    return cls(**d)


@flax.struct.dataclass
class EncoderOutput:
  """logits (B, L, V) or None; hidden_states: num_layers + 1 arrays (B, L, D), embeddings output first;
  attentions: num_layers arrays (B, H, L, L) when asked for; qkv: num_layers (queries, keys, values) triples of
  (B, H, L, K) arrays when asked for (`output_qkv`; the projections before the 1/√K scaling, what the layer
  losses' relations are built from); pooled (B, D) when the config has a pooler;
  the task head's float32 outputs: class_logits (B, num_labels), token_logits (B, L, num_labels), or
  start_logits and end_logits (B, L)."""
  logits: jax.Array | None
  hidden_states: tuple[jax.Array, ...]
  attentions: tuple[jax.Array, ...] | None = None
  qkv: tuple[tuple[jax.Array, jax.Array, jax.Array], ...] | None = None
  pooled: jax.Array | None = None
  class_logits: jax.Array | None = None
  token_logits: jax.Array | None = None
  start_logits: jax.Array | None = None
  end_logits: jax.Array | None = None

  @property
  def last_hidden_state(self) -> jax.Array:
    return self.hidden_states[-1]


class _Named(nn.LogicallyPartitioned):
  """A parameter's logical axis names, read by `logical_axes`. Unlike flax's own box, unboxing adds no
  sharding constraint: parameters enter a step already sharded (its `in_shardings`), and flax's constraint
  fails on DenseGeneral's flattened (D, H·K) kernel inside an axis-rules context."""

  def unbox(self, apply_constraint=True):
    del apply_constraint
    return self.value


def _named(init_fn, axes: Sequence[str | None]):
  return lambda *args, **kwargs: _Named(init_fn(*args, **kwargs), tuple(axes))


def _init(cfg: EncoderConfig, axes: Sequence[str | None]):
  return _named(nn.initializers.normal(cfg.initializer_range), axes)


def _zeros(axes: Sequence[str | None]):
  return _named(nn.initializers.zeros_init(), axes)


def _ones(axes: Sequence[str | None]):
  return _named(nn.initializers.ones_init(), axes)


class Dropout(nn.Module):
  """Inverted dropout as flax's `nn.Dropout`, each keep decision drawn from 16 random bits.

  The generator's 32-bit words are split in two, so a mask costs half the random bits of `nn.Dropout` (one
  32-bit uniform draw per element): on a CPU the attention probabilities' dropout took half the time
  (BENCHMARKS.md "16-bit dropout draws"). The keep probability is 1 - rate rounded to a multiple of 2⁻¹⁶ (0.9 →
  58,982 / 65,536 = 0.8999939), and kept values are divided by that same probability, so the output's
  expectation is the input exactly. Uses the "dropout" rng collection, as `nn.Dropout`.
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    threshold = round((1.0 - self.rate) * 65536)  # keep where the 16-bit draw is below it
    if deterministic or threshold == 65536:
      return x
    if threshold == 0:
      return jnp.zeros_like(x)
    # Words in the input's shape but half its last axis, so a sharded input draws its shard's bits in place.
    *lead, last = x.shape
    words = jax.random.bits(self.make_rng("dropout"), (*lead, (last + 1) // 2), jnp.uint32)
    draws = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*lead, -1)[..., :last]
    keep = draws < jnp.uint16(threshold)
    return jax.lax.select(keep, x / (threshold / 65536), jnp.zeros_like(x))


def _dropout(cfg: EncoderConfig, rate: float) -> nn.Module:
  """The dropout module `cfg.dropout_bits` picks: `Dropout` (16) or flax's `nn.Dropout` (32)."""
  return (Dropout if cfg.dropout_bits == 16 else nn.Dropout)(rate)


def _layer_norm(cfg: EncoderConfig, name: str | None = None):
  # flax computes the statistics in float32 whatever the compute dtype: bf16 variance loses too much.
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
      scale_init=_ones(("embed",)), bias_init=_zeros(("embed",)), name=name)


def accumulate_f32(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
  """`lax.dot_general` accumulating in float32 and returning the operands' dtype.

  In float32 this is the plain product. In bfloat16 it is the product a bf16 unit computes (TPU MXUs, CPUs
  with AMX or AVX512-BF16): bf16 x bf16 -> float32 sums. XLA's CPU backend only takes its fast bf16 path
  for this form; a bf16-out product runs at float32 speed there (BENCHMARKS.md "bfloat16 products").
  """
  del preferred_element_type  # always float32
  out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                            preferred_element_type=jnp.float32, **kw)
  return out.astype(jnp.result_type(lhs, rhs))


def _dense(cfg: EncoderConfig, features: int | tuple[int, ...], kernel_axes: tuple[str, ...], name: str,
           axis: int | tuple[int, ...] = -1):
  """A (general) dense layer whose kernel and bias carry logical axis names."""
  num_out = 1 if isinstance(features, int) else len(features)
  return nn.DenseGeneral(
      features, axis=axis, dtype=cfg.dtype, param_dtype=cfg.param_dtype, dot_general=accumulate_f32,
      kernel_init=_init(cfg, kernel_axes), bias_init=_zeros(kernel_axes[-num_out:]), name=name)


class Embeddings(nn.Module):
  cfg: EncoderConfig

  def setup(self):
    cfg = self.cfg
    embed = functools.partial(nn.Embed, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.word_embeddings = embed(cfg.vocab_size, cfg.hidden_size, embedding_init=_init(cfg, ("vocab", "embed")))
    self.position_embeddings = embed(
        cfg.max_position_embeddings, cfg.hidden_size, embedding_init=_init(cfg, ("position", "embed")))
    if cfg.type_vocab_size:
      self.token_type_embeddings = embed(
          cfg.type_vocab_size, cfg.hidden_size, embedding_init=_init(cfg, ("token_type", "embed")))
    if cfg.num_languages:
      self.language_embeddings = embed(
          cfg.num_languages, cfg.hidden_size, embedding_init=_init(cfg, ("language", "embed")))
    self.layer_norm = _layer_norm(cfg)
    self.dropout = _dropout(cfg, cfg.dropout_rate)

  def __call__(self, ids_BxL, type_ids_BxL, position_ids_BxL, language_ids_BxL, deterministic):
    """type_ids_BxL and language_ids_BxL may be None: token types default to 0 in a separate table and are
    left out when they index the word table (as transformers' XLM does)."""
    cfg = self.cfg
    x_BxLxD = self.word_embeddings(ids_BxL) + self.position_embeddings(position_ids_BxL)
    if cfg.num_languages:
      x_BxLxD = x_BxLxD + self.language_embeddings(language_ids_BxL)
    if cfg.type_vocab_size:
      type_ids_BxL = jnp.zeros_like(ids_BxL) if type_ids_BxL is None else type_ids_BxL
      x_BxLxD = x_BxLxD + self.token_type_embeddings(type_ids_BxL)
    elif cfg.token_types_in_word_table and type_ids_BxL is not None:
      x_BxLxD = x_BxLxD + self.word_embeddings(type_ids_BxL)
    return self.dropout(self.layer_norm(x_BxLxD), deterministic=deterministic)

  def attend(self, h_xD):
    """float32 logits against the word embeddings (the tied MLM decoder), from operands in the compute dtype."""
    dtype = self.cfg.dtype
    table_VxD = self.word_embeddings.embedding
    return jnp.einsum("...d,vd->...v", h_xD.astype(dtype), table_VxD.astype(dtype), preferred_element_type=jnp.float32)


@functools.lru_cache(maxsize=None)
def _warn_fallback(attention: str, rate: float):
  log.warning("attention=%r: attention dropout (rate %s) is active, which the fused kernel cannot apply; "
              "these layers use the einsum path (set attention_dropout_rate=0 to train through the kernel)",
              attention, rate)


class SelfAttention(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxD, attend_Bx1xQxL, deterministic, output_attentions=False, output_qkv=False):
    """x_BxLxD: (B, L, D); attend_Bx1xQxL: bool, True where a query may attend a key (Q = 1: the same for
    every query, Q = L: per query). Returns (out_BxLxD, probs_BxHxLxL, qkv): the float32 attention
    probabilities (before dropout), or None when the fused kernel ran; with `output_qkv`, the queries, keys
    and values as (B, H, L, K) (before the 1/√K scaling; the same on either path), else None."""
    cfg = self.cfg
    hk = (cfg.num_heads, cfg.head_size)
    q_BxLxHxK = _dense(cfg, hk, ("embed", "heads", "kv"), "query")(x_BxLxD)
    k_BxLxHxK = _dense(cfg, hk, ("embed", "heads", "kv"), "key")(x_BxLxD)
    v_BxLxHxK = _dense(cfg, hk, ("embed", "heads", "kv"), "value")(x_BxLxD)
    qkv = (tuple(jnp.swapaxes(x_BxLxHxK, 1, 2) for x_BxLxHxK in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK))
           if output_qkv else None)
    fused = cfg.attention != "einsum" and not output_attentions
    if fused and not deterministic and cfg.attention_dropout_rate > 0:
      _warn_fallback(cfg.attention, cfg.attention_dropout_rate)
      fused = False
    if fused:
      ctx_BxLxHxK = _fused_attention(cfg, q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, attend_Bx1xQxL)
      probs_BxHxLxL = None
    else:
      # Heads before positions for both products: the same values as contracting the (B, L, H, K) layout
      # directly, and on a CPU 1.7x faster (XLA otherwise recomputes QKᵀ inside the softmax's fusions;
      # BENCHMARKS.md "Where the CPU step's time goes").
      q_BxHxLxK, k_BxHxLxK, v_BxHxLxK = (jnp.swapaxes(x, 1, 2) for x in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK))
      q_BxHxLxK = q_BxHxLxK / jnp.sqrt(cfg.head_size).astype(q_BxHxLxK.dtype)
      scores_BxHxLxL = jnp.einsum("bhqk,bhtk->bhqt", q_BxHxLxK, k_BxHxLxK, preferred_element_type=jnp.float32)
      # Additive mask as transformers builds it: 0 where attended, the float32 minimum where masked.
      bias_Bx1xQxL = jnp.where(attend_Bx1xQxL, 0.0, jnp.finfo(jnp.float32).min)
      # Softmax in float32: bf16 scores would lose the small probabilities.
      probs_BxHxLxL = jax.nn.softmax(scores_BxHxLxL + bias_Bx1xQxL, axis=-1)
      dropped = _dropout(cfg, cfg.attention_dropout_rate)(probs_BxHxLxL, deterministic=deterministic)
      ctx_BxHxLxK = jnp.einsum("bhqt,bhtk->bhqk", dropped.astype(cfg.dtype), v_BxHxLxK,
                               preferred_element_type=jnp.float32)
      ctx_BxLxHxK = jnp.swapaxes(ctx_BxHxLxK.astype(cfg.dtype), 1, 2)
    out_BxLxD = _dense(cfg, cfg.hidden_size, ("heads", "kv", "embed"), "out", axis=(-2, -1))(ctx_BxLxHxK)
    return out_BxLxD, probs_BxHxLxL, qkv


def _fused_attention(cfg: EncoderConfig, q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, attend_Bx1xQxL):
  """softmax(QKᵀ/√K, masked)·V through `jax.nn.dot_product_attention` -> (B, L, H, K).

  Its XLA form masks with a large negative number instead of adding the float32 minimum; a query that may
  attend nothing (a pad position of a packed row) gets uniform weights either way, as on the einsum path.
  """
  B, L = q_BxLxHxK.shape[:2]
  mask = attend_Bx1xQxL
  if cfg.attention == "cudnn":
    # cuDNN takes the mask as a (B, 1, L, L) bias; it does not broadcast over queries.
    mask = jnp.broadcast_to(mask, (B, 1, L, L))
  return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=mask,
                                      scale=1.0 / float(np.sqrt(cfg.head_size)),
                                      implementation=ATTENTIONS[cfg.attention])


class Mlp(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    h_BxLxF = ACTIVATIONS[cfg.hidden_act](_dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "wi")(x_BxLxD))
    return _dense(cfg, cfg.hidden_size, ("mlp", "embed"), "wo")(h_BxLxF)


class Layer(nn.Module):
  """A Transformer layer: post-LayerNorm (BERT's `BertLayer`, DistilBERT's `TransformerBlock`, XLM) or, with
  `pre_norm`, pre-LayerNorm (pre-norm FlauBERT: each block reads a normalised copy, the stream is not
  normalised; there is no final LayerNorm)."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxD, attend_Bx1xQxL, deterministic, output_attentions=False, output_qkv=False):
    cfg = self.cfg
    attention_norm, mlp_norm = _layer_norm(cfg, "attention_norm"), _layer_norm(cfg, "mlp_norm")
    attn_BxLxD, probs, qkv = SelfAttention(cfg, name="attention")(
        attention_norm(x_BxLxD) if cfg.pre_norm else x_BxLxD, attend_Bx1xQxL, deterministic, output_attentions,
        output_qkv)
    x_BxLxD = x_BxLxD + _dropout(cfg, cfg.dropout_rate)(attn_BxLxD, deterministic=deterministic)
    if not cfg.pre_norm:
      x_BxLxD = attention_norm(x_BxLxD)
    mlp_BxLxD = Mlp(cfg, name="mlp")(mlp_norm(x_BxLxD) if cfg.pre_norm else x_BxLxD)
    x_BxLxD = x_BxLxD + _dropout(cfg, cfg.dropout_rate)(mlp_BxLxD, deterministic=deterministic)
    return (x_BxLxD if cfg.pre_norm else mlp_norm(x_BxLxD)), probs, qkv


class MlmHead(nn.Module):
  """dense -> activation -> LayerNorm (with `mlm_transform`) -> projection tied to the word embeddings + bias."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, h_NxD, embeddings: Embeddings):
    cfg = self.cfg
    if cfg.mlm_transform:
      h_NxD = _dense(cfg, cfg.hidden_size, ("embed", "embed_out"), "transform")(h_NxD)
      h_NxD = _layer_norm(cfg, "transform_norm")(ACTIVATIONS[cfg.mlm_head_act or cfg.hidden_act](h_NxD))
    bias_V = self.param("bias", _zeros(("vocab",)), (cfg.vocab_size,), cfg.param_dtype)
    # Logits in float32: the losses take log-softmax over 30k classes.
    return add_bias(embeddings.attend(h_NxD), bias_V.astype(jnp.float32))


@jax.custom_vjp
def add_bias(x_xV: jax.Array, bias_V: jax.Array) -> jax.Array:
  """x + bias over the last axis, whose bias gradient (the column sums of the incoming gradient) is a
  matrix-vector product: the same sums, 15x faster on a CPU than XLA's column reduction of a (rows, 30k)
  gradient (BENCHMARKS.md "Where the CPU step's time goes")."""
  return x_xV + bias_V


def _add_bias_fwd(x_xV, bias_V):
  return x_xV + bias_V, None


def _add_bias_bwd(_, g_xV):
  g_NxV = g_xV.reshape(-1, g_xV.shape[-1])
  return g_xV, jnp.ones((g_NxV.shape[0],), g_NxV.dtype) @ g_NxV


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class Encoder(nn.Module):
  """The encoder with its masked-LM head.

  `__call__` runs the whole model; `mlm_logits` applies only the head, so a caller can project a subset of
  positions (e.g. only the masked ones) instead of every token:
  `model.apply(variables, h_NxD, method=Encoder.mlm_logits)`.
  """
  cfg: EncoderConfig

  def setup(self):
    cfg = self.cfg
    self.embeddings = Embeddings(cfg)
    layer_cls = Layer
    if cfg.remat:  # argument 3 is `deterministic`, 4 `output_attentions`, 5 `output_qkv` (0 is the module)
      layer_cls = nn.remat(Layer, static_argnums=(3, 4, 5), policy=REMAT_POLICIES[cfg.remat_policy])
    self.layers = [layer_cls(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]
    if cfg.use_pooler:
      self.pooler = _dense(cfg, cfg.hidden_size, ("embed", "embed_out"), "pooler")
    if cfg.num_labels:
      self.classifier_dropout = _dropout(cfg, cfg.classifier_dropout_rate)
      self.classifier = _dense(cfg, cfg.num_labels, ("embed", "labels"), "classifier")
    self.mlm_head = MlmHead(cfg)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
               segment_ids=None, language_ids=None, deterministic: bool = True, output_attentions: bool = False,
               output_qkv: bool = False, compute_logits: bool = True) -> EncoderOutput:
    """input_ids, attention_mask (1 = attend, 0 = padding), token_type_ids, position_ids: (B, L) ints, as
    transformers takes them (RoBERTa's positions start at pad_token_id + 1: `cfg.first_position`).

    Left out, position ids are 0, 1, ... or, with `positions_skip_padding`, computed from the input ids as
    transformers' RoBERTa does; the attention mask is all ones (transformers' XLM would derive it from the pad
    tokens: give it). `segment_ids` (B, L), for packed rows holding several examples (1, 2, ...
    per example, 0 = padding): a token attends only within its own example. `language_ids` (B, L): required
    when the model has language embeddings. Dropout is active when `deterministic=False` (pass
    `rngs={'dropout': key}` to `apply`). `output_attentions=True` returns the attention probabilities,
    which the explicit einsum path computes whatever `cfg.attention` says. `output_qkv=True` returns every
    layer's queries, keys and values (B, H, L, K), on either path (the layer losses' relations).
    """
    cfg = self.cfg
    ids_BxL = jnp.asarray(input_ids)
    if cfg.num_languages and language_ids is None:
      raise ValueError(f"this model has {cfg.num_languages} language embeddings: pass language_ids (B, L)")
    if attention_mask is None:
      attention_mask = jnp.ones_like(ids_BxL)
    if position_ids is None:
      position_ids = default_position_ids(cfg, ids_BxL)
    mask_BxL = jnp.asarray(attention_mask)
    if segment_ids is None:
      attend_Bx1xQxL = (mask_BxL > 0)[:, None, None, :]  # Q = 1: every query sees the same keys
      keep_BxL = mask_BxL > 0
    else:
      seg_BxL = jnp.asarray(segment_ids)
      attend_Bx1xQxL = ((seg_BxL[:, :, None] == seg_BxL[:, None, :]) & (seg_BxL[:, None, :] > 0))[:, None]
      keep_BxL = seg_BxL > 0

    def between_blocks(x_BxLxD):
      if cfg.zero_padding:  # XLM zeroes the padding positions (no real token attends them either way)
        x_BxLxD = x_BxLxD * keep_BxL[:, :, None].astype(x_BxLxD.dtype)
      return nn.with_logical_constraint(x_BxLxD, ACTIVATION_AXES)

    x_BxLxD = between_blocks(self.embeddings(ids_BxL, token_type_ids, position_ids, language_ids, deterministic))
    hidden, attentions, qkvs = [x_BxLxD], [], []
    for layer in self.layers:
      x_BxLxD, probs, qkv = layer(x_BxLxD, attend_Bx1xQxL, deterministic, output_attentions, output_qkv)
      x_BxLxD = between_blocks(x_BxLxD)
      hidden.append(x_BxLxD)
      attentions.append(probs)
      qkvs.append(qkv)
    pooled_BxD = POOLER_ACTIVATIONS[cfg.pooler_activation](self.pooler(x_BxLxD[:, 0])) if cfg.use_pooler else None
    heads = self._task_head(x_BxLxD, pooled_BxD, deterministic) if cfg.num_labels else {}
    logits = self.mlm_logits(x_BxLxD) if compute_logits else None
    return EncoderOutput(logits=logits, hidden_states=tuple(hidden),
                         attentions=tuple(attentions) if output_attentions else None,
                         qkv=tuple(qkvs) if output_qkv else None, pooled=pooled_BxD, **heads)

  def _task_head(self, x_BxLxD, pooled_BxD, deterministic) -> dict[str, jax.Array]:
    """The task head's outputs, keyed by their EncoderOutput field."""
    head = self.cfg.task_head
    features = pooled_BxD if head == "sequence" else x_BxLxD
    out = self.classifier(self.classifier_dropout(features, deterministic=deterministic)).astype(jnp.float32)
    if head == "sequence":
      return {"class_logits": out}
    if head == "token":
      return {"token_logits": out}
    return {"start_logits": out[..., 0], "end_logits": out[..., 1]}

  def mlm_logits(self, h_xD):
    """(..., D) hidden states -> (..., V) float32 logits."""
    return self.mlm_head(h_xD, self.embeddings)


def default_position_ids(cfg: EncoderConfig, ids_BxL: jax.Array) -> jax.Array:
  """0, 1, ... per row; with `positions_skip_padding`, transformers' RoBERTa rule: the non-pad tokens count
  from pad_token_id + 1 (skipping pads wherever they are), pad tokens get pad_token_id."""
  if not cfg.positions_skip_padding:
    return jnp.broadcast_to(jnp.arange(ids_BxL.shape[-1]), ids_BxL.shape)
  real_BxL = (ids_BxL != cfg.pad_token_id).astype(jnp.int32)
  return jnp.cumsum(real_BxL, axis=-1) * real_BxL + cfg.pad_token_id


def _init_inputs(cfg: EncoderConfig, seq_len: int):
  ids = jnp.zeros((1, seq_len), jnp.int32)
  return (ids,), ({"language_ids": ids} if cfg.num_languages else {})


def init_params(model: Encoder, rng: jax.Array, seq_len: int = 8):
  """Random parameters as a plain nested dict (logical-axis boxes removed)."""
  args, kw = _init_inputs(model.cfg, seq_len)
  return nn.meta.unbox(model.init(rng, *args, **kw)["params"])


def logical_axes(model: Encoder):
  """The logical axis names of every parameter, as a tree of `PartitionSpec`s shaped like the params."""
  args, kw = _init_inputs(model.cfg, 8)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kw))["params"]
  return nn.get_partition_spec(boxed)


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
