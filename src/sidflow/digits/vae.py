"""The bundled teacher's VAE: a diffusers ``AutoencoderKL`` with 2x downsampling.

``[B, 1, 32, 32]`` digits in [-1, 1] <-> ``[B, 4, 16, 16]`` latents. Trained on the training split
with an L1 + MSE reconstruction loss and a small KL term (Kingma & Welling, 2014). Afterwards the
SD3 latent normalisation ``latent = (z - shift_factor) * scaling_factor`` is set from the trained
posterior means so that the latents the transformer sees have zero mean and unit variance.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

__all__ = ["build_vae", "decode_latents", "encode_images", "fit_latent_normalisation", "train_vae"]


def build_vae(seed: int = 0) -> AutoencoderKL:
    """A small AutoencoderKL: 1 channel, 2 resolution levels (32 -> 16), 4 latent channels."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def train_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    *,
    steps: int,
    batch: int = 64,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    progress: bool = True,
) -> AutoencoderKL:
    """Train ``vae`` on ``images`` ``[N, 1, 32, 32]`` for ``steps`` Adam steps (cosine lr)."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    vae.train()
    bar = tqdm(range(steps), desc="vae", disable=not progress)
    for _ in bar:
        x = images[torch.randint(0, len(images), (batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(posterior.mean + posterior.std * noise).sample
        rec = (recon - x).abs().mean() + (recon - x).square().mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + kl_weight * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.1f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def fit_latent_normalisation(vae: AutoencoderKL, images: torch.Tensor) -> tuple[float, float]:
    """Set ``vae.config.shift_factor`` / ``scaling_factor`` to the latent mean and 1/std."""
    z = torch.cat([vae.encode(x).latent_dist.mean for x in images.split(500)])
    shift, scale = float(z.mean()), float(1.0 / z.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return shift, scale


@torch.no_grad()
def encode_images(
    vae: AutoencoderKL, images: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``[N, 1, 32, 32]`` -> normalised latents ``[N, 4, 16, 16]`` ``(z - shift) * scale``."""
    out = []
    for x in images.split(500):
        dist = vae.encode(x).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        out.append((z - vae.config.shift_factor) * vae.config.scaling_factor)
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents ``[N, 4, 16, 16]`` -> images ``[N, 1, 32, 32]`` in [-1, 1]."""
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    return torch.cat([vae.decode(z / scale + shift).sample for z in latents.split(500)]).clamp(-1, 1)
