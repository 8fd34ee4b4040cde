"""Sample one site's pre-training cohort: whole patients, an exact image count, a seeded draw.

The study compares FMs whose only intended difference is the site their data came from, so each
site's cohort has the same number of images and is drawn by the same rule. Rules, and why:

* **Patients, not images, are sampled.** Patients are taken in a seeded random order; all of a
  chosen patient's images go in (at most ``per_patient_cap`` of them, a seeded subset, when the cap
  is > 0). Held-out patients (``exclude_patients``, e.g. the site's downstream test patients) are
  removed before anything else, so pre-training never sees a patient that is later tested on.
* **Exact size by trimming the last patient.** Patients are added until the next one would pass
  ``size``; that last patient contributes only as many of its (seeded-order) images as are still
  needed. Trimming does not split a patient *across* sets: its other images are simply unused, and
  the held-out side never holds it. Every stratum is filled the same way, so at most one patient per
  stratum is trimmed (``report["chosen"]["trimmed_patients"]``).
* **A patient belongs to one stratum**: its youngest recorded age's band and, for a categorical
  variable, its first level by name (levels rarely differ between a patient's images; validation
  reports those that do), so stratification never splits a patient either.
  The ``age_band`` column of the cohort is per image (the image's own age), as evaluation uses it.
* **Strategies.** ``random``: uniform over eligible patients (one stratum). ``stratified``: each
  stratum of ``balance_on`` gets its share of the site's *eligible* images (largest remainder).
  ``matched``: every site gets the same stratum mix: for each stratum the smallest share it has in
  any site's pool (``pools``, as given: before held-out patients and the cap, which only the own
  site's stage knows), renormalised. Each site's stage computes the same target from the same
  ``pools`` and samples only its own site; sites can therefore run independently.
* **Determinism.** Rows are put in a canonical order before any draw: by ``patient_id``, then by
  a fixed-key SipHash of ``image_id`` (pandas ``hash_pandas_object``; ~3x cheaper than sorting the
  ids as strings, and just as independent of the CSV's row order). The generator comes from
  ``SeedSequence([seed, sha256(site)...])``. The same seed and pool therefore give the same cohort,
  in the same order, on any machine and for any row order of the CSV. All random keys are drawn
  for the whole pool before exclusions, so excluding a patient does not reshuffle the others.

Everything is vectorised (factorize, integer sorts, ``bincount``): no Python loop over patients.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from retfm.cohorts.balance import balance_report
from retfm.data.schema import age_band_labels, age_bands

Strategy = Literal["random", "stratified", "matched"]
STRATEGIES: tuple[str, ...] = ("random", "stratified", "matched")
AGE_BAND = "age_band"
_MAX_LEVELS = 64  # a balance variable with more levels than this is almost surely continuous


class CohortError(ValueError):
    """The cohort cannot be drawn as asked (too few images, bad settings, unusable pool)."""


@dataclass(frozen=True)
class CohortResult:
    """The chosen pool rows (canonical order, plus ``age_band``) and a JSON-ready report."""

    cohort: pd.DataFrame
    report: dict[str, Any]


def site_rng(seed: int, site: str, *extra: int) -> np.random.Generator:
    """A generator fixed by (seed, site, extra); Python's ``hash()`` is salted per process."""
    if seed < 0:
        raise CohortError(f"seed must be >= 0, got {seed}")
    digest = hashlib.sha256(site.encode("utf-8")).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng(np.random.SeedSequence([seed, *words, *extra]))


@dataclass(frozen=True)
class PoolIndex:
    """A pool's patients and canonical row order, as integer arrays (rows stay where they are).

    ``codes[i]``: patient of row i (0..P-1, in patient_id order); ``canon``: row indices in
    canonical order; ``starts[p]``: position in ``canon`` of patient p's first row;
    ``patient_ids``: the P ids, sorted.
    """

    codes: np.ndarray
    canon: np.ndarray
    starts: np.ndarray
    counts: np.ndarray
    patient_ids: pd.Index

    @property
    def n_patients(self) -> int:
        return len(self.starts)

    @property
    def first_rows(self) -> np.ndarray:
        return self.canon[self.starts]


