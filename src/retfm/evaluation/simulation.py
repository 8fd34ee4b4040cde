"""Simulated studies: prediction tables with a realistic null and with planted effects.

Used by ``retfm calibrate`` and the benchmarks to measure how often the study's own analysis
(:func:`retfm.evaluation.analysis.analyse_study`) calls a difference that is not there, and how
often it finds one that is. The simulated null must be as hard as reality, or the measured
error rate proves nothing, so every source of variation the real pipeline has is here:

* a **finite test set** per task, drawn from a population: the quantity of interest is the FMs'
  AUROC in the population, not on these images;
* **patients with several images** (a patient effect shared by all of a patient's images);
* **FMs that differ per image** while equally good on average: an FM-specific error per image
  that every adaptation seed of that FM repeats (this is what a t-test over seeds cannot see);
* **training seeds**: a per-seed shift of the class signal and per-seed noise per image;
* **pre-training draws**: each site's FM pre-trained K times (a replicate: its own cohort draw
  and pre-training randomness) moves its population AUROC per task by the draw (``draw``, a
  shift of the class signal per replicate and task), and shares only part of its per-image
  error with the FM's other replicates (``fm_shared``);
* **tasks that differ** in difficulty, class count, disease prevalence and age / sex / ethnicity
  mix, with prevalence rising with age, so that pooling tasks confounds factors.

Model, for image i of patient p in task t, FM f, seed s and class k (K classes)::

    logit_k = signal_{r,s,i} [k == y_i] + a_{p,k} + b_{i,k} + c_{r,i,k} + d_{r,s,i,k}
    signal  = separation_t x visibility_i + bonus_{f,t} + draw_{r,t} + eta_{r,s}
    c_{r,i,k} = sqrt(fm_shared) c'_{f,i,k} + sqrt(1 - fm_shared) c''_{r,i,k}   (r: a run of FM f)
    visibility_i = 1 - age x clip((age_i - 30) / 50, 0, 1) - sex x [F] - ethnicity x pigment_i

with a, b, c', c'', d, draw, eta independent normals (``Noise``; ``draw`` per task,
:attr:`TaskDesign.draw`), probabilities = softmax(logit). Under the null the FMs share every
distribution (so the sites' data are equally good, though one draw may favour either); a
planted *alignment* effect gives the aligned FM a
``bonus`` (set to reach a chosen population AUROC difference, :func:`bonus_for_difference`);
planted *factor* effects lower the visibility of disease in a group, inside every task.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from retfm.evaluation.statistics import auroc_influence
from retfm.evaluation.subgroups import prob_columns

#: Fundus pigmentation 0..1 by ethnicity (as in the synthetic image generator).
PIGMENT = {
    "white": 0.1,
    "black": 0.9,
    "south_asian": 0.65,
    "east_asian": 0.45,
    "mixed": 0.5,
    "other": 0.5,
    "unknown": 0.5,
}


@dataclass(frozen=True)
class TaskDesign:
    """One downstream task's test set and population."""

    name: str
    site: str  # the data site; an FM of this site is aligned
    n_test: int = 600  # test images
    n_classes: int = 2
    separation: float = 1.0  # class signal: sets the task's difficulty
    disease_logit: float = -0.5  # prevalence of disease (any class > 0) at age 55
    age_risk: float = 0.4  # disease logit per decade above 55
    age_mean: float = 55.0
    age_sd: float = 13.0
    female: float = 0.5
    ethnicity: Mapping[str, float] = field(
        default_factory=lambda: {"white": 0.5, "east_asian": 0.3, "south_asian": 0.2}
    )
    images_per_patient: tuple[int, int] = (1, 4)
    #: A real test set's images (patient, y_true, age, sex, ethnicity), to simulate *this*
    #: study's design: each simulated test set resamples its patients with replacement
    #: (the population settings above are then unused).
    patients: pd.DataFrame | None = field(default=None, repr=False, compare=False)
    #: sd of the class-signal shift between pre-training draws (logit units; None: Noise.draw)
    draw: float | None = None


