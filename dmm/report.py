"""From run folders to a reproduction report: figures with bootstrap CIs, a careful evaluation's checks, plots.

``python -m dmm.report RUN_DIR [RUN_DIR ...] --out REPORT_DIR`` reads each run's latest
``decomposition/{stage}-epoch{N}.json`` and its per-sample ``.pt`` file and writes ``report.md``,
``report.json`` (every figure of the markdown) and PNG plots into REPORT_DIR, then prints the summary
table (:func:`markdown_table`) on stdout.

Statistics: percentile bootstrap over images, one (resamples, N) index tensor per run shared by every
figure of that run (so paired quantities such as on-fraction minus random baseline are resampled together),
with the same definitions as :func:`dmm.decomposition.summarize` (medians are lower medians, as
``torch.median``). The public replication's figures are constants of the literature shown beside ours;
they never enter a computation.

Checks follow Carlini et al., "On Evaluating Adversarial Robustness" (2019) and auto-attack's
``checks.py``: they print PASS or WARN and never stop the report.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import logging
import math
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor

from dmm.decomposition import ATTACKS
from dmm.errors import DmmError
from dmm.io import atomic_write

log = logging.getLogger("dmm.report")

LEVEL = 0.95
ATTACK_NAMES = {"full": "unconstrained", "on": "on-manifold", "off": "off-manifold"}
PUBLIC_REPLICATION = {
    "label": "public replication, 20 images",
    "note": "figures of the literature, shown for reference only and never used to compute ours",
    "dataset": "MNIST",
    "l2": {"full": 0.28, "on": 0.85, "off": 0.31},
    "sqrt_k_over_n": {"k": 16, "n": 784, "value": 0.143},
}
REQUIRED_RECORDS = ["correct", "on_fraction", "random_fraction", "on_part_fools", "off_part_fools"]
REQUIRED_RECORDS += [f"{a}_{s}" for a in ATTACKS for s in ("success", "l2", "linf")] + ["leak_on", "leak_off"]


# ----------------------------------------------------------------------------------------- bootstrap
def resample_indices(n: int, resamples: int, seed: int) -> Tensor:
    """(resamples, n) int64 indices drawn with replacement: row b is bootstrap sample b of n images."""
    return torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))


def rate(hits: Tensor, among: Tensor) -> Tensor:
    """hits.sum / among.sum over the last dim (NaN where ``among`` is empty); bool (..., N) -> (...)."""
    den = among.sum(-1).double()
    return torch.where(den > 0, hits.sum(-1).double() / den.clamp_min(1), math.nan)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` over the last dim; (..., N) -> (...), NaN where mask is empty."""
    count = mask.sum(-1)
    total = torch.where(mask, values.double(), 0.0).sum(-1)
    return torch.where(count > 0, total / count.clamp_min(1), math.nan)


def masked_median(values: Tensor, mask: Tensor) -> Tensor:
    """Lower median (as ``torch.median``) where ``mask`` over the last dim; (..., N) -> (...), NaN if empty."""
    count = mask.sum(-1)
    ordered = torch.where(mask, values.double(), math.inf).sort(dim=-1).values  # masked-out values last
    lower = torch.div(count - 1, 2, rounding_mode="floor").clamp_min(0)  # index of the lower middle value
    middle = ordered.gather(-1, lower.unsqueeze(-1)).squeeze(-1)
    return torch.where(count > 0, middle, math.nan)


def bootstrap(statistic, columns: list[Tensor], indices: Tensor, level: float = LEVEL) -> dict:
    """Point estimate and percentile CI of ``statistic(*columns)`` over resampled images.

    Args:
        statistic: reduces the last dim of its (..., N) arguments, e.g. :func:`masked_median`.
        columns: per-image tensors (N,), resampled together (paired).
        indices: (resamples, N) from :func:`resample_indices`.
        level: coverage of the interval; its ends are the lower/higher order statistics of the resamples
            where the statistic is defined (no interpolation).

    Returns:
        ``{"value": float, "ci": [low, high]}``; NaN where undefined (no image in the subset).
    """
    point = statistic(*columns)
    replicates = statistic(*(c[indices] for c in columns))  # (resamples,)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=replicates.dtype)
    low = torch.nanquantile(replicates, q[0], interpolation="lower")
    high = torch.nanquantile(replicates, q[1], interpolation="higher")
    return {"value": float(point), "ci": [float(low), float(high)]}


def random_subspace_expectation(k: int, n: int) -> float:
    """E ||P u|| for u uniform on the unit sphere of R^n and P a rank-k orthogonal projector (≈ sqrt(k/n))."""
    log_e = math.lgamma((k + 1) / 2) + math.lgamma(n / 2) - math.lgamma(k / 2) - math.lgamma((n + 1) / 2)
    return math.exp(log_e)


# ------------------------------------------------------------------------------------------ run files
@dataclass
class Run:
    """One run folder's decomposition results and the files they came from."""

    folder: Path
    label: str
    json_path: Path
    payload: dict
    records: dict[str, Tensor]
    config: dict


