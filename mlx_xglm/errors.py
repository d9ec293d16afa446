"""The one exception type for errors a user can cause."""

from __future__ import annotations


class XGLMError(ValueError):
    """Bad input: a missing file, a wrong tensor, a bad value. The message says what to do.

    A `ValueError`, as Python callers expect of a bad value (`make_sampler(temp=-1)`); so code that turns
    a library's ValueError into an XGLMError lets an XGLMError raised inside its `try` pass unchanged.

    `param` names the library parameter at fault (`"temp"`, `"max_kv_size"`), so a front end (the
    command line, the server) can point at its own name for it.
    """

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param
