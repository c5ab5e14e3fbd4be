"""The one error type for bad input: a file, a record or an option the user gave.

`cdcda.py` and the scripts print an `InputError` as one line (its message names the file,
record or option and what to do); any other exception is a bug and shows its traceback.
It is a ValueError, so code that validates values can raise it where a ValueError belongs.
"""


class InputError(ValueError):
    """Bad input from the user; the message names the file, record or option."""
