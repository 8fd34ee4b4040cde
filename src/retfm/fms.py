"""What a foundation model of the study is: a pre-training site and a recipe, made here or
imported, and its *replicates*. The one place that defines an FM's name, site, recipe, source,
its replicates and every name derived from them; stages, registry, analysis and report read
them from here.

An **FM** is named ``<recipe>-<site>`` by convention (``mae-hospital``, ``dinov2-meh``). It is
the unit of the study's question: does this site's *data* make a better FM? Alignment is by
site: an FM is aligned with a task whose data come from its site, whatever its recipe. FMs are
compared within a recipe (same recipe, different site: the data effect).

A **replicate** is one pre-training run of an FM: its own cohort drawn from the site's pool
(same size and strategy, its own seed) and its own pre-training randomness. An FM pre-trained
here has ``study.replicates`` of them, named ``<fm>-r<k>`` (``mae-hospital-r0``); the name is
its DVC stage key (``pretrain@mae-hospital-r0``, ``adapt@mae-hospital-r0-hospital_dr``), its
output folder and its registry model (``fm-mae-hospital-r0``). Replicate ``k`` of every FM of a
site shares that site's cohort ``<site>-r<k>``, so the recipes are compared on the same data.
An imported FM (a released checkpoint) is one pre-training run: one replicate, named as the FM.

DVC cannot expand a count into stages, nor read a dict entry inside a ``matrix``, so
:func:`expansion` writes the replicated stages' keys into ``params.yaml``'s ``expanded``
section (``retfm expand``); the settings refuse a stale one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retfm.settings import Settings, StudySettings

#: A replicate's seed (its cohort draw and its pre-training): study.seed + REPLICATE_STRIDE * k,
#: so replicate 0 keeps the seed a one-run study had, and the replicates of two studies with
#: different study.seed values (below the stride) never share a seed.
REPLICATE_STRIDE = 1000


def replicate_seed(study_seed: int, replicate: int) -> int:
    return study_seed + REPLICATE_STRIDE * replicate


def cohort_key(site: str, replicate: int) -> str:
    """The name of a site's cohort for one replicate: ``hospital-r0``."""
    return f"{site}-r{replicate}"


def packed_cohorts(outputs: Path) -> Path:
    return Path(outputs) / "packed" / "cohorts"


def is_pretrained_here(source: str | None, site: str, outputs: Path) -> bool:
    """Pre-trained here: no source, or (older params) the site's packed cohort folder."""
    return source is None or Path(source).as_posix() == (packed_cohorts(outputs) / site).as_posix()


@dataclass(frozen=True)
class FM:
    name: str
    site: str
    recipe: str
    # the site's packed cohorts (pre-trained here) or the checkpoint it is imported from
    source: Path
    imported: bool
    num_heads: int | None = None

    @property
    def label(self) -> str:
        """How people say it: ``mae@hospital``."""
        return f"{self.recipe}@{self.site}"

    def aligned_with(self, task_site: str) -> bool:
        return self.site == task_site

    def tags(self) -> dict[str, str]:
        """What every MLflow run and registry version of this FM carries."""
        return {
            "fm": self.name,
            "fm.site": self.site,
            "fm.recipe": self.recipe,
            "fm.source": "imported" if self.imported else "pretrained",
        }


