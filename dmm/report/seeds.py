"""Seed-level intervals: runs of the same experiment pooled, each run's headline figure one observation.

Image-level intervals (bootstrap, Wilson) say how well one run pins down its figure on its images; they
say nothing about how the figure moves when the models are retrained or the image subset redrawn. When
several runs share every setting (attack, arms, data, classifier and autoencoder types), the report gives
the mean over runs of each headline figure with a Student-t interval over runs: m independent runs give
m - 1 degrees of freedom, so two or three runs give wide and honest intervals. When the runs cross C
classifiers with A autoencoders (every pair once), they are not m independent runs: a figure that does not
depend on the autoencoder repeats A times. Those groups get a two-way random-effects interval
(:func:`crossed_interval`) instead.
"""

from __future__ import annotations

import json
import math

from dmm.report.stats import LEVEL


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, by its continued fraction (modified Lentz).

    The fraction converges fast for x < (a + 1) / (a + b + 2); above, I_x(a, b) = 1 - I_{1-x}(b, a).
    """
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1 - regularized_beta(1 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    tiny = 1e-300  # keeps the Lentz denominators off zero
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        # Even then odd step of the fraction 1 / (1 + d1 / (1 + d2 / (1 + ...))) (Numerical Recipes 6.4.5).
        for coefficient in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 + coefficient * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + coefficient / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return front * fraction / a


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom.

    Integer df: closed forms (Abramowitz & Stegun 26.7.3-4); real df: P(|T| > t) = I_{df/(df+t^2)}(df/2, 1/2).
    """
    if not float(df).is_integer():
        tail = regularized_beta(df / (df + t * t), df / 2, 0.5) / 2  # P(T > |t|)
        return 1 - tail if t >= 0 else tail
    df = int(df)
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df == 1:
        return 0.5 + theta / math.pi
    if df % 2:  # A = 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3)))
        term = total = 1.0
        for j in range(3, df - 1, 2):
            term *= c2 * (j - 1) / j
            total += term
        a = 2 / math.pi * (theta + s * math.cos(theta) * total)
    else:  # A = sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
        term = total = 1.0
        for j in range(2, df - 1, 2):
            term *= c2 * (j - 1) / j
            total += term
        a = s * total
    return 0.5 + a / 2  # A(t) = P(|T| <= t), odd in t


def student_t_pdf(t: float, df: float) -> float:
    """Density of Student's t with ``df`` > 0 degrees of freedom."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))


def student_t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (p in (0.5, 1), real ``df`` > 0): Newton steps kept inside a shrinking bracket."""
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        low, high = high, 2 * high
    t = (low + high) / 2
    for _ in range(200):
        error = student_t_cdf(t, df) - p
        low, high = (t, high) if error < 0 else (low, t)
        step = t - error / student_t_pdf(t, df)
        new = step if low < step < high else (low + high) / 2  # bisect where Newton would leave the bracket
        if abs(new - t) <= 1e-15 * t:
            return new
        t = new
    return t


def seed_interval(values: list[float], level: float = LEVEL) -> dict:
    """Mean over m independent runs with its t-interval (m - 1 df); ``{"value", "ci", "runs", "per_run",
    "undefined", "df"}``.

    A run whose figure is undefined (NaN) or censored ("> eps", +inf) makes the mean undefined: it is then
    NaN and ``undefined`` counts those runs. One run has no interval (NaN, as is its df).
    """
    m = len(values)
    bad = sum(not math.isfinite(v) for v in values)
    out = {"value": math.nan, "ci": [math.nan, math.nan], "runs": m, "per_run": list(values), "undefined": bad}
    out["df"] = float(m - 1) if m > 1 and not bad else math.nan
    if bad or m == 0:
        return out
    mean = sum(values) / m
    out["value"] = mean
    if m > 1:
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (m - 1))
        half = student_t_quantile((1 + level) / 2, m - 1) * sd / math.sqrt(m)
        out["ci"] = [mean - half, mean + half]
    return out


