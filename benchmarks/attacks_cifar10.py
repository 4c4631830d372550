"""Attacks benchmark: every attack's backdoored CIFAR-10 WRN-16-1 with the Core training recipe, one table.

Runs the real CLI per attack (resumable from per-epoch checkpoints; finished runs are skipped), then
writes benchmarks/results/attacks_cifar10.{md,json}, a trigger grid PNG per attack
(benchmarks/results/triggers/<name>.png, made from the run's own fitted trigger), and copies every
finished run folder to zoo/<name>/ (without checkpoints or licensed trigger material) with
zoo/MANIFEST.md.

    mkdir -p benchmarks/work && tar -xzf ../shared/data/cifar10_jpeg.tar.gz -C benchmarks/work
    tar -xzf ../shared/data/backdoor_triggers.tar.gz -C benchmarks/work
    python benchmarks/attacks_cifar10.py --data-dir benchmarks/work/cifar10_jpeg
    python benchmarks/attacks_cifar10.py --data-dir benchmarks/work/cifar10_jpeg --report-only

Core recipe (benchmarks/core_cifar10.py): 20 epochs, SGD lr 0.1 cosine, momentum 0.9, Nesterov, wd 5e-4,
batch 128, crop + flip, seed 0. New runs add channels-last and bf16 autocast (`--fast`, the default),
which results/precision_cifar10.md compares with fp32 on BadNets.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work"
ZOO = ROOT / "zoo"
REFOOL_DIR = WORK / "triggers" / "backdoorbench" / "refool" / "Refool-SelectedReflectionImages"

RECIPE = ["--epochs", "20", "--batch-size", "128", "--lr", "0.1", "--weight-decay", "5e-4", "--schedule", "cosine"]
FAST = ["--channels-last", "--amp", "bf16"]

# name -> (attack, params, kind, note). Order = run order: later entries use earlier runs.
ATTACKS: dict[str, tuple[str, list[str], str, str]] = {
    "clean": ("badnets", ["--rate", "0"], "none", "no poisoning (rate 0): the clean reference model; its ASR is "
              "the BadNets trigger's"),
    "clean-seed1": ("badnets", ["--rate", "0", "--seed", "1"], "none", "a second clean model (seed 1): how far two "
                    "clean runs of this recipe differ"),
    "badnets": ("badnets", [], "poisoned-label", "the core benchmark's model (fp32), which the defense benchmarks use"),
    "badnets-bf16": ("badnets", [], "poisoned-label", "the same run in bf16 + channels-last (precision check; "
                     "not in the zoo)"),
    "blend": ("blend", [], "poisoned-label", "key = seeded uniform noise, α = 0.2; fp32, used by the defense "
              "benchmarks"),
    "trojan": ("trojan", [], "poisoned-label", ""),
    "sig": ("sig", [], "clean-label", ""),
    "wanet": ("wanet", [], "poisoned-label", "poisoning and noise mode on the fly per batch"),
    "refool": ("refool", ["--reflection-dir", str(REFOOL_DIR)], "clean-label",
               "200 BackdoorBench reflection images (not redistributed: the zoo copy has no pool)"),
    "clean-label": ("clean-label", ["--surrogate", str(WORK / "attacks" / "clean")], "clean-label",
                    "PGD against the standard-trained `clean` model (not adversarially trained: non-faithful, "
                    "recorded in meta.json)"),
    "clean-label-4c": ("clean-label", ["--surrogate", str(WORK / "attacks" / "clean"), "--corners", "four-corners"],
                       "clean-label", "as `clean-label` with the four-corner trigger of Turner et al. (survives "
                       "the training flips)"),
    "trojannn": ("trojannn", ["--model", str(WORK / "attacks" / "clean")], "poisoned-label",
                 "5×5 patch optimised on the `clean` model"),
    # SAGE's attack variants (spec §4.10)
    "multi-trigger": ("multi-trigger", [], "poisoned-label",
                      "SAGE same-label: 3×3 grids at bottom-right, top-left and centre, all to class 3, 10 % "
                      "per trigger (30 % poisoned); ASR over the three triggers"),
    "multi-label": ("multi-trigger", ["--triggers", "bottom-right;top-left;centre;22,6;6,22", "--targets",
                                      "3,4,5,6,7", "--rate", "0.02"], "poisoned-label",
                    "SAGE multi-label: five 3×3 grids to classes 3–7, 2 % per trigger (10 % poisoned, as the "
                    "single-trigger attacks); no position is another's horizontal mirror, since training "
                    "flips images. At 5 % per trigger (25 % poisoned) training collapsed to chance from "
                    "epoch 2 (loss 2.27, train acc 0.13) and was stopped at epoch 6"),
    "class-specific": ("patch", ["--source", "1", "--rate", "0.2"], "poisoned-label",
                       "3×3 grid on 20 % of class 1 (1,000 images) → class 0; ASR on triggered class-1 test "
                       "images"),
    "large-transparent": ("patch", ["--size", "20", "--opacity", "0.5", "--pattern", "random"], "poisoned-label",
                          "SAGE's large-trigger study at its largest: a seeded random 20×20 patch at opacity "
                          "0.5 (SAGE: TrojanNN square, transparency 0.5), 10 %"),
    "input-aware": ("input-aware", ["--mask-epochs", "3"], "poisoned-label",
                    "CPU budget: mask pre-training 3 epochs (release: 25); 20 joint epochs (release: 600)"),
}


FINDINGS = """## What the table shows (one seed per attack)

