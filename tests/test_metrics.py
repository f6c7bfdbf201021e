"""sidflow.metrics: the Fréchet distance against an independent float64 computation, the CLIP score
against a hand computation and DINOv2 features, with tiny random transformers models built offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sidflow.metrics import FeatureStats, frechet_distance
from sidflow.metrics.features import OPENAI_CLIP, ClipEmbedder, DinoV2Features, Preprocess, clip_score, pick_scores
from sidflow.testing import build_tiny_metric_models


def _independent_fd(a: np.ndarray, b: np.ndarray) -> float:
    """numpy, float64, unbiased covariances; Tr((S_a S_b)^1/2) from the eigenvalues of the
    non-symmetric product (a different route from the symmetric square roots under test)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False, ddof=1), np.cov(b, rowvar=False, ddof=1)
    eig = np.linalg.eigvals(s_a @ s_b)
    trace_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * trace_sqrt)


@pytest.mark.parametrize("case", ["full_rank", "near_singular", "rank_deficient"])
def test_frechet_distance_matches_an_independent_computation(case):
    rng = np.random.default_rng(0)
    n, d = (400, 16) if case != "rank_deficient" else (12, 32)  # fewer samples than dimensions
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = 0.7 * rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 0.3
    if case == "near_singular":  # one direction almost a copy of another
        a[:, 1] = a[:, 0] + 1e-6 * rng.normal(size=n)
        b[:, 1] = b[:, 0] + 1e-6 * rng.normal(size=n)
    want = _independent_fd(a, b)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-6)  # arrays
    assert frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float()) == pytest.approx(
        _independent_fd(a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)), rel=1e-6
    )  # float32 tensors are read in float64
    assert frechet_distance(FeatureStats.of(a), FeatureStats.of(b)) == frechet_distance(a, b)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6 * abs(want))
    np.testing.assert_allclose(FeatureStats.of(a).sigma.numpy(), np.cov(a, rowvar=False, ddof=1), rtol=1e-12)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="feature widths differ"):
        frechet_distance(np.zeros((5, 3)) + np.arange(3), np.ones((5, 4)))
    with pytest.raises(ValueError, match=r"\[N, D\] with N >= 2"):
        frechet_distance(np.zeros(5), np.zeros((5, 1)))


def _tiny_clip(tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    folder = build_tiny_metric_models(tmp_path)["clip"]
    return CLIPModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_clip_score_equals_a_hand_computation(tmp_path):
    model, tokenizer = _tiny_clip(tmp_path)
    clip = ClipEmbedder(model, tokenizer=tokenizer)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    prompts = ["a red cat", "two dogs", "a blue house"]
    # by hand: images already at the model's size, so preprocessing is [0, 1] then CLIP normalisation
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in OPENAI_CLIP)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=((images + 1) / 2 - mean) / std).pooler_output
        tok = tokenizer(prompts, padding=True, return_tensors="pt")
        txt = model.get_text_features(**tok).pooler_output
    cos = torch.nn.functional.cosine_similarity(img.double(), txt.double(), dim=-1)
    want = float((100 * cos.clamp(min=0)).mean())
    assert clip_score(images, prompts, clip) == pytest.approx(want, rel=1e-5, abs=1e-5)
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(images, prompts[:2], clip)
    # PickScore: the model's own logit scale times the cosine, per pair (not clamped)
    picks = pick_scores(images, prompts, clip)
    torch.testing.assert_close(picks, model.logit_scale.exp().double() * cos, rtol=1e-5, atol=1e-5)
    # grey images are read as 3 equal channels
    grey = images[:, :1]
    torch.testing.assert_close(clip.images(grey), clip.images(grey.expand(-1, 3, -1, -1)))


