"""Clean accuracy (ACC), attack success rate (ASR) and robust accuracy (RA), spec §1.4."""
from __future__ import annotations

import torch

from .attacks.base import Attack, TriggeredTestSet
from .classifier import EVAL_BATCH, Classifier, nonfinite_summary
from .data.dataset import ImageDataset
from .errors import NonFiniteModel


def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = EVAL_BATCH) -> float:
    if len(images) == 0:
        return float("nan")
    return (model.predict(images, batch_size) == labels.cpu()).double().mean().item()


def predict_finite(model: Classifier, images: torch.Tensor, batch_size: int, name: str) -> torch.Tensor:
    """``model.predict``, refusing NaN/inf logits: their argmax is an arbitrary class, so a broken model
    would score as a perfect backdoor."""
    preds, bad = [], torch.zeros((), dtype=torch.int64)
    for logits in model.batched_logits(images, batch_size):
        bad += (~torch.isfinite(logits)).any(1).sum().cpu()
        preds.append(logits.argmax(1).cpu())
    if int(bad):
        raise NonFiniteModel(f"{name} gives NaN/inf logits for {int(bad)} of {len(images)} images, so it has no "
                             "meaningful ACC or ASR (overflowing weights or a diverged training)")
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)


def evaluate(model: Classifier, test: ImageDataset, attack: Attack | None = None,
             triggered: TriggeredTestSet | None = None, batch_size: int = EVAL_BATCH, *, name: str = "the model") -> dict:
    """Metrics as fractions in [0, 1].

    - ``acc``: accuracy on the whole clean test set;
    - ``acc_nontarget``: on clean images whose label is not the target (the NAD/ARGD/ABL logs'
      "clean ACC", e.g. 9,000 images on CIFAR-10); only for all-to-one attacks;
    - ``asr``: share of triggered non-target images classified as their attack target;
    - ``ra``: share of those classified as their true label.
    - ``asr_<trigger>``: for attacks with several triggers (``triggered_test_sets``), the ASR of
      each trigger on its own, e.g. ``asr_top-left``.
    - ``asr_spillover``: for class-specific attacks (``spillover_test_set``), the share of triggered
      images of the other classes sent to the backdoor's target, i.e. how class-specific it really is.
    Pass ``triggered`` to reuse a precomputed triggered set. A model with NaN/inf weights or logits is
    refused (:class:`NonFiniteModel`, naming it by ``name``).
    """
    broken = nonfinite_summary(model.net.state_dict())
    if broken:
        raise NonFiniteModel(f"{name} has non-finite weights ({broken}), so it has no meaningful ACC or ASR "
                             "(e.g. its training diverged)")
    preds = predict_finite(model, test.images, batch_size, name)
    out = {"acc": (preds == test.labels).double().mean().item(), "n_test": len(test)}
    if attack is None and triggered is None:
        return out
    if attack is not None and attack.config.mode == "all2one":
        keep = test.labels != attack.config.target
        out["acc_nontarget"] = (preds[keep] == test.labels[keep]).double().mean().item()
    if triggered is None:
        triggered = attack.triggered_test_set(test)
    tpred = predict_finite(model, triggered.images, batch_size, name)
    out["asr"] = (tpred == triggered.target_labels).double().mean().item()
    out["ra"] = (tpred == triggered.true_labels).double().mean().item()
    out["n_triggered"] = len(triggered)
    if attack is not None and hasattr(attack, "triggered_test_sets"):
        parts = attack.triggered_test_sets(test)
        # The combined set is the per-trigger sets concatenated in order (MultiTrigger.triggered_test_set).
        if sum(len(p) for p in parts.values()) == len(triggered):
            start = 0
            for name, part in parts.items():
                hit = tpred[start:start + len(part)] == triggered.target_labels[start:start + len(part)]
                out[f"asr_{name}"] = hit.double().mean().item() if len(part) else float("nan")
                start += len(part)
    spill = getattr(attack, "spillover_test_set", None) if attack is not None else None
    spill = spill(test) if spill is not None else None
    if spill is not None and len(spill):
        hit = predict_finite(model, spill.images, batch_size, name) == spill.target_labels
        out["asr_spillover"] = hit.double().mean().item()
    return out


def format_table(rows: dict[str, dict], columns=("acc", "acc_nontarget", "asr", "ra")) -> str:
    """A plain-text table of percentages, one row per model."""
    cols = [c for c in columns if any(c in r for r in rows.values())]
    head = f"{'model':<14}" + "".join(f"{c.upper().replace('_NONTARGET', ' (non-tgt)'):>16}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        cells = "".join(f"{100 * r[c]:>15.2f}%" if c in r else f"{'-':>16}" for c in cols)
        lines.append(f"{name:<14}{cells}")
    return "\n".join(lines)
