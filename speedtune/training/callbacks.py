"""The Trainer's callbacks as plain listeners (imported with the trainers, after the backend: Unsloth patches
transformers on import)."""

from __future__ import annotations

from transformers import TrainerCallback


class Listeners(TrainerCallback):
    """Forwards the Trainer's events to plain listener objects (speedtune.training.runlog.RunLog, a benchmark's timer):
    each gets the events it has a method for."""

    EVENTS = ("on_train_begin", "on_step_end", "on_log", "on_train_end")

    def __init__(self, listeners):
        self.listeners = list(listeners)

    def _forward(self, event, args, state, control, **kw):
        for listener in self.listeners:
            fn = getattr(listener, event, None)
            if fn is not None:
                fn(args, state, control, **kw)


for _event in Listeners.EVENTS:
    setattr(Listeners, _event, lambda self, args, state, control, _e=_event, **kw:
            self._forward(_e, args, state, control, **kw))
