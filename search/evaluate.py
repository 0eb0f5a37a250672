"""The evaluation protocol of one search trial: which data selects, which data only reports.

The trial's steps are :mod:`densitune.search.scoring`'s named functions (features -> density ->
scores -> metrics), cached by the per-process :mod:`densitune.search.workspace` (re-exported
here); this module decides which data each step sees. A trial that varies only ε pays for its
perturbed passes and nothing else.

Scientific honesty is structural here: :func:`selection_metrics` is the only input to
the search objective and it is only given validation data; :func:`test_metrics` runs
after the objective is fixed and its numbers are recorded, never returned to the
sampler.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from torch import Tensor
from torch.utils.data import Dataset

from densitune.errors import ConfigError
from densitune.search.cache import checkpoint_token
from densitune.search.ood.attacks import AttackConfig, attack_dataset
from densitune.search.ood.scores import Score, create_score, score_class
from densitune.search.scoring import Features, detection_metrics, gradient_signs, id_accuracy, score_inputs, score_signed
from densitune.search.space import TrialParams
from densitune.search.spec import SearchSpec
from densitune.search.workspace import Workspace, workspace
from densitune.trainables.data import SplitKey

if TYPE_CHECKING:
    from densitune.search.ood.attacks import AttackConfig

log = logging.getLogger(__name__)

__all__ = ["AttackKey", "DataKey", "Features", "TrialParams", "Workspace", "workspace", "claim_gradient_signs", "claim_splits", "selection_metrics", "selection_sets", "aggregate_objective", "test_metrics", "test_score_arrays"]


@dataclass(frozen=True)
class AttackKey:
    """The data key of an ID split under an attack: the attack's name and configuration, and the split attacked.
    :meth:`token` is the cache-key string (that of the plain tuple ``("adv", attack, cfg, *split)`` it once was)."""

    attack: str
    cfg: AttackConfig
    split: SplitKey

    def as_tuple(self) -> tuple[Any, ...]:
        return ("adv", self.attack, self.cfg, *self.split.as_tuple())

    def token(self) -> str:
        return repr(self.as_tuple())


#: What a trial's scored data is cached under: a split as loaded, or an ID split under an attack.
DataKey = SplitKey | AttackKey


class _Split(NamedTuple):
    """One split a trial scores: its data key, how to load it (``load() -> (key, data)``), and, for an OOD side,
    the ``ood_dataset`` its row names (a data set, ``proxy-<attack>`` or ``adv-<attack>``; None: the ID side)."""

    key: DataKey
    load: Callable[[], tuple[DataKey, Dataset]]
    name: str | None = None


class _Evaluator:
    """Scores data for one trial on one model (or, for ensembles, on every seed of a group).

    With ``fit=False`` only the data side is set up (keys and loaders of the splits, no density, no ``score``):
    what the claim passes need before any work starts."""

    def __init__(self, ws: Workspace, spec: SearchSpec, checkpoints: Sequence[str], params: TrialParams,
                 fit: bool = True) -> None:
        self.ws, self.spec, self.checkpoints, self.params = ws, spec, list(checkpoints), params
        self.ensemble = score_class(params.score).ensemble
        first = ws.model(self.checkpoints[0])
        # Data sets come from the search's data root, else the one the network was trained from.
        self.data_root = spec.data_root or first.config.data_root
        self.shape = tuple(first.data["shape"])
        self.id_name = first.data["name"]
        self.data_seed = int(first.data.get("data_seed", 0))
        density = None
        self.fit_checksums: dict[str, str] = {}  # of the split the density was fitted on
        self.train_key: SplitKey | None = None  # the density's training split (part of the gradient-sign keys)
        self._scored: dict[DataKey, Tensor] = {}  # each split scored once per trial
        if not fit:
            return
        if score_class(params.score).uses_density:
            (ckpt,) = self.checkpoints
            train_key, train_data = self.split(self.id_name, "train", limit=None)
            self.train_key = train_key
            train = self.features(train_key, train_data)
            density = ws.density(ckpt, params.density, train[0], train_key)
            self.fit_checksums = self.checksums(train_key)
        self.score: Score = create_score(params.score, [ws.model(c).model for c in self.checkpoints], density)
        self.density_fit = density.describe()["density_fit"] if density is not None else None

    def checksums(self, *keys: DataKey) -> dict[str, str]:
        """``{"<data set>/<split>": checksum}`` of the splits named by data keys (an attacked set: its ID split)."""
        out = {}
        for key in keys:
            split = key.split if isinstance(key, AttackKey) else key
            out[split.label] = self.ws.checksum(split)
        return out

    def split_key(self, name: str, split: str, limit: int | None = -1) -> SplitKey:
        """The data key of a split (what :meth:`split` caches it under), without loading it."""
        limit = self.spec.eval_limit if limit == -1 else limit
        return SplitKey(name, split, cast("tuple[int, int, int]", self.shape), self.data_root, self.data_seed, limit)

    def split(self, name: str, split: str, limit: int | None = -1) -> tuple[SplitKey, Dataset]:
        key = self.split_key(name, split, limit)
        return key, self.ws.data(key, *self.split_loaders(key))

    @staticmethod
    def split_loaders(key: SplitKey) -> tuple[Callable[[], Dataset], Callable[[], str | None]]:
        """(load, identity) of the split a data key names: :func:`load_split` and :func:`split_identity` on it."""
        return key.load, key.identity

    def plain(self, name: str, split: str, ood_name: str | None = None) -> _Split:
        """A split of a data set, not loaded yet."""
        return _Split(self.split_key(name, split), lambda: self.split(name, split), ood_name)

    def attacked(self, attack: str, split: str, ood_name: str, eps: float | None = None) -> _Split:
        """An ID split under an attack, not attacked yet."""
        return _Split(self.adversarial_key(attack, split, eps), lambda: self.adversarial(attack, split, eps), ood_name)

    def adversarial_key(self, attack: str, split: str = "test", eps: float | None = None) -> AttackKey:
        """The data key of an attacked split (what :meth:`adversarial` caches it under), without attacking."""
        cfg = AttackConfig(eps=self.spec.attack_eps if eps is None else eps, steps=self.spec.attack_steps)
        return AttackKey(attack, cfg, self.split_key(self.id_name, split))

    def adversarial(self, attack: str, split: str = "test", eps: float | None = None) -> tuple[AttackKey, Dataset]:
        """An ID split attacked (L∞, budget ``eps``, default the spec's) against this trial's single model."""
        (ckpt,) = self.checkpoints
        id_key, id_data = self.split(self.id_name, split)
        key = self.adversarial_key(attack, split, eps)
        cfg = key.cfg

        def make() -> tuple[Tensor, Tensor]:
            model = self.ws.model(ckpt).model
            return attack_dataset(attack, model, id_data, cfg, batch_size=self.spec.batch_size, device=self.ws.device)

        return key, self.ws.attacked(ckpt, key, make)

    def features(self, key: DataKey, data: Dataset) -> list[Features]:
        return [self.ws.features(c, key, data, self.spec.batch_size) for c in self.checkpoints]

    def scores(self, key: DataKey, data: Dataset) -> Tensor:
        """(N,) float64 scores of a data set with this trial's ε.

        Scored once per trial: the ID test side is reused by every test OOD set and attack. The clean features
        are extracted only where they are used: for ε = 0 (scores from features) and, by the callers, on the
        ID side (its accuracy); an OOD split scored with ε > 0 never needs them."""
        if key not in self._scored:
            feats = self.features(key, data) if self.params.eps == 0 else []
            self._scored[key] = self._score_split(key, data, feats)
        return self._scored[key]

    def _score_split(self, key: DataKey, data: Dataset, feats: list[Features]) -> Tensor:
        """ε > 0 with the workspace's ip cache: from the split's cached gradient signs (one forward pass per
        batch, the same numbers); otherwise :func:`score_inputs` (the reference path)."""
        bs, device = self.spec.batch_size, self.ws.device
        if self.params.eps > 0 and self.ws.ip_cache:
            signs = self.ws.gradient_signs(*self._sign_keys(key), lambda: gradient_signs(self.score, data, bs, device))
            return score_signed(self.score, data, self.params.eps, signs, bs, device)
        return score_inputs(self.score, data, self.params.eps, feats, bs, device)

    def _sign_keys(self, key: DataKey) -> tuple[tuple, str]:
        """(memory key, disk key) of a split's gradient signs: models, score, density and its parameters (and
        the split it was fitted on), the data split, the batch size and the device type; not ε. Keys enter the
        disk key as the plain tuples they were before they had types (existing caches stay valid)."""
        p = self.params
        train = self.train_key.as_tuple() if self.train_key is not None else ()
        ident = (p.score, p.density.name, p.density.params_json(), train, key.as_tuple(), self.spec.batch_size,
                 self.ws.device.type)
        disk = "|".join(checkpoint_token(c) for c in self.checkpoints) + f"|{ident!r}"
        return (tuple(self.checkpoints), *ident), disk

    def compare(
        self, id_split: tuple[DataKey, Dataset], ood_split: tuple[DataKey, Dataset], kept: list[tuple[Tensor, Tensor]] | None = None
    ) -> dict[str, Any]:
        """One row's figures: ID vs OOD detection metrics, the density's fit and the data's checksums.

        ``kept``, when given, receives the (N_id,) and (N_ood,) scores the figures come from.
        """
        s_id, f_id = self.scores(*id_split), self.features(*id_split)
        s_ood = self.scores(*ood_split)
        if kept is not None:
            kept.append((s_id, s_ood))
        return {**detection_metrics(s_id, s_ood, f_id), "density_fit": self.density_fit,
                "data_checksums": {**self.fit_checksums, **self.checksums(id_split[0], ood_split[0])}}


def _selection_splits(ev: _Evaluator, spec: SearchSpec) -> list[_Split]:
    """What selects, in scoring order: ID val, then the validation OOD side of ``spec.protocol`` (every validation
    OOD set; the proxy attack on ID val, single models only; nothing for id-only). Never a test split."""
    out = [ev.plain(ev.id_name, "val")]
    if spec.protocol == "val-ood":
        out += [ev.plain(cast(str, ood), "val", cast(str, ood)) for ood in selection_sets(spec)]
    elif spec.protocol == "adv-proxy" and not ev.ensemble:
        out.append(ev.attacked(spec.proxy_attack, "val", f"proxy-{spec.proxy_attack}", spec.proxy_eps))
    return out


def _test_splits(ev: _Evaluator, spec: SearchSpec) -> list[_Split]:
    """What only reports, in scoring order: ID test, each test OOD set, and each attack (``adv-<attack>``) for
    single-model scores (an ensemble has no one model to attack)."""
    out = [ev.plain(ev.id_name, "test"), *(ev.plain(ood, "test", ood) for ood in spec.test_ood)]
    if not ev.ensemble:
        out += [ev.attacked(attack, "test", f"adv-{attack}") for attack in spec.attacks]
    return out


def _trial_splits(ev: _Evaluator, spec: SearchSpec) -> list[_Split]:
    """Every split a trial scores, in the order it scores them: :func:`selection_metrics`'s, then
    :func:`test_metrics`'s (the same lists those two read)."""
    return [*_selection_splits(ev, spec), *_test_splits(ev, spec)]


