"""Studies: the research note's tables as runnable specs (``experiments/*.yaml``, ``densitune run``).

A study spec names the networks it needs (``parts``: an in-distribution data set, backbones × D ×
loss, seeds and training settings), the search over them (the keys of ``densitune search --spec``),
how each method row of the note is selected from the search's trials (``methods``) and the note's
own figures (``tables``), so that the report can put ours, the note's and the difference side by
side. The study service (:func:`run_studies`, ``densitune run``) trains what is missing through the
train service (networks are identified by :attr:`TrainConfig.key`, a hash of the whole config, and
reused across specs in one run), searches each part through the search service with its spec and
exactly its networks (no spec file is read back, no folder of links is made: a study runs into a
bucket like any other run), records the spec each part ran and writes the report through the run
store (:func:`write_report`). :func:`plan_studies` estimates the GPU-hours and runs nothing, from the
training and scoring throughputs measured by ``bench/gpu_check.py`` (copied here: :data:`TRAIN`).

A spec file (bounded YAML, :mod:`densitune.search.safe_yaml`)::

    study: method-comparison
    title: Method comparison
    parts:
      - name: c10
        dataset: cifar10
        networks: [{backbone: resnet50, D: 2048, loss: ce}]
        seeds: [0, 1, 2, 3, 4]
        train: {epochs: 200, batch_size: 128}
        search: {test_ood: [svhn, lsun], scores: [msp, density], eps_grid: [0, 0.001]}
    methods:                    # label -> which trials: score, density, eps (0, ip = ε > 0, any)
      ddu: {score: density, density: gmm_sum, eps: 0}
      ddu+ip: {score: density, density: gmm_sum, eps: ip}
    tables:
      - id: "§1.3"
        part: c10
        network: {backbone: resnet50, D: 2048, loss: ce}
        accuracy: 0.954         # the note's ID accuracy
        columns: [auroc, auprc]
        rows: [[ddu, svhn, 0.948, 0.9613], [ddu+ip, svhn, 0.9735, 0.9769]]

OOD sets are named as in the note (:data:`NOTE_SETS` maps them to data sets under ``--data-root``).
``smoke`` scales a study to the embedded digits on CPU (:func:`smoke`): ``cnn`` backbones, D / 64,
two epochs, a two-point ε grid, the note's OOD sets mapped onto the digits' OOD sets.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from densitune.app.search import SearchOptions, search
from densitune.app.session import Outcome, RunOptions, run_store, say
from densitune.app.train import TrainOptions, train
from densitune.errors import ConfigError, DensituneError
from densitune.run.resource_flags import check_resource_flags
from densitune.run.runstore import RunStore, location, publish
from densitune.search.safe_yaml import echo, load_yaml
from densitune.search.spec_file import check_values

if TYPE_CHECKING:
    from densitune.run.runstore import RunPath

#: The training experiment every study trains into: one models folder, so identical configs are reused.
TRAIN_EXPERIMENT = "note"
#: Where a study's search specs, model views and reports go, under the run folder.
STUDIES_DIR = "studies"

#: The note's OOD set names -> (data set name, expected layout under --data-root).
NOTE_SETS: dict[str, tuple[str, str]] = {
    "cifar10": ("cifar10", "DATA_ROOT/cifar-10-batches-py/ (torchvision CIFAR10)"),
    "cifar100": ("cifar100", "DATA_ROOT/cifar-100-python/ (torchvision CIFAR100)"),
    "svhn": ("svhn", "DATA_ROOT/test_32x32.mat and train_32x32.mat (torchvision SVHN)"),
    "mnist": ("mnist", "DATA_ROOT/MNIST/raw/ (torchvision MNIST)"),
    "fashionmnist": ("fashionmnist", "DATA_ROOT/FashionMNIST/raw/ (torchvision FashionMNIST)"),
    "lsun": ("folder:LSUN_resize", "DATA_ROOT/LSUN_resize/ (ODIN's LSUN, resized to 32x32: an image folder)"),
    "tiny-imagenet": ("folder:Imagenet_resize",
                      "DATA_ROOT/Imagenet_resize/ (ODIN's Tiny-ImageNet, resized to 32x32: an image folder)"),
    "fer2013": ("folder:fer2013", "DATA_ROOT/fer2013/ (FER2013 test images: an image folder)"),
    "tiny-imagenet-val": ("folder:tiny-imagenet-val",
                          "DATA_ROOT/tiny-imagenet-val/ (Tiny-ImageNet validation images: an image folder)"),
    "ood-val": ("folder:ood-val", "DATA_ROOT/ood-val/ (an image folder of validation OOD images)"),
}
#: Adversarial rows of the note -> the search's OOD set names (``attacks``).
ATTACK_SETS = {"fgsm": "adv-fgsm", "bim": "adv-bim", "pgd": "adv-pgd"}
#: ``--smoke``: the note's OOD sets -> the embedded digits' OOD sets (validation: ``digits-blend``).
SMOKE_SETS = {"svhn": "photo-patches", "lsun": "photo-patches", "tiny-imagenet": "noise-uniform",
              "cifar100": "digits-rot90", "cifar10": "photo-patches", "mnist": "digits-hflip",
              "fashionmnist": "digits-rot90", "fer2013": "noise-uniform"}
SMOKE_EPOCHS = 2
SMOKE_EPS = 0.02  # the 8×8 digits need larger steps than CIFAR images
SMOKE_EVAL_LIMIT = 300

#: Training settings a part may set (the rest are TrainConfig's defaults).
TRAIN_KEYS = ("epochs", "lr", "batch_size", "lam", "weight_decay", "spectral", "sn_coeff", "train_limit", "amp")
EPS_FILTERS = (0, "ip", "any")
METRIC_COLUMNS = ("auroc", "auprc", "fpr95")
#: Images per epoch / per evaluation set, for the GPU-hour estimate only (train and test splits).
SET_SIZES = {"cifar10": (50000, 10000), "cifar100": (50000, 10000), "svhn": (73257, 26032),
             "mnist": (60000, 10000), "fashionmnist": (60000, 10000), "lsun": (0, 10000),
             "tiny-imagenet": (0, 10000), "fer2013": (0, 7178), "tiny-imagenet-val": (0, 10000),
             "ood-val": (0, 10000), "digits": (1078, 360)}


@dataclass(frozen=True)
class Network:
    """One trained configuration of a part (its seeds are the part's)."""

    backbone: str
    D: int
    loss: str


@dataclass(frozen=True)
class Part:
    """One in-distribution data set: the networks it trains and the one search over them."""

    name: str
    dataset: str
    networks: tuple[Network, ...]
    seeds: tuple[int, ...]
    train: dict[str, Any]
    search: dict[str, Any]  # search spec keys; OOD sets by the note's names


@dataclass(frozen=True)
class NoteTable:
    """One table of the note: its figures, and which of our trials each row is compared with."""

    id: str
    part: str
    network: Network
    columns: tuple[str, ...]
    rows: tuple[tuple[str, str, tuple[float, ...]], ...]  # (method, OOD set, figures in ``columns`` order)
    source: str = ""
    accuracy: float | None = None
    remark: str = ""


@dataclass(frozen=True)
class Study:
    """A checked study spec: its parts (training + search), how each note row is selected, the note's tables."""

    name: str
    title: str
    path: str
    parts: tuple[Part, ...]
    methods: dict[str, dict[str, Any]]
    tables: tuple[NoteTable, ...]
    smoke: bool = False
    network_map: dict[str, Network] = field(default_factory=dict)  # smoke: "<part>/<note network>" -> ours

    @property
    def label(self) -> str:
        return f"{self.name}-smoke" if self.smoke else self.name

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)

    def ours(self, part: str, net: Network) -> Network:
        """The network of ours a note network is compared with (itself, or its smoke stand-in)."""
        return self.network_map.get(f"{part}/{net}", net)


