"""Pre-training cohorts: equal-size, seeded, patient-level samples per site, and data cards."""

from retfm.cohorts.balance import balance_report, smd_categorical, smd_continuous
from retfm.cohorts.cards import build_card, write_card
from retfm.cohorts.sampling import CohortError, CohortResult, allocate, sample_cohort, site_rng

__all__ = [
    "CohortError",
    "CohortResult",
    "allocate",
    "balance_report",
    "build_card",
    "sample_cohort",
    "site_rng",
    "smd_categorical",
    "smd_continuous",
    "write_card",
]
