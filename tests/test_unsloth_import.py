"""speedtune.training.backends.unsloth_import: Unsloth imported with its TRL rewriting limited to a run's trainers.

Each case runs in a fresh Python process (an import can be done once per process). The first cases use the real
Unsloth and TRL, so they need a CUDA GPU and run on the device machine (log in benchmarks/results/); Unsloth with
UNSLOTH_ALLOW_CPU returns before its walk, so a CPU can't show it. The last case runs anywhere: a stand-in `unsloth`
package with Unsloth's module layout (its `models.rl` defines the walk and the per-trainer step, its `__init__`
calls the walk), which checks the finder's swap and `ensure` on their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and Unsloth")


def run(code: str, path: str | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (path, str(ROOT), os.environ.get("PYTHONPATH"))
                                                      if p))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@gpu
def test_sft_only_then_ensure_patches_dpo():
    out = run("""
        import json, time
        t = time.perf_counter()
        from speedtune.training.backends.unsloth_import import import_unsloth, ensure, patched
        import_unsloth(("sft",))
        took = time.perf_counter() - t
        import trl
        sft, dpo_before = trl.SFTTrainer.__name__, trl.DPOTrainer.__name__
        ensure(("sft", "dpo"))
        print(json.dumps({"sft": sft, "dpo_before": dpo_before, "dpo_after": trl.DPOTrainer.__name__,
                          "patched": sorted(patched()), "import_s": took}))
    """)
    assert out["sft"] == "UnslothSFTTrainer"
    assert out["dpo_before"] == "DPOTrainer"  # TRL's own: the walk left it alone
    assert out["dpo_after"] == "UnslothDPOTrainer"
    assert out["patched"] == ["dpo", "sft"]


@gpu
def test_plain_import_still_rewrites_every_trainer():
    """The baselines import Unsloth as users do; the finder is installed only by import_unsloth."""
    out = run("""
        import json, time
        t = time.perf_counter()
        import unsloth, trl
        from speedtune.training.backends.unsloth_import import patched
        print(json.dumps({"dpo": trl.DPOTrainer.__name__, "patched": patched(), "import_s": time.perf_counter() - t}))
    """)
    assert out["dpo"] == "UnslothDPOTrainer" and out["patched"] is None


STAND_IN = {
    "unsloth/__init__.py": "from unsloth.models import rl\nrl.patch_trl_rl_trainers()\n",
    "unsloth/models/__init__.py": "",
    "unsloth/models/rl.py": textwrap.dedent("""
        walked = []
        def _patch_trl_rl_trainers(name):
            walked.append(name)
        def _patch_trl_experimental_trainer(name, module):
            walked.append("experimental." + name)
        def patch_trl_rl_trainers():
            for name in ("sft_trainer", "dpo_trainer", "grpo_trainer", "kto_trainer"):
                _patch_trl_rl_trainers(name)
    """),
}


@pytest.mark.parametrize("methods, walked", [(("sft",), ["sft_trainer"]),
                                             (("sft", "dpo"), ["sft_trainer", "dpo_trainer"])])
def test_the_walk_is_limited_to_the_methods_on_a_stand_in(tmp_path, methods, walked):
    for name, text in STAND_IN.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    out = run(f"""
        import json, sys
        from speedtune.training.backends.unsloth_import import import_unsloth, ensure, patched
        import_unsloth({methods!r})
        from unsloth.models import rl
        first = list(rl.walked)
        ensure(("sft", "dpo"))
        finder_left = any(getattr(f, "__name__", "") == "LimitWalk" for f in sys.meta_path)
        print(json.dumps({{"first": first, "after": rl.walked, "patched": sorted(patched()), "left": finder_left}}))
    """, path=str(tmp_path))
    assert out["first"] == walked
    assert out["after"] == ["sft_trainer", "dpo_trainer"]  # ensure adds DPO once, never twice
    assert out["patched"] == ["dpo", "sft"] and not out["left"]