# ----------------------------------------------------------------------------- loading


def _fail(path: str, where: str, what: str) -> ConfigError:
    return ConfigError(f"{path}: {where}: {what}")


def _mapping(path: str, where: str, value: Any, required: Sequence[str], optional: Sequence[str]) -> dict[str, Any]:

    if not isinstance(value, dict):
        raise _fail(path, where, f"must be a mapping, got {echo(value)}")
    unknown = sorted(str(k) for k in set(value) - set(required) - set(optional))
    if unknown:
        raise _fail(path, where, f"unknown key(s) {', '.join(unknown)}; known: {', '.join([*required, *optional])}")
    missing = [k for k in required if k not in value]
    if missing:
        raise _fail(path, where, f"missing key(s) {', '.join(missing)}")
    return value


def _list(path: str, where: str, value: Any, kind: type | tuple[type, ...], *, one: bool = True) -> list[Any]:
    """A list of ``kind`` values (a single value is a list of one); bools are not numbers."""

    items = value if isinstance(value, list) else [value] if one else None
    if not items or not all(isinstance(v, kind) and not isinstance(v, bool) for v in items):
        raise _fail(path, where, f"must be a non-empty list of {getattr(kind, '__name__', 'values')}, got {echo(value)}")
    return items


def _str(path: str, where: str, value: Any) -> str:

    if not isinstance(value, str) or not value:
        raise _fail(path, where, f"must be a non-empty string, got {echo(value)}")
    return value