def _command_hint(folder: Path, stage: str) -> str:
    command = "test" if stage == "test" else "validate"
    return (
        f"make them with `dmm {command} --config configs/<dataset>/classifier.yaml --ckpt_path "
        f"{folder}/checkpoints/last.ckpt --decomposition.autoencoder <autoencoder run>/checkpoints/last.ckpt`"
    )


def load_run(folder: str | Path, stage: str) -> Run:
    """Read the latest ``{stage}`` decomposition of a run folder.

    Raises:
        DmmError: no folder, no results of that stage, or results that are truncated or malformed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DmmError(f"run folder {folder} not found")
    pattern = re.compile(rf"^{stage}-epoch(\d+)\.json$")
    found = sorted(
        (int(m.group(1)), p) for p in (folder / "decomposition").glob("*.json") if (m := pattern.match(p.name))
    )
    if not found:
        config_text = (folder / "config.yaml").read_text() if (folder / "config.yaml").is_file() else ""
        if re.search(r"class_path: \S*Autoencoder", config_text):
            raise DmmError(
                f"{folder} is an autoencoder run: pass it as --decomposition.autoencoder "
                f"{folder}/checkpoints/last.ckpt to `dmm test` and report the classifier's run folder"
            )
        other = "val" if stage == "test" else "test"
        also = (
            f" (it has {other} results: pass --stage {other})"
            if list((folder / "decomposition").glob(f"{other}-epoch*.json"))
            else ""
        )
        raise DmmError(
            f"run folder {folder} has no {stage} decomposition results (decomposition/{stage}-epoch*.json){also}; "
            + _command_hint(folder, stage)
        )
    json_path = found[-1][1]
    samples_path = json_path.with_name(json_path.stem + "-samples.pt")
    try:
        payload = json.loads(json_path.read_text())
        records = torch.load(samples_path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise DmmError(
            f"{samples_path} is missing (it is written beside {json_path.name}); " + _command_hint(folder, stage)
        ) from None
    except Exception as error:  # json and torch raise many types for truncated or foreign files
        raise DmmError(
            f"cannot read {json_path} or its samples file ({type(error).__name__}: {error}); "
            + _command_hint(folder, stage)
        ) from None
    missing = [k for k in ("settings", "eps_curve", "latent_dim", "input_shape", "summary") if k not in payload]
    missing += [k for k in REQUIRED_RECORDS if k not in records]
    if missing or len({records[k].shape for k in REQUIRED_RECORDS}) != 1 or records["correct"].dim() != 1:
        raise DmmError(
            f"{json_path} or its samples file is malformed (missing {missing or 'nothing'}, "
            "or per-sample tensors of unequal shapes); " + _command_hint(folder, stage)
        )
    config_path = folder / "config.yaml"
    try:
        config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    except yaml.YAMLError as error:
        raise DmmError(f"{config_path} is not valid YAML ({error}); it is the config `dmm` saved for the run") from None
    return Run(folder, folder.name, json_path, payload, records, config or {})


def _origins(run: Run) -> list[Path]:
    """Folders that relative paths in the run's config may be relative to, most likely first.

    The CLI writes paths relative to the directory it ran in; when ``trainer.default_root_dir`` is
    relative and the run folder ends with it, that directory is known exactly.
    """
    bases = []
    root = ((run.config.get("trainer") or {}).get("default_root_dir")) or ""
    parts, resolved = Path(root).parts, run.folder.resolve().parts
    if root and not Path(root).is_absolute() and ".." not in parts and resolved[-len(parts) :] == parts:
        bases.append(Path(*resolved[: -len(parts)]))
    return bases + [Path.cwd(), *run.folder.resolve().parents]


def _resolve(path: str | None, run: Run) -> Path | None:
    if not path:
        return None
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [base / p for base in _origins(run)]
    return next((c for c in candidates if c.exists()), None)


def _class_name(spec) -> str:
    """``dmm.nets.MLP`` -> ``MLP`` for a class_path dict or string; "n/a" when absent."""
    path = spec.get("class_path") if isinstance(spec, dict) else spec
    return str(path).rsplit(".", 1)[-1] if path else "n/a"


def _import(class_path: str, default_module: str):
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module or default_module), name)
    except (ImportError, AttributeError):
        return getattr(importlib.import_module(default_module), name)


def _float(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def autoencoder_facts(run: Run) -> dict:
    """Types, latent size and reconstruction MSE of the run's autoencoder ("n/a" where not found)."""
    path = _resolve(run.payload.get("autoencoder"), run)
    facts = {
        "checkpoint": run.payload.get("autoencoder"),
        "class": "n/a",
        "encoder": "n/a",
        "decoder": "n/a",
        "latent_dim": run.payload["latent_dim"],
        "extra": {},
        "mse": None,
        "mse_source": "n/a",
    }
    if path is None:
        facts["mse_source"] = "n/a (autoencoder checkpoint not found)"
        return facts
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # replaced or truncated since the run: the report goes on without its facts
        facts["mse_source"] = f"n/a (cannot read {path}: {type(error).__name__})"
        return facts
    hp = checkpoint.get("hyper_parameters", {})
    facts.update(checkpoint=str(path), **{k: _class_name(hp.get(k)) for k in ("encoder", "decoder")})
    facts["class"] = _class_name(hp.get("_class_path"))
    known = {
        "encoder",
        "decoder",
        "input_shape",
        "latent_dim",
        "num_classes",
        "geometry_samples",
        "optimizer",
        "scheduler",
    }
    facts["extra"] = {
        k: v
        for k, v in hp.items()
        if k not in known and not k.startswith("_") and isinstance(v, (int, float, str, bool))
    }
    # 1) the monitored MSE when this very checkpoint was written (ModelCheckpoint state).
    for state in (checkpoint.get("callbacks") or {}).values():
        monitor = str(state.get("monitor") if isinstance(state, dict) else "")
        if "mse" in monitor and _float(state.get("current_score")) is not None:
            facts["mse"], facts["mse_source"] = _float(state["current_score"]), f"{monitor} at this checkpoint"
            return facts
    # 2) the last logged test/val MSE of the autoencoder's run folder (metrics.csv, then W&B summary).
    folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    for key in ("test/mse", "val/mse"):
        if (folder / "metrics.csv").is_file():
            with open(folder / "metrics.csv", newline="") as f:
                values = [_float(row.get(key)) for row in csv.DictReader(f)]
            if values := [v for v in values if v is not None]:
                facts["mse"], facts["mse_source"] = values[-1], f"last {key} in {folder.name}/metrics.csv"
                return facts
        for summary in sorted(folder.glob("wandb/*/files/wandb-summary.json")):
            if (value := _float(json.loads(summary.read_text()).get(key))) is not None:
                facts["mse"], facts["mse_source"] = value, f"{key} in the W&B summary of {folder.name}"
                return facts
    return facts


