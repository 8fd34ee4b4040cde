"""Team set-up: the shared services (S3 object store, PostgreSQL, MLflow server) a study uses."""

from retfm.team.services import (
    MlflowServer,
    Postgres,
    S3Service,
    ServiceError,
    first_day_lines,
    free_port,
    local_ports,
    missing_binaries,
    mlflow_server,
    postgres,
    seaweedfs_s3,
    team_stack,
)

__all__ = [
    "MlflowServer",
    "Postgres",
    "S3Service",
    "ServiceError",
    "first_day_lines",
    "free_port",
    "local_ports",
    "missing_binaries",
    "mlflow_server",
    "postgres",
    "seaweedfs_s3",
    "team_stack",
]