@dataclass(frozen=True)
class Noise:
    """Standard deviations of the latent score's parts (in logit units)."""

    patient: float = 0.5  # shared by a patient's images, every FM and seed
    image: float = 0.5  # shared by every FM and seed: how hard the image is
    fm: float = 0.8  # one FM's own error on an image, repeated by all its seeds
    seed_image: float = 0.15  # one seed's own error on an image
    seed_shift: float = 0.03  # one seed's shift of the class signal (with seed_image: AUROC
    # sd over seeds 0.003-0.01, as the demo's linear probes have)
    draw: float = 0.0  # one pre-training run's shift of the class signal, per task
    fm_shared: float = 0.5  # share of the FM's per-image error variance all its runs repeat


@dataclass(frozen=True)
class Effects:
    """Planted effects. Zero everywhere is the null."""

    alignment: Mapping[str, float] = field(default_factory=dict)  # task -> signal bonus
    age: float = 0.0  # visibility lost from age 30 to 80
    sex: float = 0.0  # visibility lost by F
    ethnicity: float = 0.0  # visibility lost per unit of pigmentation


@dataclass(frozen=True)
class StudyDesign:
    fms: Mapping[str, str]  # FM name -> its pre-training site
    tasks: tuple[TaskDesign, ...]
    seeds: int = 3
    noise: Noise = Noise()
    effects: Effects = Effects()
    recipes: Mapping[str, str] | None = None  # FM -> recipe; FMs are compared within one
    replicates: int = 1  # pre-training runs per FM

    def run_names(self, fm: str) -> list[str]:
        """The FM's runs: the FM's own name with one run, else ``<fm>-r<k>``."""
        return [fm] if self.replicates == 1 else [f"{fm}-r{k}" for k in range(self.replicates)]

    def replicate_of(self) -> dict[str, str]:
        return {run: fm for fm in self.fms for run in self.run_names(fm)}

    def with_replicates(self, replicates: int) -> StudyDesign:
        return replace(self, replicates=replicates)

    def with_draw(self, draw: float) -> StudyDesign:
        """Every task's draw sd set to ``draw`` (logit units)."""
        return replace(self, tasks=tuple(replace(t, draw=draw) for t in self.tasks))

    def with_effects(self, **changes: object) -> StudyDesign:
        return replace(self, effects=replace(self.effects, **changes))  # type: ignore[arg-type]

    def with_test_size(self, n_test: int) -> StudyDesign:
        return replace(self, tasks=tuple(replace(t, n_test=n_test) for t in self.tasks))


def demo_like_design(n_test: int = 600, seeds: int = 3) -> StudyDesign:
    """Three tasks shaped like the demo's (a specialist hospital's, a community screening's and
    a public set), two FMs (one per study site): different difficulty, class count, prevalence
    and age / sex / ethnicity mix per task."""
    tasks = (
        TaskDesign(
            "hospital_dr",
            "hospital",
            n_test,
            2,
            separation=0.7,
            disease_logit=0.4,
            age_mean=62,
            age_sd=14,
            female=0.5,
            ethnicity={
                "white": 0.46,
                "black": 0.14,
                "south_asian": 0.2,
                "east_asian": 0.06,
                "mixed": 0.05,
                "other": 0.05,
                "unknown": 0.04,
            },
        ),
        TaskDesign(
            "screening_dr",
            "screening",
            n_test,
            2,
            separation=1.2,
            disease_logit=-0.8,
            age_mean=45,
            age_sd=11,
            female=0.58,
            ethnicity={
                "east_asian": 0.94,
                "white": 0.01,
                "south_asian": 0.01,
                "mixed": 0.02,
                "black": 0.005,
                "other": 0.005,
                "unknown": 0.01,
            },
        ),
        TaskDesign(
            "public_dr",
            "public",
            n_test,
            3,
            separation=1.1,
            disease_logit=0.4,
            age_mean=54,
            age_sd=12,
            female=0.46,
            ethnicity={
                "south_asian": 0.55,
                "white": 0.15,
                "black": 0.1,
                "east_asian": 0.1,
                "mixed": 0.04,
                "other": 0.03,
                "unknown": 0.03,
            },
        ),
    )
    return StudyDesign({"hospital": "hospital", "screening": "screening"}, tasks, seeds)


# --------------------------------------------------------------------------- drawing


