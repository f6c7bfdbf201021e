"""SiDA's data path on tiny real-architecture teachers (every family): real images with captions
read from a folder, encoded once by the teacher's VAE and cached, drawn by key; the discriminator
features of the fake score and the adversarial gradient that reaches the generator through them."""

from __future__ import annotations

import json

import pytest
import torch

from sidflow.config import GANConfig, GeneratorConfig, GuidanceConfig, SiDConfig, TrainConfig
from sidflow.data.real_images import RealImageSource, read_image_table
from sidflow.errors import DataError
from sidflow.teachers import load_teacher
from sidflow.testing import FAMILIES
from sidflow.trainer import SiDTrainer

CAPTIONS = ["a red cat", "two dogs on a hill", "a blue house", "a green tree", "a yellow car"]


def _image_folder(root, n: int = 5, corrupt: int = 1, size=(40, 36)):
    """``root/images/*.png`` with ``root/metadata.jsonl`` (file name, caption), ``corrupt`` of them broken."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n + corrupt):
        name = f"images/{i:02d}.png"
        if i < n:
            pixels = (torch.rand(size[1], size[0], 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name)
        else:
            (root / name).write_bytes(b"\x89PNG\r\n broken")
        rows.append({"file_name": name, "caption": CAPTIONS[i % len(CAPTIONS)]})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_sida_on_real_images_features_and_adversarial_gradient(tiny, tmp_path, family):
    teacher = load_teacher(tiny(family), dtype=torch.float32, text_encoder_dtype=torch.float32)
    folder = _image_folder(tmp_path / "real")
    real = RealImageSource(read_image_table(str(folder)), teacher, resolution=32, cache_dir=tmp_path / "cache")
    assert real.precompute() == 1 and len(real) == 5  # the broken file is skipped and counted
    latents, cond = real.sample(seed=0, iteration=3, stream="real", indices=[0, 1, 2])
    assert latents.shape == (3, *teacher.latent_shape(32)) and len(cond) == 3
    again, _ = real.sample(seed=0, iteration=3, stream="real", indices=[2])
    torch.testing.assert_close(again[0], latents[2])  # keyed per sample, whatever the batch

    psi, phi, theta = teacher.make_denoisers()
    x_t = torch.randn(2, *teacher.latent_shape(32))
    v, feats = phi.velocity_and_features(x_t, torch.tensor([0.3, 0.8]), teacher.encode_prompts(CAPTIONS[:2]))
    inner = phi.transformer.config.num_attention_heads * phi.transformer.config.attention_head_dim
    assert v.shape == x_t.shape and feats.shape == (2, inner)  # pooled image tokens before proj_out

    # the adversarial term alone (mix = 1) moves the generator, through the fake score's features
    config = SiDConfig(
        generator=GeneratorConfig(num_steps=2),
        guidance=GuidanceConfig(kappa1=1.0, kappa2=1.0, kappa4=1.0, embedded_teacher=3.5 if family == "flux" else None),
        train=TrainConfig(batch=2, batch_gpu=2, seed=1),
        gan=GANConfig(mode="sida", warmup_kimg=0.0, mix_kimg=0.0, mix=1.0),
    )
    trainer = SiDTrainer(psi, phi, theta, real.prompts, teacher.latent_shape(32), config, real_source=real)
    trainer.images_seen = 2  # past the (empty) warm-up and the mix threshold
    assert trainer._gan_phase() == "mix"
    trainer.fake_phase(0)  # the discriminator loss on real and generated latents, one step
    for p in trainer.gen_params:
        p.requires_grad_(True)
    per_sample, mask = trainer.generator_loss(trainer.draw("gen", 0, 0), 2, "mix")
    (per_sample[mask].sum() / trainer.batch_rank).backward()
    grads = torch.cat([p.grad.flatten() for p in trainer.gen_params if p.grad is not None])
    assert torch.isfinite(grads).all() and grads.abs().max() > 0


def test_real_latents_are_encoded_once_and_read_back(tiny, tmp_path, monkeypatch):
    teacher = load_teacher(tiny("sd3"), dtype=torch.float32, text_encoder_dtype=torch.float32)
    folder = _image_folder(tmp_path / "real", n=7, corrupt=0)
    calls = []
    original = teacher.encode_posterior
    monkeypatch.setattr(teacher, "encode_posterior", lambda images: calls.append(len(images)) or original(images))
    first = RealImageSource(
        read_image_table(str(folder)), teacher, resolution=32, cache_dir=tmp_path / "c", batch_size=4
    )
    first.precompute()
    assert calls == [4, 3]
    second = RealImageSource(read_image_table(str(folder)), teacher, resolution=32, cache_dir=tmp_path / "c")
    assert second.precompute() == 0 and calls == [4, 3]  # nothing encoded again
    a, _ = first.sample(seed=5, iteration=1, stream="real", indices=[0, 1, 2, 3])
    b, _ = second.sample(seed=5, iteration=1, stream="real", indices=[0, 1, 2, 3])
    torch.testing.assert_close(a, b)
    # the posterior: cached mean and std; a draw is mean + std * keyed noise
    mean, std = original(torch.stack([_load(folder, i) for i in range(7)]))
    row = second._row(second.table.keys[0])
    torch.testing.assert_close(row["mean"][0], mean[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(row["std"][0], std[0], rtol=1e-5, atol=1e-5)
    # a changed image is a new cache entry
    (folder / "images" / "00.png").write_bytes((folder / "images" / "01.png").read_bytes())
    third = RealImageSource(read_image_table(str(folder)), teacher, resolution=32, cache_dir=tmp_path / "c")
    third.precompute()
    assert calls == [4, 3, 1]


def _load(folder, i):
    from sidflow.data.images import load_image

    return load_image(folder / "images" / f"{i:02d}.png", 32)


def test_image_tables_from_parquet_and_datasets(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def png(v):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (v, v, v)).save(buf, format="PNG")
        return buf.getvalue()

    images = [{"bytes": png(40 * i), "path": None} for i in range(3)]
    table = pa.table({"image": images, "text": ["a", "b", "c"]})
    pq.write_table(table, tmp_path / "real.parquet", row_group_size=2)
    parquet = read_image_table(str(tmp_path / "real.parquet"))
    assert parquet.captions == ["a", "b", "c"] and len(set(parquet.keys)) == 3
    assert parquet.read(2) == images[2]["bytes"]  # from the second row group

    import datasets

    ds = datasets.Dataset.from_dict({"img": [Image.new("RGB", (8, 8))] * 2, "caption": ["x", "y"]})
    ds = ds.cast_column("img", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    saved = read_image_table(str(tmp_path / "ds"))
    assert saved.captions == ["x", "y"] and saved.read(1).size == (8, 8)

    with pytest.raises(DataError, match="no captions file"):
        (tmp_path / "empty").mkdir()
        read_image_table(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="real_caption_column"):
        read_image_table(str(tmp_path / "real.parquet"), caption_column="llava")
