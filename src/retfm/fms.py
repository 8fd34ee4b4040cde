"""What a foundation model of the study is: a pre-training site and a recipe, made here or
imported. The one place that defines an FM's name, site, recipe, source and every name derived
from them; stages, registry, analysis and report read it from here.

An FM is named ``<recipe>-<site>`` by convention (``mae-hospital``, ``dinov2-meh``): the name
is its DVC stage key (``pretrain@mae-hospital``, ``adapt@mae-hospital-hospital_dr``), its
output folder (``outputs/pretrain/mae-hospital``) and its registry model (``fm-mae-hospital``).
Alignment is by site: an FM is aligned with a task whose data come from its site, whatever its
recipe. FMs are compared within a recipe (same recipe, different site: the data effect).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from retfm.settings import Settings


@dataclass(frozen=True)
class FM:
    name: str
    site: str
    recipe: str
    source: Path  # the packed cohort it is pre-trained on, or the checkpoint it is imported from
    imported: bool
    num_heads: int | None = None

    @property
    def label(self) -> str:
        """How people say it: ``mae@hospital``."""
        return f"{self.recipe}@{self.site}"

    @property
    def model_name(self) -> str:
        """Its registry model: ``fm-mae-hospital``."""
        return f"fm-{self.name}"

    def classifier_name(self, task: str) -> str:
        """Its classifier's registry model: ``clf-hospital_dr-fm-mae-hospital``."""
        return f"clf-{task}-{self.model_name}"

    def aligned_with(self, task_site: str) -> bool:
        return self.site == task_site

    def tags(self) -> dict[str, str]:
        """What every MLflow run and registry version of this FM carries."""
        return {
            "fm": self.name,
            "fm.site": self.site,
            "fm.recipe": self.recipe,
            "fm.source": "imported" if self.imported else "pretrained",
            "fm.model": self.model_name,
        }


def study_fms(settings: Settings) -> list[FM]:
    """The study's FMs, in ``params.yaml`` order."""
    cohorts = settings.paths.outputs / "packed" / "cohorts"
    out = []
    for name, spec in settings.study.fms.items():
        source = Path(spec.source)
        out.append(
            FM(
                name=name,
                site=spec.site,
                recipe=spec.recipe,
                source=source,
                imported=source.as_posix() != (cohorts / spec.site).as_posix(),
                num_heads=spec.num_heads,
            )
        )
    return out


def get_fm(settings: Settings, name: str) -> FM:
    for fm in study_fms(settings):
        if fm.name == name:
            return fm
    raise ValueError(f"FM {name!r} is not in study.fms {list(settings.study.fms)}")


def fm_sites(fms: list[FM]) -> dict[str, str]:
    return {fm.name: fm.site for fm in fms}


def fm_recipes(fms: list[FM]) -> dict[str, str]:
    return {fm.name: fm.recipe for fm in fms}
