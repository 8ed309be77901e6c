"""The one place the denoising loop asks the step cache: a hook around the transformer's forward
(torch module, compiled module or engine stand-in alike) that, for one pipeline call, reuses the
last output where the plan (runtime.stepcache) says so, and records output magnitudes for
calibration. Steps are counted by the scheduler's own step(), so a pipeline that calls the
transformer twice a step (Qwen-Image's true CFG) reuses both calls together, each from its own."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .stepcache import Plan


def tree_map(fn: Callable[[torch.Tensor], torch.Tensor], value: Any) -> Any:
    """`fn` on every tensor of a forward's output (a tensor, a tuple or list of them, diffusers'
    output dataclasses), the structure kept."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(tree_map(fn, v) for v in value)
    if hasattr(value, "to_tuple") and hasattr(value, "keys"):  # diffusers.utils.BaseOutput
        return type(value)(**{k: tree_map(fn, value[k]) for k in value.keys()})
    return value


def _tensors(value: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    tree_map(lambda t: out.append(t) or t, value)
    return out


def signature(args: tuple, kwargs: dict[str, Any]) -> tuple:
    """The shapes a call was given: a reuse must answer a call shaped as the one it reuses (a
    pipeline that drops CFG late in the schedule calls with half the batch)."""
    shapes = [tuple(t.shape) for v in args for t in _tensors(v)]
    shapes += [(k, tuple(t.shape)) for k, v in sorted(kwargs.items()) for t in _tensors(v)]
    return tuple(shapes)


class StepHook:
    """One pipeline call's view of the transformer: `plan` (None everywhere: every step computes),
    the first step run (an edit's), and whether to record per-step output norms."""

    def __init__(self, plan: Plan | None, first: int = 0, record: bool = False) -> None:
        self.plan = plan
        self.step = first
        self.record = record
        self.norms: list[float] = []  # per step run, ||output|| (all its calls together)
        self.changes: list[float] = []  # per step run after the first, ||output - last step's|| / ||last step's||
        self.computed = 0
        self.reused = 0
        self.calls = 0  # transformer calls made (a step may make several: true CFG)
        self._calls = 0
        self._step_reused = True
        self._outputs: list[torch.Tensor] = []  # this step's outputs, flattened (recording)
        self._previous: torch.Tensor | None = None
        self._last: dict[int, tuple[tuple, Any]] = {}

    def _scale(self) -> float | None:
        if self.plan is None or self.step >= len(self.plan):
            return None
        return self.plan[self.step]

    def forward(self, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        k = self._calls
        self._calls += 1
        scale = self._scale()
        sig = signature(args, kwargs)
        kept = self._last.get(k)
        if scale is not None and kept is not None and kept[0] == sig:
            return tree_map(lambda t: t * scale, kept[1])
        self._step_reused = False
        self.calls += 1
        out = fn(*args, **kwargs)
        if self.plan is not None and any(s is not None for s in self.plan[self.step + 1:]):
            self._last[k] = (sig, tree_map(torch.clone, out))  # a pipeline may change its copy in place
        if self.record:
            self._outputs += [t.detach().float().flatten() for t in _tensors(out)]
        return out

    def end_step(self) -> None:
        """After the scheduler's step: the step's outcome is counted, the next one begins."""
        if self._calls:
            if self._step_reused:
                self.reused += 1
            else:
                self.computed += 1
            if self.record and self._outputs:
                self._record(torch.cat(self._outputs))
        self.step += 1
        self._calls, self._step_reused, self._outputs = 0, True, []

    def _record(self, out: torch.Tensor) -> None:
        self.norms.append(float(out.norm()))
        if self._previous is not None and self._previous.shape == out.shape:
            self.changes.append(float((out - self._previous).norm() / self._previous.norm().clamp_min(1e-12)))
        self._previous = out
