"""The ``retfm`` command: data set-up, profiles, registry operations, inference.

Pipeline stages are not here: ``dvc repro`` runs them (``pipelines/``), so that DVC decides
what is stale. These commands are what a researcher runs around the pipeline.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from retfm.settings import load_settings
from retfm.stage import setup_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

ParamsOpt = Annotated[Path, typer.Option("--params", help="settings file")]


def _fail(message: str) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


SYNTH_STAMP = Path(".dvc/tmp/retfm-synth.json")


@app.command()
def synth(
    params: ParamsOpt = Path("params.yaml"),
    out: Annotated[Path | None, typer.Option(help="target folder (default paths.data)")] = None,
    workers: int = 2,
    if_needed: Annotated[
        bool,
        typer.Option(
            "--if-needed",
            help="skip when data/ was generated from the same settings; never "
            "overwrite a data/ that retfm synth did not write",
        ),
    ] = False,
    force: Annotated[bool, typer.Option(help="replace a data/ not written by retfm synth")] = False,
) -> None:
    """Write the built-in SIMULATED two-site data set (not patient data) into data/."""
    from retfm.data.synthetic import generate_dataset

    setup_logging()
    settings = load_settings(params)
    target = out or settings.paths.data
    wanted = {
        "synthetic": settings.digest("synthetic"),
        "sites": list(settings.study.sites),
        "target": str(target),
    }
    stamp = json.loads(SYNTH_STAMP.read_text()) if SYNTH_STAMP.is_file() else None
    if target.exists() and stamp is None and not force:
        if if_needed:
            typer.echo(f"{target}/ holds data not written by `retfm synth`: left as it is")
            return
        _fail(f"{target}/ holds data not written by `retfm synth`; --force replaces it")
    if if_needed and target.exists() and stamp == wanted:
        typer.echo(f"{target}/ is up to date with params.yaml's synthetic section")
        return
    if target.exists():
        import shutil

        shutil.rmtree(target)
    counts = generate_dataset(
        settings.synthetic, list(settings.study.sites), target, workers=workers
    )
    SYNTH_STAMP.parent.mkdir(parents=True, exist_ok=True)
    SYNTH_STAMP.write_text(json.dumps(wanted))
    typer.echo(f"SIMULATED data (not patient data) written to {target}/: {json.dumps(counts)}")


@app.command()
def profile(
    name: str,
    params: ParamsOpt = Path("params.yaml"),
    profiles: Annotated[Path, typer.Option(help="folder of profile overlays")] = Path("profiles"),
) -> None:
    """Overlay profiles/NAME.yaml onto params.yaml (comments kept), then validate it."""
    from retfm.profiles import apply_profile

    try:
        apply_profile(params, profiles / f"{name}.yaml")
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    typer.echo(f"{params}: profile {name} applied")


@app.command()
def expand(params: ParamsOpt = Path("params.yaml")) -> None:
    """Write params.yaml's `expanded` section (one cohort per site and replicate, one entry per
    FM replicate) from study.fms x study.replicates: DVC expands the replicated stages from it."""
    from retfm.profiles import expand_params

    try:
        changed = expand_params(params)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    settings = load_settings(params)
    state = "rewritten" if changed else "already up to date"
    typer.echo(
        f"{params}: expanded section {state}: {len(settings.expanded.cohorts)} cohort(s), "
        f"{len(settings.expanded.fms)} FM replicate(s) ({settings.study.replicates} per FM "
        "pre-trained here)"
    )


@app.command("import-folder")
def import_folder(
    src: Path,
    dst: Path,
    source_site: Annotated[str, typer.Option(help="site the images come from")],
    metadata: Annotated[Path | None, typer.Option(help="CSV of per-image age, sex, ...")] = None,
) -> None:
    """Import <set>/{train,val,test}/<class>/<image> into a task folder (data/tasks/<task>);
    says what it skipped and what the splits and classes found mean for adaptation."""
    from retfm.data.importer import import_folder_layout

    try:
        table = import_folder_layout(src, dst, source_site=source_site, metadata_csv=metadata)
    except ValueError as err:
        _fail(str(err))
    report = table.attrs["import_report"]
    typer.echo(f"{report.text()}\nwritten: {dst}/metadata.csv ({len(table)} rows)")
    if report.warnings:
        typer.secho(
            f"{len(report.warnings)} warning(s): see above before `dvc repro`",
            fg=typer.colors.YELLOW,
            err=True,
        )


@app.command("stand-in-checkpoints")
def stand_in_checkpoints(
    out: Annotated[Path, typer.Argument(help="folder for the four .pth files")] = Path(
        "checkpoints"
    ),
    full_size: Annotated[bool, typer.Option(help="ViT-L (1.2 GB each), not a small ViT")] = False,
) -> None:
    """Write RANDOM-weight stand-ins for the study's four released FMs, in their exact layouts
    (RETFound_mae_meh/_shanghai: MAE; RETFound_dinov2_meh/_shanghai: DINOv2), so the four-FM
    study (profile four-fms) runs before the real checkpoints are downloaded."""
    from retfm.models.releases import write_stand_ins

    setup_logging()
    size = {"dim": 1024, "depth": 24, "heads": 16} if full_size else {}
    for path in write_stand_ins(out, **size):
        typer.echo(f"{path} (random weights, released layout)")
    typer.echo("these are NOT the released weights: results on them measure nothing")


@app.command("import-checkpoint")
def import_checkpoint_cmd(
    path: Path,
    kind: Annotated[str, typer.Option(help="mae (RETFound MAE) or dinov2 (RETFound DINOv2)")],
    out: Annotated[Path, typer.Option(help="folder for encoder.safetensors + encoder.onnx")],
    img_size: Annotated[
        int | None, typer.Option(help="input size (position embeddings interpolated to it)")
    ] = None,
    num_heads: Annotated[
        int | None, typer.Option(help="only for a non-standard ViT that records no head count")
    ] = None,
) -> None:
    """Check a released RETFound checkpoint without running pickled code: read its
    architecture, refuse non-finite weights, write a retfm encoder and its ONNX export
    (parity-checked). In a study, name the checkpoint as an FM's source in params.yaml."""
    from retfm.models.checkpoints import import_encoder
    from retfm.models.encoder import save_encoder
    from retfm.models.onnx_export import export_onnx, onnx_parity

    if kind not in ("mae", "dinov2"):
        _fail(f"--kind must be mae or dinov2, got {kind!r}")
    try:
        imported = import_encoder(path, kind, img_size=img_size, num_heads=num_heads)  # type: ignore[arg-type]
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    out.mkdir(parents=True, exist_ok=True)
    save_encoder(out / "encoder.safetensors", imported.encoder, imported.spec, imported.prep,
                 {"imported_from": path.name})  # fmt: skip
    onnx_path = export_onnx(imported.encoder, imported.prep, out / "encoder.onnx")
    parity = onnx_parity(imported.encoder, onnx_path)
    typer.echo(f"{path}: {imported.describe()}")
    typer.echo(f"-> {out}/encoder.safetensors, encoder.onnx (ONNX parity {parity:.2e})")
    typer.echo(
        "use it in a study: params.yaml study.fms: {"
        f"{kind}-<site>: {{site: <site>, recipe: {kind}, source: {path}}}}}"
    )


