"""The search specification: what to search, on which models, judged on which data.

One frozen dataclass, validated when built, so a typo fails before Ray starts and
before anything is written. The CLI flags and YAML files both build it (their keys are declared on the fields: :func:`spec_keys`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from densitune.checks import INTEGER, MAPPING, NUMBER, STRING, Interval, ListOf, check_params, check_path_text, describe
from densitune.errors import ConfigError
from densitune.ood_groups import parse_set
from densitune.search.ood.metrics import METRICS, check_metric

SAMPLERS = ("grid", "tpe")
#: How hyperparameters are selected (recorded in every row):
#: val-ood   ID validation vs a held-out validation OOD set distinct from the test sets (default);
#: adv-proxy ID validation vs FGSM-perturbed ID validation inputs (no OOD data needed);
#: id-only   held-out ID log-likelihood of the density (selects density parameters, ε = 0, one model group).
PROTOCOLS = ("val-ood", "adv-proxy", "id-only")
#: How several validation OOD sets make one objective: their mean, or the worst of them ("min": the
#: lowest AUROC / AUPRC, the highest FPR95), so that a configuration failing one kind of OOD loses.
VAL_AGGS = ("mean", "min")

#: The ε grid of Lee et al. (2018, Mahalanobis), extended upwards because the
#: embedded default's 8×8 digits need larger steps than CIFAR images.
DEFAULT_EPS_GRID = (0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
#: TPE draws ε from {0} ∪ log-uniform[low, high].
DEFAULT_EPS_RANGE = (1e-4, 0.1)


def check_space(
    densities: tuple[str, ...],
    scores: tuple[str, ...],
    eps_grid: tuple[float, ...],
    eps_range: tuple[float, float],
    dims: tuple[int, ...],
) -> None:
    """Validate the search space alone (names, ε >= 0, D > 0): usable before any file is read."""
    from densitune.search.ood.densities import DENSITIES, FITTED_SCORES
    from densitune.search.ood.scores import SCORES

    for name in densities:
        if name in FITTED_SCORES:
            raise ConfigError(f"{name!r} is a score fitted on features, not a density: search it as a score "
                              f"(scores: [{name}]), its parameters under density_params.{name}")
        DENSITIES.check(name)
    for name in scores:
        SCORES.check(name)
    for eps in (*eps_grid, *eps_range):
        check_params({"eps": eps}, {"eps": [Interval(float, 0, None)]})
    lo, hi = eps_range
    if not 0 < lo < hi:
        raise ConfigError(f"eps range must satisfy 0 < low < high, got {lo}..{hi}")
    if not eps_grid:
        raise ConfigError("eps grid is empty")
    for d in dims:
        for constraint in (INTEGER, Interval(None, 0, None, closed="neither")):  # the type, then the range
            check_params({"D": d}, {"D": [constraint]}, labels={"D": "feature dimension D"})


def check_density_params(density_params: Any) -> None:
    """``{density: {param: [values]}}``; every value is tried on the density (bad names or values fail)."""
    from densitune.search.ood.densities import DENSITIES, FITTED_SCORES, create_density

    if not isinstance(density_params, dict):
        raise ConfigError(f"density_params must map density names to {{param: [values]}}, got {density_params!r}")
    for name, params in density_params.items():
        if name not in FITTED_SCORES:  # knn, rmd, vim: the parameters of the scores of those names
            DENSITIES.check(name)  # a density that is not searched keeps its params unused
        if not isinstance(params, dict):
            raise ConfigError(f"density_params.{name} must map parameter names to lists of values, got {params!r}")
        for key, values in params.items():
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"density_params.{name}.{key} must be a non-empty list of values")
            for v in values:
                create_density(name, **{key: v})


@dataclass(frozen=True)
class SpecKey:
    """One search spec key: its YAML name, what its value must be, its help text and its CLI flag.

    The YAML loader (:mod:`densitune.search.spec_file`), the ``densitune search`` flags and the
    README's key table are all derived from these (:func:`spec_keys`).
    """

    name: str
    value: tuple[Any, ...]  # constraints of densitune.checks on the YAML value (types; ranges are the spec's)
    help: str
    flags: tuple[str, ...] = ()  # () = no flag (YAML only)
    nargs: str | int | None = None
    type: Any = None  # argparse type of each flag argument
    metavar: tuple[str, ...] | None = None
    choices: tuple[str, ...] | None = None  # fixed names (argparse choices)

    @property
    def is_list(self) -> bool:
        return any(isinstance(c, ListOf) for c in self.value)


def _key(value: Any, help: str, *flags: str, nargs: str | int | None = None, type: Any = None,
         metavar: tuple[str, ...] | None = None, nullable: bool = False,
         choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Field metadata of a :class:`SearchSpec` key (see :class:`SpecKey`)."""
    constraints = (value, None) if nullable else (value,)
    return {"spec_key": dict(value=constraints, help=help, flags=flags, nargs=nargs, type=type, metavar=metavar,
                             choices=choices)}


