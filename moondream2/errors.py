"""The one exception type for problems the user can fix (bad file, bad flag, missing weights, a full disk).

Command-line entry points catch it and print its message as a single line instead of a traceback.
"""

import errno


class UserInputError(ValueError):
    """A problem with the user's input, described in one line that says what to do."""


class DiskFull(UserInputError):
    """No space left while writing a file: one line naming the file, never a half-written file."""

    def __init__(self, path: object, kept: str = ""):
        super().__init__(f"no space left on the disk while writing {path}{kept}; free some space there and run again")


def is_disk_full(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from, is 'no space left on device' (ENOSPC).

    Writers wrap it: torch.save raises a RuntimeError whose context is the OSError, and safetensors
    its own error type whose text ends with the system's '(os error 28)'.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if f"(os error {errno.ENOSPC})" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False
