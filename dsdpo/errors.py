"""The one exception type for problems a user can fix (bad input, bad config, missing files)."""


class DsdpoError(Exception):
    """A user-facing error: the message names the file, line or field and says what to do.

    The CLI and launch/train.py print it as one line and exit non-zero, without a traceback.
    """
