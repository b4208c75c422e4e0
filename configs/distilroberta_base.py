"""roberta-base -> distilroberta-base with the reference recipe, on a Cloud TPU VM.

  python -m distilbert_jax.train --config configs/distilroberta_base.py --workdir gs://BUCKET/distilroberta-base

(or a local --workdir). The teacher is the hub's `roberta-base` (or a local copy: --config.teacher=DIR); the
student is a RobertaForMaskedLM with 6 layers copied from teacher layers [0, 2, 4, 7, 9, 11], with the teacher's
word, position and (one-row) token-type embeddings and its whole LM head, as the reference's `scripts/extract.py
--model_type roberta --vocab_transform` does; it exports as RoBERTa (AutoModelForMaskedLM loads it).
Data: OpenWebText through Hugging Face datasets, the corpus DistilRoBERTa was trained on (about 9B tokens of
GPT-2's byte-level BPE, which RoBERTa shares, once tokenized into --config.data.cache_dir: put the cache on a
large local disk or a bucket mount). Without hub access, point --config.data.sources at local text files.

Recipe (REFERENCE.md; the reference trains DistilRoBERTa with DistilBERT's settings): α_ce 5, α_mlm 2, α_cos 1,
T 2, 15% masking with count^-0.7 smoothing (<s> </s> <pad> <unk> <mask> never masked), AdamW lr 5e-4, betas
(0.9, 0.98), eps 1e-6, no weight decay, 5% warmup then linear decay, clip 5.0, 2,048 sequences per update (256
per step x 8 accumulation steps), 3 epochs (the reference's default): ~9B tokens / 510 per sequence x 3 / 2,048
~ 26,000 updates (an estimate: the tokenized corpus's meta.json gives the real count). Sequences of up to 512
tokens: roberta-base has 514 positions and its first two (0 and pad_token_id = 1) never hold a real token.
bf16 compute with float32 parameters.

Mesh: all devices on the fsdp axis, (1, 8, 1) on a v5e-8 or v4-8. AOT compile for a v5e-8 without one:
  python -m distilbert_jax.aot --config configs/distilroberta_base.py --topology v5e-8 (needs libtpu, see README).
"""
from distilbert_jax import trainer


def get_config():
  c = trainer.sibling_config(__file__, "distilbert_base.py")  # its recipe, mesh and batch
  c.teacher = "roberta-base"
  c.data.sources = ("hf:Skylion007/openwebtext",)
  c.train.steps = 26000
  return c
