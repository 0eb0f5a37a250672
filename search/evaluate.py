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
from typing import Any, cast

from torch import Tensor
from torch.utils.data import Dataset

from densitune.errors import ConfigError
from densitune.search.cache import checkpoint_token
from densitune.search.ood.scores import Score, create_score, score_class
from densitune.search.scoring import Features, detection_metrics, gradient_signs, id_accuracy, score_inputs, score_signed
from densitune.search.space import TrialParams
from densitune.search.spec import SearchSpec
from densitune.search.workspace import Workspace, workspace
from densitune.trainables.data import load_split

log = logging.getLogger(__name__)

__all__ = ["Features", "TrialParams", "Workspace", "workspace", "claim_gradient_signs", "selection_metrics", "selection_sets", "aggregate_objective", "test_metrics", "test_score_arrays"]


class _Evaluator:
    """Scores data for one trial on one model (or, for ensembles, on every seed of a group)."""

    def __init__(self, ws: Workspace, spec: SearchSpec, checkpoints: Sequence[str], params: TrialParams) -> None:
        self.ws, self.spec, self.checkpoints, self.params = ws, spec, list(checkpoints), params
        first = ws.model(self.checkpoints[0])
        # Data sets come from the search's data root, else the one the network was trained from.
        self.data_root = spec.data_root or first.config.data_root
        self.shape = tuple(first.data["shape"])
        self.id_name = first.data["name"]
        self.data_seed = int(first.data.get("data_seed", 0))
        density = None
        self.fit_checksums: dict[str, str] = {}  # of the split the density was fitted on
        self.train_key: tuple = ()  # names the density's training split (part of the gradient-sign keys)
        self._scored: dict[tuple, Tensor] = {}  # each split scored once per trial
        if score_class(params.score).uses_density:
            (ckpt,) = self.checkpoints
            train_key, train_data = self.split(self.id_name, "train", limit=None)
            self.train_key = train_key
            train = self.features(train_key, train_data)
            density = ws.density(ckpt, params.density, params.density_params, train[0], train_key)
            self.fit_checksums = self.checksums(train_key)
        self.score: Score = create_score(params.score, [ws.model(c).model for c in self.checkpoints], density)
        self.density_fit = density.describe()["density_fit"] if density is not None else None

    def checksums(self, *keys: tuple) -> dict[str, str]:
        """``{"<data set>/<split>": checksum}`` of the splits named by data keys (an attacked set: its ID split)."""
        out = {}
        for key in keys:
            key = key[3:] if key[0] == "adv" else key  # ("adv", attack, cfg, *id_key)
            out[f"{key[0]}/{key[1]}"] = self.ws.checksum(key)
        return out

    def split_key(self, name: str, split: str, limit: int | None = -1) -> tuple:
        """The data key of a split (what :meth:`split` caches it under), without loading it."""
        limit = self.spec.eval_limit if limit == -1 else limit
        return (name, split, self.shape, self.data_root, self.data_seed, limit)

    def split(self, name: str, split: str, limit: int | None = -1) -> tuple[tuple, Dataset]:
        key = self.split_key(name, split, limit)
        limit = key[-1]
        make = lambda: load_split(name, split, root=self.data_root, seed=self.data_seed, shape=self.shape, limit=limit)  # noqa: E731
        return key, self.ws.data(key, make)

    def adversarial_key(self, attack: str, split: str = "test", eps: float | None = None) -> tuple:
        """The data key of an attacked split (what :meth:`adversarial` caches it under), without attacking."""
        from densitune.search.ood.attacks import AttackConfig

        cfg = AttackConfig(eps=self.spec.attack_eps if eps is None else eps, steps=self.spec.attack_steps)
        return ("adv", attack, cfg, *self.split_key(self.id_name, split))

    def adversarial(self, attack: str, split: str = "test", eps: float | None = None) -> tuple[tuple, Dataset]:
        """An ID split attacked (L∞, budget ``eps``, default the spec's) against this trial's single model."""
        from densitune.search.ood.attacks import attack_dataset

        (ckpt,) = self.checkpoints
        id_key, id_data = self.split(self.id_name, split)
        key = self.adversarial_key(attack, split, eps)
        cfg = key[2]

        def make() -> tuple[Tensor, Tensor]:
            model = self.ws.model(ckpt).model
            return attack_dataset(attack, model, id_data, cfg, batch_size=self.spec.batch_size, device=self.ws.device)

        return key, self.ws.attacked(ckpt, key, make)

    def features(self, key: tuple, data: Dataset) -> list[Features]:
        return [self.ws.features(c, key, data, self.spec.batch_size) for c in self.checkpoints]

    def scores(self, key: tuple, data: Dataset) -> Tensor:
        """(N,) float64 scores of a data set with this trial's ε.

        Scored once per trial: the ID test side is reused by every test OOD set and attack. The clean features
        are extracted only where they are used: for ε = 0 (scores from features) and, by the callers, on the
        ID side (its accuracy); an OOD split scored with ε > 0 never needs them."""
        if key not in self._scored:
            feats = self.features(key, data) if self.params.eps == 0 else []
            self._scored[key] = self._score_split(key, data, feats)
        return self._scored[key]

    def _score_split(self, key: tuple, data: Dataset, feats: list[Features]) -> Tensor:
        """ε > 0 with the workspace's ip cache: from the split's cached gradient signs (one forward pass per
        batch, the same numbers); otherwise :func:`score_inputs` (the reference path)."""
        bs, device = self.spec.batch_size, self.ws.device
        if self.params.eps > 0 and self.ws.ip_cache:
            signs = self.ws.gradient_signs(*self._sign_keys(key), lambda: gradient_signs(self.score, data, bs, device))
            return score_signed(self.score, data, self.params.eps, signs, bs, device)
        return score_inputs(self.score, data, self.params.eps, feats, bs, device)

    def _sign_keys(self, key: tuple) -> tuple[tuple, str]:
        """(memory key, disk key) of a split's gradient signs: models, score, density and its parameters (and
        the split it was fitted on), the data split, the batch size and the device type; not ε."""
        p = self.params
        ident = (p.score, p.density, p.density_params, self.train_key, key, self.spec.batch_size, self.ws.device.type)
        disk = "|".join(checkpoint_token(c) for c in self.checkpoints) + f"|{ident!r}"
        return (tuple(self.checkpoints), *ident), disk

    def compare(
        self, id_split: tuple[tuple, Dataset], ood_split: tuple[tuple, Dataset], kept: list[tuple[Tensor, Tensor]] | None = None
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


def _trial_splits(ev: _Evaluator, spec: SearchSpec) -> list[tuple[tuple, Callable[[], Dataset]]]:
    """(data key, loader) of every split a trial scores, in the order it scores them: ID val and the selection
    side (:func:`selection_metrics`), then ID test, the test OOD sets and the attacks (:func:`test_metrics`)."""
    def plain(name: str, split: str) -> tuple[tuple, Callable[[], Dataset]]:
        return ev.split_key(name, split), lambda: ev.split(name, split)[1]

    def attacked(attack: str, split: str, eps: float | None = None) -> tuple[tuple, Callable[[], Dataset]]:
        return ev.adversarial_key(attack, split, eps), lambda: ev.adversarial(attack, split, eps)[1]

    out = [plain(ev.id_name, "val")]
    if spec.protocol == "val-ood":
        out += [plain(cast(str, ood), "val") for ood in selection_sets(spec)]
    elif spec.protocol == "adv-proxy" and not ev.score.ensemble:
        out.append(attacked(spec.proxy_attack, "val", spec.proxy_eps))
    out.append(plain(ev.id_name, "test"))
    out += [plain(ood, "test") for ood in spec.test_ood]
    if not ev.score.ensemble:
        out += [attacked(attack, "test") for attack in spec.attacks]
    return out


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
    for key, load in _trial_splits(ev, spec):
        ws.claim_gradient_signs(*ev._sign_keys(key), _sign_maker(ev, load))
    return ws.counts["ipsign"] - before


def _sign_maker(ev: _Evaluator, load: Callable[[], Dataset]) -> Callable[[], Tensor]:
    return lambda: gradient_signs(ev.score, load(), ev.spec.batch_size, ev.ws.device)


def selection_metrics(
    ws: Workspace, spec: SearchSpec, checkpoints: Sequence[str], params: TrialParams, val_ood: str | None = None
) -> dict[str, Any]:
    """Validation metrics, the ONLY input to the objective; never any test data.

    Returns the metrics of the validation row plus ``objective`` (this row's share of what the
    sampler sees) and ``ood_dataset`` (the validation OOD side, per ``spec.protocol``; ``val_ood``
    picks one of several validation OOD sets, default the first).
    """
    ev = _Evaluator(ws, spec, checkpoints, params)
    id_val = ev.split(ev.id_name, "val")
    if spec.protocol == "id-only":
        s_id, feats = ev.scores(*id_val), ev.features(*id_val)
        return {"objective": float(s_id.mean()), "ood_dataset": None, "n_id": len(s_id), "id_accuracy": id_accuracy(feats),
                "density_fit": ev.density_fit, "data_checksums": {**ev.fit_checksums, **ev.checksums(id_val[0])}}
    if spec.protocol == "adv-proxy":
        if ev.score.ensemble:
            raise ConfigError("protocol adv-proxy attacks one model: it cannot select ensemble scores")
        m = ev.compare(id_val, ev.adversarial(spec.proxy_attack, "val", spec.proxy_eps))
        ood = f"proxy-{spec.proxy_attack}"
    else:
        ood = val_ood or cast(tuple[str, ...], spec.val_ood)[0]  # protocol val-ood: SearchSpec requires val_ood
        m = ev.compare(id_val, ev.split(ood, "val"))
    return {**m, "objective": m[spec.metric], "ood_dataset": ood}


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


def _test_sets(ev: _Evaluator, spec: SearchSpec) -> list[tuple[str, tuple[tuple, Dataset]]]:
    """(name, split) of every test OOD set, and of every attack (``adv-<attack>``) for single-model scores."""
    sets = [(ood, ev.split(ood, "test")) for ood in spec.test_ood]
    if not ev.score.ensemble:  # an ensemble has no one model to attack
        sets += [(f"adv-{attack}", ev.adversarial(attack)) for attack in spec.attacks]
    return sets


def test_metrics(
    ws: Workspace, spec: SearchSpec, checkpoints: Sequence[str], params: TrialParams,
    kept: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Test metrics (ID test vs each test OOD set, and vs each attack): recorded, never used to select.

    ``kept``, when given, receives per set the (N_id,) ID test and (N_ood,) OOD scores (for paired comparisons).
    """
    ev = _Evaluator(ws, spec, checkpoints, params)
    id_test = ev.split(ev.id_name, "test")
    out = {}
    for name, split in _test_sets(ev, spec):
        pair: list[tuple[Tensor, Tensor]] | None = [] if kept is not None else None
        out[name] = ev.compare(id_test, split, pair)
        if kept is not None and pair:
            kept[name] = pair[0]
    return out


def test_score_arrays(
    ws: Workspace, spec: SearchSpec, checkpoints: Sequence[str], params: TrialParams
) -> dict[str, Tensor]:
    """Raw (N,) float64 scores of the ID test split (key ``"id"``) and of every test OOD set and
    attack (keyed by its ``ood_dataset`` name), for plots. Higher = more in-distribution."""
    ev = _Evaluator(ws, spec, checkpoints, params)
    out = {"id": ev.scores(*ev.split(ev.id_name, "test"))}
    out.update({name: ev.scores(*split) for name, split in _test_sets(ev, spec)})
    return out
