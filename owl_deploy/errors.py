"""One exception type for every user-facing failure: the CLI prints its message on one line."""


class OwlError(Exception):
    """A bad input or an environment problem the user can fix; never a bug."""
