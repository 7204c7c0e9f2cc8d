"""Where speedtune keeps things: the cache (moved with SPEEDTUNE_HOME) and the data files shipped with the package."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def home() -> Path:
    """The cache root: $SPEEDTUNE_HOME, else ~/.cache/speedtune."""
    env = os.environ.get("SPEEDTUNE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "speedtune"


def models_dir() -> Path:
    return home() / "models"


def templates_dir() -> Path:
    """The `templates/` data folder: the checkout's own when this speedtune runs from a checkout (an editable install
    elsewhere would map `speedtune.templates` to its own tree), else the installed `speedtune.templates`."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "templates" / "chat").is_dir():
        return checkout / "templates"
    try:
        from importlib.resources import files

        p = Path(str(files("speedtune.templates")))
        if (p / "chat").is_dir():
            return p
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "templates"


def demo_dir() -> Path:
    return Path(__file__).resolve().parent / "demo"


@contextmanager
def staging(target: Path):
    """A temporary folder beside `target`, renamed to it when the block succeeds and removed when it fails: nothing
    half-written is ever left at `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