def index_pool(pool: pd.DataFrame, site: str) -> PoolIndex:
    """Check the id columns and compute the canonical order (see module docstring)."""
    _check_ids(pool, site)
    codes, patient_ids = pd.factorize(pool["patient_id"], sort=True)
    image_key = _image_key(pool, site)
    n = len(pool)
    canon = np.argsort(codes.astype(np.int64) * n + image_key)  # keys are unique
    counts = np.bincount(codes)
    starts = np.cumsum(counts) - counts
    return PoolIndex(codes, canon, starts, counts, pd.Index(patient_ids))


def _check_ids(pool: pd.DataFrame, site: str) -> None:
    missing = [c for c in ("image_id", "patient_id", "age") if c not in pool.columns]
    if missing:
        raise CohortError(f"site {site!r}: pool lacks required column(s) {missing}")
    if len(pool) == 0:
        raise CohortError(f"site {site!r}: pool is empty")
    for column in ("image_id", "patient_id"):
        bad = pool[column].isna().to_numpy()
        if bad.any():
            raise CohortError(_row_message(pool, site, np.flatnonzero(bad), column, "an id"))


def _image_key(pool: pd.DataFrame, site: str) -> np.ndarray:
    """Rank of each row's image_id by its SipHash; duplicates fail with their rows."""
    ids = pool["image_id"]
    digest = pd.util.hash_pandas_object(ids, index=False, categorize=False).to_numpy()
    order = np.argsort(digest, kind="stable")
    tie = np.flatnonzero(digest[order][1:] == digest[order][:-1])
    if tie.size:
        a, b = order[tie], order[tie + 1]
        same = ids.iloc[a].to_numpy() == ids.iloc[b].to_numpy()
        if same.any():
            rows = np.sort(np.concatenate([a[same], b[same]]))
            raise CohortError(_row_message(pool, site, rows, "image_id", "unique image ids"))
        codes, _ = pd.factorize(ids, sort=True)  # a 64-bit collision: rank exactly instead
        return codes.astype(np.int64)
    key = np.empty(len(ids), dtype=np.int64)
    key[order] = np.arange(len(ids))
    return key


def _row_message(frame: pd.DataFrame, site: str, rows: np.ndarray, column: str, want: str) -> str:
    shown = rows[:5]
    where = frame["row"].iloc[shown].tolist() if "row" in frame.columns else shown.tolist()
    values = frame[column].iloc[shown].tolist()
    label = "CSV line(s)" if "row" in frame.columns else "row(s)"
    return (
        f"site {site!r} metadata: {len(rows)} row(s) with a bad {column!r} (expected {want}); "
        f"first {label} {where}, values {values}"
    )