def crossed_interval(table: dict[tuple[str, str], float], level: float = LEVEL) -> dict:
    """Grand mean of a complete C x A table y[c, a] (every pair once) with a two-way random-effects interval.

    Model y = mu + c_i + a_j + e_ij (classifier, autoencoder, interaction-plus-noise effects, independent).
    With ybar_i., ybar_.j the row and column means and ybar the grand mean,
    MS_C = A sum_i (ybar_i. - ybar)^2 / (C - 1), MS_A = C sum_j (ybar_.j - ybar)^2 / (A - 1),
    MS_E = sum_ij (y - ybar_i. - ybar_.j + ybar)^2 / ((C - 1)(A - 1)).
    Var(ybar) = sigma_c^2/C + sigma_a^2/A + sigma_e^2/(CA) is estimated without bias by
    (MS_C + MS_A - MS_E)/(CA), which can be negative; we use (MS_C + MS_A)/(CA), its upper bound, so the
    interval is conservative. Degrees of freedom by Satterthwaite:
    df = (MS_C + MS_A)^2 / (MS_C^2/(C - 1) + MS_A^2/(A - 1)), real-valued (t quantile at real df).
    A factor with one level contributes no term: C x 1 or 1 x A is :func:`seed_interval` over the runs.
    A figure that does not depend on the autoencoder gets the one-way t-interval over the C classifiers.

    Returns ``{"value", "ci", "runs", "per_run", "undefined", "df", "design", "method"}``; an undefined
    or censored value (NaN, inf) makes the figure undefined as in :func:`seed_interval`. All values equal:
    the interval is the point (df NaN). Raises ValueError when the table is not complete.
    """
    rows = list(dict.fromkeys(c for c, _ in table))
    cols = list(dict.fromkeys(a for _, a in table))
    n_c, n_a = len(rows), len(cols)
    if len(table) != n_c * n_a:
        raise ValueError(f"{len(table)} values do not fill a {n_c} x {n_a} table (every pair exactly once)")
    out = seed_interval(list(table.values()), level) | {"design": f"crossed {n_c} x {n_a}"}
    if n_c == 1 or n_a == 1:  # one factor with one level: the runs are repeats of the other factor
        return out | {"method": "one factor has one level: t-interval over the runs, m - 1 df"}
    out["method"] = "two-way random effects, variance (MS_C + MS_A)/(CA) (conservative), Satterthwaite df"
    if out["undefined"]:
        return out
    y = [[table[c, a] for a in cols] for c in rows]  # [C][A]
    row_mean = [sum(r) / n_a for r in y]
    col_mean = [sum(r[j] for r in y) / n_c for j in range(n_a)]
    mean = sum(row_mean) / n_c
    ms_c = n_a * sum((m - mean) ** 2 for m in row_mean) / (n_c - 1)
    ms_a = n_c * sum((m - mean) ** 2 for m in col_mean) / (n_a - 1)
    out["value"] = mean
    if ms_c + ms_a == 0:
        out |= {"ci": [mean, mean], "df": math.nan}
        return out
    df = (ms_c + ms_a) ** 2 / (ms_c**2 / (n_c - 1) + ms_a**2 / (n_a - 1))
    half = student_t_quantile((1 + level) / 2, df) * math.sqrt((ms_c + ms_a) / (n_c * n_a))
    out |= {"ci": [mean - half, mean + half], "df": df}
    return out


def bounded(interval: dict, low: float = 0.0, high: float = 1.0) -> dict:
    """The interval of a figure that cannot leave [low, high] (a rate, a share), its ends clipped to that range.

    A t-interval is symmetric, so runs near 100 % give an upper end past it ([99.6, 100.2] %): clipping keeps every
    value the parameter can take, so the coverage is unchanged. Records the range as ``"bounds"``.
    """
    ci = [min(max(v, low), high) if math.isfinite(v) else v for v in interval["ci"]]
    return interval | {"ci": ci, "bounds": [low, high]}


