"""One exception type for problems a user can fix (bad config, bad input, unreachable service).

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class PipelineError(RuntimeError):
    """A user-facing error whose message names the file, key or value at fault."""

    # Whether running the same work again later can succeed. False for bad settings and corrupt
    # data (the same bytes fail again: the Ray backend fails the stage at once); True for a service
    # that did not answer, which the Ray backend retries up to scaling.max_failures.
    retryable = False


class StorageUnavailable(PipelineError):
    """The object store (or file system) behind a URL did not answer, after its client's own
    retries: an outage, not corrupt data. The message names the URL."""

    retryable = True
