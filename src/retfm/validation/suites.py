"""The expectation suites, as code: what a site table, a task table and a cohort must satisfy.

Every rule is a Great Expectations expectation, so the Data Docs list them all. Rules across
rows or tables are expressed on derived columns computed here with vectorised pandas (e.g. a
boolean ``patient_in_several_splits`` expected to be False), which keeps validation of a
904,170-row table to a few seconds.

- site: required columns exist, are non-null and typed; age within
  `validation.age_min..age_max`; sex, ethnicity, eye in the schema vocabularies; unique
  `image_id`; paths relative and inside their folder; every image decodes (`image_problem` null).
- task: the same for the task columns; `split` in train/val/test and each split non-empty;
  `label` in the fixed label set (the train split's labels) and each label present;
  `source_site` a known site; no patient in two splits. Before them, in plain words
  (:func:`task_learnability`), what adaptation would refuse hours later: an empty split, a
  single class, a class with no train image, a val split of one class; and patients in two
  splits.
- cohort: the site rules; no patient of a held-out task set of the site
  (`patient_in_heldout` False).
- cohort mix: per age band and sex, the cohort's share within
  `validation.distribution_tolerance` of the site pool's share.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import great_expectations as gx
import great_expectations.expectations as gxe
import numpy as np
import pandas as pd

from retfm.data import schema
from retfm.data.metadata import EYE_UNKNOWN
from retfm.settings import Settings
from retfm.validation.report import ROW_COLUMN, Failure

ESCAPING_PATH_REGEX = r"^/|^[A-Za-z]:|(?:^|/)\.\.(?:/|$)"
EYE_VALUES = [*schema.EYE, EYE_UNKNOWN]
IMAGE_PROBLEM = "image_problem"
SEVERAL_SPLITS = "patient_in_several_splits"
IN_HELDOUT = "patient_in_heldout"
MIX_FACTORS = ("age_band", "sex")
_GX_TYPE = {"str": "str", "float": "float64", "int": "int64"}


def known_source_sites(settings: Settings) -> list[str]:
    """Sites a task may come from: the study's sites plus the external ones in the params."""
    names = set(settings.study.sites) | set(settings.synthetic.sites)
    names |= {task.source_site for task in settings.synthetic.tasks.values()}
    return sorted(names)


Rules = list[gxe.Expectation]


def _columns(columns: dict[str, str], required: bool) -> Rules:
    rules: Rules = []
    for col, kind in columns.items():
        if required:
            rules.append(gxe.ExpectColumnToExist(column=col))
            rules.append(gxe.ExpectColumnValuesToNotBeNull(column=col))
        rules.append(gxe.ExpectColumnValuesToBeOfType(column=col, type_=_GX_TYPE[kind]))
    return rules


def _values(settings: Settings, present: Iterable[str]) -> Rules:
    v = settings.validation
    by_column = {
        "age": gxe.ExpectColumnValuesToBeBetween(
            column="age", min_value=v.age_min, max_value=v.age_max
        ),
        "sex": gxe.ExpectColumnValuesToBeInSet(column="sex", value_set=list(schema.SEX)),
        "ethnicity": gxe.ExpectColumnValuesToBeInSet(
            column="ethnicity", value_set=list(schema.ETHNICITY)
        ),
        "eye": gxe.ExpectColumnValuesToBeInSet(column="eye", value_set=EYE_VALUES),
    }
    wanted = set(present)
    rules: Rules = [rule for col, rule in by_column.items() if col in wanted]
    rules.append(gxe.ExpectColumnValuesToBeUnique(column="image_id"))
    rules.append(gxe.ExpectColumnValuesToNotMatchRegex(column="path", regex=ESCAPING_PATH_REGEX))
    return rules


def _image_rules(settings: Settings, images: bool | None) -> Rules:
    wanted = settings.validation.check_images if images is None else images
    return [gxe.ExpectColumnValuesToBeNull(column=IMAGE_PROBLEM)] if wanted else []


def _site_rules(settings: Settings, optional: Iterable[str]) -> Rules:
    optional = [c for c in optional if c in schema.SITE_OPTIONAL]
    return [
        *_columns(schema.SITE_REQUIRED, required=True),
        *_columns({c: schema.SITE_OPTIONAL[c] for c in optional}, required=False),
        *_values(settings, [*schema.SITE_REQUIRED, *optional]),
    ]


def site_suite(
    settings: Settings,
    name: str = "site",
    *,
    optional: Iterable[str] = ("ethnicity", "eye"),
    images: bool | None = None,
) -> gx.ExpectationSuite:
    """Rules for one site's pre-training pool (``data/sites/<site>/metadata.csv``).

    ``optional`` names the optional columns the table has, whose values are then checked too;
    ``images`` (default: ``validation.check_images``) adds the rule that ``image_problem`` is null.
    """
    rules = [*_site_rules(settings, optional), *_image_rules(settings, images)]
    return gx.ExpectationSuite(name=name, expectations=rules)


