"""Refool's adversarial reflection selection (Liu et al., ECCV 2020, Algorithm 1; spec §4.6).

The paper does not blend just any reflection: it keeps the ones that make the backdoor work. Its
released ``strategy.py`` runs rounds of: draw a reflection for every poisoned image with probability
proportional to the reflections' weights (all equal at first), train a model on that poisoned set,
blend reflections drawn the same way into non-target images the model did not train on, and count per
reflection how many of them the model sends to the target class. The reflections drawn in that test get
their count as their new weight, every other one the median of those counts, so an untested reflection
stays in play. After the last round the attack itself draws with the final weights, for poisoning and
for test triggers alike.

Here each round's model is a proxy (``select_arch``, ``select_epochs`` of SGD at lr 0.1 with a cosine
schedule, crop + flip), trained by the one trainer; the test images are ``select_val`` non-target
training images held out of the proxy's training set, not test images. Departures from the release: it
trains a full model per round; a drawn reflection with no success there is not in its log and so gets
the median, here it gets 0; weights that are all 0 fall back to equal ones.
"""
from __future__ import annotations

import torch

from ..classifier import Normalization
from ..data.dataset import ImageDataset
from ..errors import UserError

SELECT_STREAM = 3   # the rounds' own streams of per-image randomness (poisoning is 1, test triggers 2)


def updated_weights(drawn: torch.Tensor, success: torch.Tensor, pool_len: int) -> torch.Tensor:
    """One round's new weights: each reflection drawn in the test (``drawn[i]`` for test image i) gets
    its number of successes, every other one the median of those numbers (the mean of the two middle
    ones for an even count, as ``np.median``); all 0 falls back to equal weights."""
    hits = torch.bincount(drawn[success], minlength=pool_len).double()
    tested = torch.unique(drawn)
    weights = torch.full((pool_len,), torch.quantile(hits[tested], 0.5).item(), dtype=torch.float64)
    weights[tested] = hits[tested]
    return weights if weights.sum() > 0 else torch.ones(pool_len, dtype=torch.float64)


def select_reflections(atk, train: ImageDataset, *, seed: int = 0, device="cpu", quiet: bool = False) -> torch.Tensor:
    """The final weights (float64, one per reflection in ``atk``'s pool) after ``select_rounds`` rounds."""
    from ..runs import new_model
    from ..training import Trainer, TrainConfig

    cfg = atk.config
    pool_len = len(atk.pool(train.shape))
    if pool_len < 2:
        raise UserError("refool's reflection selection needs a pool of at least two reflections: set "
                        "reflection_dir, or reflection_indices to none for a pool of training images")
    others = torch.nonzero(train.labels != cfg.target).flatten()
    g = torch.Generator().manual_seed(seed)
    val_pos = others[torch.randperm(len(others), generator=g)[:cfg.select_val]]
    if len(val_pos) == 0 or len(val_pos) == len(others):
        raise UserError(f"refool's reflection selection holds out select_val = {cfg.select_val} of the "
                        f"{len(others)} non-target training images; it needs some on each side")
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[val_pos] = False
    proxy_set, val = train.subset(torch.nonzero(keep).flatten()), train.subset(val_pos)
    weights = torch.ones(pool_len, dtype=torch.float64)
    for r in range(cfg.select_rounds):
        atk.weights = weights
        poisoned = atk.poison(proxy_set, seed=seed, stream=(SELECT_STREAM, r, 0))
        model = new_model(cfg.select_arch, train.classes, train.shape, Normalization(), device, seed + r)
        train_cfg = TrainConfig(epochs=cfg.select_epochs, batch_size=128, lr=0.1, weight_decay=5e-4,
                                schedule="cosine", augment="crop+flip", seed=seed + r)
        Trainer(train_cfg, desc=f"refool selection {r + 1}/{cfg.select_rounds}", quiet=quiet).fit(model, poisoned)
        keys = [(SELECT_STREAM, r, 1, seed, int(i)) for i in val.index]
        triggered, drawn = atk.add_reflections(val.images, keys, with_choice=True)
        pred = model.predict(triggered)
        weights = updated_weights(drawn, pred == cfg.target, pool_len)
        if not quiet:
            top = torch.topk(weights, min(5, pool_len))
            print(f"refool selection {r + 1}/{cfg.select_rounds}: {int((pred == cfg.target).sum())} of {len(val)} "
                  f"held-out images sent to the target; top weights {top.values.tolist()} at reflections "
                  f"{top.indices.tolist()}", flush=True)
    return weights
