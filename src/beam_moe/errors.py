"""The one exception type users see from beam-moe."""


class BeamError(Exception):
    """A problem the user can fix: the message says what was wrong and what to do about it."""
