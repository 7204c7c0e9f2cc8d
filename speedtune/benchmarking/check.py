"""The checks a suite's results must pass, or `speedtune bench` exits non-zero with one line.

Per-step check (`check_losses`). Every run with the reference's seed trains the same rows in the same order from the
same weights and the same LoRA init, so its per-step losses and gradient norms must match the reference run's up
to numerics. The tolerance comes from measured noise where the suite measures it: runs marked `repeat_of: REF` with
REF's seed are the reference again with the same math summed another way (e.g. 2 x 4 instead of 8 x 1); their
largest relative difference from REF up to each step, times NOISE_SAFETY, is the tolerance at that step, never below
FLOOR. Without such runs, DEFAULT's constants per precision, set from the noise measured in
docs/design/benchmarking.md ("The loss check's tolerances").
The reference missing, failed or out of memory fails the check: nothing was compared.

Eval check (`check_eval`). Runs marked `repeat_of: REF` with another seed measure the seed-to-seed spread of REF's
final held-out loss (max - min); every run's final eval loss must lie within that spread of the seeds' mean."""

from __future__ import annotations

NOISE_SAFETY = 3.0
DEFAULT = {"float32": (1e-3, 1e-3), "bfloat16": (0.01, 0.05), "float16": (0.01, 0.05)}  # (loss, gradient norm)
FLOOR = {"float32": (1e-5, 1e-5), "bfloat16": (0.005, 0.05), "float16": (0.005, 0.05)}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-6)


def _running_max(xs: list[float]) -> list[float]:
    out, m = [], 0.0
    for x in xs:
        m = max(m, x)
        out.append(m)
    return out


def _diffs(run: dict, ref: dict, key: str) -> list[float | None]:
    a, b = run.get(key) or [], ref.get(key) or []
    return [None if x is None or y is None else _rel(x, y) for x, y in zip(a, b)]


def ran(results: list[dict], name: str) -> tuple[dict | None, str | None]:
    """(the run's result, None) or (None, why it has none)."""
    r = next((x for x in results if x.get("name") == name), None)
    if r is None:
        return None, "did not run (not in the suite, skipped, or left out by --runs without --resume)"
    if r.get("failed"):
        return None, f"failed ({r.get('error') or 'exit ' + str(r.get('exit'))})"
    if r.get("oom"):
        return None, "ran out of memory"
    if "losses" not in r:
        return None, "has no per-step losses"
    return r, None


def noise(results: list[dict], ref: dict) -> dict | None:
    """The per-step envelope of the same-seed repeats of the reference (see the module's note), or None."""
    reps = [r for r in results if r.get("repeat_of") == ref["name"] and r.get("seed") == ref.get("seed")
            and "losses" in r]
    if not reps:
        return None
    n = len(ref["losses"])
    env = {}
    for key in ("losses", "grad_norms"):
        diffs = [_diffs(r, ref, key) for r in reps]
        env[key] = _running_max([max((d[k] for d in diffs if k < len(d) and d[k] is not None), default=0.0)
                                 for k in range(n)])
    return {"runs": [r["name"] for r in reps], **env}


def tolerances(ref: dict, run: dict, env: dict | None, key: str, step: int) -> float:
    i = 0 if key == "losses" else 1
    dtypes = {ref.get("dtype") or "float32", run.get("dtype") or "float32"}
    if env is None:
        return max(DEFAULT.get(d, DEFAULT["bfloat16"])[i] for d in dtypes)
    floor = max(FLOOR.get(d, FLOOR["bfloat16"])[i] for d in dtypes)
    return max(floor, NOISE_SAFETY * env[key][min(step, len(env[key]) - 1)])


def check_losses(results: list[dict], reference: str) -> tuple[list[str], dict]:
    """(failures, what was compared). Records each checked run's largest differences and the tolerances used."""
    ref, why = ran(results, reference)
    if ref is None:
        return [f"the reference run {reference} {why}: nothing to compare the runs' losses with"], {}
    env = noise(results, ref)
    summary = {"reference": reference, "tolerance_from": (f"noise runs {', '.join(env['runs'])} x {NOISE_SAFETY:g}"
                                                          if env else "constants per precision (bench_check.DEFAULT)")}
    failures = []
    for r in results:
        if r is ref or "losses" not in r or r.get("failed") or r.get("repeat_of") == reference:
            continue
        if r.get("seed", ref.get("seed")) != ref.get("seed"):
            r["loss_check"] = "not compared: another seed trains other rows in another order"
            continue
        r["loss_check"] = "pass"
        for key, what in (("losses", "loss"), ("grad_norms", "gradient norm")):
            diffs = _diffs(r, ref, key)
            steps = [k for k, d in enumerate(diffs) if d is not None]
            if not steps:
                continue
            excess = {k: diffs[k] / tolerances(ref, r, env, key, k) for k in steps}
            worst = max(steps, key=lambda k: excess[k])
            tol = tolerances(ref, r, env, key, worst)
            short = "loss" if key == "losses" else "grad_norm"
            r[f"max_rel_{short}_diff"] = max(diffs[k] for k in steps)
            r[f"{short}_tolerance"] = tol
            if excess[worst] > 1:
                r["loss_check"] = "fail"
                failures.append(f"{r['name']} step {worst + 1}: {what} {r[key][worst]:.4f} vs {reference}'s "
                                f"{ref[key][worst]:.4f} ({diffs[worst]:.2%} apart, tolerance {tol:.2%})")
    return failures, summary


def check_eval(results: list[dict], reference: str) -> tuple[list[str], dict | None]:
    """(failures, the spread measured) for the final held-out losses (see the module's note)."""
    ref, _ = ran(results, reference)
    if ref is None or ref.get("final_eval_loss") is None:
        return [], None
    seeds = [ref] + [r for r in results if r.get("repeat_of") == reference and r.get("seed") != ref.get("seed")
                     and r.get("final_eval_loss") is not None]
    finals = [r["final_eval_loss"] for r in seeds]
    if len(seeds) < 2:
        return [], {"reference": reference, "seeds": [ref.get("seed")], "note": "one seed: no spread measured, "
                    "nothing checked (add runs with repeat_of and another seed)"}
    mean, spread = sum(finals) / len(finals), max(finals) - min(finals)
    summary = {"reference": reference, "seeds": [r.get("seed") for r in seeds], "finals": finals, "mean": mean,
               "spread": spread}
    failures = []
    for r in results:
        if r in seeds or r.get("final_eval_loss") is None:
            continue
        off = abs(r["final_eval_loss"] - mean)
        r["eval_within_seed_spread"] = off <= spread
        if off > spread:
            failures.append(f"{r['name']}: final eval loss {r['final_eval_loss']:.4f}, {off:.4f} from {reference}'s "
                            f"seed mean {mean:.4f}, beyond the seed spread {spread:.4f}")
    return failures, summary
