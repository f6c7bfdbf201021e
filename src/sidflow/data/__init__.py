"""Data sources: prompts (text, JSONL, CSV, parquet, saved datasets) with text embeddings cached on
disk, and real images (folders, parquet) for evaluation references."""

from sidflow.data.prompt_files import read_prompt_file, read_prompts
from sidflow.data.prompts import PromptSource

__all__ = ["PromptSource", "read_prompt_file", "read_prompts"]
