"""distilbert-jax: DistilBERT distillation in JAX/Flax, with exact Hugging Face conversion."""
from distilbert_jax.hf import ConversionError, load_hf, save_hf
from distilbert_jax.model import Encoder, EncoderConfig, EncoderOutput, count_params, init_params
from distilbert_jax.student import student_from_teacher

__all__ = ["ConversionError", "Encoder", "EncoderConfig", "EncoderOutput", "count_params", "init_params",
           "load_hf", "save_hf", "student_from_teacher"]
