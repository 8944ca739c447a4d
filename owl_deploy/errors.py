"""One exception type for every user-facing failure: the CLI prints its message on one line."""


class OwlError(Exception):
    """A bad input or an environment problem the user can fix; never a bug."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """A library's exception as one line: its first non-empty line, and when that line only introduces
    what follows (it ends with ':'), the following lines too, joined; at most ``limit`` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = " ".join(lines)
    return text if len(text) <= limit else text[: limit - 3] + "..."