# ------------------------------------------------------------------------------------------ figures
def run_figures(run: Run, resamples: int, seed: int) -> dict:
    """Every figure of one run, each ``{"value", "ci"}``, recomputed from the per-sample records."""
    r = run.records
    settings, eps_curve = run.payload["settings"], run.payload["eps_curve"]
    correct = r["correct"].bool()
    n_images = correct.numel()
    idx = resample_indices(n_images, resamples, seed)
    everyone = torch.ones_like(correct)
    full_ok = r["full_success"].bool()
    attacks = {}
    for a in ATTACKS:
        ok = r[f"{a}_success"].bool()
        attacks[a] = {
            "successes": int(ok.sum()),
            "success_rate": bootstrap(rate, [ok, correct], idx),
            "l2_median": bootstrap(masked_median, [r[f"{a}_l2"], ok], idx),
            "l2_mean": bootstrap(masked_mean, [r[f"{a}_l2"], ok], idx),
            "linf_median": bootstrap(masked_median, [r[f"{a}_linf"], ok], idx),
        }
    k, n = int(run.payload["latent_dim"]), math.prod(run.payload["input_shape"])
    fractions = {
        f"{key}_{stat}": bootstrap(fn, [r[key], full_ok], idx)
        for key in ("on_fraction", "random_fraction")
        for stat, fn in (("mean", masked_mean), ("median", masked_median))
    }
    fractions["on_minus_random_mean"] = bootstrap(masked_mean, [r["on_fraction"] - r["random_fraction"], full_ok], idx)
    needed = r[f"full_{settings['norm']}"]
    # Budgets above the largest norm the attack could reach were never tried: the curve stops there.
    reach = min(float(settings["eps"]), _reach(settings))
    budgets = sorted({0.0, reach, *(float(e) for e in eps_curve if e <= reach + 1e-9)})
    curve = []
    for eps in budgets:
        robust = correct & ~(full_ok & (needed <= eps + 1e-6))  # the rule of dmm.decomposition.summarize
        curve.append({"eps": eps, **bootstrap(rate, [robust, everyone], idx)})
    bins = torch.linspace(0, 1, 21)
    return {
        "num_images": n_images,
        "num_correct": int(correct.sum()),
        "clean_acc": bootstrap(rate, [correct, everyone], idx),
        "attacks": attacks,
        "fractions": fractions,
        "k": k,
        "n": n,
        "sqrt_k_over_n": math.sqrt(k / n),
        "random_expectation": random_subspace_expectation(k, n),
        "part_fools": {p: bootstrap(rate, [r[f"{p}_part_fools"].bool(), full_ok], idx) for p in ("on", "off")},
        "leak": {
            f"{p}_{stat}": bootstrap(fn, [r[f"leak_{p}"], correct], idx)
            for p in ("on", "off")
            for stat, fn in (("mean", masked_mean), ("median", masked_median))
        },
        "robust_accuracy": curve,
        "curve_left_out": sorted(float(e) for e in eps_curve if e > reach + 1e-9),
        "histogram": {
            "edges": bins.tolist(),
            "on_fraction": torch.histogram(r["on_fraction"][full_ok].float(), bins).hist.long().tolist(),
            "random_fraction": torch.histogram(r["random_fraction"][full_ok].float(), bins).hist.long().tolist(),
        },
    }


