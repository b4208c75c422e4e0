"""bert-base-uncased -> distilbert-base-uncased with the reference recipe, on a Cloud TPU VM.

  python -m distilbert_jax.train --config configs/distilbert_base.py --workdir gs://BUCKET/distilbert-base

(or a local --workdir). The teacher is the hub's `bert-base-uncased` (or a local copy: --config.teacher=DIR);
the student has 6 layers copied from teacher layers [0, 2, 4, 7, 9, 11], as distilbert-base-uncased.
Data: English Wikipedia and BookCorpus through Hugging Face datasets (streamed while tokenizing once into
--config.data.cache_dir; about 3.3B tokens: put the cache on a large local disk or a bucket mount). Without
hub access, point --config.data.sources at local text files.

Recipe (REFERENCE.md): α_ce 5, α_mlm 2, α_cos 1, T 2, 15% masking with count^-0.7 smoothing, AdamW lr 5e-4,
betas (0.9, 0.98), eps 1e-6, no weight decay, 5% warmup then linear decay, clip 5.0, sequences of up to 512
tokens, 2,048 sequences per update (256 per step x 8 accumulation steps; the reference used 2,000),
3 epochs of ~6.5M sequences ~ 9,500 updates. bf16 compute with float32 parameters.

Mesh: all devices on the fsdp axis (parameters and Adam moments split across chips, batch split likewise);
on a v5e-8 or v4-8 that is (1, 8, 1). Expect the paper's 77.0 GLUE macro score only after the full run
(8 x V100 took ~90 hours; see BENCHMARKS.md for measured step speed).
"""
from distilbert_jax.train import default_config


def get_config():
  c = default_config()
  c.teacher = "bert-base-uncased"
  c.student.layers = (0, 2, 4, 7, 9, 11)
  c.student.copy_head = True
  c.compute.dtype = "bfloat16"
  c.data.sources = ("hf:wikimedia/wikipedia:20231101.en", "hf:bookcorpus/bookcorpus")
  c.data.max_len = 512
  c.data.batch_size = 256
  c.data.held_out_fraction = 0.001
  c.data.eval_batches = 50
  c.optim.grad_accum = 8
  c.train.steps = 9500
  c.train.log_every = 50
  c.train.ckpt_every = 500
  c.mesh.shape = (1, -1, 1)
  return c