_STRS, _NUMS, _INTS = ListOf(STRING), ListOf(NUMBER), ListOf(INTEGER)
_POSITIVE = [Interval(float, 0, None, closed="neither")]
_LABELS = {"attack_eps": "attack eps", "attack_steps": "attack steps", "num_samples": "number of trials",
           "eval_limit": "eval limit", "batch_size": "batch size"}


@dataclass(frozen=True)
class SearchSpec:
    """A search over (model group, density, score, ε).

    * ``val_ood``: the OOD set used for selection (with ID validation data);
      ``test_ood``: OOD sets that are only reported, never used to select.
    * ``eps_grid`` is the grid sampler's ε values; the TPE sampler draws ε from
      {0} ∪ log-uniform[``eps_range``].

    Each field's metadata (:func:`_key`) declares its YAML value, help text and CLI flag.
    """

    experiment: str = field(metadata=_key(STRING, "name of the search experiment (default: search)", "--experiment"))
    val_ood: tuple[str, ...] | None = field(metadata=_key(  # a YAML string is one set
        _STRS, "OOD set(s) used for selection, e.g. one near and one far (default: per ID data set)",
        "--val-ood", nargs="+", nullable=True))
    test_ood: tuple[str, ...] = field(metadata=_key(
        _STRS, "OOD sets reported, never used to select; near:NAME=folder:PATH / far:... names a folder and its kind "
        "(default: per ID data set)", "--test-ood", nargs="+"))
    val_agg: str = field(default="mean", metadata=_key(
        STRING, "several validation OOD sets: the objective is their mean or their worst (min)", "--val-agg",
        choices=VAL_AGGS))
    protocol: str = field(default="val-ood", metadata=_key(
        STRING, "selection protocol", "--protocol", choices=PROTOCOLS))
    proxy_attack: str = field(default="fgsm", metadata=_key(STRING, "adv-proxy: the attack on ID validation inputs"))
    proxy_eps: float = field(default=8 / 255, metadata=_key(
        NUMBER, "adv-proxy: the attack's budget on ID validation inputs", "--proxy-eps", type=float))
    densities: tuple[str, ...] = field(default=("gmm_sum",), metadata=_key(
        _STRS, "densities: gmm_sum gmm_max kde", "--density", nargs="+"))
    scores: tuple[str, ...] = field(default=("density",), metadata=_key(
        _STRS, "scores; see `densitune list`", "--score", nargs="+"))
    eps_grid: tuple[float, ...] = field(default=DEFAULT_EPS_GRID, metadata=_key(
        _NUMS, "ε values of the grid sampler", "--eps-grid", nargs="+", type=float))
    eps_range: tuple[float, float] = field(default=DEFAULT_EPS_RANGE, metadata=_key(
        _NUMS, "TPE: ε in {0} ∪ log-uniform[LO, HI]", "--eps-range", nargs=2, type=float, metavar=("LO", "HI")))
    dims: tuple[int, ...] = field(default=(), metadata=_key(  # empty: every trained D
        _INTS, "only models with these D (default: all)", "-D", "--dim", nargs="+", type=int))
    backbones: tuple[str, ...] = field(default=(), metadata=_key(
        _STRS, "only models with these backbones (default: all)", "--backbone", nargs="+"))
    losses: tuple[str, ...] = field(default=(), metadata=_key(
        _STRS, "only models trained with these losses (default: all)", "--loss", nargs="+"))
    sampler: str = field(default="grid", metadata=_key(STRING, "Optuna sampler", "--sampler", choices=SAMPLERS))
    num_samples: int | None = field(default=None, metadata=_key(  # grid: the grid size
        INTEGER, "TPE trial budget (default 20)", "--num-samples", type=int, nullable=True))
    seed: int = field(default=0, metadata=_key(INTEGER, "sampler seed", "--seed", type=int))
    metric: str = field(default="auroc", metadata=_key(
        STRING, "validation metric to select on", "--metric", choices=tuple(METRICS)))
    data_root: str | None = field(default=None, metadata=_key(
        STRING, "directory holding torchvision data sets / image folders", "--data-root", nullable=True))
    eval_limit: int | None = field(default=None, metadata=_key(
        INTEGER, "cap each evaluation set at this many inputs (seeded subset)", "--eval-limit", type=int, nullable=True))
    batch_size: int = field(default=256, metadata=_key(INTEGER, "inputs per scoring batch"))
    density_params: dict[str, dict[str, list[Any]]] = field(default_factory=dict, metadata=_key(
        MAPPING, "per density, each parameter's values to search, e.g. {kde: {bandwidth: [scott, 0.5]}}"))
    keep_scores: str = field(default="none", metadata=_key(
        STRING, "per-sample test scores kept for `densitune compare` (RUN/scores/): none or all trials", "--keep-scores",
        choices=("none", "all")))
    orient: str = field(default="none", metadata=_key(
        STRING, "validation: beside a diff trial whose validation AUROC says the negation ranks better, record the "
        "negated variant diff_neg (still higher = more ID; the original is never flipped)", "--orient",
        choices=("none", "validation")))
    #: adversarial-example detection (note §1.9): attacks on the ID test set, reported like test OOD sets
    attacks: tuple[str, ...] = field(default=(), metadata=_key(
        _STRS, "adversarial detection (rows adv-<name>)", "--attacks", nargs="*", choices=("fgsm", "bim", "pgd")))
    attack_eps: float = field(default=8 / 255, metadata=_key(
        NUMBER, "L∞ attack budget in [0,1] pixel units", "--attack-eps", type=float))
    attack_steps: int = field(default=10, metadata=_key(INTEGER, "BIM/PGD iterations", "--attack-steps", type=int))

    def __post_init__(self) -> None:
        if isinstance(self.val_ood, str):  # one set, as a YAML string or an older stored spec gives it
            object.__setattr__(self, "val_ood", (self.val_ood,))
        elif self.val_ood is not None:
            object.__setattr__(self, "val_ood", tuple(self.val_ood))
        if self.keep_scores not in ("none", "all"):
            raise ConfigError(f"keep_scores must be none or all, got {self.keep_scores!r}")
        if self.orient not in ("none", "validation"):
            raise ConfigError(f"orient must be none or validation, got {self.orient!r}")
        if self.val_agg not in VAL_AGGS:
            raise ConfigError(f"unknown validation aggregation {self.val_agg!r}; known: {', '.join(VAL_AGGS)}")
        if self.val_ood is not None and len(set(self.val_ood)) != len(self.val_ood):
            raise ConfigError(f"validation OOD sets repeat a name: {list(self.val_ood)}")
        check_space(self.densities, self.scores, self.eps_grid, self.eps_range, self.dims)
        from densitune.trainables.train.config import check_experiment_name

        check_experiment_name(self.experiment)
        check_density_params(self.density_params)
        if self.attacks:
            from densitune.search.ood.attacks import ATTACKS

            for a in self.attacks:
                ATTACKS.check(a)
            check_params(vars(self), {"attack_eps": _POSITIVE, "attack_steps": [Interval(int, 1, None)]}, labels=_LABELS)
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; known: {', '.join(SAMPLERS)}")
        check_metric(self.metric)
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {self.protocol!r}; known: {', '.join(PROTOCOLS)}")
        if self.protocol == "val-ood" and not self.val_ood:
            raise ConfigError("protocol val-ood needs a validation OOD set (val_ood)")
        if self.protocol == "adv-proxy":
            from densitune.search.ood.attacks import ATTACKS

            ATTACKS.check(self.proxy_attack)
            check_params(vars(self), {"proxy_eps": _POSITIVE}, labels=_LABELS)
            from densitune.search.ood.scores import SCORES

            ens = [s for s in self.scores if SCORES.get(s).ensemble]
            if ens:
                raise ConfigError(f"protocol adv-proxy attacks one model; it cannot select ensemble scores {ens}")
        if self.protocol == "id-only":
            # Held-out ID likelihood can rank density types and parameters of one network; it says
            # nothing about ε (ip raises every likelihood) nor across networks (different feature spaces).
            if tuple(self.scores) != ("density",):
                raise ConfigError("protocol id-only selects density parameters: scores must be [density]")
            if tuple(self.eps_grid) != (0.0,):
                raise ConfigError("protocol id-only cannot select eps (ip raises every likelihood): use eps_grid [0]")
        if not self.test_ood:
            raise ConfigError("at least one test OOD set is needed")
        tested = {parse_set(n).dataset: n for n in self.test_ood if isinstance(n, str)}
        for name in self.val_ood or ():
            if isinstance(name, str) and parse_set(name).dataset in tested:
                # The selection sets must be distinct from every reported set (no test leakage), whatever they are named.
                raise ConfigError(f"validation OOD set {name!r} is also a test OOD set; choose a distinct one")
        check_params(vars(self), {"num_samples": [Interval(int, 1, None), None], "eval_limit": [Interval(int, 1, None), None],
                                   "seed": [INTEGER], "batch_size": [Interval(int, 1, None)]}, labels=_LABELS)
        for key in ("data_root", "models"):  # paths from a spec file are checked like the flags they stand for
            if getattr(self, key, None) is not None:
                check_path_text(getattr(self, key), key)
        for name in (*(self.val_ood or ()), *self.test_ood):
            dataset = parse_set(name).dataset if isinstance(name, str) else name  # near:NAME=folder:PATH checked here
            if isinstance(dataset, str) and dataset.startswith("folder:"):
                check_path_text(dataset[len("folder:"):], "OOD set folder")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchSpec:
        """Inverse of :meth:`to_dict`; unknown keys are an error that names them."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ConfigError(f"unknown search spec key(s): {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) and k != "density_params" else v for k, v in d.items()}
        return cls(**kw)

    @property
    def mode(self) -> str:
        return "max" if self.protocol == "id-only" else check_metric(self.metric).direction

    @property
    def objective(self) -> str:
        """Name of the reported metric the search optimises (validation data only)."""
        return "val_loglik" if self.protocol == "id-only" else f"val_{self.metric}"

    @property
    def protocol_label(self) -> str:
        """Recorded in every row: how hyperparameters were selected."""
        if self.protocol == "val-ood":
            sets = "+".join(self.val_ood or ())
            return f"val-ood:{sets}:{self.val_agg}" if len(self.val_ood or ()) > 1 else f"val-ood:{sets}"
        if self.protocol == "adv-proxy":
            return f"adv-proxy:{self.proxy_attack}@{self.proxy_eps:.4g}"
        return "id-only:val-loglik"


#: Keys of a search spec that are not :class:`SearchSpec` fields (where to find the trained networks).
EXTRA_KEYS = (SpecKey("models", (STRING, None), "directory of trained models (default: OUT/models)", ("--models",)),)


def spec_keys() -> list[SpecKey]:
    """Every key of a search spec (YAML file and ``densitune search`` flags), in declaration order."""
    keys = [SpecKey(f.name, **f.metadata["spec_key"]) for f in dataclasses.fields(SearchSpec)]
    return [keys[0], *EXTRA_KEYS, *keys[1:]]


def default_text(name: str) -> str:
    """A key's default as the README table and the flag help show it ("" when it has none)."""
    fields = {f.name: f for f in dataclasses.fields(SearchSpec)}
    f = fields.get(name)
    if f is None or f.default is dataclasses.MISSING:
        return ""
    value = f.default

    def text(v: Any) -> str:
        if isinstance(v, tuple | list):
            return "[" + ", ".join(text(x) for x in v) + "]"
        return "null" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    return text(value)


def keys_markdown() -> str:
    """The README's table of search spec keys (YAML key, flag, value, default, meaning)."""
    lines = ["| key | flag | value | default | meaning |", "|---|---|---|---|---|"]
    for k in spec_keys():
        flag = " ".join(f"`{f}`" for f in k.flags)
        default = default_text(k.name)
        value = describe(k.value) + (f" ({', '.join(k.choices)})" if k.choices else "")
        lines.append(f"| `{k.name}` | {flag} | {value} | {f'`{default}`' if default else ''} | "
                     f"{k.help.replace('|', '/')} |")
    return "\n".join(lines)