def _reach(settings: dict) -> float:
    """The largest norm the attack can reach: steps x step size (each PGD step moves at most one step size)."""
    step = settings["step_size"] if settings["step_size"] is not None else 2.5 * settings["eps"] / settings["steps"]
    return settings["steps"] * step


# ------------------------------------------------------------------------------------------ checks
def _check(name: str, passed: bool, detail: str, advice: str = "") -> dict:
    """One PASS/WARN line; ``advice`` (what a WARN means or what to do) is shown only on WARN."""
    if not passed and advice:
        detail += f": {advice}"
    return {"name": name, "status": "PASS" if passed else "WARN", "detail": detail}


def run_checks(run: Run, fig: dict) -> list[dict]:
    """Checks that need only the recorded samples."""
    s, curve, clean = run.payload["settings"], fig["robust_accuracy"], fig["clean_acc"]["value"]
    rises = [(a["eps"], b["eps"]) for a, b in zip(curve, curve[1:], strict=False) if b["value"] > a["value"] + 1e-12]
    full = fig["attacks"]["full"]["success_rate"]["value"]
    logged = run.payload["summary"]
    ours = {"clean_acc": clean, **{f"robust_acc@{p['eps']:g}": p["value"] for p in curve}}
    for a in ATTACKS:
        ours[f"{a}/success_rate"] = fig["attacks"][a]["success_rate"]["value"]
        ours[f"{a}/l2_median"] = fig["attacks"][a]["l2_median"]["value"]
    differ = [key for key, value in ours.items() if key in logged and not _close(value, logged[key])]
    baseline, expected = fig["fractions"]["random_fraction_mean"], fig["random_expectation"]
    return [
        _check(
            "success rises with eps",
            not rises,
            f"robust accuracy {'increases between eps ' + str(rises) if rises else 'never increases with eps'}",
            "the curve cannot come from one early-stopped attack run",
        ),
        _check(
            "robust accuracy at eps=0 equals clean accuracy",
            abs(curve[0]["value"] - clean) < 1e-12,
            f"{curve[0]['value']:.4f} at eps=0, clean {clean:.4f}",
        ),
        _check(
            "unconstrained attack fools ~all correctly classified images at the largest budget",
            full >= 0.99,
            f"{100 * full:.1f} % at eps={s['eps']:g} ({s['norm']}, {s['steps']} steps)",
            "raise --decomposition.eps or --decomposition.steps; the norms describe only the fooled subset",
        ),
        _check(
            "the attack can reach its budget",
            _reach(s) >= s["eps"] - 1e-9,
            f"steps x step size = {_reach(s):g} vs eps = {s['eps']:g}",
            "the effective budget is the smaller one; raise --decomposition.steps or --decomposition.step_size",
        ),
        _check(
            "figures recomputed from the samples equal the logged summary",
            not differ,
            f"{sum(k in logged for k in ours)} figures compared",
            f"these differ: {differ}",
        ),
        _check(
            "random-subspace baseline agrees with theory",
            baseline["ci"][0] <= expected <= baseline["ci"][1],
            f"mean {_est(baseline)}, theory E = {expected:.3f} (sqrt(k/n) = {fig['sqrt_k_over_n']:.3f})",
            "the theoretical mean is outside the 95 % interval (expected in 1 run of 20 by chance)",
        ),
        _check(
            "enough images for tight intervals",
            fig["num_correct"] >= 100,
            f"{fig['num_correct']} correctly classified of {fig['num_images']}",
            "fewer than 100 give wide intervals; raise --decomposition.num_images",
        ),
    ]


def _close(a: float, b) -> bool:
    b = float("nan") if b is None else float(b)
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-5 * max(1.0, abs(b))


