"""kvlink's one exception."""


class Error(Exception):
    """A kvlink call failed.

    code: kvlink's name for the failure, for programs to test ("timed_out",
        "unhealthy", "connection_lost", "not_found", "bad_request",
        "not_connected", "shutting_down", ...; docs/adapters.md lists them).
    message: what was wrong and what to do, for people.
    """

    def __init__(self, code, message=""):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message

    def __reduce__(self):
        return (type(self), (self.code, self.message))