def test_image_metrics_suite_and_a_missing_fid_extra(tmp_path):
    from sidflow.metrics.suite import ImageMetrics, MetricModels

    models = build_tiny_metric_models(tmp_path)
    suite = ImageMetrics(
        ["fd_dinov2", "clip", "pickscore", "fid"],
        MetricModels(models["dino"], models["clip"], models["clip"], models["clip"]),
        batch=3,
    )
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:  # this machine: no torchvision, so no Inception network: skipped, named, never faked
        assert suite.names == ("fd_dinov2", "clip", "pickscore") and "sidflow[fid]" in suite.skipped["fid"]
    images = torch.rand(6, 3, 24, 40, generator=torch.Generator().manual_seed(3)) * 2 - 1
    prompts = ["a cat", "a dog", "a car", "a cup", "a hat", "a pen"]
    rows = suite.rows(images, prompts)
    assert rows["dino"].shape == (6, 32) and rows["clip"].shape == (6,) and rows["pickscore"].shape == (6,)
    reference = {"dino": FeatureStats.of(rows["dino"].flip(0) + 0.5)}
    figures = suite.summarise(rows, reference)
    assert figures["fd_dinov2"] == pytest.approx(frechet_distance(rows["dino"], rows["dino"] + 0.5))
    assert figures["clip"] == pytest.approx(float(rows["clip"].mean()))
    with pytest.raises(ValueError, match="choose from"):
        ImageMetrics(["fd_inception"])


def test_dinov2_features_and_preprocessing():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14
    )
    dino = DinoV2Features(Dinov2Model(config), size=28, batch=2)
    images = torch.rand(5, 3, 40, 56, generator=torch.Generator().manual_seed(2)) * 2 - 1
    feats = dino(images)
    assert feats.shape == (5, 32) and feats.dtype == torch.float64
    assert torch.equal(feats, dino(images))  # deterministic, batch-independent
    scale = float(FeatureStats.of(feats).sigma.trace())  # rank-deficient (5 < 32): zero up to round-off
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6 * scale)
    pre = Preprocess(28, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = pre(images)
    assert x.shape == (5, 3, 28, 28) and pre.describe()["crop"] == "centre"
    flat = torch.zeros(1, 3, 40, 56)  # mid-grey stays mid-grey through resize and crop
    torch.testing.assert_close(pre(flat), torch.zeros(1, 3, 28, 28), atol=1e-6, rtol=0)


def test_reference_features_are_cached_once_and_keyed_by_what_made_them(tmp_path, caplog):
    from sidflow.metrics.cache import cached_features, source_identity

    images = [tmp_path / f"{i}.png" for i in range(3)]
    for i, p in enumerate(images):
        p.write_bytes(bytes([i]) * (10 + i))
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(20, 4, generator=torch.Generator().manual_seed(len(calls)))

    desc = {
        "extractor": "dinov2-tiny",
        "preprocess": Preprocess(28, *OPENAI_CLIP).describe(),
        "source": source_identity(images),
    }
    cache = tmp_path / "cache"
    first, stats, hit = cached_features(cache, desc, compute)
    assert not hit and len(calls) == 1 and first.dtype == torch.float64
    again, stats2, hit = cached_features(cache, desc, compute)
    assert hit and len(calls) == 1 and torch.equal(again, first) and torch.equal(stats2.sigma, stats.sigma)
    assert frechet_distance(stats2, first) == pytest.approx(0.0, abs=1e-9)
    # another extractor, or a changed source file, is another entry
    _, _, hit = cached_features(cache, {**desc, "extractor": "other"}, compute)
    assert not hit and len(calls) == 2
    images[0].write_bytes(b"changed!!!!!!")
    _, _, hit = cached_features(cache, {**desc, "source": source_identity(images)}, compute)
    assert not hit and len(calls) == 3
    # a corrupt entry is recomputed with a note, never trusted
    for f in cache.glob("*.safetensors"):
        f.write_bytes(b"not safetensors")
    _, _, hit = cached_features(cache, desc, compute)
    assert not hit and len(calls) == 4 and "unreadable" in caplog.text
    assert not list(cache.glob(".*"))  # no temporary files left behind