def _network(path: str, where: str, value: Any) -> list[Network]:
    m = _mapping(path, where, value, ("backbone", "D"), ("loss",))
    backbones = _list(path, f"{where}.backbone", m["backbone"], str)
    dims = _list(path, f"{where}.D", m["D"], int)
    losses = _list(path, f"{where}.loss", m.get("loss", "ce"), str)
    return [Network(b, d, loss) for b in backbones for d in dims for loss in losses]


def _part(path: str, i: int, value: Any) -> Part:
    where = f"parts[{i}]"
    m = _mapping(path, where, value, ("name", "dataset", "networks", "search"), ("seeds", "train"))
    networks = [n for j, v in enumerate(_list(path, f"{where}.networks", m["networks"], dict))
                for n in _network(path, f"{where}.networks[{j}]", v)]
    seeds = _list(path, f"{where}.seeds", m.get("seeds", [0]), int)
    train = _mapping(path, f"{where}.train", m.get("train", {}), (), TRAIN_KEYS)
    if not isinstance(m["search"], dict):
        raise _fail(path, f"{where}.search", "must be a mapping of search spec keys")
    for key in ("experiment", "data_root", "models"):
        if key in m["search"]:
            raise _fail(path, f"{where}.search.{key}", "is set by `densitune run` (experiment: <study>-<part>; --data-root)")

    search = check_values(dict(m["search"]), f"{path}: {where}.search")
    return Part(_str(path, f"{where}.name", m["name"]), _str(path, f"{where}.dataset", m["dataset"]),
                tuple(dict.fromkeys(networks)), tuple(seeds), dict(train), dict(search))


def _table(path: str, i: int, value: Any, parts: dict[str, Part], methods: Mapping[str, Any]) -> NoteTable:
    where = f"tables[{i}]"
    m = _mapping(path, where, value, ("id", "part", "network", "columns", "rows"), ("source", "accuracy", "remark"))
    part = _str(path, f"{where}.part", m["part"])
    if part not in parts:
        raise _fail(path, f"{where}.part", f"unknown part {part!r}; parts: {', '.join(parts)}")
    nets = _network(path, f"{where}.network", m["network"])
    if len(nets) != 1 or nets[0] not in parts[part].networks:
        raise _fail(path, f"{where}.network", f"must be one network of part {part!r}")
    columns = tuple(_list(path, f"{where}.columns", m["columns"], str))
    bad = [c for c in columns if c not in METRIC_COLUMNS]
    if bad:
        raise _fail(path, f"{where}.columns", f"unknown metric(s) {bad}; known: {', '.join(METRIC_COLUMNS)}")
    rows = []
    for j, row in enumerate(_list(path, f"{where}.rows", m["rows"], list, one=False)):
        if (len(row) != 2 + len(columns) or not all(isinstance(v, str) for v in row[:2])
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row[2:])):
            raise _fail(path, f"{where}.rows[{j}]", f"must be [method, OOD set, {', '.join(columns)}], got {row!r}"[:300])
        if row[0] not in methods:
            raise _fail(path, f"{where}.rows[{j}]", f"unknown method {row[0]!r}; methods: {', '.join(methods)}")
        rows.append((row[0], row[1], tuple(float(v) for v in row[2:])))
    accuracy = m.get("accuracy")
    if accuracy is not None and (not isinstance(accuracy, (int, float)) or isinstance(accuracy, bool)):
        raise _fail(path, f"{where}.accuracy", f"must be a number, got {accuracy!r}")
    return NoteTable(_str(path, f"{where}.id", str(m["id"])), part, nets[0], columns, tuple(rows),
                     str(m.get("source", "")), accuracy, str(m.get("remark", "")))


def _methods(path: str, value: Any) -> dict[str, dict[str, Any]]:
    from densitune.search.ood.scores import SCORES

    out = {}
    for label, sel in _mapping(path, "methods", value, (), tuple(value) if isinstance(value, dict) else ()).items():
        m = _mapping(path, f"methods.{label}", sel, ("score",), ("density", "eps"))
        SCORES.check(_str(path, f"methods.{label}.score", m["score"]))
        if m.get("eps", "any") not in EPS_FILTERS:
            raise _fail(path, f"methods.{label}.eps", f"must be one of 0, ip (ε > 0), any; got {m.get('eps')!r}")
        out[str(label)] = {"score": m["score"], "density": m.get("density"), "eps": m.get("eps", "any")}
    return out


