"""What happens at run time that the plan did not decide: a CUDA-graph recording that failed, an embedding offload
the model refused, Unsloth's per-block graphs as it loaded. The plan (speedtune.training.plan.Plan) is frozen; these
are recorded beside it and saved at the end of the run (`events.jsonl`, speedtune.runs)."""

from __future__ import annotations


class Events:
    def __init__(self):
        self.items: list[dict] = []

    def record(self, event: str, reason: str, **changes) -> None:
        """`changes`: the plan's fields as they ran from now on (none for a note)."""
        self.items.append({"event": event, "reason": reason, "changes": changes})

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)
