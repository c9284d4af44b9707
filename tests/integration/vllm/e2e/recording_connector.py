"""Test-only subclass of SemBlendConnectorV1: records what the worker was asked to load and capture, and can make
loads fail. Loaded by vLLM through ``kv_connector_module_path`` exactly like the real connector.

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

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        RecordingConnector.preempted.update(getattr(scheduler_output, "preempted_req_ids", None) or ())
        return super().build_connector_meta(scheduler_output)

    def _plan(self) -> StepPlan | None:
        plan = super()._plan()
        if plan is None or self.worker_side is None:
            return plan
        if RecordingConnector.fail_loads and plan.loads:
            plan = StepPlan(loads=tuple(dataclasses.replace(s, donor_id=f"{s.donor_id}#gone") for s in plan.loads),
                            saves=plan.saves)
        return plan

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        plan = self._plan()
        if plan is not None:
            RecordingConnector.loads.extend(plan.loads)
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
