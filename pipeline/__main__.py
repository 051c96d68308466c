"""`python -m pipeline COMMAND ...`: one CLI for shards, runs, plans and submissions.

Each command lives in its own module exposing `add_arguments(parser)` and `main(args) -> int`;
this file only dispatches, so importing the CLI stays cheap (torch, ray and mlflow load only
inside the command that needs them).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pipeline.console import configure_logging
from pipeline.errors import PipelineError
from pipeline.redact import redact_url

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("pipeline.commands.run", "run a job's stages on Ray (RAY_ADDRESS, else a local Ray)"),
    "plan": ("pipeline.commands.plan", "print the stage graph, fingerprints and what would be skipped"),
    "submit": ("pipeline.commands.submit", "submit a job to a Ray cluster as a Ray job"),
    "local": ("pipeline.commands.local", "run a job's stages in processes started by torchrun / accelerate launch"),
    "shards": ("pipeline.data.cli", "write, or verify, WebDataset shards from an image source"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_entry=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    # console only for now; `run` and the backends add the log file once the job is known
    configure_logging(int(os.environ.get("RANK", "0")))
    args = build_parser().parse_args(argv)
    try:
        return int(args._entry(args) or 0)
    except PipelineError as err:
        print(f"error: {redact_url(str(err))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
