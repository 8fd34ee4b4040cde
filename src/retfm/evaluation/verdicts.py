"""The words a decision may take, one spelling for the report, the summary, MLflow and tests.

A comparison is decided as *better*, *worse*, *no evidence* or *undetermined (reason)*; a
factor as *effect*, *no evidence* or *undetermined (reason)*. Undetermined means the test could
not be made (one seed, zero variance, a failed fit, too few groups): it is shown with its reason
and never counted as a "no".
"""

from __future__ import annotations

BETTER = "better"
WORSE = "worse"
EFFECT = "effect"
NO_EVIDENCE = "no evidence"
UNDETERMINED = "undetermined"


def undetermined(reason: str) -> str:
    return f"{UNDETERMINED} ({reason})"


def is_undetermined(verdict: str) -> bool:
    return verdict.startswith(UNDETERMINED)
