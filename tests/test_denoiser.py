"""The Cond contract."""

import torch

from sidflow.core.denoiser import Cond


def test_cond_cat_accepts_fields_in_any_order():
    a = Cond({"x": torch.zeros(1, 2), "y": torch.ones(1)})
    b = Cond({"y": torch.zeros(2), "x": torch.ones(2, 2)})  # e.g. read back from a safetensors cache
    c = Cond.cat([a, b])
    assert list(c.keys()) == ["x", "y"] and c["x"].shape == (3, 2) and c["y"].tolist() == [1.0, 0.0, 0.0]
