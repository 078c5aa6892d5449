"""One exception type for mistakes a user can fix.

The CLI catches :class:`UserError` and prints its message on one line with a
non-zero exit; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: recipe, data file, paths, flags.

    The message must be one line and name the place (file, row, key) and the
    reason, e.g. ``data.csv: row 12: Answer: empty``.
    """


def short(text: str, limit: int = 200) -> str:
    """``text`` on one line, cut to ``limit`` characters: a server's message or log tail inside a UserError."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