- **Every poisoned-label attack reaches ASR ≥ 90 %** (BadNets, Blend, Trojan, WaNet, TrojanNN), but all sit
  1.7–3.0 points below the clean model's ACC, so against the 2-point bar only Trojan passes. With a single
  clean seed we cannot say how much of that gap is run-to-run noise: at 20 epochs, poisoned runs stall near
  20 % training accuracy for the first epochs (e.g. `badnets-bf16`: 0.18 → 0.24 over epochs 1–4; the clean
  run is at 0.43 after epoch 1), which costs the short cosine schedule accuracy; how long the stall lasts
  varies between runs (the fp32 and bf16 BadNets runs differ by 3.3 ACC points, see precision_cifar10.md).
- **SIG** (clean-label) reaches 86.9 % ASR at 2.3 points below the clean model.
- **Clean-label (Turner et al.)** with the bottom-right trigger fails: 0.4 % ASR. Two departures from the
  paper's setting plausibly explain it: the PGD surrogate is a standard-trained model (the paper needs an
  adversarially trained one to make the images "hard"; we had no CPU budget for PGD adversarial training,
  about 8× a normal epoch per epoch), and training uses random flips, which move a one-corner trigger to
  the other side half of the time; the paper's four-corner trigger exists for that reason. The
  `clean-label-4c` row tests the second explanation: the same attack and surrogate with the four-corner
  trigger reaches 99.98 % ASR (ACC 82.28, 2.5 points below clean). The flips, not the standard surrogate,
  stop the one-corner attack here.
- **Refool** fails at 20 epochs: 2.0 % ASR. Our pool holds 200 different reflection images, and each
  poisoned or test image draws its own reflection and blend (spec §4.6); the ARGD code, whose Refool
  models reach 95–100 % ASR, blends one single reflection image into every poisoned sample, a far easier
  trigger. The paper's adversarial selection of reflections is not implemented.
