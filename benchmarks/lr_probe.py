"""One-epoch lr probe on the clean subset (benchmarks/results/zoo-v2-findings.md, section 2).

    python benchmarks/lr_probe.py THREADS CIFAR10_DIR RUN_FOLDER [...]
"""
import sys, time, torch
from backdoor_eraser import workflows, defenses
from backdoor_eraser.data.subset import clean_subset
from backdoor_eraser.metrics import accuracy
from backdoor_eraser.runs import load_model
from backdoor_eraser.training import Trainer
torch.set_num_threads(int(sys.argv[1]))
splits = workflows.load_data("cifar10", sys.argv[2], {})
for run in sys.argv[3:]:
    model, _ = load_model(run)
    for seed in (0, 1):
        clean = clean_subset(splits.train, fraction=0.05, seed=seed)
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(clean), generator=g)
        fit, val = clean.subset(perm[:2000]), clean.subset(perm[2000:])
        base = accuracy(model, val.images, val.labels)
        row = [f"{run.split('/')[-2]}/{run.split('/')[-1]} s{seed} base {base:.3f}"]
        t0 = time.time()
        for lr in (0.1, 0.05, 0.03, 0.01):
            cfg = defenses.create("finetune", lr=lr, schedule="constant", epochs=1, amp="none", seed=seed).config.train_config()
            m = model.copy()
            Trainer(cfg, quiet=True).fit(m, fit)
            row.append(f"lr{lr}: {accuracy(m, val.images, val.labels):.3f}")
        print(" | ".join(row), f"({time.time() - t0:.0f} s)", flush=True)
