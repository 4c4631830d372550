"""The exploration behind the recovery stage (kd_epochs): after FT/NAD at lr 0.1, which erase but cost
ACC on fragile models, distil the ORIGINAL model's predictions on the clean subset into the purified
model, with each recipe given as JSON. Judged on val (training images outside the clean subset and the
poisoned ones); test is printed for reference only. It predates the stage (same loss, written out here).
Usage: python benchmarks/kd_probe.py ZOO_MODEL DATA_DIR finetune|nad SEED '{"T": 4, "alpha": 0.9, "lr": 0.05,
"epochs": 20, "schedule": "cosine"}' ..."""
import sys, json, time, torch, torch.nn.functional as F
from pathlib import Path
from backdoor_eraser import defenses, workflows
from backdoor_eraser.runs import load_model, read_meta
from backdoor_eraser.data.subset import select_clean_subset
from backdoor_eraser.metrics import evaluate
from backdoor_eraser.training import Trainer, TrainConfig, Task

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
teacher = src.copy(); teacher.net.eval(); teacher.net.requires_grad_(False)
for kc in kd_cfgs:
    T, alpha = kc.get("T", 4.0), kc.get("alpha", 0.9)
    def kd(logits, inputs, labels):
        with torch.no_grad():
            t = teacher.net(inputs)
        ce = F.cross_entropy(logits, labels)
        kl = F.kl_div(F.log_softmax(logits / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T * T
        return alpha * kl + (1 - alpha) * ce, {"ce": ce.detach(), "kl": kl.detach()}
    student = res.model.copy()
    tc = dict(epochs=10, lr=0.01, schedule="constant", augment="crop+flip+cutout", seed=seed, amp="none")
    tc.update({k: v for k, v in kc.items() if k not in ("T", "alpha")})
    Trainer(TrainConfig(**tc), quiet=True).fit(student, clean, task=Task(kd))
    report(f"{method}+kd {kc}", student, t0)
