"""Data sources: prompts (with cached text embeddings) for the data-free SiD run."""

from sidflow.data.prompts import PromptSource, read_prompt_file

__all__ = ["PromptSource", "read_prompt_file"]
