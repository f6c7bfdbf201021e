"""sidflow.core.flow and sidflow.core.paths: conventions and conversions against hand-written closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from sidflow.core import flow, paths
from sidflow.core.denoiser import Cond


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _batch(n=5, shape=(3, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    eps = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.98 + 0.01  # inside (0, 1)
    return x0, eps, t


def test_add_noise_matches_hand_formula():
    x0, eps, t = _batch()
    x_t = flow.add_noise(x0, eps, t)
    for i in range(len(t)):
        assert torch.allclose(x_t[i], (1 - t[i]) * x0[i] + t[i] * eps[i], atol=1e-15)


def test_all_conversions_round_trip_float64():
    x0, eps, t = _batch()
    x_t = flow.add_noise(x0, eps, t)
    v = eps - x0  # the true velocity of this (x0, eps) pair
    score = -eps / t.view(-1, 1, 1)
    tol = dict(atol=1e-12, rtol=1e-12)
    assert torch.allclose(flow.x0_from_velocity(x_t, v, t), x0, **tol)
    assert torch.allclose(flow.velocity_from_x0(x_t, x0, t), v, **tol)
    assert torch.allclose(flow.eps_from_x0(x_t, x0, t), eps, **tol)
    assert torch.allclose(flow.x0_from_eps(x_t, eps, t), x0, **tol)
    assert torch.allclose(flow.velocity_from_eps(x_t, eps, t), v, **tol)
    assert torch.allclose(flow.eps_from_velocity(x_t, v, t), eps, **tol)
    assert torch.allclose(flow.score_from_x0(x_t, x0, t), score, **tol)
    assert torch.allclose(flow.x0_from_score(x_t, score, t), x0, **tol)
    assert torch.allclose(flow.score_from_velocity(x_t, v, t), score, **tol)
    assert torch.allclose(flow.velocity_from_score(x_t, score, t), v, **tol)


def test_expand_t_rejects_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        flow.expand_t(torch.zeros(3), torch.zeros(4, 2))


def test_sample_t_logit_normal_and_uniform():
    g = torch.Generator().manual_seed(1)
    t = flow.sample_t(20000, generator=g, dtype=torch.float64)
    assert t.shape == (20000,) and bool(((t > 0) & (t < 1)).all())
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean()) - math.log(2)) < 0.05 and abs(float(logit.std()) - 1.6) < 0.05
    t2 = flow.sample_t(20000, kind="logit_normal", mean=0.0, std=1.0, generator=g)
    assert abs(float(torch.log(t2 / (1 - t2)).std()) - 1.0) < 0.05
    u = flow.sample_t(20000, kind="uniform", t_min=0.02, t_max=0.98, generator=g)
    assert float(u.min()) >= 0.02 and float(u.max()) <= 0.98 and abs(float(u.mean()) - 0.5) < 0.01
    with pytest.raises(ValueError, match="kind"):
        flow.sample_t(3, kind="normal")


def test_t_from_variate_closed_forms():
    u = torch.tensor([-1.0, 0.0, 0.5], dtype=torch.float64)
    expected = 1 / (1 + torch.exp(-(math.log(2.0) + 1.6 * u)))
    torch.testing.assert_close(flow.t_from_variate(u), expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(
        flow.t_from_variate(torch.tensor([0.0, 0.5, 1.0]), kind="uniform", t_min=0.2, t_max=0.6),
        torch.tensor([0.2, 0.4, 0.6]),
    )


# ---- unified Gaussian-path view -------------------------------------------------------------
SD = 0.7  # data x0 ~ N(0, SD^2 I): the exact E[x0 | x] is linear for every path


def _exact_x0_rf(x_t, t):
    tb = t.view(-1, 1)
    return (1 - tb) * SD**2 / ((1 - tb) ** 2 * SD**2 + tb**2) * x_t


class _ExactDiffusionModel(torch.nn.Module):
    """Perfect diffusion model of N(0, SD^2) data on ``path`` with a given prediction type."""

    def __init__(self, path, prediction):
        super().__init__()
        self.path, self.prediction = path, prediction

    def forward(self, x_s, s, cond):
        a, b = self.path.coeffs(s)
        ab, bb = a.view(-1, 1), b.view(-1, 1)
        x0 = ab * SD**2 / (ab**2 * SD**2 + bb**2) * x_s  # E[x0 | x_s] for x_s = a x0 + b eps
        eps = (x_s - ab * x0) / bb
        return {"eps": eps, "x0": x0, "v": ab * eps - bb * x0}[self.prediction]


@pytest.mark.parametrize(
    "path", [paths.TrigFlowPath(), paths.VEPath(), paths.VPPath.scaled_linear()], ids=["trigflow", "ve", "vp"]
)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_diffusion_denoiser_matches_exact_rf_velocity(path, prediction):
    t = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.95])
    if isinstance(path, paths.VPPath):  # stay inside the table's SNR range
        lo, hi = float(path.t_from_s(torch.tensor(0.0))), float(path.t_from_s(torch.tensor(999.0)))
        t = lo + (hi - lo) * torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    x_t = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    den = paths.DiffusionDenoiser(_ExactDiffusionModel(path, prediction), path, prediction)
    v = den.velocity(x_t, t, Cond({"y": torch.zeros(5)}))
    expected = (x_t - _exact_x0_rf(x_t, t)) / t.view(-1, 1)
    assert torch.allclose(v, expected, atol=1e-9)


def test_path_time_maps():
    s = torch.tensor([0.1, 0.7, 1.2])
    assert torch.allclose(paths.TrigFlowPath().t_from_s(s), torch.sin(s) / (torch.sin(s) + torch.cos(s)))
    assert torch.allclose(paths.TrigFlowPath().s_from_t(paths.TrigFlowPath().t_from_s(s)), s)
    sigma = torch.tensor([0.01, 1.0, 80.0])
    assert torch.allclose(paths.VEPath().t_from_s(sigma), sigma / (1 + sigma))
    vp = paths.VPPath.scaled_linear()
    s = torch.tensor([0.0, 10.5, 500.25, 999.0])
    assert torch.allclose(vp.s_from_t(vp.t_from_s(s)), s, atol=1e-8)


def test_rf_from_diffusion_scales_state():
    x0, eps, _ = _batch(shape=(2,))
    a, b = torch.full((5,), 0.6), torch.full((5,), 2.0)
    x_s = a.view(-1, 1) * x0 + b.view(-1, 1) * eps
    pred = paths.prediction_from_x0(x_s, x0, a, b, "v")
    x_t, t, x0_rf, v = paths.rf_from_diffusion(x_s, pred, a, b, "v")
    assert torch.allclose(t, b / (a + b)) and torch.allclose(x0_rf, x0, atol=1e-12)
    assert torch.allclose(x_t, flow.add_noise(x0, eps, t), atol=1e-12)
    assert torch.allclose(v, eps - x0, atol=1e-12)
