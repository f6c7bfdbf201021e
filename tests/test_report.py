import json

import numpy as np
import torch
from PIL import Image

from sidflow.eval.report import plot_metrics, save_grid, save_labelled_grids, to_uint8, write_report


def test_to_uint8_maps_range_like_the_spec():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 128, 255, 255]


def test_grid_places_each_image(tmp_path):
    imgs = torch.full((3, 1, 4, 4), -1.0)
    imgs[1] = 1.0
    path = save_grid(imgs, tmp_path / "g.png", nrow=2)
    arr = np.asarray(Image.open(path))
    assert arr.shape == (2 * 6 + 2, 2 * 6 + 2)
    assert arr[2:6, 2:6].max() == 0 and arr[2:6, 8:12].min() == 255  # image 0 black, image 1 white
    save_labelled_grids({"a": imgs, "b": imgs}, tmp_path / "l.png", nrow=3)
    assert Image.open(tmp_path / "l.png").height > 0


def test_plot_and_report(tmp_path):
    hist = [
        {"images_seen": 0, "fid_1step": 200.0, "acc_1step": 0.3},
        {"images_seen": 3200, "fid_1step": 90.0, "acc_1step": 0.9},
    ]
    plot_metrics(hist, tmp_path / "m.png", reference={"teacher FID": 60.0}, marks={"selected snapshot": 3.2})
    img = np.asarray(Image.open(tmp_path / "m.png").convert("RGB"))
    assert img.shape[0] > 200 and img.shape[1] > 400  # a real figure, two panels
    assert (img < 128).any(axis=2).mean() > 0.01  # with lines and text drawn on it
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20  # coloured curves, not a blank page
    rep = write_report(
        tmp_path / "r.md",
        title="t",
        summary=["s"],
        tables={"T": (hist, ["images_seen", "fid_1step"])},
        images={"m": "m.png"},
        links={"metrics": "metrics.json"},
    )
    text = rep.read_text()
    assert "| 3200 | 90.0 |" in text and "![m](m.png)" in text
    json.dumps(hist)
