"""Attention-map pictures: rows are models, columns are attention sites, for one image."""
from __future__ import annotations

from pathlib import Path

import torch

from .classifier import Classifier
from .defenses.attention import attention_map
from .models.taps import FeatureTaps


@torch.no_grad()
def attention_maps(model: Classifier, image: torch.Tensor, sites: list[str] | None = None, p: float = 2.0
                   ) -> list[torch.Tensor]:
    """Per-site attention maps (H×W, scaled to [0, 1]) of one uint8 image C×H×W."""
    sites = list(sites or model.sites)
    model.net.eval()
    with FeatureTaps(model.net, sites) as taps:
        model(image.unsqueeze(0))
        maps = [attention_map(a, p)[0] for a in taps.outputs()]
    return [(m - m.min()) / (m.max() - m.min() + 1e-12) for m in maps]


def attention_figure(models: dict[str, Classifier], image: torch.Tensor, path: str | Path, *,
                     sites: list[str] | None = None, title: str | None = None) -> Path:
    """Save a PNG grid: the input image, then one attention map per site, one row per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(models.items())
    sites = list(sites or rows[0][1].sites)
    ncols = len(sites) + 1
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.1 * ncols, 2.1 * len(rows)), squeeze=False)
    img = image.permute(1, 2, 0).cpu().numpy()
    for r, (name, model) in enumerate(rows):
        maps = attention_maps(model, image, sites)
        axes[r][0].imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None)
        axes[r][0].set_ylabel(name, fontsize=10)
        for c, m in enumerate(maps, start=1):
            axes[r][c].imshow(m.cpu().numpy(), cmap="jet", vmin=0, vmax=1)
            if r == 0:
                axes[r][c].set_title(sites[c - 1], fontsize=9)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_title("input", fontsize=9)
    return save_figure(fig, path, title)


def trigger_figure(attack, images: torch.Tensor, path: str | Path, *, amplify: float = 5.0,
                   title: str | None = None) -> Path:
    """Save a PNG: clean images (row 1), triggered images (row 2) and |triggered − clean|·``amplify``
    (row 3, which makes subtle triggers such as WaNet's warp or a blend visible)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    triggered = attack(images)
    diff = ((triggered.float() - images.float()).abs() * amplify).clamp(0, 255).to(torch.uint8)
    rows = [("clean", images), ("triggered", triggered), (f"|diff| ×{amplify:g}", diff)]
    n = len(images)
    fig, axes = plt.subplots(3, n, figsize=(1.3 * n, 4.2), squeeze=False)
    for r, (name, batch) in enumerate(rows):
        for c in range(n):
            img = batch[c].permute(1, 2, 0).cpu().numpy()
            axes[r][c].imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=255)
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        axes[r][0].set_ylabel(name, fontsize=9)
    return save_figure(fig, path, title)


def save_figure(fig, path: str | Path, title: str | None = None) -> Path:
    """Title, tighten, write as PNG (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
