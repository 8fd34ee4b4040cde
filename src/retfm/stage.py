"""What every pipeline stage shares: logging set-up and turning failures into clear messages.

A stage that fails prints ``stage <name> failed: <what and where>`` and exits 1, so that
``dvc repro`` stops there with the reason on screen. ``RETFM_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger("retfm")


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("RETFM_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if os.environ.get("RETFM_LOG_LEVEL", "INFO").upper() == "DEBUG":
        return  # verbose: every library's own messages
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:  # ONNX Runtime's own logger: on a CPU-only machine it logs the CUDA provider that
        import onnxruntime as ort  # cannot load (MLflow asks for it) as an error, every time

        ort.set_default_logger_severity(4)  # fatal only: a session that fails still raises
    except ImportError:
        pass


#: Third-party loggers whose INFO lines drown the stages' own (onnx_ir: hundreds per export).
NOISY_LOGGERS = (
    "alembic",
    "mlflow.store.db.utils",
    "great_expectations",
    "urllib3",
    "onnx_ir",
    "onnxscript",
    "mlflow.onnx",  # "requested CUDAExecutionProvider ... dropped" on every CPU-only load
    "torch.onnx",
)


def stage(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Wrap a stage's ``main``: log its duration; on error print the reason and exit 1."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            setup_logging()
            label = " ".join([name, *map(str, args), *map(str, kwargs.values())])
            start = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            except KeyboardInterrupt:
                raise
            except Exception as err:  # noqa: BLE001 - the stage boundary reports every failure
                if os.environ.get("RETFM_DEBUG"):
                    raise
                print(f"\nstage {label} failed: {type(err).__name__}: {err}", file=sys.stderr)
                sys.exit(1)
            log.info("stage %s done in %.1f s", label, time.perf_counter() - start)
            return result

        return inner

    return wrap
