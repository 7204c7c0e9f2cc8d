"""Importing Unsloth with its TRL rewriting limited to the trainers a run uses.

On import, Unsloth rewrites every trainer TRL ships (SFT, DPO, GRPO, KTO, RLOO, reward, distillation and seven
experimental ones): it generates each one's source, writes it to its compiled cache and imports it. An SFT run uses
one of them. Here the rewriting walk (`unsloth.models.rl.patch_trl_rl_trainers`, replaced in that module just after
it is executed, before Unsloth calls it) patches only the trainers of the asked methods, as Unsloth's own per-trainer
step does; `ensure` patches another method's trainer later in the same process. Everything else Unsloth does on import
is unchanged. The walk's names are Unsloth's private ones (checked against unsloth 2026.10.9, the version the `gpu`
extra pins); where they are missing, Unsloth imports as usual."""

from __future__ import annotations

import importlib.util
import sys

# speedtune's method -> (TRL's trainer module under trl.trainer, or None; its name under trl.experimental, or None)
TRAINERS = {"sft": ("sft_trainer", None), "dpo": ("dpo_trainer", None), "orpo": ("orpo_trainer", "orpo")}
_patched: set[str] | None = None  # the methods patched in this process; None: Unsloth's whole walk ran (or none yet)


def import_unsloth(methods: tuple[str, ...] = ("sft",)) -> None:
    """`import unsloth`, its TRL rewriting limited to `methods`. If Unsloth is already imported, `ensure(methods)`."""
    if "unsloth" in sys.modules:
        ensure(methods)
        return
    if importlib.util.find_spec("unsloth") is not None:  # (a submodule's find_spec would import the package)
        _limit_on_load(methods)
    import unsloth  # noqa: F401


def _limit_on_load(methods: tuple[str, ...]) -> None:
    """A finder, first on sys.meta_path, that lets `unsloth.models.rl` load as usual and then swaps its walk for
    `_walk(methods)`; it takes itself off the path once used."""

    class LimitWalk:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "unsloth.models.rl":
                return None
            sys.meta_path.remove(LimitWalk)
            spec = importlib.util.find_spec(name)
            if spec is None or not hasattr(spec.loader, "exec_module"):
                return spec
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                if hasattr(module, "_patch_trl_rl_trainers") and hasattr(module, "patch_trl_rl_trainers"):
                    module.patch_trl_rl_trainers = lambda: _walk(module, methods)

            spec.loader.exec_module = exec_module  # this module's own loader object
            return spec

    sys.meta_path.insert(0, LimitWalk)


def _walk(rl, methods) -> None:
    global _patched
    _patched = set()
    _patch(rl, methods)


def _patch(rl, methods) -> None:
    import importlib

    for method in methods:
        if method in _patched:
            continue
        module_name, experimental = TRAINERS[method]
        import trl.trainer

        if module_name in dir(trl.trainer):
            rl._patch_trl_rl_trainers(module_name)
        elif experimental and importlib.util.find_spec(f"trl.experimental.{experimental}"):
            rl._patch_trl_experimental_trainer(
                experimental, importlib.import_module(f"trl.experimental.{experimental}.{module_name}"))
        _patched.add(method)


def ensure(methods: tuple[str, ...]) -> None:
    """Patch the methods' trainers now if the import limited its walk to others (Unsloth's own step per trainer)."""
    if _patched is None or set(methods) <= _patched:
        return
    _patch(sys.modules["unsloth.models.rl"], methods)


def patched() -> set[str] | None:
    return None if _patched is None else set(_patched)
