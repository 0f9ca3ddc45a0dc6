class SegNetError(Exception):
    """The project's one error type: its message names the file or value and what was expected."""