- **SAGE's variants** (spec §4.10):
  - *Same-label multi-trigger*: three grids to class 3, 30 % poisoned. Each trigger reaches 100 % ASR, at
    3.9 points below clean; it is the most heavily poisoned model in the table.
  - *Multi-label*: five grids to classes 3–7, 2 % each. Each trigger reaches 99.4–99.9 % ASR, at −2.04.
    A first try at 5 % per trigger (25 % poisoned) collapsed to chance at epoch 2 (loss 2.27, training
    accuracy 0.13) and stayed there until it was stopped at epoch 6. We did not look into why.
  - *Large and transparent*: a 20×20 patch at opacity 0.5 reaches 100 % ASR at −1.17, meeting both targets.
  - *Class-specific* (class 1 → 0, 1,000 poisoned images): 89.6 % ASR on triggered class-1 images, just
    under the 90 % bar. The trigger also sends 13.2 % of triggered images of the other eight classes to
    class 0 (`asr_spillover`). The attack poisons class-1 images only, with no triggered images of other
    classes that keep their labels, so nothing teaches the model that the trigger is specific to class 1.
- **Input-aware** at a CPU budget: mask pre-training 3 epochs (release: 25; 250 s per epoch here, since the
  mask network is an encoder–decoder run twice per step) and 20 joint epochs (release: 600; about 50 s per
  epoch with bf16). Result: 83.55 % ACC (−1.23) and 88.16 % ASR, just under the 90 % bar. The training-time
  backdoor accuracy was still rising at the end (0.85 at epoch 20), so the gap is plausibly the short
  schedule; that is not tested.
