"""Attention maps and the distances between them, shared by NAD, ARGD and SAGE (spec §5.4–5.6)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError

ATTENTION_FUNCTIONS = ("mean_p", "sum_p", "sum", "max_p")
DISTANCES = ("code", "paper")
EPS = 1e-6  # as in the NAD release's at.py


def attention_map(a: torch.Tensor, p: float = 2.0, function: str = "mean_p") -> torch.Tensor:
    """Channel-reduced attention B×H×W of activations B×C×H×W (not normalised).

    ``mean_p`` = (1/C)·Σ|a|^p (NAD's A^p_mean, the default), ``sum_p`` = Σ|a|^p,
    ``sum`` = Σ|a|, ``max_p`` = max_c |a|^p (SAGE's G^p_max).
    """
    if a.ndim != 4:
        raise UserError(f"attention needs B×C×H×W activations, got shape {tuple(a.shape)}")
    if function == "mean_p":
        return a.abs().pow(p).mean(1)
    if function == "sum_p":
        return a.abs().pow(p).sum(1)
    if function == "sum":
        return a.abs().sum(1)
    if function == "max_p":
        return a.abs().pow(p).amax(1)
    raise UserError(f"unknown attention function {function!r}; known: {', '.join(ATTENTION_FUNCTIONS)}")


def normalize_map(am: torch.Tensor) -> torch.Tensor:
    """Flatten B×H×W to B×(H·W) and divide by its L2 norm + 1e-6 (the release's convention)."""
    flat = am.flatten(1)
    return flat / (flat.norm(dim=1, keepdim=True) + EPS)


def attention_vector(a: torch.Tensor, p: float = 2.0, function: str = "mean_p") -> torch.Tensor:
    """Flattened, L2-normalised attention map B×(H·W)."""
    return normalize_map(attention_map(a, p, function))


def attention_distance(s: torch.Tensor, t: torch.Tensor, mode: str = "code") -> torch.Tensor:
    """Distance between normalised attention vectors B×D.

    ``code``: mean of squared differences over B·D (the released NAD code's ``F.mse_loss``, spec §5.4);
    ``paper``: per-sample L2 norm ‖s − t‖₂, averaged over the batch (the NAD paper's equation).
    For one sample, code = paper² / D.
    """
    if s.shape != t.shape:
        raise UserError(f"attention maps differ in shape: {tuple(s.shape)} vs {tuple(t.shape)}")
    if mode == "code":
        return F.mse_loss(s, t)
    if mode == "paper":
        return (s - t).norm(dim=1).mean()
    raise UserError(f"unknown distance {mode!r}; known: {', '.join(DISTANCES)}")
