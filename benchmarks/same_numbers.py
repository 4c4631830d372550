"""Same seed, same numbers: digests of each defense on the demo model, to compare two code versions:
    PYTHONPATH=OLD/src python benchmarks/same_numbers.py  vs  BACKDOOR_ERASER_AUTO_FP32=1 PYTHONPATH=src python benchmarks/same_numbers.py
(the demo run folder: backdoor-eraser demo --out /tmp/keep/demo)."""
import hashlib, json, sys, torch
from backdoor_eraser import defenses, workflows
from backdoor_eraser.data.subset import clean_subset
from backdoor_eraser.runs import load_model
torch.set_num_threads(1)
model, _ = load_model("/tmp/keep/demo/backdoored")
splits = workflows.load_data("synthetic", None, {})
clean = clean_subset(splits.train, fraction=0.1, seed=0)
small = clean.subset(torch.arange(256))
def digest(m):
    h = hashlib.sha256()
    for k, v in sorted(m.net.state_dict().items()):
        h.update(v.detach().float().numpy().tobytes())
    return h.hexdigest()[:16]
new = "amp" in defenses.create("finetune").config.__dataclass_fields__
extra = {"augment": "crop-flip"} if new else {}
jobs = {
  "finetune": dict(epochs=2, **extra),
  "nad": dict(epochs=2, teacher_epochs=2, **extra),
  "argd": dict(epochs=2, teacher_epochs=1, **extra),
  "sage": dict(epochs=4, lr_interval=2, **extra),
  "mcr": dict(epochs=1, curve_epochs=2, **extra),
  "rnp": dict(unlearn_epochs=3, recover_epochs=2, batch_size=64),
  "fine-pruning": dict(epochs=1, **extra),
  "rnp-stop": dict(unlearn_epochs=10, recover_epochs=2, batch_size=32, unlearn_lr=0.05, unlearn_window=100),
  "rnp-stop-epoch": dict(unlearn_epochs=10, recover_epochs=1, batch_size=32, unlearn_lr=0.05, unlearn_window=0),
  "sage-lr": dict(epochs=6, lr_interval=1, **extra),
}
for name in sys.argv[1:] or jobs:
    d = defenses.create(name.split("-")[0] if name != "fine-pruning" else name, **jobs[name])
    res = d.purify(model, small, quiet=True)
    print(name, digest(res.model), json.dumps({k: v for k, v in res.info.items() if k in ("steps", "total_steps", "pruned", "unlearn_steps", "selected_epoch", "lr_reduced_after_epochs", "unlearn_acc", "unlearn_epochs")}), flush=True)