def _resample_patients(task: TaskDesign, rng: np.random.Generator) -> pd.DataFrame:
    """A bootstrap of the real test set's patients, scaled to ``n_test`` images on average."""
    table = task.patients
    assert table is not None
    codes, _ = pd.factorize(table["patient"])
    per_patient = len(table) / (codes.max() + 1)
    drawn = rng.integers(0, codes.max() + 1, max(2, round(task.n_test / per_patient)))
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(codes.max() + 2))
    rows = np.concatenate([order[starts[d] : starts[d + 1]] for d in drawn])
    sizes = starts[drawn + 1] - starts[drawn]
    out = table.iloc[rows].reset_index(drop=True)
    out["patient"] = np.repeat(np.arange(len(drawn)), sizes)
    return out[["patient", "y_true", "age", "sex", "ethnicity"]]


def _draw_test_set(task: TaskDesign, rng: np.random.Generator) -> pd.DataFrame:
    """Patients and their images until ``n_test`` images: metadata, class, patient index."""
    if task.patients is not None:
        return _resample_patients(task, rng)
    lo, hi = task.images_per_patient
    counts = rng.integers(lo, hi + 1, task.n_test // lo + 1)
    counts = counts[: int(np.searchsorted(np.cumsum(counts), task.n_test)) + 1]
    counts[-1] -= int(counts.sum()) - task.n_test
    n_pat = len(counts)
    age = np.clip(rng.normal(task.age_mean, task.age_sd, n_pat), 18, 95).round(1)
    sex = np.where(rng.random(n_pat) < task.female, "F", "M")
    names = list(task.ethnicity)
    probs = np.array([task.ethnicity[e] for e in names], float)
    eth = rng.choice(names, n_pat, p=probs / probs.sum())
    logit = task.disease_logit + task.age_risk * (age - 55.0) / 10.0
    diseased = rng.random(n_pat) < 1.0 / (1.0 + np.exp(-logit))
    pid = np.repeat(np.arange(n_pat), counts)
    # A diseased patient's images carry a grade 1..K-1 each (eyes differ); healthy ones grade 0.
    grades = rng.integers(1, task.n_classes, len(pid)) if task.n_classes > 2 else 1
    y = np.where(diseased[pid], grades, 0)
    return pd.DataFrame(
        {
            "patient": pid,
            "y_true": y.astype(int),
            "age": age[pid],
            "sex": sex[pid],
            "ethnicity": eth[pid],
        }
    )


def _visibility(frame: pd.DataFrame, effects: Effects) -> np.ndarray:
    age_part = effects.age * np.clip((frame["age"].to_numpy() - 30.0) / 50.0, 0.0, 1.0)
    sex_part = effects.sex * (frame["sex"].to_numpy() == "F")
    pigment = frame["ethnicity"].map(PIGMENT).fillna(0.5).to_numpy()
    return np.clip(1.0 - age_part - sex_part - effects.ethnicity * pigment, 0.05, 1.0)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _task_predictions(
    task: TaskDesign,
    design: StudyDesign,
    rng: np.random.Generator,
) -> dict[str, pd.DataFrame]:
    """Per-seed predictions of every run of every FM on one freshly drawn test set."""
    frame = _draw_test_set(task, rng)
    n, k, noise = len(frame), task.n_classes, design.noise
    if k < 2 or frame["y_true"].max() >= k:
        raise ValueError(f"task {task.name}: labels outside 0..{k - 1}")
    n_pat = int(frame["patient"].max()) + 1
    onehot = np.eye(k)[frame["y_true"].to_numpy()]
    shared = noise.patient * rng.standard_normal((n_pat, k))[
        frame["patient"].to_numpy()
    ] + noise.image * rng.standard_normal((n, k))
    signal = task.separation * _visibility(frame, design.effects)
    meta = frame.assign(
        image_id=[f"{task.name}-{i:06d}" for i in range(n)],
        patient_id=[f"{task.name}-P{p:06d}" for p in frame["patient"]],
    ).drop(columns="patient")
    draw = noise.draw if task.draw is None else task.draw
    out = {}
    for fm in design.fms:
        bonus = design.effects.alignment.get(task.name, 0.0) if design.fms[fm] == task.site else 0
        runs = design.run_names(fm)
        if len(runs) == 1:
            common, own_sd = 0.0, noise.fm
        else:
            common = np.sqrt(noise.fm_shared) * noise.fm * rng.standard_normal((n, k))
            own_sd = np.sqrt(1.0 - noise.fm_shared) * noise.fm
        for run in runs:
            own = shared + common + own_sd * rng.standard_normal((n, k))
            run_shift = bonus + (draw * rng.standard_normal() if draw > 0 else 0.0)
            seeds = []
            for s in range(design.seeds):
                shift = run_shift + noise.seed_shift * rng.standard_normal()
                logits = own + noise.seed_image * rng.standard_normal((n, k))
                logits += onehot * (signal + shift)[:, None]
                probs = _softmax(logits)
                seeds.append(meta.assign(seed=s, **{f"prob_{c}": probs[:, c] for c in range(k)}))
            out[run] = pd.concat(seeds, ignore_index=True)
    return out


def simulate_study(
    design: StudyDesign, seed: int | np.random.Generator
) -> dict[tuple[str, str], pd.DataFrame]:
    """One simulated study: ``(run, task) -> per-seed predictions`` in the adapt stage's format
    (``image_id, patient_id, y_true, age, sex, ethnicity, seed, prob_0..prob_{K-1}``); runs
    are named by :meth:`StudyDesign.run_names`."""
    rng = np.random.default_rng(seed)
    preds: dict[tuple[str, str], pd.DataFrame] = {}
    for task in design.tasks:
        for fm, frame in _task_predictions(task, design, rng).items():
            preds[(fm, task.name)] = frame
    return preds


# --------------------------------------------------------------------------- effect sizes


def population_auroc(
    task: TaskDesign, design: StudyDesign, bonus: float = 0.0, n: int = 100_000
) -> float:
    """AUROC of one seed of an FM with signal ``bonus`` in the task's population (a large draw
    with fixed random numbers, so that differences between bonuses carry no Monte Carlo noise)."""
    one = replace(
        design,
        fms={"x": task.site},
        seeds=1,
        replicates=1,
        effects=replace(design.effects, alignment={task.name: bonus}),
        noise=replace(design.noise, seed_shift=0.0),
    )
    probe = replace(task, n_test=n, draw=0.0)
    preds = _task_predictions(probe, one, np.random.default_rng(7))["x"]
    probs = preds[[f"prob_{c}" for c in range(task.n_classes)]].to_numpy()
    return auroc_influence(preds["y_true"].to_numpy(), probs)[0]


_BONUS_CACHE: dict[str, float] = {}


def bonus_for_difference(task: TaskDesign, design: StudyDesign, target: float) -> float:
    """The signal bonus that makes the aligned FM's population AUROC ``target`` higher than
    the other FMs' (bisection on :func:`population_auroc`)."""
    if target <= 0:
        return 0.0
    null = replace(design, effects=replace(design.effects, alignment={}), replicates=1,
                   noise=replace(design.noise, draw=0.0))  # fmt: skip
    key = repr((replace(task, n_test=0, draw=0.0), replace(null, replicates=1), round(target, 6)))
    if key not in _BONUS_CACHE:
        base = population_auroc(task, null)
        lo, hi = 0.0, 4.0
        for _ in range(20):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if population_auroc(task, null, mid) - base < target else (lo, mid)
        _BONUS_CACHE[key] = (lo + hi) / 2
    return _BONUS_CACHE[key]


def _matched_separation(task: TaskDesign, design: StudyDesign, target_auroc: float) -> float:
    """The class signal at which one seed's population AUROC equals ``target_auroc``."""
    lo, hi = 0.0, 6.0
    for _ in range(16):
        mid = (lo + hi) / 2
        probe = replace(task, separation=mid)
        lo, hi = (
            (mid, hi) if population_auroc(probe, design, n=40_000) < target_auroc else (lo, mid)
        )
    return (lo + hi) / 2


def draw_auroc_sd(
    preds: Mapping[tuple[str, str], pd.DataFrame],
    replicate_of: Mapping[str, str],
    task: str,
) -> float | None:
    """The sd of a pre-training run's population AUROC between draws on ``task``, from an FM's
    replicates (pooled over the FMs with two or more): the replicates' AUROC variance less
    what the test set and the seeds put into it (each run's own test-set error, not shared with
    the FM's other runs, and the seed-mean's variance). None without two runs of one FM."""
    from retfm.evaluation.comparison import replicate_fits

    by_fm: dict[str, list[str]] = {}
    for run, t in preds:
        if t == task:
            by_fm.setdefault(replicate_of.get(run, run), []).append(run)
    by_fm = {fm: sorted(runs) for fm, runs in by_fm.items() if len(runs) >= 2}
    if not by_fm:
        return None
    _, fits = replicate_fits(preds, task, sorted(r for runs in by_fm.values() for r in runs))
    estimates = []
    for runs in by_fm.values():
        mine = [fits[r] for r in runs]
        aucs = np.array([f.auroc for f in mine])
        if not np.isfinite(aucs).all():
            continue
        w = np.stack([f.patient_influence for f in mine])
        n = w.shape[1]
        own = n / (n - 1) * float(np.mean((w**2).sum(axis=1)))  # Var(e_i)
        k = len(w)
        total = w.sum(axis=0)
        shared = n / (n - 1) * float(np.sum(total**2 - (w**2).sum(axis=0))) / (k * (k - 1))
        seed_parts = [float(np.var(f.seed_aurocs, ddof=1)) / len(f.seed_aurocs)
                      for f in mine if len(f.seed_aurocs) > 1]  # fmt: skip
        seeds = float(np.mean(seed_parts)) if seed_parts else 0.0
        estimates.append(float(aucs.var(ddof=1)) - (own - shared) - seeds)
    if not estimates:
        return None
    return float(np.sqrt(max(float(np.mean(estimates)), 0.0)))


def design_from_predictions(
    preds: Mapping[tuple[str, str], pd.DataFrame],
    fm_sites: Mapping[str, str],
    task_sites: Mapping[str, str],
    noise: Noise = Noise(),
    *,
    fm_recipes: Mapping[str, str] | None = None,
    replicate_of: Mapping[str, str] | None = None,
    draw_auroc: float | None = None,
) -> StudyDesign:
    """A null design shaped like a real study: its tasks, test-set sizes, class counts, patients
    (resampled with their images, ages, sexes and ethnicities), seeds and replicates per FM,
    with each task's difficulty matched to the FMs' mean AUROC on it, and each task's draw
    variance the one its replicates show (:func:`draw_auroc_sd`; ``draw_auroc`` instead, an
    AUROC sd, when given or when no FM has two runs).

    ``preds`` is keyed by (run, task); ``replicate_of`` maps run -> FM (None: runs are FMs)."""
    replicate_of = dict(replicate_of or {run: run for run, _ in preds})
    runs_per_fm: dict[str, set[str]] = {}
    for run, _ in preds:
        runs_per_fm.setdefault(replicate_of.get(run, run), set()).add(run)
    replicates = min((len(v) for fm, v in runs_per_fm.items() if fm in fm_sites), default=1)
    tasks, seeds = [], 0
    for task, site in task_sites.items():
        frames = [f for (run, t), f in preds.items()
                  if t == task and replicate_of.get(run, run) in fm_sites]  # fmt: skip
        if not frames:
            continue
        first = frames[0]
        seeds = max(seeds, int(first["seed"].nunique()) if "seed" in first else 1)
        one = first[first["seed"] == first["seed"].min()] if "seed" in first else first
        columns = prob_columns(one)
        table = pd.DataFrame(
            {
                "patient": one["patient_id"].astype(str).to_numpy(),
                "y_true": one["y_true"].to_numpy(int),
                "age": one["age"].to_numpy(float) if "age" in one else np.nan,
                "sex": one["sex"].astype(str).to_numpy() if "sex" in one else "unknown",
                "ethnicity": (
                    one["ethnicity"].astype(str).to_numpy() if "ethnicity" in one else "unknown"
                ),
            }
        )
        aurocs = []
        for frame in frames:
            for _, per_seed in frame.groupby("seed") if "seed" in frame else [(0, frame)]:
                probs = per_seed[columns].to_numpy()
                aurocs.append(auroc_influence(per_seed["y_true"].to_numpy(int), probs)[0])
        base = TaskDesign(task, site, n_test=len(table), n_classes=len(columns), patients=table)
        target = float(np.clip(np.nanmean(aurocs), 0.55, 0.99))
        design = StudyDesign(dict(fm_sites), (base,), 1, noise)
        matched = replace(base, separation=_matched_separation(base, design, target))
        sd = draw_auroc if draw_auroc is not None else draw_auroc_sd(preds, replicate_of, task)
        draw = bonus_for_difference(matched, design, sd) if sd else 0.0
        tasks.append(replace(matched, draw=draw))
    recipes = dict(fm_recipes) if fm_recipes else None
    return StudyDesign(
        dict(fm_sites), tuple(tasks), max(seeds, 1), noise, recipes=recipes, replicates=replicates
    )
