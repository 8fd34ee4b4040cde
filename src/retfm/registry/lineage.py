"""What a registered version must say about where it came from, and the model card."""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retfm.fms import Replicate

#: Tags a version needs before it may be promoted (promotion gate "lineage complete").
REQUIRED_TAGS = (
    "data.md5",
    "cohort.md5",
    "git.commit",
    "params.hash",
    "recipe",
    "recipe.hash",
    "fm.site",
    "weights.sha256",
)

_LIBRARIES = ("torch", "timm", "onnx", "onnxruntime-gpu", "onnxruntime", "mlflow", "dvc")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a safetensors file's content: its header with keys sorted, then its data.

    Identifies "the same weights" across saves: safetensors writes the header's metadata map in
    an arbitrary order, so two saves of one model can differ byte for byte (and in sha256).
    """
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def missing_lineage(tags: dict[str, str]) -> list[str]:
    """Required lineage tags that are absent or hold a placeholder."""
    placeholders = {"", "unknown", "untracked", "unlocked"}
    return [k for k in REQUIRED_TAGS if tags.get(k, "") in placeholders]


def fm_lineage_tags(fm: Replicate, run: dict, lock_file: Path = Path("dvc.lock")) -> dict[str, str]:
    """What an FM replicate's registry version (and its classifiers') say about where it came
    from: the FM's identity, which replicate, its recipe, and the cohort it saw
    (``released:<file>`` when imported)."""
    from retfm import tracking

    cohort = (
        f"released:{fm.source.name}"
        if fm.imported
        else tracking.lock_hash(f"cohort@{fm.cohort}", f"outputs/cohorts/{fm.cohort}", lock_file)
    )
    return {
        **fm.tags(),
        "recipe": run["recipe"],
        "recipe.hash": run["recipe_hash"],
        "cohort.md5": cohort,
        "cohort.fingerprint": run["cohort_fingerprint"],
    }


_FEATURES = {
    "avg": "the mean of the patch tokens through a LayerNorm (fc_norm): RETFound's MAE feature",
    "token": "the class token after the final norm: RETFound's DINOv2 feature",
}


def model_card(
    *,
    name: str,
    fm: Replicate,
    tags: dict[str, str],
    preprocessing: dict,
    arch: dict,
    data_card: dict | None,
    evaluation: str = "Not evaluated yet: see the study report.",
) -> str:
    """A Markdown model card (MONAI-style fields: intended use, data, input/output, versions)."""
    size = (data_card or {}).get("size") or {}
    how = (
        f"imported from the released checkpoint `{fm.source.name}` ({fm.recipe})"
        if fm.imported
        else f"pre-trained here with {fm.recipe.upper()} on the **{fm.site}** cohort "
        f"`{fm.cohort}` (replicate {fm.index} of the FM `{fm.fm.name}`)"
    )
    if fm.imported:
        data_lines = [
            f"- site: {fm.site}; pre-trained elsewhere: its pre-training data are described by "
            "its release",
            f"- checkpoint sha256: `{(data_card or {}).get('checkpoint', {}).get('sha256')}`",
        ]
    else:
        data_lines = [
            f"- site: {fm.site}; cohort images: {size.get('images', 'n/a')}; "
            f"patients: {size.get('patients', 'n/a')}",
            f"- raw data DVC md5: `{tags.get('data.md5')}`; "
            f"cohort DVC md5: `{tags.get('cohort.md5')}`",
        ]
    lines = [
        f"# Model card: {name} ({fm.label})",
        "",
        "## Intended use",
        f"Research only. A retinal foundation-model encoder, {how}, for studying how "
        "pre-training data shape downstream generalisation and fairness. Not a medical device; "
        "not for diagnosis.",
        "",
        "## Input and output",
        f"- input `image`: float32 (batch, 3, {preprocessing.get('img_size')}, "
        f"{preprocessing.get('img_size')}), RGB scaled to [0, 1] then normalised with mean "
        f"{preprocessing.get('mean')} and std {preprocessing.get('std')}",
        f"- output `features`: float32 (batch, embed_dim): "
        f"{_FEATURES.get(str(arch.get('global_pool')), 'pooled encoder tokens')}.",
        "",
        "| architecture | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in arch.items()],
        "",
        "## Training data",
        *data_lines,
        f"- recipe: `{tags.get('recipe')}` (hash `{tags.get('recipe.hash')}`); "
        f"params hash `{tags.get('params.hash')}`; git commit `{tags.get('git.commit')}`",
        *_card_summary(data_card),
        "- the full data card (age, sex, ethnicity, camera mix) is attached as `data_card.json`.",
        "",
        "## Evaluation",
        evaluation,
        "",
        "## Versions",
        *[f"- {k}: {v}" for k, v in library_versions().items()],
        "",
    ]
    return "\n".join(lines)


def _card_summary(card: dict | None) -> list[str]:
    """The data card's headline figures as a table (the full card is attached)."""
    if not card or card.get("imported"):
        return []
    rows = []
    age = (card.get("age") or {}).get("summary") or {}
    if age.get("mean") is not None:
        rows.append(("age, mean (sd)", f"{age['mean']:.1f} ({age.get('sd', float('nan')):.1f})"))
    for name, dist in (card.get("distributions") or {}).items():
        shares = (dist or {}).get("shares") or {}
        if shares:
            rows.append((name, ", ".join(f"{k} {v:.0%}" for k, v in list(shares.items())[:7])))
    disease = card.get("disease") or {}
    if disease.get("prevalence") is not None:
        rows.append(("disease prevalence",
                     f"{disease['prevalence']:.1%} ({disease.get('diseased')} of "
                     f"{disease.get('known')} with a known diagnosis)"))  # fmt: skip
    if not rows:
        return []
    return ["", "| cohort | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]


class StaleRecordError(ValueError):
    """A stage output disagrees with the settings it claims to come from."""


def check_cohort_card(card: dict, cohort_settings: dict, cohort: str) -> None:
    """Refuse a cohort whose data card was drawn with other settings than ``params.yaml``'s
    (e.g. restored from DVC's run cache for a key it cannot see), or holds another size than
    it was asked for."""
    sampling = card.get("sampling") or {}
    recorded = sampling.get("settings") or {}
    differ = sorted(
        k for k in set(recorded) | set(cohort_settings) if recorded.get(k) != cohort_settings.get(k)
    )
    if differ:
        detail = ", ".join(
            f"{k}: cohort has {recorded.get(k)!r}, params.yaml {cohort_settings.get(k)!r}"
            for k in differ
        )
        raise StaleRecordError(
            f"cohort@{cohort} was sampled with other settings than params.yaml ({detail}); "
            f"rerun it: dvc repro -f cohort@{cohort}"
        )
    report = sampling.get("report") or {}
    images = (card.get("size") or {}).get("images")
    if images != report.get("requested") and not report.get("shrunk"):
        raise StaleRecordError(
            f"cohort@{cohort} holds {images} images but was asked for {report.get('requested')}"
        )
