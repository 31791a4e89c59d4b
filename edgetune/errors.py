"""Exceptions with messages meant for the person who ran the command.

Every error edgetune raises on bad input is an ``EdgetuneError``; the CLI prints its
message (no traceback) and exits 1, or 2 for a ``UsageError``.
"""


class EdgetuneError(Exception):
    """Base class: a failure caused by input, files or configuration, not by a bug."""


class UsageError(EdgetuneError, ValueError):
    """The call itself is wrong: an unknown name, an out-of-range option, a bad shape."""


class DataError(EdgetuneError, ValueError):
    """Input data is unusable: wrong shape, NaN/inf, labels out of range, a damaged file."""


class ModelFileError(EdgetuneError):
    """A model or adapter file is missing, truncated, corrupt or does not match."""


class BackboneMismatch(ModelFileError):
    """An adapter was trained on another backbone of the same shape (loading it needs strict=False)."""


class OutputError(EdgetuneError):
    """An output file or directory cannot be written (a parent is a file, no permission, disk full)."""


class BudgetError(EdgetuneError):
    """A configuration would need more memory than the budget it was given."""
