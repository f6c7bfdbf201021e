"""Tiny random diffusers pipelines of every supported teacher family, built offline.

Library code (not only a test fixture): ``build_tiny_pipeline("sd3", out_dir)`` assembles a
pipeline of the very same diffusers/transformers classes as the real teacher — transformer, VAE,
text encoders and tokenizers — with hidden sizes of 16-32, one or two layers and 32x32 images, and
saves it with ``save_pretrained``. Tokenizers are built from vocabularies written here (character
level), so nothing is downloaded. The folders load back with ``from_pretrained`` and with
:func:`sidflow.teachers.load_teacher`.

Families: ``sd3`` (SD3-Medium layout), ``sd35`` (SD3.5-Medium layout: dual attention, RMS qk-norm),
``flux`` (FLUX.1-dev layout: guidance embedder), ``sana`` (SANA RF), ``sana_sprint`` (a SANA-Sprint
teacher: qk-norm, no guidance embedder, ``timestep_scale=0.001`` so that it is fed ``t`` rather than
``1000 t``).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from sidflow.teachers.families import FAMILIES as _FAMILIES

__all__ = ["FAMILIES", "build_tiny_pipeline", "tiny_pipeline", "load_pipeline", "build_tiny_metric_models"]

FAMILIES = tuple(_FAMILIES)  # every family of sidflow.teachers.families has a tiny pipeline
_LETTERS = string.ascii_lowercase + string.digits + ".,!?'-:;()"


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    pieces = specials + list(_LETTERS) + [c + "</w>" for c in _LETTERS]
    tok = CLIPTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[])
    tok.model_max_length = 77
    return tok


def _t5_tokenizer(max_length: int):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in _LETTERS] + [("\u2581" + c, -2.5) for c in _LETTERS]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = max_length
    return tok


def _gemma_tokenizer():
    from transformers import GemmaTokenizer

    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\u2581", "\n"]
    pieces += list(_LETTERS) + list(string.ascii_uppercase) + ["\u2581" + c for c in _LETTERS]
    tok = GemmaTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[], add_bos_token=True)
    tok.model_max_length = 4096
    return tok


def _clip_text_model(tokenizer, hidden: int, projection: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(cfg).eval()


def _clip_text_model_plain(tokenizer, hidden: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )
    return CLIPTextModel(cfg).eval()


def _t5_model(tokenizer, d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(cfg).eval()


def _kl_vae(scaling: float, shift: float, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def _sd3(out: Path, seed: int, medium35: bool) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    extra = {"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if medium35 else {}
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=24,
        pos_embed_max_size=16,
        **extra,
    )
    tok, tok3 = _clip_tokenizer(), _t5_tokenizer(77)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_kl_vae(1.5305, 0.0609, seed + 1),
        text_encoder=_clip_text_model(tok, 8, 8, seed + 2),
        tokenizer=tok,
        text_encoder_2=_clip_text_model(tok, 16, 16, seed + 3),
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=_t5_model(tok3, 32, seed + 4),
        tokenizer_3=tok3,
    )
    pipe.save_pretrained(out)


def _flux(out: Path, seed: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    tok, tok2 = _clip_tokenizer(), _t5_tokenizer(512)
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_kl_vae(0.3611, 0.1159, seed + 1),
        text_encoder=_clip_text_model_plain(tok, 16, seed + 2),
        tokenizer=tok,
        text_encoder_2=_t5_model(tok2, 32, seed + 3),
        tokenizer_2=tok2,
    )
    pipe.save_pretrained(out)


def _sana(out: Path, seed: int, sprint: bool) -> None:
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    # a Sprint teacher's transformer is fed t, not 1000 t: its config says so (timestep_scale, which
    # diffusers' SanaPipeline applies), as the released Sprint teacher checkpoints do
    extra = {"qk_norm": "rms_norm_across_heads", "timestep_scale": 0.001} if sprint else {}
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=16,
        sample_size=16,
        **extra,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()
    tok = _gemma_tokenizer()
    torch.manual_seed(seed + 2)
    gemma = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    ).eval()
    pipe = SanaPipeline(
        tokenizer=tok,
        text_encoder=gemma,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe.save_pretrained(out)


def build_tiny_pipeline(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build and save a tiny random pipeline of ``family`` into ``out_dir``.

    Args:
        family: one of :data:`FAMILIES`.
        out_dir: target folder (created); a diffusers pipeline folder afterwards.
        seed: seeds every component's random initialisation.

    Returns:
        ``Path(out_dir)``, loadable offline with diffusers' ``from_pretrained``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    builders = {
        "sd3": lambda: _sd3(out, seed, medium35=False),
        "sd35": lambda: _sd3(out, seed, medium35=True),
        "flux": lambda: _flux(out, seed),
        "sana": lambda: _sana(out, seed, sprint=False),
        "sana_sprint": lambda: _sana(out, seed, sprint=True),
    }
    if family not in builders:
        raise ValueError(f"unknown tiny family '{family}'; choose one of {', '.join(FAMILIES)}")
    builders[family]()
    return out


_CACHE: dict[tuple[str, int], Path] = {}


def tiny_pipeline(family: str, root: str | Path, seed: int = 0) -> Path:
    """Like :func:`build_tiny_pipeline` but builds each (family, seed) once under ``root``."""
    key = (family, seed)
    path = Path(root) / f"tiny-{family.replace('_', '-')}-{seed}"
    if key not in _CACHE or not (path / "model_index.json").exists():
        _CACHE[key] = build_tiny_pipeline(family, path, seed)
    return _CACHE[key]


def load_pipeline(path: str | Path):
    """The stock diffusers pipeline of a folder (its own class), progress bar off: the reference."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_metric_models(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Tiny random ``Dinov2Model`` and ``CLIPModel`` (with its tokenizer) saved under ``out_dir``:
    stand-ins, loadable offline by path, for ``eval.dino_model`` / ``eval.clip_model`` /
    ``eval.pickscore_model`` in tests (their figures mean nothing; the plumbing is real).

    Returns:
        ``{"dino": folder, "clip": folder}``.
    """
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

    out = Path(out_dir)
    torch.manual_seed(seed)
    dino = Dinov2Model(
        Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=224, patch_size=32
        )
    )
    dino.save_pretrained(out / "dino")
    tokenizer = _clip_tokenizer()
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    text |= {"num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    vision |= {"image_size": 32, "patch_size": 8}
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    clip.save_pretrained(out / "clip")
    tokenizer.save_pretrained(out / "clip")
    return {"dino": out / "dino", "clip": out / "clip"}
