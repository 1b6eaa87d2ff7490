"""tokenmill: an OpenAI-compatible completions server on transformers."""

__version__ = "0.1.0"
