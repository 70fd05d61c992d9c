"""User-facing errors.

Anything a user can cause (a bad flag, a missing file, a malformed line) raises `NLMError`
with a one-line message that names the file, line or field. The CLI prints it as
`nlm: error: <message>` and exits with status 2; it never shows a traceback for these.
"""


class NLMError(Exception):
    """An error caused by user input; its message is shown to the user as one line."""


def describe_location(path: object, line: int | None = None, field: str | None = None) -> str:
    """`path:line (field 'x')` — the prefix every input error message starts with."""
    where = str(path)
    if line is not None:
        where += f":{line}"
    if field is not None:
        where += f" (field '{field}')"
    return where
