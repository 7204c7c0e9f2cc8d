"""The training data tokenised in a side process while `speedtune train` imports torch, transformers and Unsloth
(15-20 s on a GPU machine, most of it one busy core), so a large dataset costs no time of its own before the plan.

`start()` launches `python -m speedtune.data.ahead` with the data options on its stdin; the child builds the rows
exactly as `speedtune.data.dataset.build` does in-process (the model's own tokenizer, loaded by transformers'
AutoTokenizer) and pickles the result, or the one-line error of a bad row, to a private temporary file. `Ahead.built()`
waits for it. A child that dies or can't start costs nothing but the time: the parent then builds in-process, as it
would have without it. It is used only where Unsloth's import is still to come (`wanted`): a second `train()` in one
Python session imports nothing and builds in-process."""

from __future__ import annotations

import atexit
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

from speedtune.errors import UserError


class Ahead:
    def __init__(self, proc: subprocess.Popen, out: Path):
        self.proc, self.out = proc, out
        atexit.register(self.close)  # a run that fails before it needs the data leaves no child and no file

    def built(self):
        """The child's Built, its bad row re-raised here as the same one-line error, or None if it failed."""
        try:
            self.proc.wait()
            kind, value = pickle.loads(self.out.read_bytes()) if self.proc.returncode == 0 else ("died", None)
        except (OSError, EOFError, pickle.UnpicklingError):
            kind, value = "died", None
        finally:
            self.close()
        if kind == "user_error":
            raise UserError(value[0], exit_code=value[1])
        return value if kind == "built" else None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for path in (self.out, self.out.with_name(self.out.name + ".part")):
            path.unlink(missing_ok=True)


def wanted(backend: str) -> bool:
    """Whether a side process pays: Unsloth's import (15-20 s) is still to come in this process. The plain PEFT
    backend's imports take about as long as the child's own import of transformers (measured on a 2-core CPU: 4.4 s
    against its 3 s), so there it would only add work. SPEEDTUNE_DATA_AHEAD=0 turns it off."""
    return backend == "unsloth" and "unsloth" not in sys.modules and os.environ.get("SPEEDTUNE_DATA_AHEAD") != "0"


def start(opts, model_path: str, seq_len: int) -> Ahead | None:
    fd, name = tempfile.mkstemp(prefix="speedtune-data-", suffix=".pkl")
    os.close(fd)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "TRANSFORMERS_VERBOSITY": "error"}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "speedtune.data.ahead", name], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        proc.stdin.write(pickle.dumps((opts, model_path, seq_len)))
        proc.stdin.close()
    except OSError:
        Path(name).unlink(missing_ok=True)
        return None
    return Ahead(proc, Path(name))


def main(out: str) -> None:
    opts, model_path, seq_len = pickle.loads(sys.stdin.buffer.read())
    from transformers import AutoTokenizer

    from speedtune.data.dataset import build
    from speedtune.models.registry import resolve_model

    try:
        result = ("built", build(opts, AutoTokenizer.from_pretrained(resolve_model(model_path)), seq_len))
    except UserError as e:
        result = ("user_error", (str(e), e.exit_code))
    tmp = Path(out + ".part")
    tmp.write_bytes(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    tmp.replace(out)


if __name__ == "__main__":
    main(sys.argv[1])