def load_study(path: str | Path, *, smoke_run: bool = False) -> Study:
    """The checked study of spec file ``path`` (scaled by :func:`smoke` with ``smoke_run``).

    Raises:
        ConfigError: a missing, oversized or malformed file, an unknown key, a bad value (one line naming
            the file and the key), or a search or training config the tool would refuse.
    """

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"study spec file not found: {p}")
    data = _mapping(str(p), "the study", load_yaml(p), ("study", "parts", "methods", "tables"), ("title", "source"))
    from densitune.trainables.train.config import check_experiment_name

    name = check_experiment_name(_str(str(p), "study", data["study"]))
    parts = [_part(str(p), i, v) for i, v in enumerate(_list(str(p), "parts", data["parts"], dict))]
    if len({x.name for x in parts}) != len(parts):
        raise _fail(str(p), "parts", "part names must differ")
    methods = _methods(str(p), data["methods"])
    by_name = {x.name: x for x in parts}
    tables = [_table(str(p), i, v, by_name, methods) for i, v in enumerate(_list(str(p), "tables", data["tables"], dict))]
    study = Study(name, str(data.get("title", name)), str(p), tuple(parts), methods, tuple(tables))
    for s in (study, smoke(study)) if smoke_run else (study,):  # the spec as written, then scaled: both must hold
        for part in s.parts:  # the networks and the search the tool would build: refused here if bad
            train_configs(s, part)
            search_spec(s, part, data_root=None)
    return smoke(study) if smoke_run else study


# ----------------------------------------------------------------------------- smoke


