"""Grid specs: axes (datasets, architectures, attacks, defenses, seeds, clean fractions) and shared
settings, read from YAML, checked before anything runs, and expanded into cells.

A spec file looks like::

    name: my-grid
    datasets: [cifar10]
    archs: [wrn-16-1]
    attacks:
      - badnets                                  # the attack's paper defaults
      - {name: blend, params: {alpha: 0.2}}
      - {name: clean-label, label: clean-label-4c, params: {corners: four-corners}}
      - {name: badnets, label: badnets-zoo, model: zoo/badnets}   # an existing run folder, not trained
    defenses: [finetune, nad, {name: nad, label: nad-lr0.03, params: {lr: 0.03}},
               {name: nad, label: nad-release, preset: release}]   # a named recipe; params override it
    seeds: [0, 1, 2]                # clean-subset (and defense-training) seeds
    clean_fractions: [0.05]
    attack_train: {epochs: 60, schedule: multistep, milestones: [40]}   # over training.ATTACK_TRAINING
    settings: {epoch_eval: false, reference: nad}

An attack entry may name ``zoo: NAME``: with ``bench --zoo DIR`` the run folder ``DIR/NAME`` is used
when it exists, and the attack model is trained as a cell otherwise, so one spec serves both.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from .. import attacks, defenses
from ..data import DATASETS
from ..errors import UserError
from ..models import MODELS, create_model
from ..registry import build_config, config_to_dict, drop_idle, identity_dict
from ..training import ATTACK_TRAINING, TrainConfig

SPEC_KEYS = ("name", "description", "datasets", "archs", "attacks", "defenses", "detectors", "seeds",
             "clean_fractions", "attack_train", "settings")
AXES = ("dataset", "arch", "attack", "defense", "seed", "clean_fraction")
ATTACK_KEYS = ("name", "label", "params", "model", "zoo", "seed", "train")
DATASET_KEYS = ("name", "label", "options")
DEFENSE_KEYS = ("name", "label", "params", "preset", "epochs_budget")
DETECTOR_KEYS = ("name", "label", "params")


@dataclass(frozen=True)
class Settings:
    """Shared settings of every cell. ``epoch_eval`` records test metrics after each epoch (per-epoch
    curves in the report; costs a test-set pass per epoch); ``reference``: the defense that paired
    differences are taken against; ``normalization``: input normalisation of trained attack models."""

    epoch_eval: bool = False
    reference: str = "nad"
    normalization: str = "none"
    figures: bool = True


@dataclass(frozen=True)
class DatasetEntry:
    label: str
    name: str
    options: dict = field(default_factory=dict)   # loader options, e.g. synthetic's n_train


@dataclass(frozen=True)
class AttackEntry:
    label: str
    name: str
    params: dict = field(default_factory=dict)
    model: str | None = None       # an existing run folder to purify instead of training
    zoo: str | None = None         # looked up in ``bench --zoo DIR``
    seed: int = 0
    train: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DefenseEntry:
    label: str
    name: str
    params: dict = field(default_factory=dict)
    epochs_budget: int | None = None
    preset: str | None = None


@dataclass
class GridSpec:
    name: str
    datasets: list[DatasetEntry]
    archs: list[str]
    attacks: list[AttackEntry]
    defenses: list[DefenseEntry]
    seeds: list[int]
    clean_fractions: list[float]
    attack_train: dict = field(default_factory=dict)
    detectors: list[DefenseEntry] = field(default_factory=list)
    settings: Settings = field(default_factory=Settings)
    description: str = ""
    source: str = "<spec>"
    text: str = ""

    def filtered(self, only: dict[str, list[str]]) -> "GridSpec":
        """The spec restricted to the given axis values (``{"attack": ["badnets"], "seed": ["0"]}``)."""
        spec = dataclasses.replace(self)
        for axis, values in only.items():
            if axis not in AXES:
                raise UserError(f"--only: unknown axis {axis!r}; axes: {', '.join(AXES)}")
            known = [str(v) for v in self._axis_values(axis)]
            unknown = [v for v in values if v not in known]
            if unknown:
                raise UserError(f"--only {axis}: {', '.join(unknown)} not in the spec; its values: {', '.join(known)}")
            keep = set(values)
            if axis == "attack":
                spec.attacks = [a for a in spec.attacks if a.label in keep]
            elif axis == "defense":
                spec.defenses = [d for d in spec.defenses if d.label in keep]
                spec.detectors = [d for d in spec.detectors if d.label in keep]
            elif axis == "dataset":
                spec.datasets = [d for d in spec.datasets if d.label in keep]
            elif axis == "arch":
                spec.archs = [a for a in spec.archs if a in keep]
            elif axis == "seed":
                spec.seeds = [s for s in spec.seeds if str(s) in keep]
            else:
                spec.clean_fractions = [f for f in spec.clean_fractions if str(f) in keep]
        return spec

    def _axis_values(self, axis: str) -> list:
        return {"dataset": [d.label for d in self.datasets], "arch": self.archs, "attack": [a.label for a in self.attacks],
                "defense": [d.label for d in self.defenses + self.detectors], "seed": self.seeds,
                "clean_fraction": self.clean_fractions}[axis]


class SpecError(UserError):
    pass


def _fail(source: str, msg: str):
    raise SpecError(f"{source}: {msg}")


def parse_only(tokens: list[str] | None) -> dict[str, list[str]]:
    """``["attack=badnets,blend", "defense=nad"]`` → ``{"attack": ["badnets", "blend"], "defense": ["nad"]}``."""
    out: dict[str, list[str]] = {}
    for tok in tokens or []:
        key, eq, vals = tok.partition("=")
        key = key.strip().replace("-", "_")
        values = [v.strip() for v in vals.split(",") if v.strip()]
        if not eq or not values:
            raise UserError(f"--only takes AXIS=V1,V2 (axes: {', '.join(AXES)}), got {tok!r}")
        out.setdefault(key, []).extend(values)
    return out


# ---- reading ---------------------------------------------------------------------------------------

def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__package__).joinpath("specs").iterdir()
                  if p.name.endswith(".yaml"))


def builtin_text(name: str) -> str:
    return resources.files(__package__).joinpath("specs", f"{name}.yaml").read_text()


def load_spec(name_or_path: str) -> GridSpec:
    """A built-in spec by name (``backdoor-eraser bench --list``) or a YAML file."""
    path = Path(name_or_path)
    if name_or_path in builtin_names():
        return parse_spec(builtin_text(name_or_path), source=f"built-in spec {name_or_path!r}",
                          base=Path.cwd())
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"spec file {str(path)!r} does not exist")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read spec file {path}: {exc}") from None
        return parse_spec(text, source=str(path), base=path.resolve().parent)
    raise UserError(f"no built-in spec or file {name_or_path!r}; built-in specs: {', '.join(builtin_names())}")


def parse_spec(text: str, *, source: str = "<spec>", base: Path | None = None) -> GridSpec:
    """Parse and check a spec; every error is one line naming the key and the file."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        _fail(source, "a spec must be a mapping of keys (name, datasets, archs, attacks, defenses, seeds, ...)")
    unknown = [k for k in data if k not in SPEC_KEYS]
    if unknown:
        _fail(source, f"unknown key {unknown[0]!r}; keys: {', '.join(SPEC_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        _fail(source, "key 'name' must be a non-empty string")
    base = base or Path.cwd()

    datasets = [_dataset_entry(e, i, source) for i, e in enumerate(_list(data, "datasets", source,
                                                                        default=["cifar10"]))]
    archs = _str_list(data, "archs", source, default=["wrn-16-1"])
    for a in archs:
        _check_arch(a, source)
    seeds = _list(data, "seeds", source, default=[0])
    for s in seeds:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            _fail(source, f"seeds: {s!r} is not a non-negative integer")
    fractions = _list(data, "clean_fractions", source, default=[0.05])
    for f in fractions:
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 < f <= 1:
            _fail(source, f"clean_fractions: {f!r} is not a number in (0, 1]")
    fractions = [float(f) for f in fractions]

    attack_train = data.get("attack_train") or {}
    if not isinstance(attack_train, dict):
        _fail(source, "attack_train must be a mapping of training settings (epochs, lr, ...)")
    _check_train(attack_train, source, "attack_train")

    settings_raw = data.get("settings") or {}
    if not isinstance(settings_raw, dict):
        _fail(source, "settings must be a mapping")
    settings = _build(Settings, settings_raw, source, "settings")

    atk_entries = [_attack_entry(e, i, source, base) for i, e in enumerate(_list(data, "attacks", source))]
    def_entries = [_defense_entry(e, i, source) for i, e in enumerate(_list(data, "defenses", source, default=[]))]
    det_entries = [_detector_entry(e, i, source) for i, e in enumerate(_list(data, "detectors", source, default=[]))]
    for kind, entries in (("attacks", atk_entries), ("defenses and detectors", def_entries + det_entries)):
        labels = [e.label for e in entries]
        dup = next((lab for lab in labels if labels.count(lab) > 1), None)
        if dup:
            _fail(source, f"{kind}: label {dup!r} is used twice; give the entries distinct 'label's")
    return GridSpec(name=name.strip(), datasets=datasets, archs=archs, attacks=atk_entries, defenses=def_entries, detectors=det_entries,
                    seeds=list(seeds), clean_fractions=fractions, attack_train=dict(attack_train),
                    settings=settings, description=str(data.get("description") or ""), source=source, text=text)


def _list(data: dict, key: str, source: str, default=None) -> list:
    if key not in data:
        if default is None:
            _fail(source, f"key {key!r} is missing")
        return list(default)
    value = data[key]
    if not isinstance(value, list):
        _fail(source, f"key {key!r} must be a list, got {type(value).__name__}")
    if not value:
        _fail(source, f"key {key!r} is an empty list: a grid axis needs at least one value")
    return value


def _str_list(data, key, source, default):
    values = _list(data, key, source, default)
    for v in values:
        if not isinstance(v, str):
            _fail(source, f"{key}: {v!r} is not a name")
    return values


def _check_arch(arch: str, source: str):
    if arch in MODELS:
        return
    try:
        create_model(arch, 10)
    except UserError:
        _fail(source, f"archs: unknown architecture {arch!r}; known: {', '.join(MODELS.names())}, wrn-D-K")


def _build(cls, values: dict, source: str, what: str):
    try:
        return build_config(cls, values, what=what)
    except UserError as exc:
        raise SpecError(f"{source}: {exc}") from None


def _check_train(values: dict, source: str, what: str) -> TrainConfig:
    cfg = _build(TrainConfig, values, source, what)
    try:
        cfg.check()
    except UserError as exc:
        raise SpecError(f"{source}: {what}: {exc}") from None
    return cfg


def _entry_dict(entry, keys, source, where, params_key: str = "params") -> dict:
    if isinstance(entry, str):
        return {"name": entry}
    if not isinstance(entry, dict):
        _fail(source, f"{where}: an entry is a name or a mapping with keys {', '.join(keys)}")
    unknown = [k for k in entry if k not in keys]
    if unknown:
        _fail(source, f"{where}: unknown key {unknown[0]!r}; keys: {', '.join(keys)}")
    if not isinstance(entry.get("name"), str):
        _fail(source, f"{where}: 'name' (a string) is required")
    params = entry.get(params_key) or {}
    if not isinstance(params, dict):
        _fail(source, f"{where}: {params_key!r} must be a mapping")
    if "label" in entry and not (isinstance(entry["label"], str) and entry["label"].strip()):
        _fail(source, f"{where}: 'label' must be a non-empty string")
    return entry


def _dataset_entry(entry, i: int, source: str) -> DatasetEntry:
    e = _entry_dict(entry, DATASET_KEYS, source, f"datasets[{i}]", params_key="options")
    if e["name"] not in DATASETS:
        _fail(source, f"datasets[{i}]: unknown dataset {e['name']!r}; known: {', '.join(DATASETS.names())}")
    return DatasetEntry(label=e.get("label", e["name"]).strip(), name=e["name"], options=dict(e.get("options") or {}))


def _named_entry(entry, keys, registry, where: str, source: str) -> tuple[dict, str, dict]:
    """A spec entry of a registry (attack, defense, detector): its mapping, name and checked params."""
    e = _entry_dict(entry, keys, source, where)
    name = e["name"]
    if name not in registry:
        _fail(source, f"{where}: unknown {registry.kind} {name!r}; known: {', '.join(registry.names())}")
    params = dict(e.get("params") or {})
    _build(registry.config_class(name), params, source, f"{where} ({name}) params")
    return e, name, params


def _attack_entry(entry, i: int, source: str, base: Path) -> AttackEntry:
    e, name, params = _named_entry(entry, ATTACK_KEYS, attacks.ATTACKS, f"attacks[{i}]", source)
    seed = e.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        _fail(source, f"attacks[{i}]: seed {seed!r} is not a non-negative integer")
    train = e.get("train") or {}
    if not isinstance(train, dict):
        _fail(source, f"attacks[{i}]: 'train' must be a mapping of training settings")
    model = e.get("model")
    if model is not None:
        if not isinstance(model, str):
            _fail(source, f"attacks[{i}]: 'model' must be a path to a run folder")
        path = Path(model) if Path(model).is_absolute() else base / model
        model = str(path)
    zoo = e.get("zoo")
    if zoo is not None and not isinstance(zoo, str):
        _fail(source, f"attacks[{i}]: 'zoo' must be a folder name")
    return AttackEntry(label=e.get("label", name).strip(), name=name, params=params, model=model, zoo=zoo,
                       seed=seed, train=dict(train))


def _detector_entry(entry, i: int, source: str) -> DefenseEntry:
    from ..defenses import DETECTORS

    e, name, params = _named_entry(entry, DETECTOR_KEYS, DETECTORS, f"detectors[{i}]", source)
    return DefenseEntry(label=e.get("label", name).strip(), name=name, params=params)


def _defense_entry(entry, i: int, source: str) -> DefenseEntry:
    e, name, params = _named_entry(entry, DEFENSE_KEYS, defenses.DEFENSES, f"defenses[{i}]", source)
    budget = e.get("epochs_budget")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        _fail(source, f"defenses[{i}]: epochs_budget {budget!r} is not a positive integer")
    preset = e.get("preset")
    if preset is not None:
        if not isinstance(preset, str):
            _fail(source, f"defenses[{i}]: preset must be a name, got {preset!r}")
        try:
            defenses.resolve_params(name, preset)
        except UserError as exc:
            _fail(source, f"defenses[{i}]: {exc}")
    return DefenseEntry(label=e.get("label", name).strip(), name=name, params=params, epochs_budget=budget,
                        preset=preset)


# ---- expansion into cells -----------------------------------------------------------------------------

@dataclass
class Cell:
    """One job. ``config`` is everything that determines its result; ``hash`` identifies it."""

    kind: str                    # "attack" or "defense"
    config: dict
    axes: dict
    deps: list[str] = field(default_factory=list)
    runtime: dict = field(default_factory=dict)   # where data lives etc.: not part of the identity

    @property
    def hash(self) -> str:
        return cell_hash(self.config)


def config_hash(config: dict) -> str:
    """Stable across runs and dict key order."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cell_hash(config: dict) -> str:
    """A cell's identity: its config, with an existing model known by its weights' sha256 alone, so the
    same model gives the same cells wherever its folder lies (another checkout, a renamed zoo).
    Stores made while the folder's path was hashed too are adopted by ``Store.add``."""
    model = config.get("model")
    if isinstance(model, dict) and "sha256" in model:
        config = {**config, "model": {"sha256": model["sha256"]}}
    d = config.get("defense")
    if config.get("kind") == "defense" and isinstance(d, dict) and d.get("name") in defenses.DEFENSES:
        # The resolved config is the identity: the spec's params and preset are how it was written (a
        # default spelt out, left implicit or named by a preset is the same cell, so a recipe keeps its
        # cells when the defaults change and a preset pins it), and fields a defense gained later, sitting
        # at their neutral value, identify nothing (identity_dict), so a config stored before they existed
        # and one stored with them name the same cell.
        config = {**config, "defense": {"name": d["name"],
                                        "config": drop_idle(defenses.DEFENSES.config_class(d["name"]), d["config"])}}
    return config_hash(config)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def attack_train_config(spec: GridSpec, entry: AttackEntry) -> TrainConfig:
    values = {**ATTACK_TRAINING, **spec.attack_train, **entry.train, "seed": entry.seed}
    return _check_train(values, spec.source, f"attacks ({entry.label}) train")


def expand(spec: GridSpec, *, zoo: str | Path | None = None, say=None) -> list[Cell]:
    """The spec's cells in run order: each attack model first, then its defense cells."""
    from ..runs import MODEL_FILE, read_meta

    cells: list[Cell] = []
    for dataset in spec.datasets:
        data_rec = {"name": dataset.name, "options": dataset.options}
        for arch in spec.archs:
            for entry in spec.attacks:
                # Fields an attack gained later, at their neutral value, identify nothing (as for defenses).
                atk_cfg = identity_dict(attacks.ATTACKS.make_config(entry.name, **entry.params))
                attack_desc = {"name": entry.name, "config": atk_cfg}
                existing = _existing_model(entry, zoo)
                axes = {"dataset": dataset.label, "arch": arch, "attack": entry.label, "defense": None, "seed": None,
                        "clean_fraction": None}
                if existing is not None:
                    meta = read_meta(existing)
                    _check_existing(meta, existing, dataset, arch, entry, spec.source)
                    model_ref = {"run": str(existing), "sha256": file_sha256(existing / MODEL_FILE)}
                    # The model's own attack (its trigger state, e.g. a blend key, lives in its folder).
                    attack_desc = meta.get("attack") or attack_desc
                    # Its metrics come from an evaluation cell, so the store holds every model it reports.
                    cells.append(Cell("attack", {"kind": "evaluate", "dataset": data_rec, "arch": arch,
                                                 "model": model_ref}, axes))
                    deps: list[str] = []
                    if say:
                        say(f"attack {entry.label}: using the model in {existing}")
                else:
                    train = attack_train_config(spec, entry)
                    atk_cell = Cell("attack", {"kind": "attack", "dataset": data_rec, "arch": arch,
                                               "attack": attack_desc, "seed": entry.seed,
                                               "normalization": spec.settings.normalization,
                                               "train": config_to_dict(train)}, axes)
                    cells.append(atk_cell)
                    model_ref = {"cell": atk_cell.hash}
                    deps = [atk_cell.hash]
                for d in spec.defenses:
                    for frac in spec.clean_fractions:
                        for seed in spec.seeds:
                            params = dict(d.params)
                            if "seed" in {f.name for f in dataclasses.fields(defenses.DEFENSES.config_class(d.name))}:
                                params.setdefault("seed", seed)
                            resolved = identity_dict(defenses.DEFENSES.make_config(
                                d.name, **defenses.resolve_params(d.name, d.preset, params)))
                            cfg = {"kind": "defense", "dataset": data_rec, "arch": arch, "model": model_ref,
                                   "attack": attack_desc, "defense": {"name": d.name, "preset": d.preset,
                                                                      "params": params, "config": resolved},
                                   "epochs_budget": d.epochs_budget, "seed": seed, "clean_fraction": frac}
                            cells.append(Cell("defense", cfg, {**axes, "defense": d.label, "seed": seed,
                                                               "clean_fraction": frac}, list(deps)))
                for d in spec.detectors:
                    for frac in spec.clean_fractions:
                        for seed in spec.seeds:
                            from ..defenses import DETECTORS
                            resolved = config_to_dict(DETECTORS.make_config(d.name, **d.params))
                            cfg = {"kind": "detect", "dataset": data_rec, "arch": arch, "model": model_ref,
                                   "attack": attack_desc, "detector": {"name": d.name, "config": resolved}, "seed": seed,
                                   "clean_fraction": frac}
                            cells.append(Cell("detect", cfg, {**axes, "defense": d.label, "seed": seed,
                                                              "clean_fraction": frac}, list(deps)))
    _refuse_twins(cells, spec.source)
    return cells


def _refuse_twins(cells: list[Cell], source: str):
    """Two defense rows that resolve to one recipe (e.g. the default and the preset that spells it out)
    would be one cell under two labels, and the store keeps one label per cell."""
    seen: dict[str, str] = {}
    for cell in cells:
        if cell.kind == "attack":
            continue
        label = cell.axes["defense"]
        other = seen.setdefault(cell.hash, label)
        if other != label:
            raise UserError(f"{source}: defenses {other!r} and {label!r} are the same recipe (their resolved "
                            "configs are equal); keep one of them")


def _existing_model(entry: AttackEntry, zoo) -> Path | None:
    if entry.model:
        path = Path(entry.model)
        if not path.is_dir():
            raise UserError(f"attack {entry.label}: model folder {entry.model} does not exist")
        return path.resolve()
    if entry.zoo and zoo:
        path = Path(zoo) / entry.zoo
        if path.is_dir():
            return path.resolve()
    return None


def _check_existing(meta: dict, path: Path, dataset: DatasetEntry, arch: str, entry: AttackEntry, source: str):
    rec = meta.get("dataset") or {}
    if rec.get("name") not in (None, dataset.name):
        raise UserError(f"{source}: attack {entry.label}: {path} holds a {rec.get('name')} model, not {dataset.name}")
    if meta.get("arch") not in (None, arch):
        raise UserError(f"{source}: attack {entry.label}: {path} holds a {meta.get('arch')} model, not {arch}")
    desc = meta.get("attack") or {}
    if desc.get("name") not in (None, entry.name):
        raise UserError(f"{source}: attack {entry.label}: {path} was made by attack {desc.get('name')!r}, "
                        f"not {entry.name!r}")


def describe_cells(cells: list[Cell]) -> str:
    n = {k: sum(c.kind == k for c in cells) for k in ("attack", "defense", "detect")}
    parts = [f"{n['attack']} attack models", f"{n['defense']} defense runs"] + (
        [f"{n['detect']} detector runs"] if n["detect"] else [])
    return f"{len(cells)} cells ({', '.join(parts)})"

