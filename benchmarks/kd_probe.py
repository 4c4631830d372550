"""The exploration behind the recovery stage (kd_epochs): after FT/NAD at lr 0.1, which erase but cost
ACC on fragile models, distil the ORIGINAL model's predictions on the clean subset into the purified
model, with each recipe given as JSON. Judged on val (training images outside the clean subset and the
poisoned ones); test is printed for reference only. It runs the stage's own ``recover`` on a copy of the
purified model; the table in kd-recovery-findings.md §1 came from its first version (git fe742ec), which
wrote the same loss out inline (softmax target instead of log-softmax, numerically near, not bit-equal).
Usage: python benchmarks/kd_probe.py ZOO_MODEL DATA_DIR finetune|nad SEED '{"T": 4, "alpha": 0.9, "lr": 0.05,
"epochs": 20, "schedule": "cosine"}' ..."""
import dataclasses, sys, json, time, torch
from pathlib import Path
from backdoor_eraser import defenses, workflows
from backdoor_eraser.runs import load_model
from backdoor_eraser.data.subset import select_clean_subset
from backdoor_eraser.defenses.base import PurifyResult
from backdoor_eraser.defenses.recovery import recover
from backdoor_eraser.metrics import evaluate

torch.set_num_threads(2)
zoo, data_dir, method, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
kd_cfgs = [json.loads(a) for a in sys.argv[5:]]
src, meta = load_model(zoo)
splits, _ = workflows.data_for(meta, "cifar10", data_dir, None)
atk = workflows.attack_for(meta, Path(zoo), None, None)
idx = select_clean_subset(splits.train.labels, fraction=0.05, seed=seed, num_classes=10)
clean = splits.train.subset(idx)
val = workflows.validation_set(splits, idx, meta); vtr = atk.triggered_test_set(val)
ttr = atk.triggered_test_set(splits.test)
def report(tag, m, t0):
    v = workflows.validation_metrics(m, val, atk, vtr); t = evaluate(m, splits.test, atk, ttr)
    print(f"{tag}: val acc {v['acc']:.4f} asr {v['asr']:.4f} | test acc {t['acc']:.4f} asr {t['asr']:.4f} | {time.perf_counter()-t0:.0f}s", flush=True)
t0 = time.perf_counter(); report("before", src, t0)
d = defenses.create(method, seed=seed, amp="none")
res = d.purify(src, clean, quiet=True)
report(method, res.model, t0)
for kc in kd_cfgs:
    # the recovery stage itself, on a copy of the purified model; unnamed settings as in the exploration
    cfg = dataclasses.replace(d.config, kd_epochs=kc.get("epochs", 10), kd_lr=kc.get("lr", 0.01),
                              kd_schedule=kc.get("schedule", "constant"), kd_temperature=kc.get("T", 4.0),
                              kd_alpha=kc.get("alpha", 0.9), kd_augment=kc.get("augment", "crop+flip"),
                              kd_mixup=kc.get("mixup", False))
    recovered = recover(src, PurifyResult(res.model.copy()), clean, cfg, quiet=True)
    report(f"{method}+kd {kc}", recovered.model, t0)
