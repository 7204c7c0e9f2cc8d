"""The one exception type for user mistakes: the CLI prints its message as one line, no traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, malformed row). The message names what and how."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


# The distribution's name ("speedtune" on PyPI is another project) and the repository it installs from; pyproject.toml
# and the notebooks' install cells name the same (tests/test_install.py holds them together).
DISTRIBUTION = "speedtune-llm"
SOURCE = "git+https://github.com/speedtune-lab/speedtune"


class RowError(UserError):
    """A bad data row: `where` names the file and row (e.g. "data.jsonl line 5"), `reason` what is wrong and the fix."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}", exit_code=1)
        self.where, self.reason = where, reason


def install_hint(extra: str) -> str:
    """The command that adds an optional extra, e.g. install_hint("gguf")."""
    return f"pip install '{DISTRIBUTION}[{extra}] @ {SOURCE}'"
