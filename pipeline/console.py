"""What a person sees while a job runs, and where the rest goes.

`configure_logging(rank, log_file)` sets up every process of a job (the driver, each Ray Train
worker, each torchrun rank) the same way:
- console (stderr): rank 0 prints the pipeline's INFO lines (progress, stage starts, the summary);
  other ranks print warnings and errors only. Library chatter never reaches it: INFO lines of
  other packages (aiobotocore/botocore "Found credentials", Ray Train's controller and report
  lines, MLflow's database migrations) and the known warnings in `KNOWN_NOISE`;
- log file (`log_file`, usually `{output_root}/logs/{job}-rank{N}.log`): every record of every
  logger at INFO and above, chatter included, with rank and logger name.
Python warnings (torch's FutureWarnings and the like) are routed through logging so the same rules
apply. Both outputs pass every line (message, arguments and traceback) through
`pipeline.redact.redact_url`: a password in a URL (an MLflow tracking URI, an endpoint) never
reaches the console or a log file. This module imports no Ray, MLflow or torch: stages use
`progress_line` from it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

from pipeline.redact import redact_url

# Loggers whose INFO lines are ours; every other logger reaches the console from WARNING up.
OWN_LOGGERS = ("pipeline", "models", "__main__")

# Warnings seen on every run that say nothing a user can act on: (logger prefix, text in the message).
# Found by running `python -m pipeline local` (2 ranks) and `python -m pipeline run jobs/quickstart.yaml`.
KNOWN_NOISE: tuple[tuple[str, str], ...] = (
    # torch 2.14 deprecates the collective DeepSpeed's ZeRO calls on every step
    ("py.warnings", "`torch.distributed.all_gather_into_tensor` is deprecated"),
    # MLflow's pyfunc wants type hints our classifier wrapper's predict() cannot give usefully
    ("py.warnings", "Add type hints to the `predict` method"),
    # timm: a cosine schedule shorter than one cycle (every short run)
    ("timm.scheduler", "will have no effect on the learning rate"),
    # DeepSpeed on a machine without a GPU
    ("DeepSpeed", "Setting accelerator to CPU"),
    # MLflow's HTTP retries against a tracking server that is away: the pipeline says so in one line
    ("urllib3.connectionpool", "Retrying"),
)

# Libraries that attach their own console handler instead of propagating to the root logger.
OWN_HANDLER_LOGGERS = ("DeepSpeed", "mlflow", "ray.train", "ray.data")

_MARK = "_pipeline_console"  # set on the handlers this module installs, so a second call replaces them


def is_chatter(record: logging.LogRecord) -> bool:
    """True for a record that belongs in the log file but not on the console."""
    own = any(record.name == name or record.name.startswith(name + ".") for name in OWN_LOGGERS)
    if record.levelno < logging.WARNING and not own:
        return True
    if record.levelno >= logging.ERROR:
        return False
    message = record.getMessage()
    return any(record.name.startswith(prefix) and text in message for prefix, text in KNOWN_NOISE)


class ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not is_chatter(record)


class ConsoleFormatter(logging.Formatter):
    """`12:04:31 pretrain step 40/184 ...` for our INFO lines; level, rank and logger for the rest."""

    def __init__(self, rank: int) -> None:
        super().__init__(datefmt="%H:%M:%S")
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        when = self.formatTime(record, self.datefmt)
        text = record.getMessage()
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        if record.levelno < logging.WARNING:
            return redact_url(f"{when} {text}")
        return redact_url(f"{when} {record.levelname} rank{self.rank} {record.name}: {text}")


class FileFormatter(logging.Formatter):
    """The log file's lines (time, rank, level, logger, message, traceback), URL passwords redacted."""

    def __init__(self, rank: int) -> None:
        super().__init__(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact_url(super().format(record))


class _ToRoot(logging.Filter):
    """On a library logger that adds its own stdout handler (DeepSpeed does so at import, after we
    ran): hand each record to the root logger's handlers instead, and keep it from its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        logging.getLogger().handle(record)
        return False


def configure_logging(rank: int, log_file: str | None = None) -> None:
    """Console and log file for this process (see the module doc). Safe to call again, e.g. first
    without a log file and again once the job (and so its output_root) is known."""
    # read by MLflow at import: keep its own handler and artifact progress bars off the console
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow prints "View run ... at: <store URL>" to stdout at every run end, past logging (so past the
    # redaction below, with the store's user:password): the summary's `browse the runs:` line says it once
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _MARK, False) or _is_console(handler):
            root.removeHandler(handler)
            if isinstance(handler, logging.FileHandler):
                handler.close()
    console = _CurrentStderr()
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.addFilter(ConsoleFilter())
    console.setFormatter(ConsoleFormatter(rank))
    setattr(console, _MARK, True)
    root.addHandler(console)
    if log_file:
        os.makedirs(os.path.dirname(log_file) or ".", exist_ok=True)
        to_file = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        to_file.setLevel(logging.INFO)
        to_file.setFormatter(FileFormatter(rank))
        setattr(to_file, _MARK, True)
        root.addHandler(to_file)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings -> logger "py.warnings", so the filter and the file see them
    for name in OWN_HANDLER_LOGGERS:
        _adopt(logging.getLogger(name))


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (pytest, notebooks and the CLI called twice
    in one process swap it; a handler holding an old, closed stream would fail)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def _adopt(logger: logging.Logger) -> None:
    """Drop a library's own console handlers (its file handlers, e.g. Ray's session logs, stay) and hand
    its records to ours. Not by propagation: a parent ("ray") may hold a console handler of its own."""
    for handler in list(logger.handlers):
        if _is_console(handler):
            logger.removeHandler(handler)
    if logger.name == "DeepSpeed":  # it may add its handler later (at import): a filter catches that too
        if not any(isinstance(f, _ToRoot) for f in logger.filters):
            logger.addFilter(_ToRoot())
        return
    if not any(isinstance(h, _ForwardToRoot) for h in logger.handlers):
        logger.addHandler(_ForwardToRoot())
    logger.propagate = False


class _ForwardToRoot(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        for handler in logging.getLogger().handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def log_file_for(output_root: str, job_name: str, label: str) -> str | None:
    """`{output_root}/logs/{job}-{label}.log` when output_root is a local folder, else None (an object
    store cannot be appended to; the console and Ray's own logs remain)."""
    if "://" in output_root and not output_root.startswith("file://"):
        return None
    root = os.path.abspath(output_root.removeprefix("file://"))
    return os.path.join(root, "logs", f"{job_name}-{label}.log")


# --------------------------------------------------------------------------- the progress line


def progress_line(stage: str, step: int, total: int, metrics: Mapping[str, float],
                  images_per_step: int | None = None) -> str:
    """`pretrain step 40/184 (22%) loss 0.8123 lr 1.2e-03 300 img/s ETA 1m05s`; a field the metrics do
    not hold (or hold as nan) is left out. ETA = remaining steps x images per step / images per s."""
    parts = [f"{stage} step {step}/{total}" + (f" ({step / total:.0%})" if total else "")]
    loss, lr, speed = (_finite(metrics.get(k)) for k in ("loss", "lr", "images_per_s"))
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if lr is not None:
        parts.append(f"lr {lr:.1e}")
    if speed is not None and speed > 0:
        parts.append(f"{speed:.0f} img/s")
        if images_per_step and total > step:
            parts.append(f"ETA {format_duration((total - step) * images_per_step / speed)}")
    return " ".join(parts)


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
