"""The one error type that user-facing layers raise; the CLI turns it into a single stderr line."""


class SkipconvError(Exception):
    """A problem the user can fix (bad input, missing file, wrong option); printed as one line."""
