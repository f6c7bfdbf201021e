"""sidflow.core.guidance: CFG combination, one batched pass, embedded guidance kept apart."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sidflow.core.denoiser import Cond
from sidflow.core.guidance import (
    cfg,
    guided_velocity,
    guided_velocity_and_features,
    guided_x0,
    with_embedded_guidance,
)


class ClassVelocity(nn.Module):
    """v = x_t * (1 + label) + t; label -1 is the null class. Records every call's batch size."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def velocity(self, x_t, t, cond):
        return self.velocity_and_features(x_t, t, cond)[0]

    def velocity_and_features(self, x_t, t, cond):
        self.batches.append(x_t.shape[0])
        v = x_t * (1 + cond["label"].view(-1, 1)) + t.view(-1, 1)
        return v, v[:, :1] * 10


def _setup():
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    t = torch.tensor([0.5, 0.25])
    cond = Cond({"label": torch.tensor([1.0, 2.0])})
    uncond = Cond({"label": torch.tensor([-1.0, -1.0])})
    return x, t, cond, uncond


def test_cfg_formula():
    assert torch.allclose(cfg(torch.tensor([1.0]), torch.tensor([3.0]), 4.5), torch.tensor([1.0 + 4.5 * 2]))


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
def test_guided_velocity_one_pass(scale):
    x, t, cond, uncond = _setup()
    den = ClassVelocity()
    v = guided_velocity(den, x, t, cond, uncond, scale)
    v_c = x * (1 + cond["label"].view(-1, 1)) + t.view(-1, 1)
    v_u = x * 0 + t.view(-1, 1)
    assert torch.allclose(v, v_u + scale * (v_c - v_u))
    assert den.batches == ([4] if scale not in (0.0, 1.0) else [2])  # one call: batched or single


def test_features_from_conditional_half_and_x0():
    x, t, cond, uncond = _setup()
    v, feats = guided_velocity_and_features(ClassVelocity(), x, t, cond, uncond, 2.0)
    assert torch.equal(v, guided_velocity(ClassVelocity(), x, t, cond, uncond, 2.0))
    v_c = x * (1 + cond["label"].view(-1, 1)) + t.view(-1, 1)
    assert torch.allclose(feats, v_c[:, :1] * 10)
    y = guided_x0(ClassVelocity(), x, t, cond, uncond, 2.0)
    assert torch.allclose(y, x - t.view(-1, 1) * v)


def test_embedded_guidance_travels_in_meta_only():
    _, _, cond, _ = _setup()
    assert with_embedded_guidance(cond, None) is cond
    g = with_embedded_guidance(cond, 3.5)
    assert g.meta["embedded_guidance"] == 3.5 and torch.equal(g["label"], cond["label"])
    assert "embedded_guidance" not in cond.meta