def _registry(params: Path):  # noqa: ANN202 - (settings, client) pair
    from retfm import tracking

    settings = load_settings(params)
    return settings, tracking.configure(settings)


@app.command()
def promote(
    model: str,
    version: Annotated[str | None, typer.Option(help="version (default: @candidate)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    allow_other_settings: Annotated[
        bool,
        typer.Option(
            help="apply promotion settings other than the study's (recorded in the decision)"
        ),
    ] = False,
) -> None:
    """Move @champion to a version only if every gate in params.yaml's promotion passes (the
    settings the study recorded on the version; other settings are refused unless allowed)."""
    from filelock import Timeout

    from retfm import tracking
    from retfm.evaluation.runs import groupings
    from retfm.registry.promotion import PromotionError
    from retfm.registry.promotion import promote as do_promote

    setup_logging()
    settings, client = _registry(params)
    try:
        decision = do_promote(
            client,
            model,
            version,
            settings.promotion,
            groupings(settings.evaluation),
            tracking.experiment_id(settings, "promotion"),
            allow_other_settings=allow_other_settings,
        )
    except (PromotionError, Timeout) as err:
        _fail(f"promote {model}: {err}")
    typer.echo(decision.report())
    if not decision.promoted:
        raise typer.Exit(1)


@app.command()
def rollback(model: str, params: ParamsOpt = Path("params.yaml")) -> None:
    """Move @champion back to the previous champion."""
    from filelock import Timeout

    from retfm import tracking
    from retfm.registry.promotion import PromotionError
    from retfm.registry.promotion import rollback as do_rollback

    settings, client = _registry(params)
    try:
        decision = do_rollback(client, model, tracking.experiment_id(settings, "promotion"))
    except (PromotionError, Timeout) as err:
        _fail(f"rollback {model}: {err}")
    typer.echo(decision.report())


@app.command()
def predict(
    inputs: Annotated[list[Path], typer.Argument(help="images, folders, or a CSV with 'path'")],
    model: Annotated[str, typer.Option(help="e.g. models:/fm-mae-hospital@champion")],
    out: Annotated[Path, typer.Option(help="output .csv or .parquet")] = Path("predictions.csv"),
    batch_size: int = 64,
    int8: Annotated[
        bool, typer.Option(help="INT8 dynamic quantisation (faster on big ViTs)")
    ] = False,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Batch inference with ONNX Runtime on a registered model, one output row per image."""
    from mlflow.exceptions import MlflowException

    from retfm.registry.inference import predict_files

    _registry(params)
    try:
        table = predict_files(model, inputs, batch_size=batch_size, int8=int8)
    except (ValueError, MlflowException) as err:
        _fail(f"predict: {err}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        table.to_parquet(out, index=False)
    else:
        table.to_csv(out, index=False)
    bad = table[table["status"] != "ok"]
    for _, row in bad.iterrows():
        typer.secho(f"skipped {row['path']}: {row['status']}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"{len(table) - len(bad)} images predicted, {len(bad)} skipped -> {out}")
    if len(table) == len(bad):
        _fail(f"predict: no image could be predicted from {', '.join(map(str, inputs))}")


@app.command()
def summary(params: ParamsOpt = Path("params.yaml")) -> None:
    """Print the study summary table (after `dvc repro`) and how to open the MLflow UI."""
    from retfm import tracking
    from retfm.reporting.summary import print_summary

    settings = load_settings(params)
    path = settings.paths.outputs / "study" / "summary.json"
    if not path.is_file():
        _fail(f"{path} not found: run `dvc repro` first")
    print_summary(json.loads(path.read_text()), sys.stdout)
    typer.echo(
        "\nBrowse every run, model and artifact with:\n"
        f"  .venv/bin/mlflow ui --backend-store-uri {settings.tracking.uri} "
        f"--port 5000\n  then open http://127.0.0.1:5000{tracking.UI_PATH}"
    )


@app.command()
def calibrate(
    params: ParamsOpt = Path("params.yaml"),
    studies: Annotated[int, typer.Option(help="null studies (at least 500 for the README)")] = 500,
    power_studies: Annotated[int, typer.Option(help="studies per power cell (0: no power)")] = 200,
    test_images: Annotated[int, typer.Option(help="test images per task of the null design")] = 600,
    test_sizes: Annotated[
        str, typer.Option(help="power grid: test images per task")
    ] = "120,600,2000",
    differences: Annotated[str, typer.Option(help="power grid: AUROC differences")] = (
        "0.02,0.04,0.06,0.08"
    ),
    age_effects: Annotated[
        str, typer.Option(help="power grid: planted age effects")
    ] = "0.4,0.6,0.9",
    replicates: Annotated[
        int, typer.Option(help="pre-training runs per FM of the null design")
    ] = 3,
    draw_sd: Annotated[
        float, typer.Option(help="between-draw sd of a run's population AUROC")
    ] = 0.02,
    from_study: Annotated[
        bool, typer.Option("--from-study", help="null shaped like this study's own test sets")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="write the full report as JSON")] = None,
    seed: int = 0,
) -> None:
    """Measure each decision's false-positive rate under a realistic null, and its power.

    Simulates studies (finite test sets, patients with several images, seed noise, tasks of
    different difficulty and age / sex / ethnicity mix) and runs the study's own analysis on
    them. Exits 1 when a null rate's 95% interval reaches above alpha + 0.02.
    """
    from retfm.evaluation.analysis import AnalysisConfig
    from retfm.evaluation.calibration import calibration_report, with_draw_auroc
    from retfm.evaluation.simulation import demo_like_design
    from retfm.reporting.calibration import format_calibration

    setup_logging()
    settings = load_settings(params)
    config = AnalysisConfig.from_settings(settings)
    design = with_draw_auroc(
        demo_like_design(test_images, seeds=len(settings.adapt.seeds)).with_replicates(replicates),
        draw_sd,
    )
    if from_study:
        design = _study_design(settings)
    report = calibration_report(
        design,
        config,
        null_studies=studies,
        power_studies=power_studies,
        differences=[float(x) for x in differences.split(",")],
        test_sizes=[int(x) for x in test_sizes.split(",")],
        age_effects=[float(x) for x in age_effects.split(",")],
        seed=seed,
    )
    typer.echo(format_calibration(report))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=float))
        typer.echo(f"report: {out}")
    if not report["within_target"]:
        raise typer.Exit(1)


def _study_design(settings):  # noqa: ANN001, ANN202
    from retfm.evaluation.analysis import read_adaptations
    from retfm.evaluation.simulation import design_from_predictions
    from retfm.fms import fm_recipes, fm_sites, replicate_fms, study_fms, study_replicates

    fms, reps = study_fms(settings), study_replicates(settings)
    try:
        preds, task_sites = read_adaptations(
            settings.paths.outputs, [r.name for r in reps], settings.study.tasks
        )
    except FileNotFoundError as err:
        _fail(str(err))
    return design_from_predictions(
        preds,
        fm_sites(fms),
        task_sites,
        fm_recipes=fm_recipes(fms),
        replicate_of=replicate_fms(reps),
    )


@app.command()
def doctor(params: ParamsOpt = Path("params.yaml")) -> None:
    """Check that params.yaml, dvc.lock, the stage outputs, the data cards and the registry's
    lineage tags agree; name every disagreement and the command that fixes it."""
    from tabulate import tabulate

    from retfm.doctor import examine

    setup_logging()
    findings = examine(load_settings(params))
    rows = [[("ok" if f.ok else "DISAGREES"), f.check, f.subject, f.detail] for f in findings]
    typer.echo(tabulate(rows, headers=["", "check", "record", "detail"], tablefmt="simple"))
    bad = [f for f in findings if not f.ok]
    if bad:
        _fail(f"\n{len(bad)} record(s) disagree: the study's lineage cannot be trusted as is")
    typer.echo("\nall records agree")


@app.command()
def relocate(params: ParamsOpt = Path("params.yaml")) -> None:
    """Point a moved or copied project's embedded MLflow store at this project's artifacts."""
    from retfm.tracking import relocate_store

    old, new, rows = relocate_store(load_settings(params))
    if rows == 0:
        typer.echo(f"the store already keeps its artifacts here ({new})")
        return
    typer.echo(f"{rows} artifact locations moved from {old} to {new} (backup: mlflow.db.bak)")


@app.command()
def relink(params: ParamsOpt = Path("params.yaml")) -> None:
    """Record a finished study in the current MLflow store (e.g. the team server) without
    retraining: pre-training runs from their outputs, the other tracked stages rerun."""
    from retfm.relink import relink as relink_study
    from retfm.tracking import tracking_uri

    setup_logging()
    settings = load_settings(params)
    try:
        stages = relink_study(settings, echo=typer.echo)
    except (FileNotFoundError, RuntimeError) as err:
        _fail(str(err))
    typer.echo(f"\nrelinked: {len(stages)} stages rerun against {tracking_uri(settings)}; "
               "`git status` should show dvc.lock unchanged")  # fmt: skip


@app.command()
def repro(
    jobs: Annotated[int, typer.Option(help="stages run at once (lanes)")] = 2,
    root: Annotated[Path, typer.Option(help="the project folder")] = Path("."),
) -> None:
    """`dvc repro` with the independent stages of each kind (cohorts, packs, pre-trainings,
    registrations, adaptations) in `jobs` parallel lanes, then a plain `dvc repro`."""
    from retfm.lanes import run_lanes

    status = run_lanes(root, jobs)
    if status:
        raise typer.Exit(status)


@app.command()
def server(
    backend_store_uri: Annotated[
        str | None,
        typer.Option(envvar="RETFM_BACKEND_STORE_URI", help="postgresql://USER:PASS@HOST/DB"),
    ] = None,
    artifacts_destination: Annotated[
        str | None,
        typer.Option(envvar="RETFM_ARTIFACTS_DESTINATION", help="s3://BUCKET/PATH"),
    ] = None,
    local: Annotated[
        bool, typer.Option("--local", help="also start PostgreSQL and SeaweedFS (S3) here")
    ] = False,
    host: str = "127.0.0.1",
    port: int = 5000,
    workers: int = 4,
    basic_auth: Annotated[
        bool, typer.Option("--basic-auth", help="require MLFLOW_TRACKING_USERNAME/PASSWORD")
    ] = False,
    workdir: Annotated[Path, typer.Option(help="logs, auth db, --local data")] = Path(
        ".retfm-server"
    ),
    s3_port: Annotated[
        int | None, typer.Option(help="--local: S3 port (default: last start's, else 8333)")
    ] = None,
    pg_port: Annotated[
        int | None, typer.Option(help="--local: PostgreSQL port (last start's, else 5433)")
    ] = None,
    dvc_bucket: Annotated[str, typer.Option(help="--local: bucket for the DVC remote")] = "dvc",
) -> None:
    """Run the team's MLflow server (PostgreSQL + S3 artifacts, proxied) until Ctrl-C.

    S3 credentials and endpoint come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
    MLFLOW_S3_ENDPOINT_URL; clients need only the tracking URI this prints.
    """
    import signal
    import time
    from contextlib import ExitStack

    from retfm.team import ServiceError, first_day_lines, local_ports, mlflow_server, team_stack

    if not local and not (backend_store_uri and artifacts_destination):
        _fail("give --backend-store-uri and --artifacts-destination, or --local")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the services on SIGTERM too
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    with ExitStack() as stack:
        try:
            if local:
                ports = local_ports(workdir, {"s3": s3_port, "postgres": pg_port})
                s3, pg, srv = stack.enter_context(
                    team_stack(
                        workdir,
                        workers=workers,
                        basic_auth=basic_auth,
                        port=port,
                        persist=True,
                        s3_port=ports["s3"],
                        pg_port=ports["postgres"],
                        extra_buckets=(dvc_bucket,),
                    )
                )
                typer.echo(f"PostgreSQL: {pg.uri}\nS3: {s3.endpoint} (data in {s3.data_dir})")
            else:
                srv = stack.enter_context(
                    mlflow_server(
                        workdir,
                        backend_store_uri=str(backend_store_uri),
                        artifacts_destination=str(artifacts_destination),
                        host=host,
                        port=port,
                        workers=workers,
                        basic_auth=basic_auth,
                    )
                )
        except ServiceError as err:
            _fail(str(err))
        typer.echo(f"MLflow server log: {srv.log_path}")
        if local:
            typer.echo(
                "\n# ready to paste, in the project (each member once per clone; commit "
                ".dvc/config,\n# the keys go to the git-ignored .dvc/config.local):"
            )
            typer.echo(first_day_lines(srv.uri, s3, dvc_bucket), color=False)
        else:
            typer.echo(f"export MLFLOW_TRACKING_URI={srv.uri}", color=False)
        sys.stdout.flush()
        try:
            while srv.process.popen.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            typer.echo("stopping")
            return
        _fail(f"mlflow server exited ({srv.process.popen.returncode}); see {srv.log_path}")


if __name__ == "__main__":
    app()