def claim_splits(ws: Workspace, spec: SearchSpec, checkpoints: Sequence[str], params: TrialParams) -> int:
    """Share the decoding of image-file splits between concurrent trials: load every split this trial will read
    (the density's training split first) that no other process is decoding right now, through the workspace's
    disk cache, skipping the ones another process holds (the trial then waits for those and reads them).

    Only with a disk cache and for the splits that have a :func:`split_identity` (``folder:`` sets held in
    memory); the data are bit for bit those of :func:`load_split` either way. Returns the number of splits this
    call decoded.
    """
    if ws.disk is None:
        return 0
    ev = _Evaluator(ws, spec, checkpoints, params, fit=False)
    train = [ev.split_key(ev.id_name, "train", None)] if score_class(params.score).uses_density else []
    before = ws.counts["load_data"]
    for key in [*train, *(s.key for s in _trial_splits(ev, spec) if isinstance(s.key, SplitKey))]:  # attacks: not files
        ws.claim_data(key, *ev.split_loaders(key))
    return ws.counts["load_data"] - before


def claim_gradient_signs(ws: Workspace, spec: SearchSpec, checkpoints: Sequence[str], params: TrialParams) -> int:
    """Share the gradient-sign work of concurrent trials: compute the (N, C, H, W) signs of every split this trial
    will score that no other process is computing right now, skipping the ones another process holds.

    Trials that start together (the first wave of a search, one per CPU) would otherwise queue on the first
    split's lock, one computing while the others wait idle; this way they split the splits between them, and
    the scoring that follows waits only for what another process is still finishing. Only with the ip cache on,
    ε > 0 and a disk cache shared between processes; the numbers are those of the reference path either way.
    Returns the number of splits whose signs this call computed.
    """
    if not (params.eps > 0 and ws.ip_cache and ws.disk is not None):
        return 0
    ev = _Evaluator(ws, spec, checkpoints, params)
    before = ws.counts["ipsign"]
    for split in _trial_splits(ev, spec):
        ws.claim_gradient_signs(*ev._sign_keys(split.key), _sign_maker(ev, split.load))
    return ws.counts["ipsign"] - before