def task_suite(
    settings: Settings,
    classes: Sequence[str],
    name: str = "task",
    *,
    optional: Iterable[str] = (),
    images: bool | None = None,
) -> gx.ExpectationSuite:
    """Rules for one downstream set; ``classes`` is its fixed label set.

    ``optional`` names the optional columns the table has (age, sex, ...), whose values are
    then checked too. Needs the ``patient_in_several_splits`` column (:func:`with_split_leakage`)
    and, with ``images`` (default: ``validation.check_images``), ``image_problem``.
    """
    optional = [c for c in optional if c in schema.TASK_OPTIONAL]
    split, classes = list(schema.SPLITS), list(classes)
    rules = [
        *_columns(schema.TASK_REQUIRED, required=True),
        *_columns({c: schema.TASK_OPTIONAL[c] for c in optional}, required=False),
        *_values(settings, optional),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=split),
        gxe.ExpectColumnDistinctValuesToContainSet(column="split", value_set=split),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=classes),
        gxe.ExpectColumnDistinctValuesToContainSet(column="label", value_set=classes),
        gxe.ExpectColumnUniqueValueCountToBeBetween(column="label", min_value=2),
        gxe.ExpectColumnValuesToBeInSet(
            column="source_site", value_set=known_source_sites(settings)
        ),
        gxe.ExpectColumnValuesToBeInSet(column=SEVERAL_SPLITS, value_set=[False]),
        *_image_rules(settings, images),
    ]
    return gx.ExpectationSuite(name=name, expectations=rules)


def cohort_suite(
    settings: Settings, name: str = "cohort", *, optional: Iterable[str] = ("ethnicity", "eye")
) -> gx.ExpectationSuite:
    """Rules for a sampled cohort: the site rules plus no held-out patient in it.

    Needs the ``patient_in_heldout`` column (:func:`with_heldout_flag`). Images were checked
    with the site pool, so they are not checked again.
    """
    rules = [
        *_site_rules(settings, optional),
        gxe.ExpectColumnValuesToBeInSet(column=IN_HELDOUT, value_set=[False]),
    ]
    return gx.ExpectationSuite(name=name, expectations=rules)


def mix_suite(settings: Settings, name: str = "cohort_mix") -> gx.ExpectationSuite:
    """Rules on the table of :func:`mix_table`: each group's share close to the pool's."""
    tolerance = settings.validation.distribution_tolerance
    rule = gxe.ExpectColumnValuesToBeBetween(
        column="abs_difference", min_value=0.0, max_value=tolerance
    )
    return gx.ExpectationSuite(name=name, expectations=[rule])


def task_classes(df: pd.DataFrame) -> list[str]:
    """The fixed label set of a task table: the labels of its train split (all labels if none)."""
    if "label" not in df.columns:
        return []
    train = df["label"][df["split"].eq("train")] if "split" in df.columns else df["label"]
    labels = train if train.notna().any() else df["label"]
    return sorted(labels.dropna().astype(str).unique().tolist())


SPLIT_ROLE = {
    "train": "the classifier is fitted on train",
    "val": "the epoch is picked by val AUROC",
    "test": "without test there is nothing to report the classifier's performance on",
}
_LEARNABLE = "task_learnable"


def _sorted_classes(labels: Iterable[str]) -> list[str]:
    """Ordered as :func:`retfm.training.adapt.task_classes` does: numerically when all are."""
    names = sorted(set(labels))
    try:
        return sorted(names, key=float)
    except ValueError:
        return names


def _images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def _lines(df: pd.DataFrame, mask: pd.Series, max_rows: int) -> list[int]:
    if ROW_COLUMN not in df.columns:
        return []
    return [int(r) for r in df.loc[mask, ROW_COLUMN].head(max_rows)]