def _classifier_checkpoint(run: Run) -> Path | None:
    """The weights the run evaluated: ``ckpt_path`` of a validate/test run, else the run's last, then best."""
    ckpt = run.config.get("ckpt_path")
    if ckpt not in (None, "best", "last") and (path := _resolve(ckpt, run)) is not None:
        return path
    last = run.folder / "checkpoints" / "last.ckpt"
    best = sorted((run.folder / "checkpoints").glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    return last if last.is_file() else (best[-1] if best else None)


def model_checks(run: Run, stage: str, num_images: int, device: str) -> tuple[dict, list[dict]]:
    """Checks that rerun the classifier on the run's own image subset (rebuilt from config.yaml)."""
    from torch.nn import functional as F
    from torch.utils.data import default_collate

    from dmm.attacks import fgsm, pgd

    def skip(why: str) -> tuple[dict, list[dict]]:
        return {"skipped": why}, [_check("model checks", False, f"skipped: {why}")]

    path = _classifier_checkpoint(run)
    if path is None:
        return skip(f"no classifier checkpoint (config ckpt_path or {run.folder}/checkpoints/*.ckpt)")
    model_spec, data_spec = run.config.get("model") or {}, run.config.get("data") or {}
    try:
        model_cls = _import(model_spec.get("class_path", "Classifier"), "dmm.models")
        model = model_cls.load_from_checkpoint(path, map_location=device, weights_only=True)
        model = model.eval().requires_grad_(False)
        data_cls = _import(data_spec["class_path"], "dmm.data")
        init = dict(data_spec.get("init_args") or {})
        if "data_dir" in init:
            init["data_dir"] = str(_resolve(init["data_dir"], run) or init["data_dir"])
        if "download" in init:
            init["download"] = False  # a report never downloads
        data = data_cls(**init)
        data.prepare_data()
        data.setup("test" if stage == "test" else "validate")
        dataset = (data.test_dataloader() if stage == "test" else data.val_dataloader()).dataset
    except Exception as error:  # any failure here only costs the optional checks, never the report
        return skip(f"cannot load the classifier {path} or the data ({type(error).__name__}: {error})")
    # The callback attacked randperm(len(dataset), seed)[:count]; the records are in that order.
    decomposition = run.config.get("decomposition") or {}
    count = run.records["correct"].numel()
    if "seed" in decomposition:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(int(decomposition["seed"])))
        subset, where = order[: min(count, num_images)], "the run's own images"
    else:
        subset, where = torch.arange(min(count, num_images, len(dataset))), "the first images of the split"
    x, y = (t.to(device) for t in default_collate([dataset[int(i)][:2] for i in subset]))
    m, s = len(subset), run.payload["settings"]
    with torch.no_grad():
        logits, again = model(x), model(x)
    probabilities = bool((logits >= 0).all()) and float((logits.sum(1) - 1).abs().max()) < 1e-3
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    zero = int((grad.flatten(1).abs().amax(1) == 0).sum())
    correct = logits.argmax(1) == y
    kwargs = dict(eps=s["eps"], norm=s["norm"], clamp=s["clamp"])
    adversarial = {
        "fgsm": fgsm(model, x, y, **kwargs),
        "pgd": pgd(model, x, y, steps=s["steps"], step_size=s["step_size"], early_stop=s["early_stop"], **kwargs),
    }
    with torch.no_grad():
        rates = {name: float(rate((model(xa).argmax(1) != y) & correct, correct)) for name, xa in adversarial.items()}
    checks = [
        _check(
            "model outputs logits, not probabilities",
            not probabilities,
            "rows are non-negative and sum to 1" if probabilities else "rows are not probability vectors",
            "attacks on softmax outputs see vanishing gradients; attack the logits",
        ),
        _check(
            "model is deterministic",
            torch.equal(logits, again),
            f"two forward passes {'agree' if torch.equal(logits, again) else 'differ'}",
            "a randomised model needs attacks with expectation over transformation",
        ),
        _check(
            "input gradients are non-zero",
            zero == 0,
            f"{zero} of {m} images have an all-zero input gradient",
            "gradient-based attacks cannot move those images (saturated or masked gradients)",
        ),
        _check(
            "iterative attack beats a one-step attack",
            rates["fgsm"] <= rates["pgd"],
            f"PGD ({s['steps']} steps) {100 * rates['pgd']:.1f} % vs one-step FGM {100 * rates['fgsm']:.1f} % of "
            f"correctly classified images at eps={s['eps']:g} ({s['norm']}) on {m} of {where}",
            "a one-step attack doing better means the iterative one is misconfigured or gradients are masked",
        ),
    ]
    if "seed" in decomposition:
        same = int((correct == run.records["correct"][:m].to(device)).sum())
        checks.append(
            _check(
                "checkpoint and data reproduce the run's clean predictions",
                same == m,
                f"{same} of {m} images classified as recorded ({path.name})",
                "these are not the weights or the images the run evaluated",
            )
        )
    facts = {
        "checkpoint": str(path),
        "images": m,
        "subset": where,
        "clean_acc": float(correct.double().mean()),
        "fgsm_success_rate": rates["fgsm"],
        "pgd_success_rate": rates["pgd"],
        "pgd_steps": s["steps"],
    }
    return facts, checks


