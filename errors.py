"""The one exception type for errors a user can cause.

A `SlimcError` carries a message that says what went wrong and what to do about it. The CLI
prints it on one line (`error: ...`) and exits with status 2. Programming errors stay ordinary
exceptions and keep their tracebacks.
"""

from __future__ import annotations


class SlimcError(Exception):
    """An error caused by the user's input: bad path, unknown recipe key, unsupported op, ..."""


class PipelineError(SlimcError):
    """A pass failed; the message names the failing pass and the passes that ran before it."""

    def __init__(self, failed: str, before: list[str], cause: BaseException):
        self.failed = failed
        self.before = list(before)
        self.cause = cause
        ran = ", ".join(before) if before else "none"
        if isinstance(cause, SlimcError):  # already says what went wrong and what to do: keep it readable
            super().__init__(f"pass '{failed}': {cause} (passes run before it: {ran})")
        else:
            super().__init__(f"pass '{failed}' failed ({type(cause).__name__}: {cause}); passes run before it: {ran}")


class PostconditionError(SlimcError):
    """A pass's result breaks what the pass promises (`Pass.ensures`): a bug or an unsupported model."""
