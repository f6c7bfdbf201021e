"""Assembling the bundled teacher as a stock diffusers ``StableDiffusion3Pipeline``.

The transformer is a small ``SD3Transformer2DModel`` (MMDiT, Esser et al., 2024) with patch size 2 on
the ``[4, 16, 16]`` latents (64 image tokens). Prompt embeddings always come from the pipeline's own
``encode_prompt`` (CLIP-L/G penultimate states, T5 slot zeros since ``text_encoder_3=None``), with
``max_sequence_length`` equal to the CLIP tokenizer length, which is the path the SD3 adapter uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from sidflow.digits import BUNDLED_TEACHER
from sidflow.digits.text import MAX_TOKENS, build_text_encoder, build_tokenizer

__all__ = [
    "BUNDLED_TEACHER",
    "TEXT_HIDDEN",
    "assemble_pipeline",
    "build_transformer",
    "encode_prompts",
    "load_pipeline",
    "write_sidecar",
]

TEXT_HIDDEN = 32  # width of each tiny CLIP (L and G): joint_attention_dim = 2 * 32, pooled = 2 * 32
SCHEDULER_SHIFT = 1.0


def build_transformer(*, heads: int = 4, head_dim: int = 32, layers: int = 4, seed: int = 0) -> SD3Transformer2DModel:
    """The teacher's MMDiT: ``[B, 4, 16, 16]`` latents, patch 2, text width ``2 * TEXT_HIDDEN``."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=2 * TEXT_HIDDEN,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=2 * TEXT_HIDDEN,
        pos_embed_max_size=16,
    )


def assemble_pipeline(
    transformer: SD3Transformer2DModel, vae: AutoencoderKL, *, seed: int = 0
) -> StableDiffusion3Pipeline:
    """A complete SD3 pipeline around ``transformer`` and ``vae`` with frozen random tiny CLIPs."""
    tokenizer = build_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SCHEDULER_SHIFT),
        vae=vae,
        text_encoder=build_text_encoder(TEXT_HIDDEN, TEXT_HIDDEN, seed=seed + 1),
        tokenizer=tokenizer,
        text_encoder_2=build_text_encoder(TEXT_HIDDEN, TEXT_HIDDEN, seed=seed + 2),
        tokenizer_2=build_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


@torch.no_grad()
def encode_prompts(pipe: StableDiffusion3Pipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompts`` -> (``[N, 2 * MAX_TOKENS, 64]`` embeds, ``[N, 64]`` pooled), by ``encode_prompt``."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        device=torch.device("cpu"),
        do_classifier_free_guidance=False,
        max_sequence_length=MAX_TOKENS,
    )
    return embeds.float(), pooled.float()


def load_pipeline(path: str | Path = BUNDLED_TEACHER) -> StableDiffusion3Pipeline:
    """Load a saved teacher folder offline (fp32, CPU).

    A folder saved without T5 needs ``text_encoder_3=None, tokenizer_3=None`` (diffusers lists them
    as required components; this is the documented way to drop T5).
    """
    return StableDiffusion3Pipeline.from_pretrained(
        path, text_encoder_3=None, tokenizer_3=None, local_files_only=True, dtype=torch.float32
    )


def write_sidecar(folder: str | Path) -> None:
    """Write ``sidflow_teacher.json``: how sidflow's SD3 adapter must encode for this teacher
    (T5 slot as long as the CLIP context, as in training; time fed as ``1000 t``)."""
    info = {"family": "sd3", "time_scale": 1000.0, "max_sequence_length": MAX_TOKENS}
    (Path(folder) / "sidflow_teacher.json").write_text(json.dumps(info, indent=2) + "\n")
