"""Test-only subclass of SemBlendConnectorV1: records what the worker was asked to load and capture, and can make
loads fail (or, in blend mode, evict a blend's donors just before the worker runs it). Loaded by vLLM through ``kv_connector_module_path`` exactly like the real connector.

The failure switch replaces a load's donor id with one the worker's store does not hold, so the worker takes its
real failure path (lease fails -> blocks reported through ``get_block_ids_with_load_errors`` -> vLLM recomputes):
the stand-in is only the cause of the failure, never its handling.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from semblend.integration.vllm._metadata import StepPlan
from semblend.integration.vllm.connector_v1 import SemBlendConnectorV1


class RecordingConnector(SemBlendConnectorV1):
    loads: ClassVar[list[Any]] = []
    saves: ClassVar[list[Any]] = []
    preempted: ClassVar[set[str]] = set()
    fail_loads: ClassVar[bool] = False
    blends: ClassVar[list[Any]] = []
    evict_before_blend: ClassVar[bool] = False  # blend mode: drop each blend's donors from the worker store first

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        RecordingConnector.preempted.update(getattr(scheduler_output, "preempted_req_ids", None) or ())
        return super().build_connector_meta(scheduler_output)

    def _plan(self) -> StepPlan | None:
        plan = super()._plan()
        if plan is None or self.worker_side is None:
            return plan
        if RecordingConnector.fail_loads and plan.loads:
            plan = dataclasses.replace(plan, loads=tuple(dataclasses.replace(s, donor_id=f"{s.donor_id}#gone")
                                                         for s in plan.loads))
        return plan

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        plan = self._plan()
        if plan is not None:
            RecordingConnector.loads.extend(plan.loads)
            RecordingConnector.blends.extend(plan.blends)
            if RecordingConnector.evict_before_blend:
                # A real eviction between scheduling and loading (what LRU pressure does): the worker's lease fails.
                for spec in plan.blends:
                    for donor_id in spec.plan.donor_ids:
                        self.worker_side.store.evict(spec.namespace_key, donor_id)
        super().start_load_kv(forward_context, **kwargs)

    def wait_for_save(self) -> None:
        plan = self._plan()
        if plan is not None:
            RecordingConnector.saves.extend(plan.saves)
        super().wait_for_save()

    @classmethod
    def reset(cls) -> None:
        cls.loads.clear()
        cls.saves.clear()
        cls.preempted.clear()
        cls.fail_loads = False
        cls.blends.clear()
        cls.evict_before_blend = False
