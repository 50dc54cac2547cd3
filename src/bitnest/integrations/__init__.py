"""Where users already are: transformers' `from_pretrained` (hf), lm-evaluation-harness (lm_eval)."""
