"""Shared by the registry tests: point MLflow at a temporary store and restore it afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import mlflow
import pytest
from mlflow.tracking import MlflowClient


@contextmanager
def _use_store(uri: str) -> Iterator[MlflowClient]:
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield MlflowClient(uri, uri)
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


@pytest.fixture(scope="session")
def use_store() -> Callable[[str], AbstractContextManager[MlflowClient]]:
    """``with use_store(uri) as client:`` -- tracking and registry URIs set, then restored."""
    return _use_store
