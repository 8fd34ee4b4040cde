"""Typed, frozen settings read once from ``params.yaml``.

DVC tracks the same keys as stage params, so what a stage reads is what DVC hashes. Every model
forbids unknown keys: a typo such as ``cohort.szie`` fails at load time with the key's path.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Recipe = Literal["mae", "dinov2"]
#: An FM name is a stage key (``pretrain@<name>``), a folder and part of a registry name
#: (``fm-<name>``): letters, digits, ``_`` and ``-`` only (DVC splits stage names at ``@``,
#: MLflow model URIs at ``@`` and ``/``).
FM_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"


class FMSpec(_Frozen):
    """One foundation model of the study: a pre-training site and a recipe, and what it is made
    from: nothing more when retfm pre-trains it on the site's cohorts (``source`` left out; older
    params name the site's packed cohort folder, which means the same), or ``source``, a released
    checkpoint file, when it is imported. See :mod:`retfm.fms`."""

    site: str
    recipe: Recipe
    source: str | None = None
    # only for a checkpoint that does not record its architecture and whose width and depth
    # are not a standard ViT's: the attention head count (never guessed from the width)
    num_heads: PositiveInt | None = None


class StudySettings(_Frozen):
    name: str
    seed: Annotated[int, Field(ge=0, lt=1000)] = 0  # < the replicate seed stride (retfm.fms)
    sites: list[str] = Field(default_factory=list)  # sites with pre-training images (cohorts)
    # pre-training runs per FM made here, each on its own cohort draw with its own seed; an
    # imported FM is one run. With one, the data-level verdict is undetermined.
    replicates: Annotated[int, Field(ge=1, le=100)] = 1
    fms: dict[Annotated[str, Field(pattern=FM_NAME)], FMSpec] = Field(min_length=1)
    tasks: list[str] = Field(min_length=1)


class CohortRunSpec(_Frozen):
    """One cohort of a site for one replicate (``expanded.cohorts.<site>-r<k>``)."""

    site: str
    replicate: Annotated[int, Field(ge=0)]
    seed: int


class ReplicateSpec(_Frozen):
    """One pre-training run of an FM (``expanded.fms.<fm>-r<k>``): what DVC's stage needs."""

    fm: str
    site: str
    recipe: Recipe
    replicate: Annotated[int, Field(ge=0)]
    seed: int
    source: str
    num_heads: PositiveInt | None = None


class ExpandedSettings(_Frozen):
    """The study expanded into the keys of its replicated stages, written by ``retfm expand``
    from ``study`` (DVC cannot expand a count into stages): never edited by hand."""

    cohorts: dict[str, CohortRunSpec] = Field(default_factory=dict)
    fms: dict[str, ReplicateSpec] = Field(default_factory=dict)


class PathSettings(_Frozen):
    data: Path = Path("data")
    outputs: Path = Path("outputs")


class EffectSettings(_Frozen):
    population: Fraction = 1.0  # 0: every site sees the same people (age, sex, ethnicity, disease)
    site_style: float = Field(1.0, ge=0.0)
    age_visibility: float = 0.0
    sex: float = 0.0
    ethnicity: float = 0.0
    # site -> 0..1: the listed sites' cameras record low-contrast photographs, which only an FM
    # normalised with its own cohort's statistics reads well (see retfm.data.synthetic)
    alignment: dict[str, Fraction] = Field(default_factory=dict)


class SyntheticTask(_Frozen):
    source_site: str
    images: PositiveInt
    classes: Annotated[int, Field(ge=2)] = 2


