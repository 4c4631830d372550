"""Run folders, safe model loading and refusal of unsafe pickles."""
import json
import os
import pickle

import pytest
import torch

from backdoor_eraser.classifier import Normalization
from backdoor_eraser.errors import UserError
from backdoor_eraser.runs import load_model, new_model, read_state_dict, save_run

CLASSES = [str(i) for i in range(10)]


def make():
    return new_model("wrn-16-1", CLASSES, (3, 32, 32), Normalization.parse("cifar10"), seed=1)


def test_run_folder_round_trip(tmp_path):
    m = make()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    save_run(tmp_path / "run", m, {"kind": "attack", "seed": 1}, metrics={"acc": 0.5},
             history=[{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.0, "acc": 0.3}])
    names = sorted(os.listdir(tmp_path / "run"))
    assert names == ["history.csv", "meta.json", "metrics.json", "model.safetensors"]
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["arch"] == "wrn-16-1" and meta["seed"] == 1 and meta["normalization"]["mean"][0] == 0.4914
    assert (tmp_path / "run" / "history.csv").read_text().splitlines() == ["epoch,loss,acc", "1,2.0,", "2,1.0,0.3"]
    loaded, meta2 = load_model(tmp_path / "run")
    assert loaded.normalization == m.normalization and loaded.sites == ["block1", "block2", "block3"]
    m.net.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {"x": torch.zeros(1)}, "payload": Boom()}, fh, protocol=2)
    with pytest.raises(UserError, match="--unsafe-load"):
        read_state_dict(path)
    with pytest.raises(UserError, match="--unsafe-load"):
        load_model(path, arch="wrn-16-1")


def test_bare_checkpoint_forms_load(tmp_path):
    m = make()
    sd = m.net.state_dict()
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "a.pth")
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "b.pt")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    m.net.eval()
    for name in ("a.pth", "b.pt"):
        clf, meta = load_model(tmp_path / name, arch="wrn-16-1", normalization="cifar10")
        assert meta == {} and clf.num_classes == 10
        with torch.no_grad():
            assert torch.equal(clf(x), m(x))
    with pytest.raises(UserError, match="--arch"):
        load_model(tmp_path / "a.pth")


def test_state_dict_that_does_not_fit_lists_keys(tmp_path):
    sd = make().net.state_dict()
    sd.pop("fc.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(UserError) as err:
        load_model(tmp_path / "bad.pt", arch="wrn-16-1")
    msg = str(err.value)
    assert "missing keys: fc.bias" in msg and "unexpected keys: extra.weight" in msg
    with pytest.raises(UserError, match=r"shape mismatches: block1.layer.0.conv1.weight \(16, 16, 3, 3\)≠\(32, 16, 3, 3\)"):
        load_model(tmp_path / "bad.pt", arch="wrn-16-2")


def test_unknown_arch_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nothing.pt", arch="wrn-16-1")
    torch.save(make().net.state_dict(), tmp_path / "m.pt")
    with pytest.raises(UserError, match="known: .*wrn-16-1"):
        load_model(tmp_path / "m.pt", arch="resnet-999")


def test_normalization_parsing():
    assert Normalization.parse("none").mean is None
    n = Normalization.parse("0.5,0.5,0.5:0.25,0.25,0.25")
    assert n.mean == (0.5, 0.5, 0.5) and n.std == (0.25, 0.25, 0.25)
    with pytest.raises(UserError):
        Normalization.parse("bogus")
    clf = new_model("wrn-16-1", CLASSES, (3, 32, 32), n)
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(clf.prepare(x), torch.full((1, 3, 2, 2), 2.0))


def test_bare_safetensors_of_the_toolkits_own_weights_load_whatever_the_key_order(tmp_path):
    from safetensors.torch import save_file

    from backdoor_eraser.models import create_model
    from backdoor_eraser.runs import load_model

    for channels, classes in ((3, 10), (1, 7)):
        net = create_model("wrn-16-1", num_classes=classes, in_channels=channels)
        path = tmp_path / f"m{channels}.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))  # keys stored sorted
        model, meta = load_model(path, arch="wrn-16-1")
        assert meta == {} and model.input_shape[0] == channels and model.num_classes == classes
        for k, v in net.state_dict().items():
            assert torch.equal(model.net.state_dict()[k], v)


def test_metrics_files_are_strict_json_without_nan_tokens(tmp_path):
    from backdoor_eraser.runs import write_json

    write_json(tmp_path / "m.json", {"acc": float("nan"), "asr": torch.tensor(float("inf")), "ra": [0.5, float("-inf")]})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict token {c}")) == \
        {"acc": None, "asr": None, "ra": [0.5, None]}


def test_batched_inference_matches_the_plain_forward_and_keeps_the_train_mode():
    m = make()
    x = torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8)
    m.net.eval()
    with torch.no_grad():
        plain = m.net(m.prepare(x))
    m.net.train()
    parts = list(m.batched_logits(x, batch_size=32))
    assert [len(p) for p in parts] == [32, 32, 6]
    assert m.net.training  # restored
    assert not any(p.requires_grad for p in parts)
    torch.testing.assert_close(torch.cat(parts), plain, atol=1e-4, rtol=1e-4)
    assert torch.equal(m.predict(x, batch_size=32), plain.argmax(1))
    assert m.predict(x[:0]).shape == (0,)
