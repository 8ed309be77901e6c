"""One error base for everything omni-trt refuses on purpose.

Each class carries its CLI exit code and its HTTP status; `cli.main` and the server's one
exception handler map them, so neither has a table of its own. Anything that is not an
OmniError is a fault: exit 1, HTTP 500 "internal error" (details only in the log)."""

from __future__ import annotations


class OmniError(Exception):
    """message: what went wrong and what to do; param: the request field or option at fault;
    status: the HTTP status (class default unless given); headers: extra HTTP headers."""

    exit_code = 1
    status = 500

    def __init__(self, message: str, param: str | None = None, *, status: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if status is not None:
            self.status = status
        self.headers = headers

    def __str__(self) -> str:
        return self.message


class UsageError(OmniError, ValueError):
    """A bad argument, option, size or config from the user: exit 2, HTTP 400."""

    exit_code = 2
    status = 400


class ModelNotFound(UsageError):
    pass


class UnsupportedModel(UsageError):
    pass


class RequestError(UsageError):
    """A request the server will not run; `status` is 400 or 422, `param` the field."""


class OutOfProfile(RequestError):
    """A call outside the shapes a built engine covers."""


class TensorRTNotInstalled(UsageError):
    pass


class EngineDirError(OmniError):
    """An engine dir that cannot be served as asked; the message says why and what to run."""

    exit_code = 2
    status = 503


class ComponentNotBuilt(EngineDirError):
    """A call that needs an engine the engine dir was built without (the VAE encoder, for edits):
    HTTP 501, since this server cannot do it until the operator runs the command in the message."""

    status = 501


class ManifestError(EngineDirError):
    """A manifest that is missing, unreadable or does not follow the schema."""


class BuildError(OmniError):
    """An export, validation or engine build that failed: nothing half-built is kept."""


class Cancelled(OmniError):
    """Work stopped before its end: the client left (499), its deadline passed (504), or the
    server is shutting down (503). Raised from a pipeline's step callback to stop at once."""

    status = 503