def sample_cohort(
    pool: pd.DataFrame,
    *,
    site: str,
    size: int,
    strategy: Strategy = "random",
    balance_on: Iterable[str] = ("age_band", "sex"),
    per_patient_cap: int = 0,
    allow_smaller: bool = False,
    exclude_patients: Iterable[str] = (),
    seed: int = 0,
    age_edges: Iterable[float] = (40.0, 60.0, 80.0),
    pools: Mapping[str, pd.DataFrame] | None = None,
) -> CohortResult:
    """Draw ``size`` images of whole patients from ``pool`` (one site's normalised metadata).

    ``pools`` (site -> pool, every site including this one) is required for ``matched``.
    Raises :class:`CohortError` when the pool has too few eligible images (unless
    ``allow_smaller``), when settings are invalid, or when a needed column is missing.
    """
    balance_on = list(balance_on)
    age_edges = [float(e) for e in age_edges]
    _check_args(site, size, strategy, per_patient_cap, age_edges, balance_on, pools)
    index = index_pool(pool, site)
    exclude = {str(p) for p in exclude_patients}
    draw = _Draw.make(pool, index, site, seed, per_patient_cap, exclude)

    strata_of_patient, strata = _patient_strata(pool, index, balance_on, age_edges, strategy, site)
    stratum_row = strata_of_patient[index.codes]
    available = np.bincount(stratum_row[draw.eligible], minlength=len(strata))
    if strategy == "matched":
        assert pools is not None
        indexes = {name: index if pools[name] is pool else None for name in pools}
        shares, matched = _matched_shares(strata, balance_on, age_edges, pools, indexes, site)
    else:
        shares, matched = available / max(int(available.sum()), 1), {}
    quota, shrunk = _quota(
        size, shares, available, strata, balance_on, draw, site, strategy, allow_smaller
    )

    chosen = _take(draw, stratum_row, quota, index)
    cohort = pool.iloc[chosen].reset_index(drop=True)
    cohort[AGE_BAND] = age_bands(cohort["age"].to_numpy(dtype=float), age_edges)
    report = _report(
        site=site,
        size=size,
        strategy=strategy,
        seed=seed,
        balance_on=balance_on,
        age_edges=age_edges,
        allow_smaller=allow_smaller,
        pool=pool,
        index=index,
        draw=draw,
        chosen=chosen,
        strata=strata,
        stratum_row=stratum_row,
        available=available,
        shares=shares,
        quota=quota,
        shrunk=shrunk,
        matched=matched,
        cohort=cohort,
        n_exclude=len(exclude),
    )
    return CohortResult(cohort=cohort, report=report)


# --------------------------------------------------------------------------------------- checks


def _check_args(
    site: str,
    size: int,
    strategy: str,
    cap: int,
    age_edges: list[float],
    balance_on: list[str],
    pools: Mapping[str, pd.DataFrame] | None,
) -> None:
    if strategy not in STRATEGIES:
        raise CohortError(f"cohort.strategy: expected one of {STRATEGIES}, got {strategy!r}")
    if isinstance(size, bool) or int(size) != size or size <= 0:
        raise CohortError(f"cohort.images_per_site: expected a positive integer, got {size!r}")
    if cap < 0:
        raise CohortError(f"cohort.per_patient_cap: expected >= 0 (0 = no cap), got {cap}")
    if any(b <= a for a, b in zip(age_edges, age_edges[1:], strict=False)):
        raise CohortError(f"age_edges must be strictly increasing, got {age_edges}")
    if strategy != "random" and not balance_on:
        raise CohortError(f"cohort.balance_on is empty; strategy {strategy!r} needs variables")
    if len(set(balance_on)) != len(balance_on):
        raise CohortError(f"cohort.balance_on has duplicates: {balance_on}")
    if strategy == "matched":
        if not pools:
            raise CohortError("strategy 'matched' needs `pools` (every site's pool, this one too)")
        if site not in pools:
            raise CohortError(f"strategy 'matched': site {site!r} is not in pools {sorted(pools)}")


# -------------------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class _Draw:
    """The seeded order and who is eligible: per row, per patient."""

    patient_pos: np.ndarray  # per patient: its place in the seeded patient order
    image_rank: np.ndarray  # per row: its place among its patient's images (seeded)
    excluded_patient: np.ndarray  # per patient
    excluded_row: np.ndarray
    capped_row: np.ndarray
    eligible: np.ndarray
    cap: int

    @classmethod
    def make(
        cls, pool: pd.DataFrame, index: PoolIndex, site: str, seed: int, cap: int, exclude: set[str]
    ) -> _Draw:
        n = len(index.codes)
        rng = site_rng(seed, site)
        patient_pos = rng.permutation(index.n_patients)
        image_random = np.empty(n, dtype=np.int64)
        image_random[index.canon] = rng.permutation(n)
        order = np.argsort(index.codes.astype(np.int64) * n + image_random)  # unique keys
        image_rank = np.empty(n, dtype=np.int64)
        image_rank[order] = np.arange(n) - index.starts[index.codes[order]]
        excluded_patient = np.zeros(index.n_patients, dtype=bool)
        if exclude:
            excluded_patient = index.patient_ids.astype(str).isin(exclude)
        excluded_row = excluded_patient[index.codes]
        capped_row = image_rank >= cap if cap > 0 else np.zeros(n, dtype=bool)
        eligible = ~excluded_row & ~capped_row
        return cls(
            patient_pos, image_rank, excluded_patient, excluded_row, capped_row, eligible, cap
        )

    def why(self) -> str:
        text = f"after excluding {int(self.excluded_patient.sum())} held-out patient(s)"
        return text + (f" and capping at {self.cap} image(s) per patient" if self.cap else "")