# ------------------------------------------------------------------------------------------ report
def build_report(
    folders: list[str | Path],
    *,
    stage: str = "test",
    resamples: int = 2000,
    seed: int = 0,
    check_model: bool = True,
    check_images: int = 256,
    device: str = "cpu",
) -> dict:
    """The whole report as one JSON-able dict; :func:`write_report` renders it."""
    if resamples < 1 or check_images < 1:
        raise DmmError(f"--bootstrap and --check-images must be >= 1, got {resamples} and {check_images}")
    runs = [load_run(folder, stage) for folder in folders]
    labels = [run.label for run in runs]
    for i, run in enumerate(runs):  # two folders of the same name: number them so labels and files stay unique
        if labels.count(run.label) > 1:
            run.label = f"{run.label}-{labels[:i].count(run.label) + 1}"
    entries = []
    for run in runs:
        log.info("report: %s (%s)", run.folder, run.json_path.name)
        fig = run_figures(run, resamples, seed)
        checks = run_checks(run, fig)
        model, more = model_checks(run, stage, check_images, device) if check_model else (None, [])
        model_spec = run.config.get("model") or {}
        entries.append(
            {
                "label": run.label,
                "folder": str(run.folder),
                "results": str(run.json_path),
                "stage": run.payload.get("stage", stage),
                "epoch": run.payload.get("epoch"),
                "global_step": run.payload.get("global_step"),
                "dataset": _class_name(run.config.get("data")),
                "classifier": {
                    "class": _class_name(model_spec),
                    "network": _class_name((model_spec.get("init_args") or {}).get("network")),
                },
                "autoencoder": autoencoder_facts(run),
                "settings": run.payload["settings"],
                "figures": fig,
                "model_checks": model,
                "checks": checks + more,
                "grid": f"grid-{_slug(run.label)}.png" if run.json_path.with_suffix(".png").is_file() else None,
                "_grid_source": str(run.json_path.with_suffix(".png")),
            }
        )
    return {
        "stage": stage,
        "bootstrap": {
            "resamples": resamples,
            "seed": seed,
            "level": LEVEL,
            "method": "percentile bootstrap over images, one index tensor per run",
        },
        "reference": PUBLIC_REPLICATION,
        "runs": entries,
        "plots": {
            "robust_accuracy": "robust_accuracy.png",
            "on_fraction": "on_fraction_hist.png",
            "median_norms": "median_norms.png",
        },
    }


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def _number(v, percent: bool = False) -> str:
    """A figure as text: 3 decimals, or a percentage; n/a for NaN (or None, as report.json stores NaN)."""
    if v is None or math.isnan(v):
        return "n/a"
    return f"{100 * v:.1f} %" if percent else f"{v:.3f}"


def _est(e: dict, percent: bool = False) -> str:
    """``0.493 [0.410, 0.550]``: estimate and CI; rates as percentages; n/a where undefined."""
    value = _number(e["value"], percent)
    return value if value == "n/a" else f"{value} [{_number(e['ci'][0], percent)}, {_number(e['ci'][1], percent)}]"