class SyntheticSettings(_Frozen):
    seed: int = 0
    image_size: PositiveInt = 80
    site_images: PositiveInt = 2400
    images_per_patient: tuple[PositiveInt, PositiveInt] = (1, 4)
    sites: dict[str, Literal["specialist", "community", "public"]]
    tasks: dict[str, SyntheticTask]
    split_fractions: tuple[Fraction, Fraction, Fraction] = (0.6, 0.2, 0.2)
    effects: EffectSettings = EffectSettings()
    # write rectangular raw-looking photographs (off-centre field of view, sometimes clipped,
    # noisy black border, a text-like mark) around the same retina (retfm.data.synthetic)
    raw_photos: bool = False

    @model_validator(mode="after")
    def _check(self) -> SyntheticSettings:
        lo, hi = self.images_per_patient
        if lo > hi:
            raise ValueError(f"images_per_patient: {lo} > {hi}")
        if abs(sum(self.split_fractions) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must sum to 1, got {self.split_fractions}")
        for name, task in self.tasks.items():
            if task.source_site not in self.sites:
                raise ValueError(f"tasks.{name}.source_site {task.source_site!r} is not in sites")
        unknown = sorted(set(self.effects.alignment) - set(self.sites))
        if unknown:
            raise ValueError(f"effects.alignment: sites {unknown} are not in synthetic.sites")
        return self


class CohortSettings(_Frozen):
    images_per_site: PositiveInt
    strategy: Literal["random", "stratified", "matched"] = "random"
    balance_on: list[str] = Field(default_factory=lambda: ["age_band", "sex"])
    per_patient_cap: Annotated[int, Field(ge=0)] = 0
    allow_smaller: bool = False


class ValidationSettings(_Frozen):
    age_min: float = 0
    age_max: float = 120
    min_image_side: PositiveInt = 32
    check_images: bool = True
    workers: PositiveInt = 2
    max_report_rows: PositiveInt = 5
    distribution_tolerance: Fraction = 0.05


class PackSettings(_Frozen):
    image_size: PositiveInt = 64
    shard_size: PositiveInt = 4096
    # AutoMorph-style crop of the black background and pad to square before resizing
    # (retfm.data.fundus), as RETFound's authors prepared their images
    fundus_crop: bool = True


class ModelPreset(_Frozen):
    img_size: PositiveInt
    patch_size: PositiveInt
    embed_dim: PositiveInt
    depth: PositiveInt
    num_heads: PositiveInt
    decoder_embed_dim: PositiveInt
    decoder_depth: PositiveInt
    decoder_num_heads: PositiveInt

    @model_validator(mode="after")
    def _check(self) -> ModelPreset:
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.embed_dim % self.num_heads or self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError("embedding dims must be divisible by their head counts")
        return self


class ModelSettings(_Frozen):
    preset: str
    presets: dict[str, ModelPreset]

    @model_validator(mode="after")
    def _check(self) -> ModelSettings:
        if self.preset not in self.presets:
            raise ValueError(f"model.preset {self.preset!r} is not one of {sorted(self.presets)}")
        return self

    @property
    def arch(self) -> ModelPreset:
        return self.presets[self.preset]


class _RecipeSettings(_Frozen):
    recipe: str  # a name and version for what the recipe computes, recorded with every FM

    def check_arch(self, arch: ModelPreset) -> None:
        """Raise if this recipe's settings cannot train ``arch`` (nothing to check by default)."""


class MAERecipeSettings(_RecipeSettings):
    """The RETFound MAE recipe (``main_pretrain.py`` defaults), see retfm.training.recipes.mae."""

    recipe: str = "mae-retfound-v1"
    base_lr: float = Field(1.5e-4, gt=0)  # per 256 images (linear scaling rule)
    min_lr: float = Field(0.0, ge=0)
    warmup_epochs: Annotated[int, Field(ge=0)] = 1
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    norm_pix_loss: bool = True
    init_from: str = ""


class DINOv2RecipeSettings(_RecipeSettings):
    """The DINOv2 recipe (Oquab et al. 2023, ``ssl_default_config.yaml``, as RETFound-DINOv2
    trained it), on lightly's parts; see retfm.training.recipes.dinov2. Defaults are the paper's
    ViT-L settings; a key's comment in ``params.yaml`` says where the demo departs from them."""

    recipe: str = "dinov2-retfound-v1"
    # optimiser: AdamW, lr = base_lr * sqrt(effective batch / 1024), warm-up then cosine
    base_lr: float = Field(4e-3, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    warmup_epochs: Annotated[int, Field(ge=0)] = 10
    weight_decay: float = Field(0.04, ge=0)  # cosine from weight_decay to weight_decay_end
    weight_decay_end: float = Field(0.2, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = Field(0.9, gt=0, le=1)  # layer-wise lr decay
    patch_embed_lr_mult: float = Field(0.2, gt=0)
    clip_grad: float = Field(3.0, ge=0)  # 0: no clipping
    freeze_last_layer_epochs: Annotated[int, Field(ge=0)] = 1
    # the ViT
    layerscale: float = Field(1e-5, gt=0)
    drop_path: Fraction = 0.3
    drop_path_mode: Literal["uniform", "linear"] = "uniform"
    # heads (DINO and iBOT, shared unless ibot_separate_head)
    out_dim: PositiveInt = 65536
    head_hidden_dim: PositiveInt = 2048
    head_bottleneck_dim: PositiveInt = 256
    ibot_separate_head: bool = False
    # multi-crop, from the packed uint8 images (global crops at the model's img_size)
    local_crops: Annotated[int, Field(ge=0)] = 8
    local_crop_size: PositiveInt = 96
    global_crop_scale: tuple[Fraction, Fraction] = (0.32, 1.0)
    local_crop_scale: tuple[Fraction, Fraction] = (0.05, 0.32)
    # iBOT block masking of the global crops
    mask_probability: Fraction = 0.5  # share of global crops that are masked
    mask_ratio_min_max: tuple[Fraction, Fraction] = (0.1, 0.5)
    # losses
    dino_loss_weight: float = Field(1.0, ge=0)
    ibot_loss_weight: float = Field(1.0, ge=0)
    koleo_loss_weight: float = Field(0.1, ge=0)
    centering: Literal["sinkhorn_knopp", "softmax"] = "sinkhorn_knopp"
    center_momentum: Fraction = 0.9  # softmax centering only
    student_temp: float = Field(0.1, gt=0)
    warmup_teacher_temp: float = Field(0.04, gt=0)
    teacher_temp: float = Field(0.07, gt=0)
    warmup_teacher_temp_epochs: Annotated[int, Field(ge=0)] = 30
    momentum_teacher: Fraction = 0.992  # EMA momentum, cosine to momentum_teacher_end
    momentum_teacher_end: Fraction = 1.0
    # collapse: stop when, after collapse_after_epochs, the teacher's class-token embeddings
    # spread less than min_embedding_std x an isotropic spread, or its output distribution over
    # the batch has less than min_teacher_entropy of the maximum entropy
    collapse_after_epochs: float = Field(1.0, ge=0)
    min_embedding_std: Fraction = 0.05
    min_teacher_entropy: Fraction = 0.02

    @model_validator(mode="after")
    def _check(self) -> DINOv2RecipeSettings:
        for name in ("global_crop_scale", "local_crop_scale", "mask_ratio_min_max"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: {lo} > {hi}; expected [min, max]")
        return self

    def check_arch(self, arch: ModelPreset) -> None:
        if self.local_crop_size % arch.patch_size or self.local_crop_size > arch.img_size:
            raise ValueError(
                f"pretrain.dinov2.local_crop_size ({self.local_crop_size}) must be a multiple of "
                f"the patch size ({arch.patch_size}) and at most img_size ({arch.img_size})"
            )


class PretrainSettings(_Frozen):
    """How pre-training runs, shared by every recipe (the loop: epochs, batches, precision,
    checkpoints, processes), and each recipe's own section (what one step computes)."""

    launcher: str = "python"
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 64  # images per process per micro-batch
    accum_steps: PositiveInt = 1
    num_threads: PositiveInt = 2
    amp: bool = False
    checkpoint_every_steps: PositiveInt = 50
    normalisation: Literal["imagenet", "cohort"] = "imagenet"
    mae: MAERecipeSettings = MAERecipeSettings()
    dinov2: DINOv2RecipeSettings = DINOv2RecipeSettings()

    def recipe_settings(self, name: str) -> _RecipeSettings:
        """The section of recipe ``name`` (``pretrain.<name>``)."""
        if name not in TRAINABLE_RECIPES:
            raise ValueError(f"no pre-training recipe {name!r}; trainable: {TRAINABLE_RECIPES}")
        return getattr(self, name)

    def for_recipe(self, name: str) -> dict[str, Any]:
        """What decides what a run of recipe ``name`` computes: the shared loop settings (not
        the operational ones, which a resumed run may change) and that recipe's section only,
        so that a change to another recipe's params leaves this one's FMs alone."""
        shared = self.model_dump(mode="json", exclude={"num_threads", "checkpoint_every_steps",
                                                       *TRAINABLE_RECIPES})  # fmt: skip
        return {**shared, name: self.recipe_settings(name).model_dump(mode="json")}


#: The recipes retfm can pre-train: every section of ``pretrain`` that is a recipe's settings
#: (each with its module ``retfm.training.recipes.<name>``).
TRAINABLE_RECIPES: tuple[str, ...] = tuple(
    name for name, f in PretrainSettings.model_fields.items()
    if isinstance(f.annotation, type) and issubclass(f.annotation, _RecipeSettings)
)  # fmt: skip


class AdaptSettings(_Frozen):
    """RETFound's adaptation recipe (``main_finetune.py`` defaults), see retfm.training.adapt."""

    # finetune: RETFound; retfound_lp: RETFound's --adaptation lp; mae_linprobe: MAE's probe
    method: Literal["finetune", "retfound_lp", "mae_linprobe"] = "finetune"
    selection: Literal["retfound", "auroc"] = "retfound"  # (F1 + AUROC + kappa) / 3, or AUROC
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    epochs: PositiveInt = 50
    batch_size: PositiveInt = 16
    base_lr: float = Field(5e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    probe_base_lr: float = Field(0.1, gt=0)  # mae_linprobe only (MAE's main_linprobe.py)
    probe_weight_decay: float = Field(0.0, ge=0)
    warmup_epochs: Annotated[int, Field(ge=0)] = 10
    layer_decay: float = Field(0.65, gt=0, le=1)
    drop_path: Fraction = 0.2
    label_smoothing: Fraction = 0.0
    min_lr: float = Field(1e-6, ge=0)
    # RETFound's training transforms (timm create_transform); "" turns RandAugment off
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    reprob: Fraction = 0.25
    remode: Literal["pixel", "rand", "const"] = "pixel"
    recount: PositiveInt = 1


Factor = Literal["age", "sex", "ethnicity"]
FACTORS: tuple[Factor, ...] = ("age", "sex", "ethnicity")


class EvaluationSettings(_Frozen):
    factors: list[Factor] = Field(default_factory=lambda: list(FACTORS))
    age_bins: dict[str, list[float]] = Field(
        default_factory=lambda: {"age": [60.0], "age_fine": [40.0, 60.0, 80.0]}
    )
    intersections: list[str] = Field(default_factory=list)  # e.g. ["age*sex"]
    min_group_size: PositiveInt = 10
    n_boot: Annotated[int, Field(ge=0)] = 200
    ci: float = Field(0.95, gt=0, lt=1)


class CompareSettings(_Frozen):
    alpha: float = Field(0.05, gt=0, lt=1)
    correction: Literal["holm", "bh"] = "holm"  # over every comparison / every factor
    power: float = Field(0.8, gt=0, lt=1)  # for the "detectable difference" in the report
    calibration_studies: Annotated[int, Field(ge=0)] = 200  # null studies simulated at this
    # study's design to measure each decision's false-positive rate (0 = skip)
    require_identical_recipe: bool = True


class PromotionSettings(_Frozen):
    metric: str = "auroc"
    floor: float = 0.6
    max_drop_vs_champion: float = Field(0.02, ge=0)
    min_worst_group: float = 0.5
    max_gap: float = Field(0.25, ge=0)
    min_group_size: PositiveInt = 10
    # a subgroup without a defined metric: refuse (any fails the gate) | exclude_small (groups
    # only under evaluation.min_group_size are left out, named in the record) | exclude (all)
    undefined_groups: Literal["refuse", "exclude_small", "exclude"] = "refuse"


KEY_SPEC = r"^(synthetic|env:[A-Za-z_][A-Za-z0-9_]*|file:.+)$"  # also load_key's check


class PrivacySettings(_Frozen):
    # where the site's key for pseudonymising patient ids is (retfm.data.pseudonyms): never the
    # key itself. env:<VARIABLE> | file:<path> | synthetic (public; built-in synthetic data only)
    pseudonym_key: Annotated[str, Field(pattern=KEY_SPEC)] = "env:RETFM_PSEUDONYM_KEY"


class TrackingSettings(_Frozen):
    uri: str = "sqlite:///mlruns/mlflow.db"
    artifacts: str = "mlruns/artifacts"


class Settings(_Frozen):
    profile: str = "demo"
    study: StudySettings
    paths: PathSettings = PathSettings()
    synthetic: SyntheticSettings
    cohort: CohortSettings
    validation: ValidationSettings = ValidationSettings()
    pack: PackSettings = PackSettings()
    model: ModelSettings
    pretrain: PretrainSettings = PretrainSettings()
    adapt: AdaptSettings = AdaptSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    compare: CompareSettings = CompareSettings()
    promotion: PromotionSettings = PromotionSettings()
    privacy: PrivacySettings = PrivacySettings()
    tracking: TrackingSettings = TrackingSettings()
    expanded: ExpandedSettings = ExpandedSettings()

    @model_validator(mode="after")
    def _check(self) -> Settings:
        from retfm.fms import expansion, is_pretrained_here

        outputs = self.paths.outputs
        trained = [n for n, s in self.study.fms.items()
                   if is_pretrained_here(s.source, s.site, outputs)]  # fmt: skip
        if trained and self.pack.image_size != self.model.arch.img_size:
            raise ValueError(
                f"pack.image_size ({self.pack.image_size}) must equal the model preset's img_size "
                f"({self.model.arch.img_size}, preset {self.model.preset!r}), the input of the "
                f"FMs pre-trained here ({', '.join(trained)}); imported FMs are interpolated to it"
            )
        if len(set(self.study.sites)) != len(self.study.sites):
            raise ValueError(f"study.sites has duplicates: {self.study.sites}")
        for name, spec in self.study.fms.items():
            packed = (outputs / "packed").as_posix()
            if not is_pretrained_here(spec.source, spec.site, outputs):
                if Path(str(spec.source)).as_posix().startswith(packed):
                    raise ValueError(
                        f"study.fms.{name}: source {spec.source!r} is a packed folder; an FM "
                        f"pre-trained here names no source (it is trained on site "
                        f"{spec.site!r}'s cohorts, one per replicate)"
                    )
                continue  # imported from a checkpoint
            if spec.site not in self.study.sites:
                raise ValueError(
                    f"study.fms.{name}: pre-trained on site {spec.site!r}'s cohort, but "
                    f"{spec.site!r} is not in study.sites {self.study.sites}"
                )
            if spec.recipe not in TRAINABLE_RECIPES:
                raise ValueError(
                    f"study.fms.{name}: recipe {spec.recipe!r} cannot be pre-trained here yet "
                    f"(trainable: {list(TRAINABLE_RECIPES)}); import a released {spec.recipe} "
                    "checkpoint instead (source: <path to the .pth file>)"
                )
            self.pretrain.recipe_settings(spec.recipe).check_arch(self.model.arch)
        expected = ExpandedSettings.model_validate(expansion(self.study, outputs))
        if self.expanded != expected:
            raise ValueError(
                "the `expanded` section does not match study.fms x study.replicates "
                f"({self.study.replicates}): run `retfm expand` (it rewrites that section, "
                "which the replicated stages of dvc.yaml iterate over)"
            )
        return self

    def recipe_digest(self, recipe: str) -> str:
        """The hash of what makes an FM of ``recipe`` here: the model presets, the shared loop
        settings and that recipe's section (not another recipe's)."""
        blob = json.dumps(
            {
                "model": self.model.model_dump(mode="json"),
                "pretrain": self.pretrain.for_recipe(recipe),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def digest(self, *sections: str) -> str:
        """A stable hash of the named sections (all when none), for lineage tags."""
        data = self.model_dump(mode="json")
        picked = {k: data[k] for k in sections} if sections else data
        blob = json.dumps(picked, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class SettingsError(ValueError):
    """params.yaml is missing, unreadable or does not match the schema."""


#: Keys DVC 3.x leaves out of a stage's run-cache key wherever they appear, params included
#: (``dict_sha256(..., exclude=["size", "nfiles"])`` in ``dvc/stage/cache.py``;
#: treeverse/dvc issue 10296): a change to such a key would restore an old run's outputs
#: instead of rerunning the stage. No setting may be called this.
DVC_INVISIBLE_KEYS = ("size", "nfiles")
DVC_ISSUE = "https://github.com/treeverse/dvc/issues/10296"
#: Settings renamed because of that, old path -> new path.
RENAMED = {"cohort.size": "cohort.images_per_site"}
#: Settings that no longer exist, path -> what replaced them.
REPLACED = {
    "pretrain.imported": (
        "an FM is now a (site, recipe) entry of study.fms; an imported one names its "
        "checkpoint as its source, e.g. study.fms: {mae-meh: {site: meh, recipe: mae, "
        "source: checkpoints/RETFound_mae_meh.pth}}"
    ),
}
#: Recipes retfm can pre-train (the others can be imported from released checkpoints).


def invisible_keys(raw: Any, path: str = "") -> list[str]:
    """Dotted paths of every key DVC's run cache cannot see, at any depth."""
    found: list[str] = []
    if isinstance(raw, dict):
        for key, value in raw.items():
            here = f"{path}.{key}" if path else str(key)
            if key in DVC_INVISIBLE_KEYS:
                found.append(here)
            found += invisible_keys(value, here)
    elif isinstance(raw, list):
        for i, value in enumerate(raw):
            found += invisible_keys(value, f"{path}[{i}]")
    return found


def _check_visible_to_dvc(raw: dict[str, Any], source: Path) -> None:
    hidden = invisible_keys(raw)
    if not hidden:
        return
    lines = [f"{source}: setting(s) that DVC cannot see:"]
    for key in hidden:
        new = RENAMED.get(key)
        hint = f"renamed: use {new}" if new else "rename it"
        lines.append(f"  {key}: {hint}")
    lines.append(
        f"  DVC 3.x leaves keys named {' / '.join(DVC_INVISIBLE_KEYS)} out of its run-cache key "
        f"({DVC_ISSUE}), so changing one would restore an old run instead of rerunning."
    )
    raise SettingsError("\n".join(lines))


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: {err.error_count()} invalid setting(s)"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (typo?)")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _check_replaced(raw: dict[str, Any], source: Path) -> None:
    lines = []
    for dotted, hint in REPLACED.items():
        section, key = dotted.split(".", 1)
        if isinstance(raw.get(section), dict) and key in raw[section]:
            lines.append(f"  {dotted}: no longer a setting: {hint}")
    adapt = raw.get("adapt")
    if isinstance(adapt, dict) and adapt.get("method") == "linear_probe":
        lines.append(
            "  adapt.method: 'linear_probe' is now named for its source: mae_linprobe (MAE's "
            "BatchNorm + Linear probe); RETFound's --adaptation lp is retfound_lp"
        )
    study = raw.get("study")
    if isinstance(study, dict) and "fms" not in study and study.get("sites"):
        sites = study["sites"]
        example = ", ".join(
            f"mae-{s}: {{site: {s}, recipe: mae, source: outputs/packed/cohorts/{s}}}"
            for s in sites
        )
        lines.append(
            "  study.fms: required: the FMs compared, each a (site, recipe) pair, e.g. "
            f"study.fms: {{{example}}}"
        )
    if lines:
        raise SettingsError("\n".join([f"{source}: settings from an older retfm:", *lines]))


def parse_settings(raw: dict[str, Any], source: Path = Path("params.yaml")) -> Settings:
    _check_visible_to_dvc(raw, source)
    _check_replaced(raw, source)
    try:
        return Settings.model_validate(raw)
    except ValidationError as err:
        raise SettingsError(_format_errors(source, err)) from None


def load_settings(path: str | Path = "params.yaml") -> Settings:
    """Read and validate ``params.yaml`` (once per process; stages call this at start-up)."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"{path}: no such settings file (run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SettingsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: expected a mapping at the top level")
    return parse_settings(raw, path)
