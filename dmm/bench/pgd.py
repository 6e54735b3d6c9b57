"""[pgd] ``dmm.attacks.pgd`` against the floor of its own gradient steps, other libraries, and early stopping.

The floor is a hand-written loop doing only what every PGD step must do: a forward pass, the loss and
``torch.autograd.grad`` with respect to the input, ``steps`` times on the same model and batch. What PGD
costs above it is its ball geometry (step, projection, clamp). Timing does not depend on the weights,
so the MNIST CNN keeps its random initialisation unless ``--classifier`` is given; early stopping does,
so it is measured on a model that classifies: the given checkpoint or an MLP trained for a few steps.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dmm.attacks import PGD
from dmm.bench.core import Options, Row, Target, median, peak_memory_mb, repeat_times
from dmm.bench.inputs import classifier, images

EPS = {"l2": 2.0, "linf": 0.3}  # the usual MNIST budgets; timing without early stop does not depend on them
FLOOR_TARGET = Target(1.05)


@dataclass(frozen=True)
class Sizes:
    batch: int = 128
    steps: int = 40
    repeats: int = 5
    train_steps: int = 200


FULL, QUICK = Sizes(), Sizes(batch=8, steps=3, repeats=2, train_steps=10)


def gradient_floor(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> None:
    """``steps`` × (forward, summed cross-entropy, gradient w.r.t. the input): no step, no projection."""
    with torch.enable_grad():
        for _ in range(steps):
            x_in = x.detach().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(x_in), y, reduction="sum"), x_in)


class RowCounter(nn.Module):
    """Wraps a model and counts the images it is asked to classify."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x: Tensor) -> Tensor:
        self.rows += x.shape[0]
        return self.model(x)


def _library_attack(library: str, model: nn.Module, norm: str, eps: float, steps: int):
    """``attack(x, y)`` with the same budget, step size and start as ours, or None when not installed."""
    if importlib.util.find_spec(library) is None:
        return None
    lib = importlib.import_module(library)
    alpha = 2.5 * eps / steps
    if library == "torchattacks":
        cls = lib.PGDL2 if norm == "l2" else lib.PGD
        return cls(model, eps=eps, alpha=alpha, steps=steps, random_start=False)
    fmodel = lib.PyTorchModel(model, bounds=(0, 1))
    attack = (lib.attacks.L2PGD if norm == "l2" else lib.attacks.LinfPGD)(
        abs_stepsize=alpha, steps=steps, random_start=False
    )
    return lambda x, y: attack(fmodel, x, y, epsilons=eps)


def _trained_classifier(opts: Options, steps: int) -> tuple[nn.Module, str]:
    """The given checkpoint, else the configured MNIST MLP after ``steps`` Adam steps of batch 128: a model that
    classifies, so early-stopped attacks succeed gradually instead of at step 0."""
    if opts.classifier is not None:
        return classifier(opts)
    torch.manual_seed(0)
    model, _ = classifier(opts, config="classifier_mlp")
    model.train().requires_grad_(True)
    x, y, source = images(opts, 128 * steps, split="train")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for i in range(steps):
        loss = F.cross_entropy(model(x[128 * i : 128 * (i + 1)]), y[128 * i : 128 * (i + 1)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False), f"MNIST MLP trained {steps} steps on {source}"


def run(opts: Options) -> list[Row]:
    sizes = QUICK if opts.quick else FULL
    model, weights = classifier(opts)
    x, y, source = images(opts, sizes.batch)
    setting = f"{type(model.network).__name__}, {weights}, batch {sizes.batch} of {source}, {sizes.steps} steps"
    rows = []
    for norm, eps in EPS.items():

        def ours(norm=norm, eps=eps):
            return PGD(eps=eps, norm=norm, steps=sizes.steps)(model, x, y)

        fns = {"ours": ours, "floor": lambda: gradient_floor(model, x, y, sizes.steps)}
        libraries = {name: _library_attack(name, model, norm, eps, sizes.steps) for name in ("torchattacks", "foolbox")}
        fns.update({name: functools.partial(attack, x, y) for name, attack in libraries.items() if attack})
        samples = repeat_times(fns, repeats=sizes.repeats, device=opts.device)
        t_ours, peak = median(samples["ours"]), peak_memory_mb(ours, opts.device)
        t_floor = median(samples["floor"])
        rows.append(
            Row(
                f"pgd/{norm} vs floor",
                t_ours,
                reference=t_floor,
                ratio=t_ours / t_floor,
                target=FLOOR_TARGET,
                peak_mb=peak,
                note=f"floor = {sizes.steps} × (forward + input gradient); {setting}",
                samples={"ours": samples["ours"], "floor": samples["floor"]},
            )
        )
        for name, attack in libraries.items():
            if attack is None:
                rows.append(Row(f"pgd/{norm} vs {name}", t_ours, peak_mb=peak, note=f"{name} not installed"))
                continue
            t_lib = median(samples[name])
            rows.append(
                Row(
                    f"pgd/{norm} vs {name}",
                    t_ours,
                    reference=t_lib,
                    ratio=t_ours / t_lib,
                    peak_mb=peak,
                    note=f"same eps, step size, steps, no random start; {setting}",
                    samples={"ours": samples["ours"], name: samples[name]},
                )
            )
    rows.append(_early_stop_row(opts, sizes))
    return rows


def _early_stop_row(opts: Options, sizes: Sizes) -> Row:
    model, weights = _trained_classifier(opts, sizes.train_steps)
    x, y, source = images(opts, sizes.batch)
    eps = EPS["l2"]
    fns = {
        "early_stop": lambda: PGD(eps=eps, steps=sizes.steps, early_stop=True)(model, x, y),
        "all_steps": lambda: PGD(eps=eps, steps=sizes.steps)(model, x, y),
    }
    samples = repeat_times(fns, repeats=sizes.repeats, device=opts.device)
    counted = {}
    for name, early_stop in (("early_stop", True), ("all_steps", False)):
        counter = RowCounter(model)
        PGD(eps=eps, steps=sizes.steps, early_stop=early_stop)(counter, x, y)
        counted[name] = counter.rows
    t_es, t_all = median(samples["early_stop"]), median(samples["all_steps"])
    saved = 1 - counted["early_stop"] / counted["all_steps"]
    return Row(
        "pgd/l2 early stop vs all steps",
        t_es,
        reference=t_all,
        ratio=t_es / t_all,
        peak_mb=peak_memory_mb(fns["early_stop"], opts.device),
        note=(
            f"images classified {counted['early_stop']} vs {counted['all_steps']} ({saved:.0%} saved); "
            f"eps {eps:g}, {weights}, batch {sizes.batch} of {source}, {sizes.steps} steps"
        ),
        samples=samples,
    )
