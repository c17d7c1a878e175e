"""LEARN: frozen-LLM item content, aligned with user behaviour by twin-tower transformers."""
__version__ = "0.1.0"
