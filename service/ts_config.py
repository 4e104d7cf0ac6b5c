"""TorchServe's listeners and generated files: ``config.properties`` and log4j2's."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from service.protocol.limits import MAX_MESSAGE_BYTES

JOB_QUEUE_SIZE = 256
"""Requests TorchServe queues per model: above the gateway's in-flight bounds
(``service.gateway.admission``), so the gateway refuses overload first, with a retryable
RESOURCE_EXHAUSTED, and TorchServe's own "queue full" is never what a client sees."""
TOKEN_LIFETIME_MIN = 60 * 24 * 365 * 10
"""TorchServe's keys expire after 60 minutes by default, and only a call to its token API
renews them. Here they live as long as the process: every start writes new ones into its
private run directory (mode 0600), where the gateway and the launcher read them."""


@dataclass(frozen=True)
class TorchServePorts:
    """TorchServe's five listeners (DESIGN.md defaults)."""

    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071

    @classmethod
    def free(cls) -> TorchServePorts:
        """Five ports free right now (for tests running beside a real deployment)."""
        return cls(*(_free_port() for _ in fields(cls)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(
    path: Path,
    model_store: Path,
    ports: TorchServePorts,
    *,
    bind: str = "127.0.0.1",
    extra: Mapping[str, object] | None = None,
) -> Path:
    """``config.properties``: localhost only, token authorization on, Prometheus metrics,
    large enough messages.

    ``extra`` entries are added to (or replace) these, e.g. ``{"enable_model_api": "true"}``
    for a benchmark that registers models through the management API.
    """
    lines: dict[str, object] = {
        "inference_address": f"http://{bind}:{ports.inference}",
        "management_address": f"http://{bind}:{ports.management}",
        "metrics_address": f"http://{bind}:{ports.metrics}",
        "grpc_inference_address": bind,
        "grpc_management_address": bind,
        "grpc_inference_port": ports.grpc_inference,
        "grpc_management_port": ports.grpc_management,
        "model_store": model_store,
        "metrics_mode": "prometheus",
        "token_expiration_min": TOKEN_LIFETIME_MIN,
        "job_queue_size": JOB_QUEUE_SIZE,
        # An archive's requirements.txt (`archive --requirements`) is installed when its
        # worker starts, in the model's own venv; pip is held to the server's packages by
        # PIP_CONSTRAINT (see TorchServe.start and service.model_requirements).
        "install_py_dep_per_model": "true",
        "max_request_size": MAX_MESSAGE_BYTES,
        "max_response_size": MAX_MESSAGE_BYTES,
        "default_response_timeout": 120,
        **(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    return path


# TorchServe's own log4j2.xml logs org.pytorch.serve at DEBUG to two appenders (a file and
# stdout) and every request to an access log: per request, CPU that the two cores of a
# small node would rather give the worker. Here: warnings and errors, the frontend's INFO
# lines (start-up, worker state, a few per batch, one appender) and all worker output (the
# worker logs to stdout, so its logged exceptions arrive at INFO). Requests are counted and
# timed by the gateway's Prometheus metrics instead of an access log.
_ROLLING_FILE = """    <RollingFile name="{name}" fileName="${{env:LOG_LOCATION:-logs}}/{name}.log"
                 filePattern="${{env:LOG_LOCATION:-logs}}/{name}.%i.log.gz">
      <PatternLayout pattern="%d{{ISO8601}} [%-5p] %t %c - %m%n"/>
      <Policies><SizeBasedTriggeringPolicy size="100 MB"/></Policies>
      <DefaultRolloverStrategy max="5"/>
    </RollingFile>"""
LOG_CONFIG = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
{appenders}
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="warn" additivity="false"><AppenderRef ref="ts_log"/></Logger>
    <Logger name="MODEL_LOG" level="info" additivity="false"><AppenderRef ref="model_log"/></Logger>
    <Logger name="MODEL_METRICS" level="off" additivity="false"/>
    <Logger name="TS_METRICS" level="off" additivity="false"/>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Logger name="org.pytorch.serve" level="info" additivity="false">
      <AppenderRef ref="ts_log"/>
    </Logger>
    <Root level="warn"><AppenderRef ref="ts_log"/></Root>
  </Loggers>
</Configuration>
""".replace("{appenders}", "\n".join(_ROLLING_FILE.format(name=n) for n in ("ts_log", "model_log")))


def write_log_config(path: Path) -> Path:
    """TorchServe's log4j2 configuration (:data:`LOG_CONFIG`) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(LOG_CONFIG)
    return path
