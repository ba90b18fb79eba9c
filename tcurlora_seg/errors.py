"""The one exception type for problems a user can fix (bad input, config key, checkpoint).

Entry points catch it, print its message as a single line and exit with code 2; library callers can catch it as a ValueError.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A problem the user can fix; the message names the file or key and the fix."""
