"""Start, wait for, and stop a TorchServe process bound to localhost."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import BinaryIO

import psutil

from service.gateway.upstream import MAX_MESSAGE_BYTES
from service.model_requirements import write_server_constraints

SOURCE_ROOT = Path(__file__).resolve().parents[1]  # holds service/ and handlers/


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
    """``config.properties``: localhost only, Prometheus metrics, large enough messages.

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
        "disable_token_authorization": "true",
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


class TorchServe:
    """One TorchServe in the foreground of its own process group.

    Args:
        model_store: folder of ``.mar`` files.
        models: served name -> ``.mar`` file name, registered at start.
        run_dir: its configuration, logs and private temp directory.
        ports: its five listeners; the DESIGN.md defaults when omitted.
        config: a ``config.properties`` to use as it is, instead of writing one.
        settings: extra ``config.properties`` entries for the one written here.
    """

    def __init__(
        self,
        model_store: Path,
        models: dict[str, str],
        run_dir: Path,
        ports: TorchServePorts | None = None,
        config: Path | None = None,
        settings: Mapping[str, object] | None = None,
    ) -> None:
        self.model_store = model_store
        self.models = models  # name -> .mar file name
        self.run_dir = run_dir
        self.ports = ports or TorchServePorts()
        self.config = config or write_config(
            run_dir / "config.properties", model_store, self.ports, extra=settings
        )
        self.process: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None

    @property
    def grpc_address(self) -> str:
        """``host:port`` of its gRPC inference API, what the gateway fronts."""
        return f"127.0.0.1:{self.ports.grpc_inference}"

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log_dir = self.run_dir / "logs"
        # TorchServe keeps its pid file in $TMPDIR and refuses to start while it names a live
        # process: a private TMPDIR lets instances (tests beside `make serve`) coexist.
        private_tmp = self.run_dir / "tmp"
        private_tmp.mkdir(exist_ok=True)
        env = {
            **os.environ,
            "LOG_LOCATION": str(log_dir),
            "METRICS_LOCATION": str(log_dir),
            "TMPDIR": str(private_tmp),
            "PIP_CONSTRAINT": str(write_server_constraints(self.run_dir / "constraints.txt")),
            # A model with requirements runs in a venv of its own (useVenv), which inherits
            # the server's site-packages as plain path entries: their .pth files are not
            # read there, so an editable install of this project would not import.
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(SOURCE_ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
        # The worker alternates torch (gradients) and ONNX Runtime (forwards) on the same
        # cores, beside the frontend and the gateway: libgomp's default spin-wait after a
        # parallel region would keep torch's idle threads on the CPU the others need.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        command = [
            str(Path(sys.executable).parent / "torchserve"),
            "--start",
            "--foreground",
            "--ncs",
            "--disable-token-auth",
            "--ts-config",
            str(self.config),
            "--log-config",
            str(write_log_config(self.run_dir / "log4j2.xml")),
            "--model-store",
            str(self.model_store),
        ]
        if self.models:  # none: the management API registers them later
            command += ["--models", *[f"{name}={mar}" for name, mar in self.models.items()]]
        self._log = (self.run_dir / "torchserve.out").open("ab")
        self.process = subprocess.Popen(
            command,
            cwd=self.run_dir,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def ready(self) -> bool:
        """The frontend answers, and every model has a READY worker (management API)."""
        try:  # with no model to ask about, the frontend's answer is the whole question
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.ports.management}/models", timeout=2
            ):
                pass
        except (urllib.error.URLError, OSError):
            return False
        for name in self.models:
            url = f"http://127.0.0.1:{self.ports.management}/models/{name}"
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    described = json.loads(reply.read())
            except (urllib.error.URLError, OSError, ValueError):
                return False
            workers = described[0].get("workers", []) if described else []
            if not any(w.get("status") == "READY" for w in workers):
                return False
        return True

    def wait_ready(self, timeout: float = 180.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"TorchServe exited early; see {self.run_dir / 'logs'}")
            if self.ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"TorchServe not ready after {timeout:.0f}s; see {self.run_dir}/logs")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the launcher, the Java frontend and its workers; return once all are gone.

        The launcher exits before the frontend has finished shutting down, so waiting for
        it alone would return while ports are still bound and workers still run.
        """
        if self.process is not None and self.process.poll() is None:
            group = self.process.pid  # its own session: the group id is its pid
            os.killpg(group, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and (
                self.process.poll() is None or _group_alive(group)
            ):
                time.sleep(0.1)
            if self.process.poll() is None or _group_alive(group):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
                self.process.wait()
        if self._log is not None:  # also after an early exit, which wait_ready reports
            self._log.close()

    def __enter__(self) -> TorchServe:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_alive(group: int) -> bool:
    """Whether a process of process group ``group`` still runs (zombies do not count)."""
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == group and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):  # gone between the listing and the question
            continue
    return False