def markdown_table(report: dict) -> str:
    """The README's table: one row per run and the public replication's figures as a labelled reference row."""
    head = (
        "run | dataset | classifier | k / n | clean acc | fooled: unconstrained / on / off | unconstrained L2 | "
        "on-manifold L2 | off-manifold L2 | on-fraction (random) | sqrt(k/n)"
    ).split(" | ")
    rows = []
    for e in report["runs"]:
        fig = e["figures"]
        fr = fig["fractions"]
        rows.append(
            [
                e["label"],
                e["dataset"],
                f"{e['classifier']['class']} ({e['classifier']['network']})",
                f"{fig['k']} / {fig['n']}",
                _est(fig["clean_acc"], percent=True),
                " / ".join(_number(fig["attacks"][a]["success_rate"]["value"], percent=True) for a in ATTACKS),
                *(_est(fig["attacks"][a]["l2_median"]) for a in ATTACKS),
                f"{_est(fr['on_fraction_mean'])} ({_number(fr['random_fraction_mean']['value'])})",
                f"{fig['sqrt_k_over_n']:.3f}",
            ]
        )
    ref = report["reference"]
    rows.append(
        [
            f"*{ref['label']}* (reference)",
            ref["dataset"],
            "—",
            f"{ref['sqrt_k_over_n']['k']} / {ref['sqrt_k_over_n']['n']}",
            "—",
            "—",
            *(f"*{ref['l2'][a]:.2f}*" for a in ATTACKS),
            "—",
            f"*{ref['sqrt_k_over_n']['value']:.3f}*",
        ]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    note = (
        f"Medians of the L2 norm (in [0,1] pixel space) of the perturbations that fooled the classifier, with "
        f"{100 * report['bootstrap']['level']:.0f} % bootstrap intervals over images; on-fraction is the mean "
        f"||d_on|| / ||d|| of the unconstrained perturbation, next to a random k-dim subspace's. Italic: "
        f"{ref['label']}, {ref['note']}."
    )
    return "\n".join(lines) + "\n\n" + note


def _run_markdown(e: dict) -> list[str]:
    fig, s, ae = e["figures"], e["settings"], e["autoencoder"]
    mse = "n/a" if ae["mse"] is None else f"{ae['mse']:.4g} ({ae['mse_source']})"
    extra = "".join(f", {k}={v}" for k, v in ae["extra"].items())
    out = [
        f"## {e['label']}",
        "",
        f"- Folder: `{e['folder']}`; results `{Path(e['results']).name}` (stage {e['stage']}, epoch {e['epoch']}, "
        f"step {e['global_step']})",
        f"- Dataset: {e['dataset']}; classifier: {e['classifier']['class']} ({e['classifier']['network']})",
        f"- Autoencoder: {ae['class']} ({ae['encoder']} / {ae['decoder']}, k = {ae['latent_dim']}{extra}), "
        f"reconstruction MSE {mse}; checkpoint `{ae['checkpoint']}`",
        f"- Attack: early-stopped PGD, {s['norm']} eps = {s['eps']:g}, {s['steps']} steps, step size "
        f"{s['step_size'] if s['step_size'] is not None else '2.5 eps / steps'}, clamp to [0, 1] {s['clamp']}",
        f"- Images: {fig['num_images']} ({fig['num_correct']} correctly classified); clean accuracy "
        f"{_est(fig['clean_acc'], percent=True)}",
        "",
        "| attack | success rate | fooled | median L2 | mean L2 | median Linf |",
        "|---|---|---|---|---|---|",
    ]
    for a in ATTACKS:
        f = fig["attacks"][a]
        out.append(
            f"| {ATTACK_NAMES[a]} | {_est(f['success_rate'], True)} | {f['successes']} | "
            f"{_est(f['l2_median'])} | {_est(f['l2_mean'])} | {_est(f['linf_median'])} |"
        )
    fr = fig["fractions"]
    out += [
        "",
        "Norms are over the images each attack fooled; where its success rate is below 100 % they describe that "
        "subset only (the others would need more than eps).",
        "",
        "| on-manifold fraction of the unconstrained d | mean | median |",
        "|---|---|---|",
        f"| classifier's perturbation | {_est(fr['on_fraction_mean'])} | {_est(fr['on_fraction_median'])} |",
        f"| random {fig['k']}-dim subspace (baseline) | {_est(fr['random_fraction_mean'])} | "
        f"{_est(fr['random_fraction_median'])} |",
        f"| difference (paired) | {_est(fr['on_minus_random_mean'])} | |",
        f"| theory: sqrt(k/n) = sqrt({fig['k']}/{fig['n']}) | {fig['sqrt_k_over_n']:.3f} | "
        f"(exact E = {fig['random_expectation']:.3f}) |",
        "",
        f"The on-manifold part alone fools {_est(fig['part_fools']['on'], True)} and the off-manifold part alone "
        f"{_est(fig['part_fools']['off'], True)} of the images the unconstrained attack fooled.",
        "",
    ]
    if s["clamp"]:
        lk = fig["leak"]
        out += [
            f"Leak (clamping to [0, 1] moves part of a constrained perturbation out of its subspace): "
            f"on-manifold attack {_est(lk['on_mean'])} of its norm off the tangent space (median "
            f"{_est(lk['on_median'])}); off-manifold attack {_est(lk['off_mean'])} on it (median "
            f"{_est(lk['off_median'])}).",
            "",
        ]
    else:
        out += ["No clamping: the constrained attacks stay exactly in their subspaces (no leak).", ""]
    out += ["| eps | robust accuracy |", "|---|---|"]
    out += [f"| {p['eps']:g} | {_est(p, True)} |" for p in fig["robust_accuracy"]]
    if fig["curve_left_out"]:
        out += [
            "",
            f"Left out of the curve: eps {', '.join(f'{e:g}' for e in fig['curve_left_out'])}, above the "
            "largest norm the attack could reach (min(eps, steps x step size)); it never tried them.",
        ]
    if e["model_checks"] and "skipped" not in e["model_checks"]:
        mc = e["model_checks"]
        out += [
            "",
            f"Model rerun on {mc['images']} images ({mc['subset']}, `{mc['checkpoint']}`): clean accuracy "
            f"{100 * mc['clean_acc']:.1f} %, one-step FGM {100 * mc['fgsm_success_rate']:.1f} %, PGD "
            f"({mc['pgd_steps']} steps) {100 * mc['pgd_success_rate']:.1f} % success.",
        ]
    out += ["", "### Checks a careful evaluation needs", ""]
    out += [f"- **{c['status']}** {c['name']}: {c['detail']}" for c in e["checks"]]
    if e["grid"]:
        out += [
            "",
            f"![x, x_adv, d, d_on, d_off of {e['label']}]({e['grid']})",
            "",
            "Rows: x | x_adv | d | d_on | d_off (perturbations amplified around mid-grey).",
        ]
    return out + [""]


def render_markdown(report: dict) -> str:
    b, plots = report["bootstrap"], report["plots"]
    lines = [
        "# DMM reproduction report",
        "",
        f"Stage `{report['stage']}`; {b['level']:.0%} intervals: {b['method']}, {b['resamples']} resamples, "
        f"seed {b['seed']}. Medians are lower medians (as `torch.median`).",
        "",
        markdown_table(report),
        "",
        f"![robust accuracy vs eps]({plots['robust_accuracy']})",
        f"![median norms]({plots['median_norms']})",
        f"![on-manifold fraction]({plots['on_fraction']})",
        "",
    ]
    for e in report["runs"]:
        lines += _run_markdown(e)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ plots
def _figure(width: float, height: float):
    # A bare Figure draws with Agg and touches no pyplot state, so importers keep their own backend.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _norm_label(report: dict) -> str:
    norms = {e["settings"]["norm"] for e in report["runs"]}
    name = {"l2": "L2", "linf": "Linf"}.get(norms.pop(), "?") if len(norms) == 1 else "each run's"
    return f"eps: {name} norm in [0,1] pixel space"


def plot_robust_accuracy(report: dict, path: Path) -> None:
    fig = _figure(5.5, 4)
    ax = fig.add_subplot()
    for e in report["runs"]:
        curve = e["figures"]["robust_accuracy"]
        eps = [p["eps"] for p in curve]
        line = ax.plot(eps, [100 * p["value"] for p in curve], marker="o", label=e["label"])[0]
        ax.fill_between(
            eps,
            [100 * p["ci"][0] for p in curve],
            [100 * p["ci"][1] for p in curve],
            color=line.get_color(),
            alpha=0.2,
            linewidth=0,
        )
    ax.set(
        xlabel=_norm_label(report),
        ylabel="robust accuracy (%)",
        ylim=(-2, 102),
        title=f"Robust accuracy vs budget (shaded: {report['bootstrap']['level']:.0%} CI)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)


def plot_on_fraction(report: dict, path: Path) -> None:
    runs = report["runs"]
    fig = _figure(4.5 * len(runs), 3.6)
    for i, e in enumerate(runs):
        ax, h, fg = fig.add_subplot(1, len(runs), i + 1), e["figures"]["histogram"], e["figures"]
        edges = h["edges"]
        ax.stairs(h["on_fraction"], edges, label="classifier's perturbation", linewidth=1.5)
        ax.stairs(h["random_fraction"], edges, label=f"random {fg['k']}-dim subspace", linewidth=1.5, linestyle="--")
        ax.axvline(fg["sqrt_k_over_n"], color="black", linestyle=":", label=f"sqrt(k/n) = {fg['sqrt_k_over_n']:.3f}")
        ax.set(
            xlabel="||d_on|| / ||d|| (fraction of the L2 norm)", ylabel="fooled images", xlim=(0, 1), title=e["label"]
        )
        ax.legend(fontsize="small")
    _save(fig, path)


def plot_median_norms(report: dict, path: Path) -> None:
    runs = report["runs"]
    fig = _figure(max(5.5, 1.2 * len(runs) * len(ATTACKS)), 4)
    ax, width = fig.add_subplot(), 0.8 / len(runs)
    for i, e in enumerate(runs):
        positions = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(ATTACKS))]
        values, low, high = [], [], []
        for x, a in zip(positions, ATTACKS, strict=True):
            median = e["figures"]["attacks"][a]["l2_median"]
            if median["value"] is None or math.isnan(median["value"]):  # no image fooled: no bar
                ax.annotate("n/a\n(none fooled)", (x, 0), ha="center", va="bottom", fontsize="small")
                median = {"value": 0.0, "ci": [0.0, 0.0]}
            values.append(median["value"])
            low.append(median["value"] - median["ci"][0])
            high.append(median["ci"][1] - median["value"])
        ax.bar(positions, values, width, yerr=[low, high], capsize=3, label=e["label"])
    ax.set_xticks(range(len(ATTACKS)), [ATTACK_NAMES[a] for a in ATTACKS])
    ax.set(ylabel="median L2 norm in [0,1] pixel space", title="Norm needed to fool (fooled images; 95 % CI)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, path)


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150))