def _sign_maker(ev: _Evaluator, load: Callable[[], tuple[DataKey, Dataset]]) -> Callable[[], Tensor]:
    return lambda: gradient_signs(ev.score, load()[1], ev.spec.batch_size, ev.ws.device)


def selection_metrics(
    ws: Workspace, spec: SearchSpec, checkpoints: Sequence[str], params: TrialParams, val_ood: str | None = None
) -> dict[str, Any]:
    """Validation metrics, the ONLY input to the objective; never any test data.

    Returns the metrics of the validation row plus ``objective`` (this row's share of what the
    sampler sees) and ``ood_dataset`` (the validation OOD side, per ``spec.protocol``; ``val_ood``
    picks one of several validation OOD sets, default the first).
    """
    ev = _Evaluator(ws, spec, checkpoints, params)
    id_side, *ood_sides = _selection_splits(ev, spec)
    id_val = id_side.load()
    if spec.protocol == "id-only":
        s_id, feats = ev.scores(*id_val), ev.features(*id_val)
        return {"objective": float(s_id.mean()), "ood_dataset": None, "n_id": len(s_id), "id_accuracy": id_accuracy(feats),
                "density_fit": ev.density_fit, "data_checksums": {**ev.fit_checksums, **ev.checksums(id_val[0])}}
    if spec.protocol == "adv-proxy":
        if ev.ensemble:
            raise ConfigError("protocol adv-proxy attacks one model: it cannot select ensemble scores")
        (side,) = ood_sides
    else:
        ood = val_ood or cast(tuple[str, ...], spec.val_ood)[0]  # protocol val-ood: SearchSpec requires val_ood
        side = next((s for s in ood_sides if s.name == ood), None) or ev.plain(ood, "val", ood)
    m = ev.compare(id_val, side.load())
    return {**m, "objective": m[spec.metric], "ood_dataset": side.name}


