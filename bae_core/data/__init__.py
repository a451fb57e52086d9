"""Activations from a language model: loading models and hookpoints (`lm`), documents and tokenisation
(`text`), and the parquet activation cache (`cache`)."""