def is_bounded(name: str) -> bool:
    """Whether a headline figure (:func:`headline_figures`' name) lies in [0, 1]: rates, accuracies, fractions."""
    return name.endswith("success rate") or name == "clean accuracy" or "fraction" in name


def headline_figures(entry: dict) -> dict[str, float]:
    """The figures of one run that are pooled over runs, by a readable name (same names for every run)."""
    fig = entry["figures"]
    out = {"clean accuracy": fig["clean_acc"]["value"]}
    for arm, f in fig["attacks"].items():
        out[f"{arm}: success rate"] = f["success_rate"]["value"]
        out[f"{arm}: censored median norm"] = f["censored_median"]["value"]
    out["on-fraction mean"] = fig["fractions"]["on_fraction_mean"]["value"]
    out["random-fraction mean"] = fig["fractions"]["random_fraction_mean"]["value"]
    for name, ratio in fig["ratios"].items():
        out[f"ratio {name}"] = ratio["value"]
    return {k: math.nan if v is None else v for k, v in out.items()}


def experiment_key(entry: dict) -> str:
    """What must agree for runs to count as repeats of one experiment (seed and checkpoints may differ)."""
    key = {
        "stage": entry["stage"],
        "settings": entry["settings"],
        "arms": sorted(entry["arms"]),
        "k": entry["figures"]["k"],
        "n": entry["figures"]["n"],
        "dataset": entry["dataset"],
        "classifier": [entry["classifier"].get(k) for k in ("class", "network", "adversary")],
        "autoencoder": [entry["autoencoder"][k] for k in ("class", "encoder", "decoder", "latent_dim", "extra")],
    }
    return json.dumps(key, sort_keys=True, default=str)


def crossed_shape(pairs: list[tuple]) -> tuple[int, int] | None:
    """(C, A) when (classifier, autoencoder) checkpoint pairs cross >= 2 of each, every pair once; else None."""
    classifiers, autoencoders = {c for c, _ in pairs}, {a for _, a in pairs}
    complete = len(set(pairs)) == len(pairs) == len(classifiers) * len(autoencoders)
    if complete and len(classifiers) > 1 and len(autoencoders) > 1 and None not in classifiers | autoencoders:
        return len(classifiers), len(autoencoders)
    return None


def seed_groups(entries: list[dict], level: float = LEVEL) -> list[dict]:
    """Groups of two or more runs of one experiment, each with an interval over runs per headline figure.

    Runs that cross classifier and autoencoder checkpoints get :func:`crossed_interval` (``"design":
    "crossed"``); other groups count as independent runs and get :func:`seed_interval`.
    """
    groups: dict[str, list[dict]] = {}
    for e in entries:
        groups.setdefault(experiment_key(e), []).append(e)
    out = []
    for members in (g for g in groups.values() if len(g) > 1):
        per_run = [headline_figures(e) for e in members]
        names = [n for n in per_run[0] if all(n in figures for figures in per_run)]
        # Repeats of the same seed and checkpoints are not independent: they measure nothing of seed variation.
        origins = {(e["seed"], e["autoencoder"]["checkpoint"], e["classifier"]["checkpoint"]) for e in members}
        group = {
            "runs": [e["label"] for e in members],
            "seeds": [e["seed"] for e in members],
            "independent": len(origins) == len(members),
        }
        pairs = [(e["classifier"]["checkpoint"], e["autoencoder"]["checkpoint"]) for e in members]
        if shape := crossed_shape(pairs):
            group |= {"design": "crossed", "classifiers": shape[0], "autoencoders": shape[1]}
            tables = {n: dict(zip(pairs, (f[n] for f in per_run), strict=True)) for n in names}
            group["figures"] = {n: crossed_interval(t, level) for n, t in tables.items()}
        else:
            group["design"] = "independent runs"
            group["figures"] = {n: seed_interval([f[n] for f in per_run], level) for n in names}
        group["figures"] = {n: bounded(f) if is_bounded(n) else f for n, f in group["figures"].items()}
        out.append(group)
    return out
