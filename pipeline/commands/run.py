"""`python -m pipeline run JOB.yaml`: run the job's stages on Ray (RAY_ADDRESS, else a local Ray)."""

from __future__ import annotations

import argparse
import shlex

from pipeline.commands._job_args import add_job_arguments, load
from pipeline.redact import redact_url


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from pipeline.console import configure_logging, log_file_for
    from pipeline.runner.preflight import check_output_root, check_records_location

    job, stages = load(args)
    check_records_location(job)  # inside a Ray job's temporary working directory: refuse relative locations
    check_output_root(job)  # before the log file goes there
    configure_logging(0, log_file_for(job.output_root, job.name, "driver"))

    from pipeline.runner.job import run_job
    from pipeline.runner.ray_backend import RayBackend

    if job.sweep is not None:
        from pipeline.runner.sweep import run_sweep

        parent, runs = run_sweep(job, RayBackend, stages, job_file=args.job)
        reused = sum(r.reused for r in runs)
        print(f"sweep run {parent} finished: {len(runs)} cell runs ({reused} reused); "
              "comparison.csv/.md/.png are its artifacts under comparison/")
        return 0
    outcome = run_job(job, RayBackend(), stages, job_file=args.job)
    print(summary(outcome))
    return 0


def summary(outcome) -> str:
    lines = [f"job run {outcome.job_run_id} finished"]
    for name, step in outcome.stages.items():
        state = "reused" if step.skipped else "ran"
        lines.append(f"  {name:<9} {state:<6} MLflow run {step.run_id}  fingerprint {step.fingerprint[:12]}")
    evaluation = outcome.stages.get("evaluate")
    if evaluation is not None:
        m = evaluation.result.metrics
        top1, top5, count, energy = (m.get(k) for k in ("top1", "top5", "n_samples", "energy_pj_per_image"))
        if top1 is not None:
            lines.append(f"top-1 accuracy: {top1:.2%}   top-5: {top5:.2%}   over {int(count)} validation images")
        if energy is not None:
            lines.append(f"energy estimate: {energy / 1e6:.4f} uJ per image (45 nm: 4.6 pJ/MAC, 0.9 pJ/AC)")
    uri = outcome.tracking_uri
    table = f"#/experiments/{experiment_id(uri, outcome.job_run_id)}/runs"  # `mlflow ui` opens elsewhere
    shown = redact_url(uri)  # the password stays in the spec or MLFLOW_TRACKING_PASSWORD, not on the console
    if uri.startswith(("http://", "https://")):
        lines.append(f"browse the runs: {shown.rstrip('/')}/{table}")
    else:  # quoted: a store path with a space (or a shell character) pastes as one argument
        lines.append(f"browse the runs: mlflow ui --backend-store-uri {shlex.quote(shown)}, "
                     f"then http://127.0.0.1:5000/{table}")
    return "\n".join(lines)


def experiment_id(uri: str, run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(uri).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - the summary never fails the job; the id is a convenience
        return "<id>"