def task_learnability(df: pd.DataFrame, task: str, max_rows: int = 5) -> list[Failure]:
    """Why a task table cannot be adapted as given, in the researcher's words; [] when it can.

    The conditions of :func:`retfm.training.adapt._check_task` (the adapt stage), checked at
    validation so they stop the pipeline before anything is trained: every split non-empty,
    at least two classes, every class present in train (a class the classifier never sees
    cannot be learned), at least two classes in val (the epoch is picked by val AUROC). Also
    patients with images in more than one split. Vectorised: one crosstab and one groupby.
    """
    if not {"label", "split"} <= set(df.columns):
        return []
    label, split = df["label"].astype("str"), df["split"].astype("str")
    counts = pd.crosstab(label, split).reindex(columns=list(schema.SPLITS), fill_value=0)
    failures: list[Failure] = []

    def fail(column: str, message: str, mask: pd.Series | None = None) -> None:
        rows = _lines(df, mask, max_rows) if mask is not None else []
        values = df.loc[mask, column].astype("str").head(len(rows)).tolist() if rows else []
        count = int(mask.sum()) if mask is not None else None
        failures.append(Failure(_LEARNABLE, column, count, rows, values, message=message))

    for name in schema.SPLITS:
        if counts[name].sum() == 0:
            fail(
                "split",
                f"task {task}: split {name!r} has no images; adaptation needs train, val and "
                f"test ({SPLIT_ROLE[name]}). Give some patients split {name!r}.",
            )
    classes = _sorted_classes(counts.index)
    if len(classes) < 2:
        fail(
            "label",
            f"task {task}: one class only ({classes}); a classifier needs at least 2 classes.",
        )
    for cls in classes:
        if counts.at[cls, "train"] == 0:
            elsewhere = [
                f"{counts.at[cls, s]} in {s!r}" for s in ("val", "test") if counts.at[cls, s]
            ]
            fail(
                "label",
                f"task {task}: class {cls!r} has 0 images in split 'train' but "
                f"{' and '.join(elsewhere)}; the classifier cannot learn it. Move some of its "
                "patients into train or drop the class.",
                label.eq(cls),
            )
    in_val = counts.index[counts["val"] > 0].tolist()
    if len(in_val) == 1:
        only = in_val[0]
        fail(
            "label",
            f"task {task}: split 'val' holds one class only ({only!r}, "
            f"{_images(counts.at[only, 'val'])}); picking the epoch by validation AUROC needs at "
            "least 2 classes there. Move patients of another class into val.",
            split.eq("val"),
        )
    if "patient_id" in df.columns:
        per_patient = df.groupby("patient_id", dropna=False)["split"].transform("nunique")
        leaking = per_patient.gt(1)
        if leaking.any():
            first = df.loc[leaking, "patient_id"].iloc[0]
            mine = df[df["patient_id"].eq(first)].drop_duplicates("split")
            lines = mine[ROW_COLUMN] if ROW_COLUMN in mine.columns else [None] * len(mine)
            where = " and ".join(
                f"{s!r} (line {r})" if r is not None else repr(s)
                for s, r in zip(mine["split"], lines, strict=True)
            )
            fail(
                "patient_id",
                f"task {task}: {df.loc[leaking, 'patient_id'].nunique()} patient(s) have "
                f"images in more than one split, e.g. patient {first!r} in {where}; the "
                "classifier would be tested on patients it was trained or tuned on. Keep each "
                "patient's images in one split.",
                leaking,
            )
    return failures


def with_split_leakage(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``patient_in_several_splits``: True on every row of a patient found in >1 split."""
    out = df.copy()
    if {"patient_id", "split"} <= set(df.columns):
        out[SEVERAL_SPLITS] = (
            df.groupby("patient_id", dropna=False)["split"].transform("nunique").gt(1)
        )
    else:
        out[SEVERAL_SPLITS] = False
    return out


def with_heldout_flag(df: pd.DataFrame, heldout_patients: Iterable[str]) -> pd.DataFrame:
    """Add ``patient_in_heldout``: True where the row's patient is in a held-out task set."""
    out = df.copy()
    out[IN_HELDOUT] = df["patient_id"].isin(pd.Index(list(heldout_patients), dtype="str"))
    return out


def with_image_problems(df: pd.DataFrame, problems: pd.DataFrame) -> pd.DataFrame:
    """Add ``image_problem``: ``"<problem>: <detail>"`` for images with an error, else null."""
    errors = problems[problems["severity"].eq("error")]
    text = pd.Series(
        (errors["problem"] + ": " + errors["detail"]).to_numpy(),
        index=errors["path"].to_numpy(),
        dtype="str",
    )
    out = df.copy()
    out[IMAGE_PROBLEM] = df["path"].map(text[~text.index.duplicated()]).astype("str")
    return out


def age_bands(age: pd.Series, edges: Sequence[float]) -> pd.Series:
    """:func:`retfm.data.schema.age_bands` as a Series aligned with ``age``."""
    values = age.to_numpy(dtype="float64", na_value=np.nan)
    return pd.Series(schema.age_bands(values, sorted(edges)), index=age.index, dtype="str")


def mix_table(cohort: pd.DataFrame, pool: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """Share of each age band (``evaluation.age_bins['age']``) and sex in cohort vs pool.

    One row per ``factor=group`` (column ``group``), with ``cohort_share``, ``pool_share`` and
    ``abs_difference``; a group absent from one side has share 0 there.
    """
    edges = settings.evaluation.age_bins.get("age", [60.0])
    parts = []
    for factor in MIX_FACTORS:
        if factor == "age_band":
            c, p = age_bands(cohort["age"], edges), age_bands(pool["age"], edges)
        else:
            c, p = cohort[factor].astype("str"), pool[factor].astype("str")
        shares = pd.concat(
            {
                "cohort_share": c.value_counts(normalize=True),
                "pool_share": p.value_counts(normalize=True),
            },
            axis=1,
        ).fillna(0.0)
        shares.index = [f"{factor}={g}" for g in shares.index]
        parts.append(shares)
    table = pd.concat(parts).rename_axis("group").reset_index()
    table["abs_difference"] = (table["cohort_share"] - table["pool_share"]).abs()
    return table
