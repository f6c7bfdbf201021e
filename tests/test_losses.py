"""sidflow.core.losses against hand-derived values, and the SiD gradient with linear denoisers."""

from __future__ import annotations

import math

import pytest
import torch

from sidflow.core import losses
from sidflow.core.flow import add_noise

D64 = torch.float64


def test_weightings_hand_values():
    t = torch.tensor([0.25, 0.5, 0.8], dtype=D64)
    expected = {
        "1_minus_sigma": [0.75, 0.5, 0.2],
        "1_minus_sigma_squared": [0.5625, 0.25, 0.04],
        "1_over_sigma": [4.0, 2.0, 1.25],
        "1_over_sigma2": [16.0, 4.0, 1.5625],
        "snr_sqrt": [3.0, 1.0, 0.25],
        "snr": [9.0, 1.0, 0.0625],
    }
    for name, vals in expected.items():
        assert torch.allclose(losses.loss_weight(name, t), torch.tensor(vals, dtype=D64)), name
    # floors: 1/max(t, 1e-5) at t = 0, snr at t -> 1 is floored, not infinite
    assert float(losses.loss_weight("1_over_sigma", torch.tensor([0.0]))) == pytest.approx(1e5)
    assert float(losses.loss_weight("1_over_sigma2", torch.tensor([1e-4]))) == pytest.approx(1e5)
    assert float(losses.loss_weight("snr_sqrt", torch.tensor([1e-7]))) == pytest.approx(1e5)
    x_g = torch.tensor([[1.0, -1.0], [0.0, 0.0]])
    y = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    w = losses.loss_weight("sid_legacy", torch.tensor([0.3, 0.3]), x_g, y)
    assert torch.allclose(w, torch.tensor([1 / 1.5, 1e5]))
    assert set(losses.WEIGHTINGS) == {*expected, "sid_legacy"}
    with pytest.raises(ValueError, match="choose one of"):
        losses.loss_weight("edm", t)


def test_weight_has_no_grad():
    t = torch.tensor([0.3, 0.6], requires_grad=True)
    assert not losses.loss_weight("1_minus_sigma", t).requires_grad


def test_generator_loss_hand_values_and_alpha_forms():
    x_g = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=D64)
    y_r = torch.tensor([[0.5, 1.0], [1.0, 1.0]], dtype=D64)
    y_f = torch.tensor([[0.0, 3.0], [2.0, 0.0]], dtype=D64)
    t = torch.tensor([0.5, 0.75], dtype=D64)
    # alpha = 1: sum (y_r - y_f)(y_f - x_g)(1 - t)
    # sample 0: (0.5)(-1) + (-2)(1) = -2.5 -> *0.5 = -1.25 ; sample 1: (-1)(2) + (1)(1) = -1 -> *0.25
    out = losses.sid_generator_loss(x_g, y_r, y_f, t)
    assert torch.allclose(out, torch.tensor([-1.25, -0.25], dtype=D64))
    # the general form written out at alpha = 1 equals the short form
    general = ((y_r - y_f) * ((y_r - x_g) - 1.0 * (y_r - y_f)) * (1 - t).view(-1, 1)).sum(1)
    assert torch.allclose(general, out, atol=1e-14)
    near_one = losses.sid_generator_loss(x_g, y_r, y_f, t, alpha=1.0 + 1e-9)  # general branch
    assert torch.allclose(near_one, out, atol=1e-7)
    # alpha = 1.2: sum (y_r - y_f)[(y_r - x_g) - 1.2 (y_r - y_f)] w
    # sample 0: 0.5*(-0.5 - 0.6) + (-2)*(-1 + 2.4) = -0.55 - 2.8 = -3.35 -> * 0.5
    a12 = losses.sid_generator_loss(x_g, y_r, y_f, t, alpha=1.2, weighting="1_minus_sigma_squared")
    assert float(a12[0]) == pytest.approx(-3.35 * 0.25)


