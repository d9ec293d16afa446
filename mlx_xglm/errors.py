"""The one exception type for errors a user can cause."""


class XGLMError(Exception):
    """Bad input: a missing file, a wrong tensor, a bad value. The message says what to do."""
