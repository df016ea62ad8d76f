"""Plan <-> engine cache: the verified engine a plan names, built first when allowed, gated on parity.

The cache itself (keys, sidecars, atomic stores) is appliance.engine_cache; this file only decides,
for a plan on this device, which engine may run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from appliance.backends.tensorrt.build import build_engine
from appliance.backends.tensorrt.config import TensorRTConfig
from appliance.backends.tensorrt.plan import cache_dir_for, current_device, plan_engine
from appliance.backends.tensorrt.runner import TensorRTBackend
from appliance.engine_cache import EngineMismatch, EngineRecord, find_engine
from appliance.errors import BackendUnavailable
from appliance.manifest import Manifest

log = logging.getLogger(__name__)


def parity_refusal(record: EngineRecord, config: TensorRTConfig) -> str | None:
    """Why a key-matching engine still must not run (parity gate), or None."""
    if not config.require_parity:
        return None
    if record.parity is None:
        return "engine has not passed the parity check yet; run tools/engines/check_parity.py --record"
    if not record.parity.passed:
        return (
            f"engine FAILED the parity check on {record.parity.checked_at} (report: {record.parity.report})"
        )
    return None


def cached_engine(
    manifest: Manifest, config: TensorRTConfig, precision: str = "auto", max_batch: int = 4
) -> tuple[Path, EngineRecord]:
    """(engine file, sidecar) for this device, built first when allowed; BackendUnavailable says why not."""
    device = current_device(config.device_index)
    plan = plan_engine(manifest, config, device, precision, max_batch)
    try:
        engine_path, record = find_engine(cache_dir_for(manifest, config), plan.spec, device)
    except EngineMismatch as exc:
        if not config.build_if_missing:
            raise EngineMismatch(f"{exc}; build it with tools/engines/build_engine.py") from exc
        log.warning("no usable engine (%s); building one now, this takes minutes", exc)
        record = build_engine(plan, progress=log.info, device_index=config.device_index)
        engine_path = plan.engine_path
    refusal = parity_refusal(record, config)
    if refusal:
        raise BackendUnavailable(f"{engine_path}: {refusal}")
    return engine_path, record


def open_tensorrt(
    manifest: Manifest, config: TensorRTConfig, precision: str = "auto", max_batch: int = 4
) -> TensorRTBackend:
    """The runner over the verified engine for `precision` and a 1..max_batch profile on this device."""
    engine_path, record = cached_engine(manifest, config, precision, max_batch)
    return TensorRTBackend(manifest, engine_path, record, config.device_index)
