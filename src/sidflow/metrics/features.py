"""Image features for FD-DINOv2 and the CLIP score, from ``transformers`` models.

Models come from a hub id or a local folder (never bundled), or an already-built model (tests build
tiny random ones offline). Preprocessing is stated and identical for every image set compared:

* images ``[N, 3, H, W]`` in ``[-1, 1]`` (sidflow's decoded latents) are mapped to ``[0, 1]``;
* the shorter side is resized to ``size`` (bicubic, antialiased, on the model's device), then the
  centre ``size x size`` is cropped;
* channels are normalised with the model's mean and standard deviation (ImageNet's for DINOv2,
  OpenAI's for CLIP); the model runs in float32.

The resize is done with ``torch.nn.functional.interpolate`` on whole batches rather than with the
models' PIL image processors (one PIL round trip per image); :meth:`Preprocess.describe` records it
next to cached features.

FD-DINOv2 (Stein et al., 2023): the class token of the last layer after the final layer norm
(``Dinov2Model``'s ``pooler_output``) at 224 px, the convention of their evaluation code. CLIP score
(Hessel et al., 2021, as torchmetrics): ``100 * max(cos(image embedding, text embedding), 0)``,
averaged over the samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "Preprocess",
    "DinoV2Features",
    "ClipEmbedder",
    "InceptionFeatures",
    "clip_score",
    "clip_scores",
    "pick_scores",
    "IMAGENET",
    "OPENAI_CLIP",
    "FID_EXTRA",
]

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def _rgb(images: Tensor) -> Tensor:
    """``[N, 3, H, W]`` as given; grey ``[N, 1, H, W]`` images repeated to 3 channels."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 3, H, W] (or grey [N, 1, H, W]) in [-1, 1], got {list(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``size`` (bicubic, antialiased), centre-crop, normalise (grey
    images are repeated to 3 channels first)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images: Tensor) -> Tensor:
        x = ((_rgb(images).float() + 1) / 2).clamp(0, 1)
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        new_h, new_w = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        x = x[..., top : top + self.size, left : left + self.size].clamp(0, 1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "resize": "shorter side, bicubic, antialias", "crop": "centre", "dtype": "float32"}


def _load(cls_name: str, model: str | Path | nn.Module) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    import transformers

    return getattr(transformers, cls_name).from_pretrained(str(model))


def _embedding(out: Any) -> Tensor:
    """``get_*_features`` returns the projected embedding (transformers 4) or an output whose
    ``pooler_output`` is it (transformers 5)."""
    return out if isinstance(out, Tensor) else out.pooler_output


def _batched(images: Tensor, batch: int) -> list[Tensor]:
    return [images[i : i + batch] for i in range(0, images.shape[0], batch)]


class DinoV2Features:
    """``features(images) -> [N, D]`` float64 DINOv2 class-token features (FD-DINOv2).

    Args:
        model: a hub id or folder of a ``Dinov2Model`` (``facebook/dinov2-large`` in the literature),
            or a built model.
        device: where the model runs.
        size: input resolution (224, the FD-DINOv2 convention).
        batch: images per forward.
    """

    def __init__(
        self, model: str | Path | nn.Module, device: torch.device | str = "cpu", *, size: int = 224, batch: int = 64
    ) -> None:
        self.model = _load("Dinov2Model", model).to(device, torch.float32).eval().requires_grad_(False)
        self.name = str(model) if not isinstance(model, nn.Module) else type(model).__name__
        self.preprocess = Preprocess(size, *IMAGENET)
        self.device, self.batch = torch.device(device), batch

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        out = [
            cast(Any, self.model)(pixel_values=self.preprocess(chunk.to(self.device))).pooler_output.double().cpu()
            for chunk in _batched(images, self.batch)
        ]
        return torch.cat(out)


