"""One exception type for problems a user can fix (bad config, bad input, unreachable service).

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class PipelineError(RuntimeError):
    """A user-facing error whose message names the file, key or value at fault."""
