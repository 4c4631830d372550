"""Defenses benchmark: every defense on one backdoored CIFAR-10 WRN-16-1 with the same seeded 5 % clean subset.

Runs the real CLI per defense (each step resumable; finished ones are skipped), then writes
benchmarks/results/defenses_cifar10_<attack>.{md,json} and an attention-map figure (rows: backdoored,
fine-tuned, NAD, ARGD, SAGE; columns: the three residual groups; one triggered test image).

    python benchmarks/defenses_cifar10.py --data-dir benchmarks/work/cifar10_jpeg \
        --attack-run benchmarks/work/core/badnets --name badnets
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Per-defense overrides of the paper defaults, only where a CPU budget forces them (stated in the results).
BUDGET_OVERRIDES = {
    "sage": ["--epochs", "20"],          # spec §5.6: 100 (or 50) epochs
    "mcr": ["--curve-epochs", "20"],     # spec §5.3: IBM's 100 curve epochs
    # spec §5.8: 60 retraining epochs (÷10 at 40), here 10 (÷10 at 8); bf16 autocast + channels-last for speed
    "abl": ["--finetune-epochs", "10", "--finetune-milestones", "8", "--amp", "bf16", "--channels-last", "true"],
}
ORDER = ["finetune", "finetune-lr0.03", "finetune-lr0.01", "nad", "nad-lr0.03", "argd", "sage", "sage-100", "fine-pruning", "mcr", "anp", "rnp",
         "rnp-epochcheck", "abl-lga", "abl-flooding"]
# Rows that run a registered defense with other parameters: row name -> (defense, parameters).
VARIANTS = {
    # where the 8–13-point ACC loss of every fine-tuning-based defense comes from: the lr 0.1 start
    "finetune-lr0.03": ("finetune", ["--lr", "0.03"]),
    "finetune-lr0.01": ("finetune", ["--lr", "0.01"]),
    # NAD with the gentler lr (teacher and student), where fine-tuning kept more ACC
    "nad-lr0.03": ("nad", ["--lr", "0.03"]),
    # SAGE with the spec's full 100 epochs: its lr-halving rule (interval 25 epochs) never fires in 20
    "sage-100": ("sage", ["--epochs", "100"]),
    # RNP's unlearning stop checked once per epoch (the release's literal check)
    "rnp-epochcheck": ("rnp", ["--unlearn-window", "0"]),
    # the paper's per-sample LGA (the default until session 3; it isolated no poisoned image here)
    "abl-lga": ("abl", ["--objective", "lga"] + BUDGET_OVERRIDES["abl"]),
    # the released code's isolation: batch-level flooding |L − γ| + γ for 10 epochs (spec §5.8 [C])
    "abl-flooding": ("abl", ["--objective", "flooding", "--isolation-epochs", "10"] + BUDGET_OVERRIDES["abl"]),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--attack-run", required=True)
    ap.add_argument("--name", required=True, help="label for the result files, e.g. badnets")
    ap.add_argument("--work", default=None, help="folder for the defense runs (default: next to the attack run)")
    ap.add_argument("--methods", default=",".join(ORDER))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-only", action="store_true", help="rewrite the results from finished runs")
    a = ap.parse_args()
    attack_run = Path(a.attack_run)
    work = Path(a.work) if a.work else attack_run.parent
    log = work / f"defenses-{a.name}.log"
    exe = [sys.executable, "-m", "backdoor_eraser.cli"]
    wall = {}
    for method in ([] if a.report_only else a.methods.split(",")):
        out = work / f"{attack_run.name}-{method}"
        if (out / "metrics.json").exists():
            print(f"{method}: done already ({out})", flush=True)
            continue
        defense, extra = VARIANTS.get(method, (method, BUDGET_OVERRIDES.get(method, [])))
        cmd = exe + ["purify", "--model", str(attack_run), "--method", defense, "--clean-fraction", "0.05",
                     "--seed", str(a.seed), "--data-dir", a.data_dir, "--out", str(out), "--resume",
                     "--no-epoch-eval"] + extra
        print("$", shlex.join(cmd), flush=True)
        t0 = time.perf_counter()
        with open(log, "a") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
        if rc:
            print(f"{method} failed ({rc}); see {log}", flush=True)
            continue
        wall[method] = time.perf_counter() - t0

    rows, info = {}, {}
    for method in ORDER:
        out = work / f"{attack_run.name}-{method}"
        if not (out / "metrics.json").exists():
            continue
        m = json.loads((out / "metrics.json").read_text())
        rows.setdefault("backdoored", m["before"])
        rows[method] = m
        meta = json.loads((out / "meta.json").read_text())
        info[method] = {"epochs": m.get("total_epochs", m.get("epochs")), "steps": m.get("total_steps", m.get("steps")),
                        "wall_seconds": m.get("wall_seconds"), "overrides": VARIANTS.get(method, (method, BUDGET_OVERRIDES.get(method, [])))[1],
                        "config": meta["defense"]["config"]}

    sys.path.insert(0, str(ROOT / "src"))
    from backdoor_eraser.runs import load_model, read_meta
    from backdoor_eraser.viz import attention_figure
    from backdoor_eraser.workflows import attack_for, load_data

    figure_rows = {"backdoored": attack_run}
    figure_rows.update({label: work / f"{attack_run.name}-{m}" for label, m in
                        (("fine-tuned", "finetune"), ("NAD", "nad"), ("ARGD", "argd"), ("SAGE", "sage"))})
    figure_rows = {k: v for k, v in figure_rows.items() if (v / "model.safetensors").exists()}
    splits = load_data("cifar10", a.data_dir)
    atk = attack_for(read_meta(attack_run), attack_run, None, None)
    trig = atk.triggered_test_set(splits.test)
    attention_figure({k: load_model(v)[0] for k, v in figure_rows.items()}, trig.images[0],
                     RESULTS / f"defenses_cifar10_{a.name}_attention.png",
                     title=f"CIFAR-10 {a.name}: attention of a triggered test image")

    record = {"attack_run": str(attack_run), "clean_fraction": 0.05, "seed": a.seed, "metrics": rows, "runs": info}
    (RESULTS / f"defenses_cifar10_{a.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| model | ACC (10k) | ACC (non-target) | ASR | RA | epochs | optimizer steps | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in rows.items():
        i = info.get(name, {})
        wt = i.get("wall_seconds")
        lines.append(f"| {name} | {100 * m['acc']:.2f} | {100 * m.get('acc_nontarget', float('nan')):.2f} | "
                     f"{100 * m['asr']:.2f} | {100 * m['ra']:.2f} | {i.get('epochs', '')} | {i.get('steps', '')} | "
                     f"{f'{wt:.0f} s' if wt else ''} |")
    abl_lines = []
    for name in ("abl-lga", "abl-flooding"):
        if name in info:
            d = json.loads((work / f"{attack_run.name}-{name}" / "meta.json").read_text())["defense_info"]
            abl_lines.append(f"{name}: {d['isolated_poisoned']} of the {d['isolated_count']} isolated training images "
                             f"are poisoned (isolation precision {d['isolation_precision']:.2f}; "
                             f"{d['poisoned_total']} poisoned in all).")
    text = [
        f"# Defenses benchmark: CIFAR-10, WRN-16-1, {a.name}",
        "",
        f"Backdoored model: `{attack_run}` (see core_cifar10.md for its training). Every defense gets the same "
        f"seeded stratified 5 % clean subset (2,500 training images, seed {a.seed}) and its paper defaults "
        "(spec §5), except these CPU-budget cuts: " +
        "; ".join(f"{k} {' '.join(v)}" for k, v in BUDGET_OVERRIDES.items()) +
        ". Metrics in %; ASR and RA on the 9,000 triggered non-target test images. `epochs` counts every "
        "training stage (teacher + student, endpoint + curve, unlearning + recovery); ANP counts mask "
        "iterations as steps. ABL is the exception to the clean subset: it is a training-time defense and "
        "trains a fresh model on the attack's poisoned training set (50,000 images), so its epochs are "
        "full-set epochs. RNP checks its unlearning stop after every step over the last 500 images "
        "(`unlearn_window`). Variant rows: " +
        "; ".join(f"{k} = {d} {' '.join(v)}" for k, (d, v) in VARIANTS.items()) + ".",
        "",
        *lines,
        "",
        *(["ABL isolation: " + " ".join(abl_lines) + " After the BadNets result, ABL's default objective became "
           "the release's flooding (`abl-lga` is the paper's per-sample LGA, the earlier default).", ""]
          if abl_lines else []),
        "About the ACC these defenses lose (8–13 points at the paper's lr 0.1, against 2–3 in the NAD and ARGD "
        "papers): the `finetune-lr*` and `nad-lr0.03` rows are a sensitivity study, not a tuned setting (they are "
        "read off the test split, so no default was changed from them). At lr 0.03 fine-tuning and NAD keep 6–8 "
        "more ACC points with ASR still below 5 %; at lr 0.01 fine-tuning keeps the backdoor. Our backdoored "
        "models were trained for 20 epochs only (the papers' for 100–200), which may make them less stable under "
        "a lr 0.1 restart; we have not tested that. `sage-100` runs SAGE for the spec's 100 epochs: its "
        "lr-halving rule (interval 25 epochs) never fires within the 20-epoch budget of the `sage` row.",
        "",
        "Wall times are not comparable across rows: runs made by this script skip per-epoch test evaluation "
        "and used 2 threads; for badnets, the finetune and nad rows come from the core benchmark, which ran with "
        "per-epoch evaluation, partly on 1 thread, while other jobs shared the CPU.",
        "",
        "Reproduce (resumable; needs the core benchmark's attack run):",
        "",
        "```bash",
        f"python benchmarks/defenses_cifar10.py --data-dir benchmarks/work/cifar10_jpeg --attack-run {attack_run} "
        f"--name {a.name}",
        "```",
        "",
        f"![attention maps](defenses_cifar10_{a.name}_attention.png)",
    ]
    (RESULTS / f"defenses_cifar10_{a.name}.md").write_text("\n".join(text) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
