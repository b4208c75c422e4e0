"""A FlauBERT teacher -> a FlauBERT-small-shaped student on French Wikipedia, on a Cloud TPU VM.

  python -m distilbert_jax.train --config configs/flaubert_small.py --workdir gs://BUCKET/flaubert-small
  python -m distilbert_jax.train --config configs/flaubert_small.py:TEACHER_DIR ...   # another FlauBERT teacher

The teacher defaults to the hub's `flaubert/flaubert_base_cased` (post-norm XLM; a local copy works the same).
The student has flaubert_small_cased's shape: 6 pre-norm layers, width 512, 8 heads, feed-forward 2,048,
LayerNorm eps 1e-6, the teacher's 68,729-word vocabulary and Moses + BPE tokenizer (sacremoses). Its width
differs from the teacher's, so no teacher layer can be copied into it: it starts from random weights, and
L_cos, which compares hidden states of one width, is off (α_cos 0); L_ce and L_mlm are the reference's.
The export is a FlaubertWithLMHeadModel; transformers 5 cannot run a pre-norm FlauBERT (its forward raises),
this project's encoder can (distilbert_jax.load_hf).
Data: French Wikipedia through Hugging Face datasets (`wikimedia/wikipedia`, 20231101.fr), tokenized once into
--config.data.cache_dir. FlauBERT's tokenizer is pure Python (measured here: under 1 MB of text a second on
one CPU core), so that first pass is long; point --config.data.sources at local French text to try on less.

Recipe otherwise DistilBERT's (REFERENCE.md): α_ce 5, α_mlm 2, T 2, 15% masking with count^-0.7 smoothing (<s>
</s> <pad> <unk> and the mask <special1> never masked), AdamW lr 5e-4, betas (0.9, 0.98), eps 1e-6, 5% warmup
then linear decay, clip 5.0, 2,048 sequences of up to 512 tokens per update, bf16 compute with float32
parameters. Mesh: all devices on the fsdp axis, (1, 8, 1) on a v5e-8 or v4-8. AOT compile for a v5e-8 needs
libtpu and the teacher's config.json (a local folder or the hub cache: its shape is not built in).
"""
from distilbert_jax import trainer

# flaubert_small_cased's shape (EncoderConfig.flaubert's defaults), for the student.
SMALL = dict(hidden_size=512, num_layers=6, num_heads=8, intermediate_size=2048, pre_norm=True, layer_norm_eps=1e-6)


def get_config(teacher: str = "flaubert/flaubert_base_cased"):
  c = trainer.sibling_config(__file__, "distilbert_base.py")  # its recipe, mesh and batch
  c.teacher = teacher
  c.student.init = "random"
  c.student.layers = ()
  c.student.overrides.update(SMALL)
  c.loss.alpha_cos = 0.0
  c.data.sources = ("hf:wikimedia/wikipedia:20231101.fr",)
  return c
