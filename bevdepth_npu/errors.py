"""The one error type the command line turns into a clear message and an exit code."""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; ``str()`` is the whole message, ``exit_code`` the status."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
