"""L-infinity attacks: budget and box respected, accuracy really drops, analytic FGSM, determinism, no side effects."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from densitune.errors import ConfigError, UnknownNameError
from densitune.search.ood.attacks import ATTACKS, AttackConfig, attack, attack_dataset, attack_names
from densitune.trainables.data import load_split
from densitune.trainables.train.config import TrainConfig
from densitune.trainables.train.loop import fit

EPS = 0.1  # on the 8x8 digits (16 grey levels, step 1/16) this budget costs the cnn 40-50 points of accuracy


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """The small cnn on digits, ~96 % test accuracy, trained once for this module (~2 s)."""
    *_, last = fit(TrainConfig(backbone="cnn", feature_dim=8, epochs=3))
    last.model.zero_grad(set_to_none=True)  # training leaves the last step's gradients behind
    return last.model.eval()


@pytest.fixture(scope="module")
def test_set():
    return load_split("digits", "test")


@pytest.fixture(scope="module")
def xy(test_set) -> tuple[Tensor, Tensor]:
    """The whole digits test split as tensors: x (359, 1, 8, 8) in [0, 1], y (359,)."""
    x = torch.stack([test_set[i][0] for i in range(len(test_set))])
    y = torch.stack([torch.as_tensor(test_set[i][1]) for i in range(len(test_set))])
    return x, y


@torch.no_grad()
def _acc(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def adversarial(model, test_set) -> dict[str, tuple[Tensor, Tensor]]:
    """Every registered attack at EPS on the whole test split, computed once: name -> (x_adv, y)."""
    return {name: attack_dataset(name, model, test_set, AttackConfig(eps=EPS)) for name in ATTACKS}


def test_registry_names():
    assert attack_names() == ["bim", "fgsm", "pgd"]


@pytest.mark.parametrize("name", ["fgsm", "bim", "pgd"])
def test_budget_box_and_order(name, adversarial, xy):
    x, y = xy
    x_adv, y_adv = adversarial[name]
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device.type == "cpu"
    assert torch.equal(y_adv, y)  # data set order kept
    assert float((x_adv - x).abs().max()) <= EPS + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert not x_adv.requires_grad
    # The budget is used: a sign step moves interior pixels by the full eps (digits are mostly 0 or 1, so pixels at
    # the box edge that are pushed outwards stay put; enough remain).
    assert float((x_adv - x).abs().max()) > EPS - 1e-6


@pytest.mark.parametrize("name", ["fgsm", "bim", "pgd"])
def test_accuracy_drops(name, model, adversarial, xy):
    clean = _acc(model, *xy)
    adv = _acc(model, *adversarial[name])
    assert clean > 0.9
    # Measured over training seeds 0-2: drops of 0.39-0.44 (fgsm) and 0.46-0.54 (bim, pgd).
    assert adv < clean - 0.3


def test_iterative_attacks_beat_fgsm(model, adversarial):
    fgsm_acc = _acc(model, *adversarial["fgsm"])
    # Measured: bim/pgd 6-9 points below fgsm at eps 0.1 over training seeds 0-2.
    assert _acc(model, *adversarial["bim"]) <= fgsm_acc
    assert _acc(model, *adversarial["pgd"]) <= fgsm_acc


@pytest.mark.parametrize("name", ["fgsm", "bim", "pgd"])
def test_deterministic_and_no_side_effects(name, model, xy):
    x, y = xy[0][:64], xy[1][:64]
    model.train()  # the attack must run in eval mode and give the mode back
    model.head.train(False)  # a mixed state is restored module by module
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = AttackConfig(eps=EPS, steps=5, seed=3)
    a = attack(name, model, x, y, cfg)
    b = attack(name, model, x, y, cfg)
    assert torch.equal(a, b)
    assert model.training and not model.head.training
    assert all(p.grad is None for p in model.parameters())
    # eval mode: batch-norm running statistics untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    assert torch.equal(attack(name, model, x, y, cfg), a)  # same result whatever the mode it was called in
    assert not x.requires_grad


def test_no_grad_context_and_existing_param_grads_untouched(model, xy):
    x, y = xy[0][:16], xy[1][:16]
    params = list(model.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    try:
        with torch.no_grad():
            x_adv = attack("pgd", model, x, y, AttackConfig(eps=EPS, steps=2))
        assert not torch.equal(x_adv, x)
        assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params)
    finally:
        for p in params:
            p.grad = None


def test_pgd_seed_changes_start_bim_does_not_use_it(model, xy):
    x, y = xy[0][:32], xy[1][:32]
    cfg0, cfg1 = AttackConfig(eps=EPS, steps=1, seed=0), AttackConfig(eps=EPS, steps=1, seed=1)
    assert not torch.equal(attack("pgd", model, x, y, cfg0), attack("pgd", model, x, y, cfg1))
    assert torch.equal(attack("bim", model, x, y, cfg0), attack("bim", model, x, y, cfg1))
    assert not torch.equal(attack("pgd", model, x, y, cfg0), attack("bim", model, x, y, cfg0))


def test_attack_dataset_matches_attack_whatever_the_batch_size(model, test_set, xy):
    x, y = xy
    cfg = AttackConfig(eps=EPS, steps=3, seed=7)
    whole = attack("pgd", model, x, y, cfg)
    x_adv, y_adv = attack_dataset("pgd", model, test_set, cfg, batch_size=100)
    # one random stream across batches: the same starts as one big batch; eval mode makes samples independent
    torch.testing.assert_close(x_adv, whole, atol=1e-6, rtol=0)
    assert torch.equal(y_adv, y)


class _Linear(nn.Module):
    """logits = W x_flat + b, so grad_x CE = W^T (softmax(logits) - onehot(y)) in closed form."""

    def __init__(self, w: Tensor, b: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)
        self.b = nn.Parameter(b)

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.w.T + self.b


def test_fgsm_matches_closed_form_and_bim_one_step_is_fgsm():
    g = torch.Generator().manual_seed(0)
    n, k, shape = 20, 3, (1, 4, 4)
    model = _Linear(torch.randn(k, 16, generator=g), torch.randn(k, generator=g))
    x = torch.rand(n, *shape, generator=g)
    x[:3] = 0.0  # box edges: moves outwards are clipped away
    x[3:6] = 1.0
    y = torch.randint(0, k, (n,), generator=g)
    eps = 0.05
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
        grad = ((p - nn.functional.one_hot(y, k)) @ model.w).reshape(n, *shape)
        expected = (x + eps * grad.sign()).clamp(0, 1)
    fg = attack("fgsm", model, x, y, AttackConfig(eps=eps))
    torch.testing.assert_close(fg, expected, atol=1e-7, rtol=0)
    # BIM with one step of size eps from x is FGSM exactly (Kurakin et al.'s iteration starts as FGSM).
    assert torch.equal(attack("bim", model, x, y, AttackConfig(eps=eps, steps=1, step_size=eps)), fg)
    # FGSM raises the loss of a linear model (first-order exact along the sign direction for small eps)
    ce = nn.functional.cross_entropy
    with torch.no_grad():
        assert float(ce(model(fg), y)) > float(ce(model(x), y))


def test_large_steps_are_projected():
    """A step size far beyond eps still ends inside the ball and the box."""
    g = torch.Generator().manual_seed(1)
    model = _Linear(torch.randn(4, 9, generator=g), torch.zeros(4))
    x = torch.rand(10, 1, 3, 3, generator=g)
    y = torch.randint(0, 4, (10,), generator=g)
    for name in ATTACKS:
        x_adv = attack(name, model, x, y, AttackConfig(eps=0.03, steps=4, step_size=1.0, seed=2))
        assert float((x_adv - x).abs().max()) <= 0.03 + 1e-6
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_config_defaults_and_validation():
    cfg = AttackConfig()
    assert cfg.eps == pytest.approx(8 / 255) and cfg.steps == 10 and cfg.seed == 0
    assert cfg.alpha == pytest.approx(2.5 * (8 / 255) / 10)  # Madry et al.'s step size
    assert AttackConfig(eps=0.1, step_size=0.01).alpha == 0.01
    for bad in (dict(eps=0.0), dict(eps=-0.1), dict(eps=math.nan), dict(eps=math.inf), dict(steps=0),
                dict(steps=-3), dict(steps=2.5), dict(step_size=0.0), dict(step_size=-1.0)):
        with pytest.raises(ConfigError):
            AttackConfig(**bad)


def test_unknown_name_lists_known(model, test_set, xy):
    x, y = xy[0][:2], xy[1][:2]
    with pytest.raises(UnknownNameError, match="fgsm"):
        attack("cw", model, x, y, AttackConfig())
    with pytest.raises(UnknownNameError, match="pgd"):
        attack_dataset("cw", model, test_set, AttackConfig())


def test_rejects_inputs_outside_pixel_space(model, xy):
    x, y = xy[0][:2], xy[1][:2]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attack("fgsm", model, x * 2 - 0.5, y, AttackConfig())