class ClipEmbedder:
    """L2-normalised CLIP image and text embeddings (``CLIPModel``: ViT-L/14 by default).

    Args:
        model: hub id or folder of a ``CLIPModel`` (with its tokenizer), or a built model.
        tokenizer: the tokenizer, or the hub id / folder it is loaded from (default: ``model``'s own;
            PickScore ships without one and uses its base model's, LAION's ViT-H/14).
        device, batch: where it runs and images/prompts per forward.
    """

    def __init__(
        self,
        model: str | Path | nn.Module = "openai/clip-vit-large-patch14",
        device: torch.device | str = "cpu",
        *,
        tokenizer: Any = None,
        batch: int = 64,
    ) -> None:
        self.model = _load("CLIPModel", model).to(device, torch.float32).eval().requires_grad_(False)
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer if tokenizer is not None else model))
        self.tokenizer = tokenizer
        config = cast(Any, self.model).config.vision_config
        self.preprocess = Preprocess(int(config.image_size), *OPENAI_CLIP)
        self.name = str(model) if not isinstance(model, nn.Module) else type(model).__name__
        self.device, self.batch = torch.device(device), batch

    @torch.no_grad()
    def images(self, images: Tensor) -> Tensor:
        out = [
            _embedding(cast(Any, self.model).get_image_features(pixel_values=self.preprocess(chunk.to(self.device))))
            for chunk in _batched(images, self.batch)
        ]
        return F.normalize(torch.cat(out).double(), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, prompts: Sequence[str]) -> Tensor:
        out = []
        limit = min(
            int(self.tokenizer.model_max_length), int(cast(Any, self.model).config.text_config.max_position_embeddings)
        )
        for i in range(0, len(prompts), self.batch):
            tokens = self.tokenizer(
                list(prompts[i : i + self.batch]), padding=True, truncation=True, max_length=limit, return_tensors="pt"
            ).to(self.device)
            out.append(_embedding(cast(Any, self.model).get_text_features(**tokens)))
        return F.normalize(torch.cat(out).double(), dim=-1).cpu()


def _cosines(images: Tensor, prompts: Sequence[str], clip: ClipEmbedder) -> Tensor:
    if images.shape[0] != len(prompts):
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
    return (clip.images(images) * clip.texts(prompts)).sum(-1)


def clip_scores(images: Tensor, prompts: Sequence[str], clip: ClipEmbedder) -> Tensor:
    """Per-pair CLIP scores ``[N]`` (float64): ``100 * max(cos, 0)`` (torchmetrics' convention)."""
    return 100 * _cosines(images, prompts, clip).clamp(min=0)


def clip_score(images: Tensor, prompts: Sequence[str], clip: ClipEmbedder) -> float:
    """Mean CLIP score of ``images`` ``[N, 3, H, W]`` in ``[-1, 1]`` against their ``prompts``."""
    return float(clip_scores(images, prompts, clip).mean())


def pick_scores(images: Tensor, prompts: Sequence[str], pickscore: ClipEmbedder) -> Tensor:
    """Per-pair PickScore ``[N]`` (Kirstain et al., 2023): a CLIP model fine-tuned on human
    preferences, scored as its own ``logit_scale.exp() * cos`` (about 20-23 for good images)."""
    scale = cast(Any, pickscore.model).logit_scale.detach().exp().double().cpu()
    return scale * _cosines(images, prompts, pickscore)


FID_EXTRA = (
    "FID (Inception) needs the optional [fid] extra: pip install 'sidflow[fid]' (torch-fidelity, which "
    "pulls torchvision: install it against your CUDA torch); or drop fid from eval.metrics"
)


class InceptionFeatures:
    """``features(images) -> [N, 2048]`` float64 pool features of the FID Inception network
    (torch-fidelity's ``inception-v3-compat``, the weights and resize of the original TensorFlow FID
    and of COCO-FID tables). Images are quantised to uint8 first, as FID tools read image files.

    Raises:
        ImportError: with :data:`FID_EXTRA` when torch-fidelity is not installed.
    """

    def __init__(self, device: torch.device | str = "cpu", *, batch: int = 64) -> None:
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as err:
            raise ImportError(FID_EXTRA) from err
        self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).to(device).eval()
        self.name = "torch-fidelity inception-v3-compat"
        self.device, self.batch = torch.device(device), batch

    def describe(self) -> dict[str, Any]:
        return {"resize": "the extractor's own (299, bilinear as TF FID)", "dtype": "uint8 input"}

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        out = []
        for chunk in _batched(images, self.batch):
            pixels = ((_rgb(chunk).float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).to(self.device)
            out.append(self.model(pixels)[0].reshape(len(chunk), -1).double().cpu())
        return torch.cat(out)