def test_fake_score_loss_hand_value():
    v = torch.tensor([[1.0, 0.0]])
    x_g = torch.tensor([[0.5, 0.5]])
    eps = torch.tensor([[1.0, 1.0]])  # target eps - x_g = (0.5, 0.5)
    assert float(losses.fake_score_loss(v, x_g, eps)[0]) == pytest.approx(0.25 + 0.25)


def test_gan_losses_hand_values():
    lr = torch.tensor([[0.0, 20.0]])  # clamped to 10
    lf = torch.tensor([[0.0, 0.0]])
    bce_real = 0.5 * (math.log(2) + math.log1p(math.exp(-10)))
    d = losses.discriminator_loss(lr, lf, latent_numel=8)
    assert float(d[0]) == pytest.approx(0.5 * (bce_real + math.log(2)) * 8)
    g = losses.generator_adv_loss(torch.tensor([[-30.0]]), torch.tensor([0.5]), latent_numel=4)
    assert float(g[0]) == pytest.approx(math.log1p(math.exp(10)) * 0.5 * 4)


def test_finite_mask_and_masked_sum_count():
    a = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [1.0, 1.0]])
    b = torch.tensor([[1.0], [1.0], [float("inf")]])
    mask = losses.finite_mask(a, b)
    assert mask.tolist() == [True, False, False]
    per = torch.tensor([1.0, 2.0, float("nan")], requires_grad=True)
    total, bad = losses.masked_sum(per, torch.tensor([True, False, True]))
    assert float(total.detach()) == 1.0 and bad == 2
    total.backward()
    assert per.grad.tolist() == [1.0, 0.0, 0.0]


# ---- SiD gradient with linear denoisers x0 = A x_t + b --------------------------------------------
def _linear_setup(seed=0, n=3, d=4):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=D64)

    A_T, b_T, A_F, b_F = r(d, d) * 0.5, r(d), r(d, d) * 0.5, r(d)
    x_g = r(n, d).requires_grad_(True)
    eps, t = r(n, d), torch.tensor([0.2, 0.5, 0.9], dtype=D64)
    return A_T, b_T, A_F, b_F, x_g, eps, t


def _sid_grad(detach_teacher=False, detach_fake=False, alpha=1.0):
    A_T, b_T, A_F, b_F, x_g, eps, t = _linear_setup()
    x_t = add_noise(x_g, eps, t)
    y_r = x_t @ A_T.T + b_T
    y_f = x_t @ A_F.T + b_F
    y_r = y_r.detach() if detach_teacher else y_r
    y_f = y_f.detach() if detach_fake else y_f
    losses.sid_generator_loss(x_g, y_r, y_f, t, alpha=alpha).sum().backward()
    return x_g.grad


def _hand_grad(alpha=1.0):
    """d/dx_g of sum_i w_i [d_i . ((y_r - x_g) - alpha d_i)], d = y_r - y_f, dx_t/dx_g = (1 - t) I."""
    A_T, b_T, A_F, b_F, x_g, eps, t = _linear_setup()
    x_g = x_g.detach()
    grads = []
    for i in range(x_g.shape[0]):
        s = 1 - float(t[i])
        x_t = s * x_g[i] + float(t[i]) * eps[i]
        y_r, y_f = A_T @ x_t + b_T, A_F @ x_t + b_F
        d, e = y_r - y_f, (y_r - x_g[i]) - alpha * (y_r - y_f)
        J_d = s * (A_T - A_F)  # Jacobian of d wrt x_g
        J_e = s * A_T - torch.eye(4, dtype=D64) - alpha * J_d  # Jacobian of e wrt x_g
        grads.append(s * (J_d.T @ e + J_e.T @ d))  # weight w = 1 - t
    return torch.stack(grads)


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_sid_gradient_matches_hand_formula(alpha):
    assert torch.allclose(_sid_grad(alpha=alpha), _hand_grad(alpha), atol=1e-10, rtol=0)


def test_sid_gradient_detects_detached_predictions():
    hand = _hand_grad()
    assert (_sid_grad(detach_teacher=True) - hand).abs().max() > 1e-3
    assert (_sid_grad(detach_fake=True) - hand).abs().max() > 1e-3
