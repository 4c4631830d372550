"""Turn per-epoch checkpoints of an attack run into run folders, to measure how a model's fragility
changes along its schedule (zoo-v2-findings.md, section 6).

The trainer keeps only the last epoch's ``checkpoint.pt``; copy it aside after the epochs of interest
while the attack trains (e.g. ``cp RUN/checkpoint.pt snaps/ep40.pt``), then:

    python benchmarks/snapshot_models.py RUN OUT snaps/ep40.pt snaps/ep42.pt ...

writes ``OUT/ep40/`` ... : the run's meta (with ``snapshot_epoch`` and the weights' conv norm) and the
checkpoint's weights and history. A spec entry ``{name: badnets, label: ep40, model: OUT/ep40}`` then
evaluates and purifies it like any run folder.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from backdoor_eraser.workflows import conv_weight_sq_norm
from backdoor_eraser.runs import load_model, save_run

def main(run: str, out: str, *checkpoints: str) -> None:
    for ckpt in checkpoints:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model, meta = load_model(run)
        model.net.load_state_dict(state["model"])
        epoch = state["epoch"] + 1
        # save_run writes the model's description, the provenance and the files list afresh.
        meta.update(snapshot_of=str(Path(run).resolve()), snapshot_epoch=epoch,
                    conv_weight_sq_norm=conv_weight_sq_norm(model.net))
        dest = Path(out) / f"ep{epoch}"
        save_run(dest, model, meta, history=state["history"])
        print(f"{dest}: epoch {epoch}, lr {state['history'][-1]['lr']}, conv |w|^2 {meta['conv_weight_sq_norm']:.0f}")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