def smoke_dim(D: int) -> int:
    """D of a smoke network: D / 64, at least 4 (2048 -> 32, 512 -> 8): a D sweep stays a sweep."""
    return max(4, D // 64)


def smoke(study: Study) -> Study:
    """``study`` scaled to the embedded digits on CPU: cnn, D / 64, 2 epochs, ε ∈ {0, 0.02}, OOD sets mapped."""
    from densitune.search.ood.scores import SCORES

    parts, network_map = [], {}
    for part in study.parts:
        nets = {n: Network("cnn", smoke_dim(n.D), n.loss) for n in part.networks}
        network_map.update({f"{part.name}/{n}": m for n, m in nets.items()})
        s = dict(part.search)
        ensembles = any(SCORES.get(x).ensemble for x in s.get("scores", ["density"]))
        s["test_ood"] = list(dict.fromkeys(SMOKE_SETS.get(n, n) for n in s.get("test_ood", [])))
        s.pop("val_ood", None)  # digits' default: digits-blend
        grid = [float(e) for e in s.get("eps_grid", [0])]
        s["eps_grid"] = [0.0] * (0 in grid) + [SMOKE_EPS] * any(e > 0 for e in grid)
        if "density_params" in s:
            s["density_params"] = {d: {k: list(v[:1]) for k, v in ps.items()} for d, ps in s["density_params"].items()}
        if s.get("attacks"):
            s.update(attack_eps=0.1, attack_steps=3)
        s["eval_limit"] = SMOKE_EVAL_LIMIT
        train = {k: v for k, v in part.train.items() if k in ("lam", "spectral", "sn_coeff")}
        train["epochs"] = SMOKE_EPOCHS
        parts.append(replace(part, dataset="digits", networks=tuple(dict.fromkeys(nets.values())),
                             seeds=part.seeds[:2] if ensembles else part.seeds[:1], train=train, search=s))
    return replace(study, parts=tuple(parts), smoke=True, network_map=network_map)


def ood_name(study: Study, note_name: str) -> str:
    """The data set (or adversarial row) the search calls the note's OOD set ``note_name``."""
    if note_name in ATTACK_SETS:
        return ATTACK_SETS[note_name]
    if study.smoke:
        return SMOKE_SETS.get(note_name, note_name)
    return NOTE_SETS.get(note_name, (note_name, ""))[0]


# ----------------------------------------------------------------------------- training and search


def train_configs(study: Study, part: Part, data_root: str | None = None) -> list:
    """The :class:`TrainConfig` of every network × seed of ``part`` (validated)."""
    from densitune.trainables.train.config import TrainConfig

    out = []
    for net in part.networks:
        for seed in part.seeds:
            kw = dict(part.train)
            out.append(TrainConfig(backbone=net.backbone, feature_dim=net.D, loss=net.loss, seed=seed,
                                   dataset=part.dataset, data_root=data_root, experiment=TRAIN_EXPERIMENT, **kw))
    return out


def all_train_configs(study: Study, data_root: str | None = None) -> list:
    """Every network of the study, once (parts may share networks)."""
    configs = {c.key: c for part in study.parts for c in train_configs(study, part, data_root)}
    return list(configs.values())


def search_values(study: Study, part: Part, *, data_root: str | None, models: str | None = None) -> dict[str, Any]:
    """The ``densitune search --spec`` values of ``part``: experiment ``<study>-<part>``, OOD sets by data set name."""
    s = dict(part.search)
    s["experiment"] = f"{study.label}-{part.name}"
    if s.get("test_ood"):
        s["test_ood"] = [ood_name(study, n) for n in s["test_ood"]]
    if s.get("val_ood"):  # one set or several (`--val-ood A B`)
        vals = [s["val_ood"]] if isinstance(s["val_ood"], str) else list(s["val_ood"])
        s["val_ood"] = [ood_name(study, n) for n in vals]
    if data_root is not None:
        s["data_root"] = data_root
    if models is not None:
        s["models"] = models
    return s


def search_spec(study: Study, part: Part, data_root: str | None):
    """The checked :class:`SearchSpec` of ``part`` (no file read but the ID data set's description)."""
    from densitune.search.prepare import build_spec

    values = search_values(study, part, data_root=data_root)
    return build_spec(values, part.dataset)


def model_groups(study: Study, part: Part, data_root: str | None = None, models: RunPath | None = None) -> list:
    """The model groups ``part`` searches: exactly its networks, each group's seeds in order.

    ``models``: the run's model store (``RUN/models``); each member's checkpoint is its network's folder
    there (``<models>/note/<key>``). Without it (planning) the checkpoints are empty: none need exist.
    """
    from densitune.search.models import ModelGroup

    groups: dict[str, list] = {}
    for c in train_configs(study, part, data_root):
        groups.setdefault(c.name, []).append(c)
    out = []
    for k, cs in groups.items():
        cs = sorted(cs, key=lambda c: c.seed)
        checkpoints = tuple(str(models / TRAIN_EXPERIMENT / c.key) if models is not None else "" for c in cs)
        out.append(ModelGroup(key=k, backbone=cs[0].backbone, D=cs[0].feature_dim, loss=cs[0].loss, lam=cs[0].lam,
                              spectral=cs[0].spectral, dataset=cs[0].dataset, data_seed=cs[0].data_seed,
                              seeds=tuple(c.seed for c in cs), checkpoints=checkpoints))
    return out


def study_dir(run: str | RunPath, study: Study) -> RunPath:
    """``RUN/studies/<study>``: the study's report and the search specs it ran (a folder or a bucket prefix)."""

    return RunStore(run).root / STUDIES_DIR / study.label if isinstance(run, str) else run / STUDIES_DIR / study.label


def check_study_data(study: Study, data_root: str | None) -> None:
    """Every data set the study reads is there, else one line naming the expected layout under ``--data-root``."""
    from densitune.search.prepare import check_data

    names: dict[str, str] = {}
    for part in study.parts:
        names[part.dataset] = part.dataset
        spec = search_spec(study, part, data_root)
        for n in (*(spec.val_ood or ()), *spec.test_ood):
            if n and not n.startswith("adv-"):
                names[n] = n
    layouts = {v[0]: (k, v[1]) for k, v in NOTE_SETS.items()}
    for name in names:
        try:
            check_data(name, data_root)
        except DensituneError as e:
            note, layout = layouts.get(name, (name, ""))
            where = f"expected {layout} with --data-root DATA_ROOT" if layout else str(e)
            raise type(e)(f"study {study.name}: data set {note} is missing ({where}; "
                          f"--data-root is {data_root or 'not given'})") from None


# ----------------------------------------------------------------------------- plan


# ----------------------------------------------------------------------------- throughputs (for the plan)
# GPU throughputs measured by ``bench/gpu_check.py``, as data for ``densitune run --plan``. The package never
# reads ``bench/`` at run time: the figures are copied here, with the card and the file they come from.
# Training figures are img/s of one optimiser step (batch 256, 32×32 inputs, spectral norm on); ``amp`` is
# what training uses on CUDA (``TrainConfig.amp``, on by default). Scoring figures are img/s of density
# scoring with ResNet-18 at D = 512 (ε = 0: one forward pass; ε > 0: forward, backward, forward); other
# backbones are scaled by their training throughput.


@dataclass(frozen=True)
class Throughput:
    """Training step throughput of one backbone on :data:`CARD` (img/s)."""

    fp32: float
    amp: float
    measured: bool = True  # False: not measured; the figure of ``source`` is used instead
    source: str = ""


CARD = "NVIDIA H200"
SOURCE = "bench/results/gpu_check_h200.jsonl (python bench/gpu_check.py)"

TRAIN: dict[str, Throughput] = {
    "resnet18": Throughput(10613.8, 8270.4),
    "resnet50": Throughput(4790.3, 3970.2),
    "wrn28_10": Throughput(3426.2, 5347.7),
    "vit": Throughput(7686.5, 6271.8),
    # Not measured by gpu_check.py: ResNet-18's figures stand in (VGG-16-BN for 32×32 inputs has about
    # half ResNet-18's FLOPs, so this errs on the long side).
    "vgg16": Throughput(10613.8, 8270.4, measured=False, source="resnet18"),
}

#: Density scoring with ResNet-18 at D = 512 (img/s): ε = 0 and ε > 0 (input perturbation).
SCORE_RESNET18 = {"eps0": 62721.01, "ip": 20689.575}


#: Density evaluation alone on features (queries/s), fitted on 50,000 × 512 features: KDE's cost grows with D.
SCORE_DENSITY = {"gmm_sum": 1936136.986, "kde": 326255.092}
DENSITY_DIM = 512


def train_throughput(backbone: str) -> Throughput:
    """The training throughput of ``backbone`` (unmeasured backbones, e.g. ``cnn``: ResNet-18's, flagged)."""
    if backbone in TRAIN:
        return TRAIN[backbone]
    r = TRAIN["resnet18"]
    return Throughput(r.fp32, r.amp, measured=False, source="resnet18")


def score_throughput(backbone: str, ip: bool) -> float:
    """Scoring img/s of ``backbone``: ResNet-18's, scaled by the two backbones' training throughput."""
    scale = train_throughput(backbone).amp / TRAIN["resnet18"].amp
    return SCORE_RESNET18["ip" if ip else "eps0"] * scale


@dataclass
class PlanLine:
    study: str
    networks: int
    to_train: int
    trials: int
    train_gpu_h: float
    search_gpu_h: float


def _sizes(name: str, limit: int | None) -> tuple[int, int]:
    key = {v[0]: k for k, v in NOTE_SETS.items()}.get(name, name)
    train, test = SET_SIZES.get(key, (50000, 10000))
    return train, min(test, limit) if limit else test


def plan(study: Study, trained: set[str]) -> PlanLine:
    """Networks, trials and estimated GPU-hours (:data:`TRAIN`, :data:`SCORE_RESNET18`) of ``study``.

    ``trained``: keys of networks already trained (or trained by an earlier study of the same command);
    ``study``'s networks are added to it.

    Training: epochs × (training images + a third of a validation pass) / the backbone's AMP step
    throughput. Search: per trial and seed, every evaluation set (ID validation and test, validation
    and test OOD, attacked sets) at ε > 0 pays one perturbed pass; ε = 0 features, the density's
    training features and the attacks are computed once per network (they are cached).
    """
    from densitune.search.space import grid_points, score_class
    from densitune.search.tune import trial_budget

    configs = all_train_configs(study)
    todo = [c for c in configs if c.key not in trained]
    trained.update(c.key for c in todo)  # a later study of the same command reuses them
    train_s = 0.0
    for c in todo:
        n_train, _ = _sizes(c.dataset, None)
        n_val = n_train // 10
        train_s += c.epochs * (n_train + n_val / 3) / train_throughput(c.backbone).amp
    trials, search_s = 0, 0.0
    for part in study.parts:
        spec = search_spec(study, part, None)
        groups = model_groups(study, part)
        trials += trial_budget(spec, groups)
        n_train, n_id_test = _sizes(part.dataset, spec.eval_limit)
        n_id_val = min(n_train // 10, spec.eval_limit or n_train)
        attacks = len(spec.attacks)
        eval_images = (n_id_val + sum(_sizes(v, spec.eval_limit)[1] for v in spec.val_ood or ()) + n_id_test * (1 + attacks)
                       + sum(_sizes(n, spec.eval_limit)[1] for n in spec.test_ood))
        by_group = {g.key: g for g in groups}
        for g in groups:  # once per network: features at ε = 0 (train + evaluation sets), the attacks
            steps = sum(1 if a == "fgsm" else spec.attack_steps for a in spec.attacks)
            search_s += len(g.seeds) * ((n_train + eval_images) / score_throughput(g.backbone, False)
                                        + n_id_test * steps / train_throughput(g.backbone).amp)
        if spec.sampler == "grid":
            for point in grid_points(spec, groups):
                g = by_group[point.group]
                if point.eps > 0 or score_class(point.score).needs_ip:
                    search_s += len(g.seeds) * eval_images / score_throughput(g.backbone, True)
                if point.density.name == "kde":  # a KDE query costs a pass over the training features
                    search_s += len(g.seeds) * eval_images * g.D / DENSITY_DIM / SCORE_DENSITY["kde"]
        else:  # TPE: assume every trial perturbs, on the costliest group
            worst = max(len(g.seeds) / score_throughput(g.backbone, True) for g in groups)
            search_s += trial_budget(spec, groups) * eval_images * worst
    return PlanLine(study.label, len(configs), len(todo), trials, train_s / 3600, search_s / 3600)


def plan_text(lines: Sequence[PlanLine], borrowed: Sequence[str], networks: int) -> str:
    """The plan as a table; ``networks``: how many distinct networks all ``lines`` use together."""
    head = f"{'study':<24} {'networks':>8} {'to train':>8} {'trials':>7} {'train GPU-h':>11} {'search GPU-h':>12} {'total':>7}"
    out = [f"plan (GPU-hours on one {CARD}, throughputs from {SOURCE}):", head]
    for x in lines:
        out.append(f"{x.study:<24} {x.networks:>8} {x.to_train:>8} {x.trials:>7} {x.train_gpu_h:>11.2f} "
                   f"{x.search_gpu_h:>12.2f} {x.train_gpu_h + x.search_gpu_h:>7.2f}")
    if len(lines) > 1:
        out.append(f"{'all':<24} {networks:>8} {sum(x.to_train for x in lines):>8} "
                   f"{sum(x.trials for x in lines):>7} {sum(x.train_gpu_h for x in lines):>11.2f} "
                   f"{sum(x.search_gpu_h for x in lines):>12.2f} "
                   f"{sum(x.train_gpu_h + x.search_gpu_h for x in lines):>7.2f}")
    if borrowed:
        out.append(f"not measured on that card (ResNet-18's throughput used): {', '.join(borrowed)}")
    return "\n".join(out)


def borrowed_throughputs(studies: Sequence[Study]) -> list[str]:
    return sorted({n.backbone for s in studies for p in s.parts for n in p.networks
                   if not train_throughput(n.backbone).measured})


# ----------------------------------------------------------------------------- report


def _selected(df: Any, study: Study, table: NoteTable, method: str) -> Any:
    """The trials of ``table``'s network that ``method`` selects among, best validation first."""
    from densitune.search.report.tables import trial_objectives

    sel = study.methods[method]
    net = study.ours(table.part, table.network)
    rows = df[(df["experiment"] == f"{study.label}-{table.part}") & (df["backbone"] == net.backbone)
              & (df["D"] == net.D) & (df["loss"] == net.loss) & (df["score"] == sel["score"])]
    if sel["density"]:
        rows = rows[rows["density"] == sel["density"]]
    if sel["eps"] == 0:
        rows = rows[rows["eps"] == 0]
    elif sel["eps"] == "ip":
        rows = rows[rows["eps"] > 0]
    if rows.empty or rows[rows["split"] == "val"].empty:
        return rows, None
    return rows, trial_objectives(rows, "auroc").iloc[0]


def _fmt(v: float) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def report_tables(study: Study, results_dir: str | RunPath) -> list:
    """One table per note table: method, OOD set, metric, ours (mean ± std over seeds), the note's, ours − note."""
    import pandas as pd

    from densitune.results.store import read_results
    from densitune.search.report.tables import Table, search_frame

    frames = []
    for part in study.parts:
        frames.append(search_frame(read_results(results_dir, experiment=f"{study.label}-{part.name}")))
    df = pd.concat(frames, ignore_index=True)
    out = []
    for t in study.tables:
        records, accuracy = [], []
        for method, note_ood, figures in t.rows:
            rows, trial = _selected(df, study, t, method)
            ood = ood_name(study, note_ood)
            test = rows[(rows["split"] == "test") & (rows["ood_dataset"] == ood)]
            if trial is not None:
                test = test[test["trial_id"] == trial["trial_id"]]
                accuracy += list(test["id_accuracy"].dropna())
            for metric, note in zip(t.columns, figures):
                v = test[metric].dropna() if trial is not None else pd.Series(dtype=float)
                mean = float(v.mean()) if len(v) else math.nan
                std = float(v.std(ddof=1)) if len(v) > 1 else math.nan
                records.append({"method": method, "ood": note_ood if ood == note_ood else f"{note_ood} ({ood})",
                                "metric": metric, "ours": _fmt(mean), "std": _fmt(std), "seeds": len(v),
                                "eps": "" if trial is None else f"{trial['eps']:g}", "note": f"{note:.4f}",
                                "diff": _fmt(mean - note)})
        net = study.ours(t.part, t.network)
        acc = f"; ID accuracy ours {sum(accuracy) / len(accuracy):.4f}" if accuracy else ""
        acc += f", note {t.accuracy:.4f}" if t.accuracy is not None else ""
        title = (f"{study.name} {t.id}: {t.network.backbone} D={t.network.D} {t.network.loss}"
                 + (f" (ours: {net.backbone} D={net.D} on {study.part(t.part).dataset}, smoke)" if study.smoke else "")
                 + acc + (f". {t.source}" if t.source else "") + (f". {t.remark}" if t.remark else ""))
        out.append(Table(title, pd.DataFrame.from_records(records)))
    return out


def write_report(study: Study, run: str | RunPath) -> tuple[str, list[RunPath]]:
    """The study's report as markdown, also written to ``RUN/studies/<study>/report.md`` and ``report.csv``
    (through the run store: a folder or a bucket)."""
    from densitune.search.report.tables import render

    root = location(run)
    tables = report_tables(study, root / "results")
    text = f"# {study.title}\n\nstudy spec: {study.path}\n\n" + render(tables, "markdown")
    folder = study_dir(root, study)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [publish(folder / name, body) for name, body in (("report.md", text + "\n"), ("report.csv", render(tables, "csv")))]
    return text, paths


def write_search_spec(run: str | RunPath, study: Study, part: Part, values: dict[str, Any], networks: Sequence[str]) -> RunPath:
    """A record of the search ``part`` ran: its spec keys as YAML (``densitune search --spec`` reads them) and,
    in a comment, the networks it searched (``RUN/models/note/<key>``)."""
    import yaml


    path = study_dir(location(run), study) / part.name / "search.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = json.loads(json.dumps(values))
    note = "".join(f"#   {key}\n" for key in networks)
    return publish(path, f"# the search of study {study.label}, part {part.name}, over the networks (models/{TRAIN_EXPERIMENT}/):\n"
                         f"{note}" + yaml.safe_dump(plain, sort_keys=False))


# ----------------------------------------------------------------------------- the study service


@dataclass(frozen=True, kw_only=True)
class StudyOptions(RunOptions):
    """Which study specs to run into the run ``out``, and how."""

    specs: tuple[str, ...] = ()  # study spec files, e.g. experiments/method_comparison.yaml
    smoke: bool = False  # the studies scaled to the embedded digits on CPU (:func:`smoke`)
    data_root: str | None = None  # where the data sets are (ignored with ``smoke``: the digits are embedded)
    max_concurrent: int | None = None  # search trials at once (None: as many as fit)


@dataclass(frozen=True)
class StudyReport:
    label: str
    text: str  # the report as markdown
    paths: tuple[RunPath, ...]  # RUN/studies/<study>/report.md and report.csv


@dataclass(frozen=True)
class StudyOutcome(Outcome):
    reports: tuple[StudyReport, ...] = ()  # the studies finished (all of them when ``error`` is None)


def _load(options: StudyOptions) -> tuple[list[Study], str | None]:

    check_resource_flags(options)
    if not options.specs:
        raise ConfigError("no study spec given")
    studies = [load_study(path, smoke_run=options.smoke) for path in options.specs]  # every spec checked first
    return studies, None if options.smoke else options.data_root


def plan_studies(options: StudyOptions) -> str:
    """The plan of ``options``' studies as a table: networks, trials, estimated GPU-hours. Writes nothing."""
    from densitune.trainables.train.tune import TrainRun, is_trained

    studies, data_root = _load(options)
    store = RunStore(options.out)
    train_run = TrainRun(experiment=TRAIN_EXPERIMENT, models_dir=str(store.models), results_dir=str(store.results),
                         storage_path=store.tune)
    trained = {c.key for s in studies for c in all_train_configs(s, data_root) if is_trained(train_run, c)}
    lines = [plan(s, trained) for s in studies]
    networks = len({c.key for s in studies for c in all_train_configs(s)})
    return plan_text(lines, borrowed_throughputs(studies), networks)


def run_studies(options: StudyOptions) -> StudyOutcome:
    """Train the studies' missing networks (each shared network once), search each part over exactly its
    networks, write each study's report; the outcome holds the reports (and why it stopped, if it did).

    Raises:
        DensituneError: a bad spec or flag, a missing data set, a run that is not writable: before anything runs.
    """
    from densitune.trainables.train.tune import TrainRun, is_trained

    studies, data_root = _load(options)
    store = run_store(options.out)
    for s in studies:
        check_study_data(s, data_root)
    common = {f: getattr(options, f) for f in RunOptions.__dataclass_fields__} | {"out": str(store), "resume": True}
    train_run = TrainRun(experiment=TRAIN_EXPERIMENT, models_dir=str(store.models), results_dir=str(store.results),
                         storage_path=store.tune)
    needed = {c.key: c for s in studies for c in all_train_configs(s, data_root)}  # networks shared by studies: once
    todo = [c for c in needed.values() if not is_trained(train_run, c)]
    for dataset in dict.fromkeys(c.dataset for c in todo):  # one training run per data set
        trained = train(TrainOptions(**common, networks=tuple(c for c in todo if c.dataset == dataset)))
        common["doctor"] = False  # the first service's start checked the nodes (densitune doctor): once is enough
        if trained.error is not None:
            return StudyOutcome(trained.error)
    reports: list[StudyReport] = []
    for s in studies:
        for part in s.parts:  # one search per part, over exactly its networks
            spec, groups = search_spec(s, part, data_root), model_groups(s, part, data_root, store.models)
            write_search_spec(store.root, s, part, search_values(s, part, data_root=data_root),
                              [c.key for c in train_configs(s, part, data_root)])
            searched = search(SearchOptions(**common, spec=spec, groups=tuple(groups), max_concurrent=options.max_concurrent))
            common["doctor"] = False
            if searched.error is not None:
                return StudyOutcome(searched.error, tuple(reports))
            if searched.top:
                print(searched.top + "\n")
            print(searched.best)
            say(options, searched.summary)
        text, paths = write_report(s, store.root)
        reports.append(StudyReport(s.label, text, tuple(paths)))
    return StudyOutcome(None, tuple(reports))