def _take(draw: _Draw, stratum_row: np.ndarray, quota: np.ndarray, index: PoolIndex) -> np.ndarray:
    """Rows chosen: per stratum, patients in seeded order, images in seeded order, up to quota.

    Returns row indices of ``pool`` in canonical order.
    """
    rows = np.flatnonzero(draw.eligible)
    n_patients = np.int64(index.n_patients)
    max_rank = np.int64(draw.image_rank.max() + 1)
    key = (stratum_row[rows] * n_patients + draw.patient_pos[index.codes[rows]]) * max_rank
    rows = rows[np.argsort(key + draw.image_rank[rows])]  # unique keys
    strat = stratum_row[rows]
    first = np.searchsorted(strat, np.arange(len(quota)), side="left")
    picked = rows[np.arange(len(rows)) - first[strat] < quota[strat]]
    canon_pos = np.empty(len(index.canon), dtype=np.int64)
    canon_pos[index.canon] = np.arange(len(index.canon))
    return picked[np.argsort(canon_pos[picked])]


# -------------------------------------------------------------------------------------- strata


def _patient_strata(
    pool: pd.DataFrame,
    index: PoolIndex,
    balance_on: list[str],
    age_edges: list[float],
    strategy: str,
    site: str,
) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """Stratum index per patient and the sorted stratum labels (value tuples of balance_on)."""
    if strategy == "random":
        return np.zeros(index.n_patients, dtype=np.int64), [()]
    table = _patient_table(pool, index.codes, index.n_patients, balance_on, age_edges, site)
    return _combine(table)


def _combine(table: pd.DataFrame) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """Joint stratum code per row and the sorted value tuples (integer work, no MultiIndex)."""
    codes, levels = [], []
    for col in table.columns:
        c, u = pd.factorize(table[col], sort=True)
        codes.append(c)
        levels.append([str(v) for v in u])
    flat = np.ravel_multi_index(codes, [len(u) for u in levels])
    present, inverse = np.unique(flat, return_inverse=True)
    parts = np.unravel_index(present, [len(u) for u in levels])
    strata = [
        tuple(levels[j][parts[j][i]] for j in range(len(levels))) for i in range(len(present))
    ]
    return inverse.astype(np.int64), strata


def _patient_table(
    pool: pd.DataFrame,
    codes: np.ndarray,
    n_patients: int,
    balance_on: list[str],
    age_edges: list[float],
    site: str,
) -> pd.DataFrame:
    """Per patient (in code order), its balance_on values: youngest age, first level by name.

    Aggregates, not "the first image", so that another site's pool needs no canonical order
    (only its patient codes) when ``matched`` computes the shared target.
    """
    columns: dict[str, np.ndarray] = {}
    for var in balance_on:
        if var == AGE_BAND:
            age = pd.Series(pool["age"].to_numpy(dtype=float)).groupby(codes).min()
            columns[var] = age_bands(age.reindex(range(n_patients)).to_numpy(), age_edges)
            continue
        if var not in pool.columns:
            raise CohortError(
                f"cohort.balance_on: site {site!r} pool has no column {var!r} "
                f"(columns: {sorted(map(str, pool.columns))}; 'age_band' is derived from age)"
            )
        col = pool[var]
        if pd.api.types.is_float_dtype(col):
            raise CohortError(
                f"cohort.balance_on: {var!r} is continuous; balance on a banded version "
                "(use 'age_band' for age, bands from age_edges)"
            )
        level, levels = pd.factorize(col.astype("string").fillna("unknown"), sort=True)
        if len(levels) > _MAX_LEVELS:
            raise CohortError(
                f"cohort.balance_on: {var!r} has {len(levels)} levels in site {site!r} (more than "
                f"{_MAX_LEVELS}); stratifying on it would leave strata of one patient"
            )
        first = pd.Series(level).groupby(codes).min().reindex(range(n_patients)).to_numpy()
        columns[var] = np.asarray(levels, dtype=object)[first]
    return pd.DataFrame(columns)