@dataclass(frozen=True)
class Replicate:
    """One pre-training run of an FM: what the stages ``pretrain@``, ``register@`` and
    ``adapt@`` make, and what the per-run comparisons compare."""

    fm: FM
    index: int
    name: str
    seed: int
    source: Path  # the replicate's packed cohort, or the FM's checkpoint

    # the FM's identity, so that code written for one run reads the FM's facts directly
    @property
    def site(self) -> str:
        return self.fm.site

    @property
    def recipe(self) -> str:
        return self.fm.recipe

    @property
    def imported(self) -> bool:
        return self.fm.imported

    @property
    def num_heads(self) -> int | None:
        return self.fm.num_heads

    @property
    def cohort(self) -> str | None:
        """Its cohort's name (``hospital-r0``); None for an imported FM."""
        return None if self.imported else cohort_key(self.site, self.index)

    @property
    def label(self) -> str:
        """``mae@hospital r0`` (``mae@meh`` for an imported FM)."""
        return self.fm.label if self.imported else f"{self.fm.label} r{self.index}"

    @property
    def model_name(self) -> str:
        """Its registry model: ``fm-mae-hospital-r0``."""
        return f"fm-{self.name}"

    def classifier_name(self, task: str) -> str:
        """Its classifier's registry model: ``clf-hospital_dr-fm-mae-hospital-r0``."""
        return f"clf-{task}-{self.model_name}"

    def aligned_with(self, task_site: str) -> bool:
        return self.fm.aligned_with(task_site)

    def tags(self) -> dict[str, str]:
        """The FM's tags plus which run this is; ``fm.model`` is its registry model."""
        return {
            **self.fm.tags(),
            "fm.replicate": str(self.index),
            "fm.run": self.name,
            "fm.model": self.model_name,
        }


# --------------------------------------------------------------------------- the study's


def _fm(name: str, spec: Any, outputs: Path) -> FM:
    here = is_pretrained_here(spec.source, spec.site, outputs)
    return FM(
        name=name,
        site=spec.site,
        recipe=spec.recipe,
        source=packed_cohorts(outputs) / spec.site if here else Path(spec.source),
        imported=not here,
        num_heads=spec.num_heads,
    )


def expansion(study: StudySettings, outputs: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """What ``params.yaml``'s ``expanded`` section must hold: one cohort per site and
    replicate, one entry per FM replicate (the keys DVC's ``foreach`` / ``matrix`` expand)."""
    cohorts = {
        cohort_key(site, k): {"site": site, "replicate": k, "seed": replicate_seed(study.seed, k)}
        for site in study.sites
        for k in range(study.replicates)
    }
    runs: dict[str, dict[str, Any]] = {}
    for name, spec in study.fms.items():
        fm = _fm(name, spec, outputs)
        indices = [0] if fm.imported else list(range(study.replicates))
        for k in indices:
            key = name if fm.imported else f"{name}-r{k}"
            source = fm.source if fm.imported else packed_cohorts(outputs) / cohort_key(fm.site, k)
            entry: dict[str, Any] = {
                "fm": name,
                "site": fm.site,
                "recipe": fm.recipe,
                "replicate": k,
                "seed": replicate_seed(study.seed, k),
                "source": source.as_posix(),
            }
            if fm.num_heads is not None:
                entry["num_heads"] = fm.num_heads
            runs[key] = entry
    return {"cohorts": cohorts, "fms": runs}


def study_fms(settings: Settings) -> list[FM]:
    """The study's FMs, in ``params.yaml`` order."""
    return [_fm(n, s, settings.paths.outputs) for n, s in settings.study.fms.items()]


def study_replicates(settings: Settings) -> list[Replicate]:
    """Every FM's replicates, FM by FM in ``params.yaml`` order."""
    fms = {fm.name: fm for fm in study_fms(settings)}
    return [
        Replicate(fm=fms[e.fm], index=e.replicate, name=key, seed=e.seed, source=Path(e.source))
        for key, e in settings.expanded.fms.items()
    ]


def get_fm(settings: Settings, name: str) -> FM:
    for fm in study_fms(settings):
        if fm.name == name:
            return fm
    raise ValueError(f"FM {name!r} is not in study.fms {list(settings.study.fms)}")


def get_replicate(settings: Settings, name: str) -> Replicate:
    for rep in study_replicates(settings):
        if rep.name == name:
            return rep
    known = list(settings.expanded.fms)
    raise ValueError(f"{name!r} is not one of the study's FM replicates {known}")


def fm_sites(fms: list[FM]) -> dict[str, str]:
    return {fm.name: fm.site for fm in fms}


def fm_recipes(fms: list[FM]) -> dict[str, str]:
    return {fm.name: fm.recipe for fm in fms}


def replicate_fms(replicates: list[Replicate]) -> dict[str, str]:
    """Replicate name -> its FM's name."""
    return {r.name: r.fm.name for r in replicates}