def selection_sets(spec: SearchSpec) -> list[str | None]:
    """The validation OOD sets of ``spec`` (``[None]``: the protocol's one selection row)."""
    return list(spec.val_ood or ()) if spec.protocol == "val-ood" else [None]


def aggregate_objective(spec: SearchSpec, per_set: Sequence[Sequence[float]]) -> float:
    """The sampler's objective from each validation set's per-member figures (sets x members).

    Each set's figures are averaged over the members (seeds); the sets are then combined by
    ``spec.val_agg``: ``mean``, or ``min`` = the worst set (the lowest AUROC / AUPRC, the highest FPR95),
    so that a configuration that fails on one kind of OOD cannot win on another.
    """
    means = [math.fsum(v) / len(v) for v in per_set]
    if spec.val_agg == "mean" or len(means) == 1:
        return math.fsum(means) / len(means)
    return max(means) if spec.mode == "min" else min(means)


def test_metrics(
    ws: Workspace, spec: SearchSpec, checkpoints: Sequence[str], params: TrialParams,
    kept: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Test metrics (ID test vs each test OOD set, and vs each attack): recorded, never used to select.

    ``kept``, when given, receives per set the (N_id,) ID test and (N_ood,) OOD scores (for paired comparisons).
    """
    ev = _Evaluator(ws, spec, checkpoints, params)
    id_side, *ood_sides = _test_splits(ev, spec)
    id_test = id_side.load()
    out = {}
    for side in ood_sides:
        name = cast(str, side.name)
        pair: list[tuple[Tensor, Tensor]] | None = [] if kept is not None else None
        out[name] = ev.compare(id_test, side.load(), pair)
        if kept is not None and pair:
            kept[name] = pair[0]
    return out


def test_score_arrays(
    ws: Workspace, spec: SearchSpec, checkpoints: Sequence[str], params: TrialParams
) -> dict[str, Tensor]:
    """Raw (N,) float64 scores of the ID test split (key ``"id"``) and of every test OOD set and
    attack (keyed by its ``ood_dataset`` name), for plots. Higher = more in-distribution."""
    ev = _Evaluator(ws, spec, checkpoints, params)
    id_side, *ood_sides = _test_splits(ev, spec)
    out = {"id": ev.scores(*id_side.load())}
    out.update({cast(str, side.name): ev.scores(*side.load()) for side in ood_sides})
    return out
