"""Benchmark-only helpers shared by ``vllm_ttft.py blend`` and ``vllm_quality.py blend-*``: register SemBlend's vLLM
model plugin in this process, switch the recompute ratio of an engine's planner between series, and read back the
plans it makes (to check that the switch reached them). Nothing here is used by the library."""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any


def register_plugins() -> None:
    """Blend mode needs SemBlend's vLLM model plugin in this process. vLLM loads ``vllm.general_plugins`` entry
    points from installed metadata only; code run from ``PYTHONPATH`` (the H200 copy) has none, so the benchmarks
    call ``semblend.integration.vllm.register()`` themselves (enough for an in-process engine:
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` + the ``uni`` executor). ``BENCH_VLLM_PLUGIN=module:function`` names
    another registration to call instead."""
    spec = os.environ.get("BENCH_VLLM_PLUGIN", "") or "semblend.integration.vllm:register"
    module, _, func = spec.partition(":")
    getattr(importlib.import_module(module), func or "register")()


def scheduler_pipeline(side: Any) -> tuple[Any, Any]:
    """``(side, pipeline)`` of a connector's scheduler side."""
    for name in ("pipeline", "_pipeline"):
        if hasattr(side, name):
            return side, getattr(side, name)
    raise RuntimeError(f"no pipeline on {type(side).__name__}: run one engine per ratio (--ratio-per-engine)")


KEEP = object()  # set_ratio: the selection the engine was started with
_STARTED_WITH: dict[int, Any] = {}  # id(scheduler side) -> its adapter config before the first switch


def parse_point(text: str) -> tuple[float, Any]:
    """An operating point of ``--ratios``: ``"0.05"`` (the engine's own selection), ``"0.05:position"`` (that
    ``SelectionStrategy``) or ``"0.05:check"`` (no strategy: the deviation check) -> ``(ratio, selection)``, the
    selection :data:`KEEP`, a strategy name or None."""
    ratio, _, sel = text.strip().partition(":")
    return float(ratio), KEEP if not sel else (None if sel == "check" else sel)


def point_label(ratio: float, selection: Any) -> str:
    return f"{ratio:g}" if selection is KEEP else f"{ratio:g}:{selection or 'check'}"


def set_ratio(side: Any, ratio: float, selection: Any = KEEP) -> None:
    """Plans made from now on carry ``recompute_budget = ratio`` (and its bathtub layer policy); with ``selection``
    (a ``SelectionStrategy`` name, or None for the deviation check) the blends sent from now on use it. The
    scheduler side copies the budget into each ``SemanticKvPlan`` and the selection into each ``BlendSpec``, and the
    worker's executor reads both from there, so one engine (one donor store) serves every point.
    :func:`record_plans` checks that the plans really carry the budget."""
    from semblend_core.bathtub import layer_recompute_policy

    side, pipe = scheduler_pipeline(side)
    cfg = dataclasses.replace(pipe.config, recompute_budget=float(ratio))
    pipe.config = cfg
    pipe._layer_policy = layer_recompute_policy(pipe.model_shape, cfg.recompute_budget, cfg.bathtub_preset,
                                                cfg.layer_recompute)
    adapter = getattr(side, "adapter", None)
    if dataclasses.is_dataclass(adapter) and "recompute_ratio" in {f.name for f in dataclasses.fields(adapter)}:
        started = _STARTED_WITH.setdefault(id(side), adapter)
        side.adapter = dataclasses.replace(adapter, recompute_ratio=float(ratio),
                                           selection=started.selection if selection is KEEP else selection)
    elif selection is not KEEP:
        raise RuntimeError(f"{type(side).__name__} has no adapter config to switch the selection on")


def record_plans(side: Any) -> list[Any]:
    """Wrap the scheduler's ``pipeline.plan`` so the plans it makes can be read back (the returned list grows)."""
    _, pipe = scheduler_pipeline(side)
    seen: list[Any] = []
    inner = pipe.plan

    def plan(*a: Any, **kw: Any) -> Any:
        out = inner(*a, **kw)
        seen.append(out)
        return out

    pipe.plan = plan
    return seen
