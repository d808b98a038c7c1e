"""The one exception type for problems the user can fix (bad file, bad flag, missing weights).

Command-line entry points catch it and print its message as a single line instead of a traceback.
"""


class UserInputError(ValueError):
    """A problem with the user's input, described in one line that says what to do."""
