"""The one base class of failures whose message is meant for a person.

Every layer raises subclasses of :class:`TesseraError` for what it expects can go
wrong (a dead peer, a refused request, a missing data file); the process entry
points print the message as one line and exit non-zero. Anything else is a bug
and keeps its traceback.
"""


class TesseraError(Exception):
    """An expected failure; ``str(exc)`` names the process or peer and what to do."""


class UsageError(TesseraError, ValueError):
    """The user asked for something that cannot work (a bad setting for this model)."""
