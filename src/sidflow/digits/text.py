"""Text side of the bundled tiny SD3 teacher: a closed prompt set, offline CLIP tokenizers and
frozen, randomly initialised tiny CLIP-L / CLIP-G text encoders.

SD3 conditions on two CLIP encoders (penultimate hidden states + projected pooled output) and T5.
The bundled teacher keeps both CLIP slots (tiny, random, frozen: they only need to give each prompt
a distinct, fixed embedding) and leaves ``text_encoder_3=None`` so ``encode_prompt`` fills T5's part
with zeros. The tokenizer vocabulary is written in code (no download) and covers every prompt word.
"""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

__all__ = [
    "CLASS_WORDS",
    "MAX_TOKENS",
    "PHRASINGS",
    "build_text_encoder",
    "build_tokenizer",
    "prompt_for",
    "prompts_for_class",
]

CLASS_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Five phrasings per class; {w} is the number word, {d} the numeral.
PHRASINGS = (
    "a handwritten digit {w}",
    "the number {d}",
    "a drawing of the digit {d}",
    "{w}",
    "an image of a handwritten {w}",
)
MAX_TOKENS = 8  # CLIP context length of the tiny tokenizers (longest prompt is 8 with BOS/EOS)
_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def prompt_for(label: int, phrasing: int) -> str:
    """The prompt text for class ``label`` (0-9) in phrasing ``phrasing`` (0-4)."""
    return PHRASINGS[phrasing].format(w=CLASS_WORDS[label], d=str(label))


def prompts_for_class(label: int) -> list[str]:
    """All five phrasings of one class."""
    return [prompt_for(label, p) for p in range(len(PHRASINGS))]


def _words() -> list[str]:
    words = {w for p in PHRASINGS for w in p.replace("{w}", "").replace("{d}", "").split()}
    words |= set(CLASS_WORDS) | {str(d) for d in range(10)}
    return sorted(words)


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-pair vocab: every character (bare and word-final) plus each prompt word, built by
    left-to-right merge chains so each word encodes to a single token."""
    chars = sorted({c for w in _words() for c in w})
    tokens = list(chars) + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in _words():
        prefix = word[0]
        for i, c in enumerate(word[1:], start=1):
            right = c + "</w>" if i == len(word) - 1 else c
            merge = (prefix, right)
            prefix += right
            if merge not in merges:
                merges.append(merge)
            if prefix not in tokens:
                tokens.append(prefix)
    tokens += list(_SPECIALS)
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_tokenizer() -> CLIPTokenizer:
    """An offline CLIP BPE tokenizer over the prompt words, padded/truncated to ``MAX_TOKENS``."""
    vocab, merges = _vocab_and_merges()
    tok = CLIPTokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.model_max_length = MAX_TOKENS
    return tok


def build_text_encoder(hidden: int, projection: int, seed: int) -> CLIPTextModelWithProjection:
    """A 2-layer CLIP text encoder with random (seeded) frozen weights.

    Args:
        hidden: width of the hidden states (the per-token embedding SD3 reads at layer -2).
        projection: width of the projected pooled embedding.
        seed: initialisation seed (the weights are then saved and never trained).
    """
    vocab, _ = _vocab_and_merges()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config)
    with torch.no_grad():  # unit-variance token embeddings (CLIP's 0.02 init): well-separated prompts
        model.text_model.embeddings.token_embedding.weight.normal_(0.0, 1.0)
    model.requires_grad_(False)
    return model.eval()