"""

NOT_IN_ZOO = {"badnets-bf16", "clean-seed1"}


def run_attack(name: str, data_dir: str, work: Path, seed: int, fast: bool, log: Path) -> float | None:
    attack, params, _, _ = ATTACKS[name]
    out = work / name
    cmd = [sys.executable, "-m", "backdoor_eraser.cli", "attack", "--dataset", "cifar10", "--data-dir", data_dir,
           "--arch", "wrn-16-1", "--attack", attack, *params, *RECIPE, *(FAST if fast else []),
           *([] if "--seed" in params else ["--seed", str(seed)]), "--out", str(out), "--resume", "--no-epoch-eval"]
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"\n$ {shlex.join(cmd)}\n")
        fh.flush()
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc:
        print(f"{name} failed ({rc}); see {log}", flush=True)
        return None
    return time.perf_counter() - t0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def to_zoo(name: str, run: Path) -> Path:
    """Copy the run folder without its checkpoint. Trigger state is dropped where it is licensed material
    (Refool's reflection pool) or over the zoo's 1 MB per file (clean-label's PGD images, input-aware's
    generator and mask networks)."""
    dest = ZOO / name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    attack = json.loads((run / "meta.json").read_text())["attack"]["name"]
    keep_trigger = attack not in ("refool", "clean-label", "input-aware")
    for f in ("model.safetensors", "meta.json", "metrics.json", "history.csv") + (("trigger.safetensors",) if keep_trigger else ()):
        if (run / f).exists():
            shutil.copy2(run / f, dest / f)
    meta = json.loads((dest / "meta.json").read_text())
    # Paths of the machine that trained it mean nothing elsewhere; evaluate takes --data-dir.
    meta["dataset"]["data_dir"] = None
    params = meta.get("attack", {}).get("config", {})
    for key in ("surrogate", "model", "reflection_dir"):
        if isinstance(params.get(key), str) and "/" in params[key]:
            params[key] = Path(params[key]).name
    source = meta.get("attack", {}).get("reflection_source")
    if isinstance(source, dict) and source.get("folder"):
        source["folder"] = Path(source["folder"]).name
    if not keep_trigger:
        meta["zoo_note"] = "trigger.safetensors left out: " + {
            "refool": "the reflection pool is the licensed BackdoorBench set; pass --reflection-dir to rebuild it",
            "clean-label": "it holds the 4,000 PGD-perturbed training images (12 MB); the test-time trigger is the "
                           "corner grid and needs no state",
            "input-aware": "it holds the generator and mask networks (5.8 MB; the zoo keeps files under 1 MB), "
                           "without which this model's ASR cannot be measured; benchmarks/attacks_cifar10.py "
                           "--only input-aware retrains them with the model"}[attack]
    (dest / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return dest


def trigger_grid(name: str, run: Path, splits) -> Path:
    from backdoor_eraser.workflows import run_show_trigger

    target = json.loads((run / "meta.json").read_text())["attack"]["config"]["target"]
    return run_show_trigger(run=run, splits=splits, out=RESULTS / "triggers" / f"{name}.png", seed=0,
                            title=f"{name} on CIFAR-10 (target {target})")


def extra_asr(m: dict) -> str:
    """Per-trigger ASRs (multi-trigger) and a class-specific trigger's spill-over, for the note column."""
    parts = [f"{k[4:]} {100 * v:.2f}" for k, v in m.items() if k.startswith("asr_") and k != "asr_spillover"]
    text = f" — ASR per trigger: {', '.join(parts)}" if parts else ""
    if "asr_spillover" in m:
        text += f" — spill-over (other classes triggered → target): {100 * m['asr_spillover']:.2f}"
    return text


def report(names: list[str], work: Path, data_dir: str, wall: dict):
    sys.path.insert(0, str(ROOT / "src"))
    from backdoor_eraser.workflows import load_data

    splits = load_data("cifar10", data_dir)
    rows, manifest = {}, []
    for name in names:
        run = work / name
        if not (run / "metrics.json").exists():
            continue
        metrics = json.loads((run / "metrics.json").read_text())
        meta = json.loads((run / "meta.json").read_text())
        train = meta["train"]
        precision = ("bf16 autocast" if train.get("amp") == "bf16" else "fp32") + (", channels-last" if train.get("channels_last") else "")
        rows[name] = {"attack": meta["attack"], "kind": ATTACKS[name][2], "note": ATTACKS[name][3],
                      "metrics": metrics, "precision": precision, "epochs": train["epochs"],
                      "poisoned": len(meta.get("poison_indices", []))}
        if name in NOT_IN_ZOO:
            continue
        trigger_grid(name, run, splits)
        dest = to_zoo(name, run)
        size = (dest / "model.safetensors").stat().st_size
        manifest.append((name, json.loads((dest / "meta.json").read_text()), metrics,
                         sha256(dest / "model.safetensors"), size))
    clean_acc = rows["clean"]["metrics"]["acc"] if "clean" in rows else None

    def verdict(name, r):
        m = r["metrics"]
        if r["kind"] == "none":
            return "reference"
        goal = 0.9 if r["kind"] == "poisoned-label" else 0.7
        ok_asr = m["asr"] >= goal
        ok_acc = clean_acc is None or m["acc"] >= clean_acc - 0.02
        if ok_asr and ok_acc:
            return "meets target"
        why = []
        if not ok_asr:
            why.append(f"ASR < {goal:.0%}")
        if not ok_acc:
            why.append("ACC > 2 pts below clean")
        return "misses: " + ", ".join(why)

    lines = ["| run | attack | kind | poisoned train images | ACC | ASR | RA | ACC − clean | target | precision | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        m = r["metrics"]
        gap = f"{100 * (m['acc'] - clean_acc):+.2f}" if clean_acc is not None else "n/a"
        poisoned = "on the fly" if r["poisoned"] == 0 and r["kind"] != "none" else f"{r['poisoned']:,}"
        lines.append(f"| {name} | {r['attack']['name']} | {r['kind']} | {poisoned} | {100 * m['acc']:.2f} | "
                     f"{100 * m['asr']:.2f} | {100 * m['ra']:.2f} | {gap} | {verdict(name, r)} | {r['precision']} | "
                     f"{r['note']}{extra_asr(m)} |")
    record = {"recipe": RECIPE, "fast": FAST, "rows": rows, "wall_seconds": wall}
    old = RESULTS / "attacks_cifar10.json"
    if old.exists():
        record["wall_seconds"] = {**json.loads(old.read_text()).get("wall_seconds", {}), **wall}
    old.write_text(json.dumps(record, indent=2) + "\n")
    train_s = {n: r["metrics"].get("train_seconds") for n, r in rows.items()}
    text = [
        "# Attacks benchmark: CIFAR-10, WRN-16-1, every attack with the Core recipe",
        "",
        "CIFAR-10 from the `../shared/data` JPEG copy. Each model: 20 epochs, SGD lr 0.1 cosine, momentum 0.9, "
        "Nesterov, wd 5e-4, batch 128, crop + flip, seed 0, attack defaults of the spec (§4) unless the note says "
        "otherwise; target class 0 (airplane). Metrics in % on the test split: ACC on all 10,000 clean images, "
        "ASR and RA on the triggered non-target images. Targets from the issue: poisoned-label ASR ≥ 90 %, "
        "clean-label ASR ≥ 70 %, ACC no more than 2 points below the clean model.",
        "",
        *lines,
        "",
        "Training seconds (sum over epochs, 2 CPU threads): " +
        ", ".join(f"{n} {s:.0f}" for n, s in train_s.items() if s) + ".",
        "",
        "Trigger grids (row 1 clean, row 2 triggered, row 3 |difference| × 5): " +
        ", ".join(f"[{n}](triggers/{n}.png)" for n in rows if n not in NOT_IN_ZOO) + ".",
        "",
        "Run folders are copied to `zoo/` (see `zoo/MANIFEST.md`).",
        "",
        FINDINGS,
    ]
    (RESULTS / "attacks_cifar10.md").write_text("\n".join(text) + "\n")
    man = ["# Model zoo: backdoored CIFAR-10 WRN-16-1 run folders",
           "",
           "Made by `benchmarks/attacks_cifar10.py` (results in `benchmarks/results/attacks_cifar10.md`). Each folder "
           "is a run folder (`model.safetensors`, `meta.json`, `metrics.json`, `history.csv`, and "
           "`trigger.safetensors` where the trigger has state). Evaluate or purify one with, e.g.:",
           "",
           "```bash",
           "backdoor-eraser evaluate --model zoo/badnets --data-dir PATH/TO/cifar10",
           "backdoor-eraser purify --model zoo/badnets --method nad --clean-fraction 0.05 --data-dir PATH/TO/cifar10 --out runs/nad",
           "```",
           "",
           "| folder | attack | parameters | seed | ACC | ASR | model sha256 | size |",
           "|---|---|---|---|---|---|---|---|"]
    for name, meta, m, digest, size in manifest:
        params = meta["attack"].get("config", {})
        ptxt = ", ".join(f"{k}={v}" for k, v in params.items())
        man.append(f"| {name} | {meta['attack']['name']} | {ptxt} | {meta['seed']} | {100 * m['acc']:.2f} | "
                   f"{100 * m['asr']:.2f} | `{digest}` | {size / 1024:.0f} KiB |")
    (ZOO / "MANIFEST.md").write_text("\n".join(man) + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--work", default=str(WORK / "attacks"))
    ap.add_argument("--only", default=",".join(ATTACKS), help="comma-separated run names")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp32", action="store_true", help="train new runs in fp32 without channels-last")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    names = [n for n in a.only.split(",") if n]
    unknown = set(names) - set(ATTACKS)
    if unknown:
        sys.exit(f"unknown run names {sorted(unknown)}; known: {', '.join(ATTACKS)}")
    wall = {}
    if not a.report_only:
        for name in names:
            if (work / name / "metrics.json").exists():
                print(f"{name}: done already", flush=True)
                continue
            took = run_attack(name, a.data_dir, work, a.seed, not a.fp32, work / "log.txt")
            if took is not None:
                wall[name] = took
    report(list(ATTACKS), work, a.data_dir, wall)


if __name__ == "__main__":
    main()
