"""The one exception type for every problem a user can fix."""


class LibrarianError(Exception):
    """A problem with the user's input or environment. Its message names the problem and the fix."""