def _json_ready(value):
    """Strict JSON: NaN and infinities become null; private keys (leading underscore) are dropped."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(report: dict, out: str | Path) -> Path:
    """Write the plots, image grids, ``report.json`` and (last) ``report.md`` into ``out``; return report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_robust_accuracy(report, out / report["plots"]["robust_accuracy"])
    plot_on_fraction(report, out / report["plots"]["on_fraction"])
    plot_median_norms(report, out / report["plots"]["median_norms"])
    for e in report["runs"]:
        if e["grid"]:
            atomic_write(out / e["grid"], lambda tmp, src=e["_grid_source"]: shutil.copyfile(src, tmp))
    clean = _json_ready(report)
    atomic_write(out / "report.json", lambda tmp: tmp.write_text(json.dumps(clean, indent=2, allow_nan=False)))
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(render_markdown(report)))
    return out / "report.md"


def main(argv: list[str] | None = None) -> None:
    """``python -m dmm.report``: see the module docstring; ``argv`` replaces ``sys.argv[1:]`` (for tests)."""
    parser = argparse.ArgumentParser(prog="dmm report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders with decomposition/ results")
    parser.add_argument("--out", required=True, metavar="REPORT_DIR", help="folder for report.md/json and plots")
    parser.add_argument("--stage", choices=("test", "val"), default="test", help="which results (default test)")
    parser.add_argument("--bootstrap", type=int, default=2000, metavar="B", help="bootstrap resamples (2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (0)")
    parser.add_argument("--no-model-checks", action="store_true", help="skip the checks that rerun the classifier")
    parser.add_argument("--check-images", type=int, default=256, help="images the model checks attack (256)")
    parser.add_argument("--device", default="cpu", help="device of the model checks (cpu)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = build_report(
            args.runs,
            stage=args.stage,
            resamples=args.bootstrap,
            seed=args.seed,
            check_model=not args.no_model_checks,
            check_images=args.check_images,
            device=args.device,
        )
        path = write_report(report, args.out)
    except DmmError as error:
        sys.stderr.write(f"dmm report: error: {error}\n")
        sys.exit(2)
    log.info("wrote %s", path)
    sys.stdout.write(markdown_table(report) + "\n")


if __name__ == "__main__":
    main()
