"""The TorchServe launcher's generated files (the integration tests run TorchServe on them)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from service.ts_config import write_log_config


def test_log_config_keeps_worker_output_and_drops_per_request_lines(tmp_path: Path) -> None:
    root = ET.parse(write_log_config(tmp_path / "log4j2.xml")).getroot()
    levels = {logger.get("name"): logger.get("level") for logger in root.iter("Logger")}
    # Per-request lines: the access log and the metric log lines.
    assert levels["ACCESS_LOG"] == "warn"
    # The worker logs to stdout (TorchServe's basicConfig), so its logged exceptions
    # arrive at INFO: all of it is kept.
    assert levels["MODEL_LOG"] == "info"
    assert levels["MODEL_METRICS"] == levels["TS_METRICS"] == "off"
    # The frontend's own start-up and worker-state lines stay.
    assert levels["org.pytorch.serve"] == "info"
    appenders = {a.get("name") for a in root.iter("RollingFile")}
    refs = {r.get("ref") for r in root.iter("AppenderRef")}
    assert refs <= appenders


def test_worker_threads_split_the_quota_among_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    import handlers.saliency_handler as handler
    from service.archive import BatchConfig

    monkeypatch.setattr(handler, "cpu_quota", lambda: 4)
    config = yaml.safe_load(BatchConfig(workers=2).yaml())
    assert config["minWorkers"] == config["maxWorkers"] == 2
    assert handler.worker_threads(config) == 2  # 4 CPUs, 2 workers
    assert handler.worker_threads(yaml.safe_load(BatchConfig(workers=1).yaml())) == 4
    assert handler.worker_threads(yaml.safe_load(BatchConfig(workers=8).yaml())) == 1
    assert handler.worker_threads(yaml.safe_load(BatchConfig(threads=3).yaml())) == 3
    assert handler.worker_threads({}) == 4  # an archive without a model config
