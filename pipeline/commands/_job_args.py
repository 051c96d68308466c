"""Arguments every job command shares: the spec, --set overrides and --stages."""

from __future__ import annotations

import argparse

from pipeline.config import JobConfig, load_job


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", metavar="JOB.yaml", help="job spec (see jobs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one value of the spec, e.g. --set stages.finetune.epochs=2 (repeatable)")
    parser.add_argument("--stages", default=None, metavar="A,B",
                        help="comma-separated subset of the stages (default: the enabled ones)")


def load(args: argparse.Namespace) -> tuple[JobConfig, list[str] | None]:
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    return load_job(args.job, args.overrides), stages
