"""sidflow.core.generator: step times, noise types, truncation and where gradients flow."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sidflow.core.denoiser import Cond
from sidflow.core.generator import draw_fresh_noise, generate, generator_step_times, sample_generator

D64 = torch.float64


class LinearVelocity(nn.Module):
    """v = W x_t + t u (an affine denoiser with parameters)."""

    def __init__(self, d=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(d, d, generator=g, dtype=D64) * 0.3)
        self.u = nn.Parameter(torch.randn(d, generator=g, dtype=D64))
        self.calls = []

    def velocity(self, x_t, t, cond):
        self.calls.append((x_t.detach().clone(), t.detach().clone(), torch.is_grad_enabled()))
        return x_t @ self.W.T + t.view(-1, 1) * self.u


COND = Cond({"y": torch.zeros(2)})


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, generator=g, dtype=D64), torch.randn(3, 2, 3, generator=g, dtype=D64)


def test_step_times():
    assert generator_step_times() == [1.0, 0.75, 0.5, 0.25]
    assert generator_step_times(2, t_init=0.8) == pytest.approx([0.8, 0.4])
    warped = generator_step_times(4, shift=3.0)
    assert warped == pytest.approx([3 * t / (1 + 2 * t) for t in (1.0, 0.75, 0.5, 0.25)])
    with pytest.raises(ValueError):
        generator_step_times(0)


def _manual(G, z, noises, times, k):
    """Hand-unrolled recursion with the noise of each step given explicitly."""
    D = torch.zeros_like(z)
    for i in range(k):
        x = (1 - times[i]) * D + times[i] * noises[i]
        t = torch.full((z.shape[0],), times[i], dtype=D64)
        D = x - times[i] * G.velocity(x, t, COND)
    return D


def test_fresh_uses_given_noise_and_fixed_reuses_z():
    G, (z, fresh) = LinearVelocity(), _inputs()
    times = generator_step_times(4)
    with torch.no_grad():
        out = sample_generator(G, z, COND, k=3, step_times=times, noise_type="fresh", fresh_noise=fresh)
        assert torch.allclose(out, _manual(G, z, [z, fresh[0], fresh[1]], times, 3), atol=1e-12)
        out = sample_generator(G, z, COND, k=4, step_times=times, noise_type="fixed")
        assert torch.allclose(out, _manual(G, z, [z, z, z, z], times, 4), atol=1e-12)
    with pytest.raises(ValueError, match="fresh_noise"):
        sample_generator(G, z, COND, k=2, step_times=times, noise_type="fresh")


def test_ddim_is_an_euler_step_of_the_ode():
    G, (z, _) = LinearVelocity(), _inputs()
    times = generator_step_times(4)
    G.calls.clear()
    with torch.no_grad():
        sample_generator(G, z, COND, k=3, step_times=times, noise_type="ddim")
    xs = [c[0] for c in G.calls]
    # Euler: x_{i} = x_{i-1} + (t_i - t_{i-1}) v(x_{i-1}, t_{i-1}), with v the generator's velocity
    for i in (1, 2):
        t_prev = torch.full((2,), times[i - 1], dtype=D64)
        with torch.no_grad():
            v_prev = G.velocity(xs[i - 1], t_prev, COND)
        assert torch.allclose(xs[i], xs[i - 1] + (times[i] - times[i - 1]) * v_prev, atol=1e-12)


def test_truncation_and_grad_only_through_last_step():
    G, (z, fresh) = LinearVelocity(), _inputs()
    times = generator_step_times(4)
    G.calls.clear()
    out = sample_generator(G, z, COND, k=3, step_times=times, fresh_noise=fresh, grad_last=True)
    assert [round(float(c[1][0]), 6) for c in G.calls] == [1.0, 0.75, 0.5]  # truncated, not re-spaced
    assert [c[2] for c in G.calls] == [False, False, True]
    out.sum().backward()
    # grad only through the last step (x_2 constant): out = x_2 - t (W x_2 + t u), so
    # d sum(out) / du = -t^2 per sample and element, times B = 2 samples
    assert torch.allclose(G.u.grad, torch.full((3,), -(0.5**2) * 2, dtype=D64), atol=1e-12)
    G.calls.clear()
    out = sample_generator(G, z, COND, k=2, step_times=times, fresh_noise=fresh)
    assert not out.requires_grad and [c[2] for c in G.calls] == [False, False]


def test_first_step_input_is_z_and_draws_are_keyed():
    G, (z, fresh) = LinearVelocity(), _inputs()
    G.calls.clear()
    with torch.no_grad():
        sample_generator(G, z, COND, k=1, step_times=[1.0, 0.5], fresh_noise=fresh)
    assert torch.equal(G.calls[0][0], z)
    a = draw_fresh_noise((3,), 4, seed=0, iteration=2, stream="f", indices=[0, 1, 2])
    b = draw_fresh_noise((3,), 4, seed=0, iteration=2, stream="f", indices=[2])
    assert a.shape == (3, 3, 3) and torch.equal(a[:, 2], b[:, 0])


def test_generate_is_batch_size_invariant():
    G = LinearVelocity().float()
    cond = Cond({"y": torch.zeros(4)})
    times = generator_step_times(4)
    full = generate(G, cond, (3,), steps=4, step_times=times, seed=5)
    part = generate(G, cond.index([2, 3]), (3,), steps=4, step_times=times, seed=5, indices=[2, 3])
    assert torch.allclose(full[2:], part, atol=1e-6)
    batched = generate(G, cond, (3,), steps=4, step_times=times, seed=5, batch=3)  # passes of 3 then 1
    assert torch.allclose(batched, full, atol=1e-6)
    # fixed inputs instead of the keyed ones: the sampler's own recursion
    z, fresh = torch.randn(4, 3), torch.randn(3, 4, 3)
    given = generate(G, cond, (3,), steps=2, step_times=times, z=z, fresh_noise=fresh, batch=2)
    with torch.no_grad():
        direct = sample_generator(G, z, cond, k=2, step_times=times, fresh_noise=fresh)
    assert torch.equal(given, direct)
