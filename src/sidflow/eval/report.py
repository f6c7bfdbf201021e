"""What a finished run shows: sample grids, the metric curve and a one-page Markdown report.

Grids are assembled by hand with PIL because ``torchvision.utils.make_grid`` would pull
torchvision (and with it a CUDA build of torch) into the dependencies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

__all__ = ["to_uint8", "save_grid", "save_labelled_grids", "plot_metrics", "write_report"]


def to_uint8(images: Tensor) -> np.ndarray:
    """``[N, C, H, W]`` images in ``[-1, 1]`` -> ``[N, H, W, C]`` uint8 (spec 3.4's mapping)."""
    x = images.detach().float().cpu().clamp(-1, 1)
    x = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _grid_array(images: Tensor, nrow: int, pad: int = 2) -> np.ndarray:
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    ncol = nrow
    nrows = (n + ncol - 1) // ncol
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = arr[i]
    return grid


def save_grid(images: Tensor, path: str | Path, nrow: int = 10, scale: int = 1) -> Path:
    """Save ``[N, C, H, W]`` images in ``[-1, 1]`` as one PNG grid with ``nrow`` images per row."""
    grid = _grid_array(images, nrow)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_labelled_grids(
    rows: Mapping[str, Tensor], path: str | Path, nrow: int = 10, scale: int = 2, label_width: int = 150
) -> Path:
    """Stack several grids (e.g. teacher 32 steps, student 1 and 4 steps) with a label per block."""
    blocks = []
    for label, images in rows.items():
        grid = _grid_array(images, nrow)
        img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).convert("RGB")
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
        canvas = Image.new("RGB", (img.width + label_width, img.height), "white")
        canvas.paste(img, (label_width, 0))
        ImageDraw.Draw(canvas).text((6, img.height // 2 - 6), label, fill="black")
        blocks.append(canvas)
    width = max(b.width for b in blocks)
    out = Image.new("RGB", (width, sum(b.height for b in blocks)), "white")
    y = 0
    for b in blocks:
        out.paste(b, (0, y))
        y += b.height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path


def plot_metrics(
    history: Sequence[Mapping[str, float]],
    path: str | Path,
    reference: Mapping[str, float] | None = None,
    marks: Mapping[str, float] | None = None,
    metrics: tuple[str, str] = ("fid", "acc"),
) -> Path:
    """Plot a distance and a score (default FID and prompt accuracy) against training images, one
    line per student step count.

    Args:
        history: rows with ``images_seen`` and keys ``{distance}_{k}step`` / ``{score}_{k}step``.
        reference: horizontal lines, e.g. ``{"teacher best FID": 60.0, "real floor FID": 30.0}``
            (keys containing "FID" go on the FID axis, the others on the accuracy axis).
        marks: labelled vertical lines at training images (k), e.g. ``{"selected snapshot": 14.4}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fid, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [row["images_seen"] / 1000 for row in history]
    distance, score = metrics
    keys = sorted({k for row in history for k in row if k.startswith(f"{distance}_") and k.endswith("step")})
    for key in keys:
        steps = key.removeprefix(f"{distance}_")
        ax_fid.plot(xs, [row.get(key, float("nan")) for row in history], marker="o", label=f"student {steps}")
        ax_acc.plot(
            xs, [row.get(f"{score}_{steps}", float("nan")) for row in history], marker="o", label=f"student {steps}"
        )
    for name, value in (reference or {}).items():
        ax = ax_fid if "FID" in name or "FD" in name else ax_acc
        ax.axhline(value, linestyle="--", linewidth=1, color="gray")
        ax.text(xs[0] if xs else 0, value, name, fontsize=7, va="bottom")
    for i, (name, kimg) in enumerate((marks or {}).items()):
        for ax in (ax_fid, ax_acc):
            ax.axvline(kimg, linestyle=":" if i == 0 else "-.", linewidth=1.2, color="black", label=name)
    labels = {"fid": "FID", "fd_dinov2": "FD-DINOv2", "acc": "prompt accuracy", "clip": "CLIP score"}
    ax_fid.set(xlabel="training images (k)", ylabel=labels.get(distance, distance), yscale="log")
    ax_acc.set(xlabel="training images (k)", ylabel=labels.get(score, score))
    if score == "acc":
        ax_acc.set_ylim(0, 1.02)
    for ax in (ax_fid, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(
    path: str | Path,
    *,
    title: str,
    summary: Sequence[str],
    tables: Mapping[str, tuple[Sequence[Mapping[str, object]], Sequence[str]]],
    images: Mapping[str, str],
    links: Mapping[str, str],
) -> Path:
    """Write a one-page Markdown report: summary bullets, tables, embedded images and file links."""
    parts = [f"# {title}", ""]
    parts += [f"- {line}" for line in summary] + [""]
    for name, (rows, columns) in tables.items():
        parts += [f"## {name}", "", _table(rows, columns), ""]
    for caption, rel in images.items():
        parts += [f"## {caption}", "", f"![{caption}]({rel})", ""]
    if links:
        parts += ["## Files", ""] + [f"- [{name}]({rel})" for name, rel in links.items()] + [""]
    path = Path(path)
    path.write_text("\n".join(parts))
    return path