def _matched_shares(
    strata: list[tuple[str, ...]],
    balance_on: list[str],
    age_edges: list[float],
    pools: Mapping[str, pd.DataFrame],
    indexes: Mapping[str, PoolIndex | None],
    site: str,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Target share per stratum: min over sites of its image share, renormalised."""
    per_site = {}
    for name in sorted(pools):
        pool = pools[name]
        index = indexes.get(name)
        if index is None:
            _check_ids(pool, name)
            codes, uniques = pd.factorize(pool["patient_id"])
            n_patients, counts = len(uniques), np.bincount(codes)
        else:
            codes, n_patients, counts = index.codes, index.n_patients, index.counts
        table = _patient_table(pool, codes, n_patients, balance_on, age_edges, name)
        stratum, keys = _combine(table)
        images = np.bincount(stratum, weights=counts, minlength=len(keys))
        per_site[name] = pd.Series(images / images.sum(), index=keys)
    shares = pd.concat(per_site, axis=1).fillna(0.0)
    floor = shares.min(axis=1)
    if floor.sum() <= 0:
        raise CohortError(
            f"strategy 'matched': sites {sorted(pools)} share no stratum of {balance_on}; "
            "balance on fewer variables or coarser age_edges"
        )
    target = (floor / floor.sum()).sort_index()
    known = set(strata)
    missing = [_label(balance_on, s) for s in target.index if target[s] > 0 and s not in known]
    if missing:
        raise CohortError(
            f"strategy 'matched': pools[{site!r}] is not the pool being sampled "
            f"(strata {missing[:3]} are in pools[{site!r}] but not in the pool)"
        )
    info = {
        "sites": sorted(pools),
        "target_share": {_label(balance_on, s): round(float(v), 6) for s, v in target.items()},
        "site_shares": {
            name: {_label(balance_on, s): round(float(v), 6) for s, v in shares[name].items()}
            for name in shares.columns
        },
    }
    return np.array([float(target.get(s, 0.0)) for s in strata]), info


def _label(balance_on: list[str], values: tuple[str, ...]) -> str:
    return "|".join(f"{k}={v}" for k, v in zip(balance_on, values, strict=False)) or "all"


def allocate(total: int, shares: np.ndarray) -> np.ndarray:
    """Split ``total`` by ``shares`` into integers summing to ``total`` (largest remainder).

    Ties in the remainder go to the earlier stratum (strata are sorted), so it is deterministic.
    """
    shares = np.asarray(shares, dtype=float)
    if total == 0 or shares.sum() <= 0:
        return np.zeros(len(shares), dtype=np.int64)
    exact = total * shares / shares.sum()
    base = np.floor(exact).astype(np.int64)
    extra = total - int(base.sum())
    order = np.argsort(-(exact - base), kind="stable")
    base[order[:extra]] += 1
    return base


def _quota(
    size: int,
    shares: np.ndarray,
    available: np.ndarray,
    strata: list[tuple[str, ...]],
    balance_on: list[str],
    draw: _Draw,
    site: str,
    strategy: str,
    allow_smaller: bool,
) -> tuple[np.ndarray, bool]:
    """Images to take per stratum; shrinks (when allowed) to what the pool can give."""
    n_eligible = int(available.sum())
    if n_eligible < size:
        if not allow_smaller:
            raise CohortError(
                f"site {site!r}: cohort.images_per_site asks for {size} images but only "
                f"{n_eligible} are eligible ({draw.why()}); set cohort.allow_smaller: true to "
                "accept a smaller cohort"
            )
        if strategy != "matched":
            return available.copy(), True
    quota = allocate(size, shares)
    short = np.flatnonzero(quota > available)
    if short.size == 0:
        return quota, False
    if not allow_smaller:
        details = "; ".join(
            f"{_label(balance_on, strata[i])} needs {quota[i]}, has {available[i]}"
            for i in short[:5]
        )
        raise CohortError(
            f"site {site!r}: the matched mix of {size} images needs more images than the site has "
            f"in {len(short)} stratum/strata ({draw.why()}): {details}; "
            "set cohort.allow_smaller: true to accept a smaller cohort"
        )
    positive = shares > 0
    largest = int(np.floor(np.min(available[positive] / shares[positive]) + 1e-9))
    return allocate(min(size, largest), shares), True


# -------------------------------------------------------------------------------------- report


def _report(**k: Any) -> dict[str, Any]:
    """What was asked, what the pool held, what was taken, and how the cohort compares to it."""
    index: PoolIndex = k["index"]
    draw: _Draw = k["draw"]
    chosen: np.ndarray = k["chosen"]
    balance_on: list[str] = k["balance_on"]
    chosen_per_patient = np.bincount(index.codes[chosen], minlength=index.n_patients)
    eligible_per_patient = np.bincount(index.codes[draw.eligible], minlength=index.n_patients)
    taken = chosen_per_patient > 0
    trimmed = int((chosen_per_patient[taken] < eligible_per_patient[taken]).sum())
    chosen_strata = np.bincount(k["stratum_row"][chosen], minlength=len(k["strata"]))
    columns = [c for c in ("patient_id", "age", *balance_on) if c in k["pool"].columns]
    eligible_frame = k["pool"][columns].iloc[np.flatnonzero(draw.eligible)]
    report: dict[str, Any] = {
        "site": k["site"],
        "strategy": k["strategy"],
        "seed": int(k["seed"]),
        "requested": int(k["size"]),
        "size": int(len(chosen)),
        "shrunk": bool(k["shrunk"]),
        "allow_smaller": bool(k["allow_smaller"]),
        "per_patient_cap": int(draw.cap),
        "balance_on": list(balance_on),
        "age_edges": list(k["age_edges"]),
        "age_bands": age_band_labels(k["age_edges"]),
        "pool": {"images": int(len(index.codes)), "patients": int(index.n_patients)},
        "excluded": {
            "requested_patients": int(k["n_exclude"]),
            "patients_in_pool": int(draw.excluded_patient.sum()),
            "images": int(draw.excluded_row.sum()),
        },
        "capped_images": int((draw.capped_row & ~draw.excluded_row).sum()),
        "eligible": {
            "images": int(draw.eligible.sum()),
            "patients": int((eligible_per_patient > 0).sum()),
        },
        "chosen": {
            "images": int(len(chosen)),
            "patients": int(taken.sum()),
            "trimmed_patients": trimmed,
        },
        "strata": [
            {
                "stratum": _label(balance_on, s) if s else "all",
                "eligible_images": int(k["available"][i]),
                "target_share": round(float(k["shares"][i]), 6),
                "quota": int(k["quota"][i]),
                "chosen_images": int(chosen_strata[i]),
            }
            for i, s in enumerate(k["strata"])
        ],
        "balance": balance_report(
            {"cohort": k["cohort"], "eligible_pool": eligible_frame},
            ["age", *balance_on],
            k["age_edges"],
        ),
    }
    if k["matched"]:
        report["matched"] = k["matched"]
    return report
