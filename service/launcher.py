"""Start, wait for, and stop a TorchServe process bound to localhost.

Each instance is private to its run directory: its pid file and worker sockets
(``.ts.sock.<port>``, which TorchServe names by port alone, so two instances on one host
would delete each other's) live in ``<run_dir>/tmp``, and its access keys in
``<run_dir>/key_file.json`` (mode 0600; token authorization is on, so another local
process can neither infer nor scale workers). Each served model is registered twice: the
explain pool ``<name>`` and the forward-only pool ``<name>--predict``, so a Predict never
waits behind an explanation (``service.gateway.upstream``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import psutil
import yaml

from service.gateway.admission import PoolSize
from service.gateway.upstream import predict_pool
from service.model_requirements import write_server_constraints
from service.ts_config import TorchServePorts, write_config, write_log_config

__all__ = ["TorchServe", "TorchServePorts", "archive_pool"]
KEY_FILE = "key_file.json"
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # holds service/ and handlers/


def archive_pool(mar: Path) -> PoolSize:
    """The workers and batch size an archive's ``model-config.yaml`` asks for."""
    with zipfile.ZipFile(mar) as archive:
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        name = manifest.get("model", {}).get("configFile")
        config = yaml.safe_load(archive.read(Path(name).name)) if name else {}
    return PoolSize(
        workers=int(config.get("minWorkers") or 1), batch_size=int(config.get("batchSize") or 1)
    )


class TorchServe:
    """One TorchServe in the foreground of its own process group.

    Args:
        model_store: folder of ``.mar`` files.
        models: served name -> ``.mar`` file name, registered at start.
        run_dir: its configuration, logs, keys and private temp directory.
        ports: its five listeners; the DESIGN.md defaults when omitted.
        config: a ``config.properties`` to use as it is, instead of writing one.
        settings: extra ``config.properties`` entries for the one written here.
        split_pools: register each model's forward-only twin (:func:`predict_pool`).
        predict_workers: workers of each forward-only pool; ``None``: as the archive says.
    """

    def __init__(
        self,
        model_store: Path,
        models: dict[str, str],
        run_dir: Path,
        ports: TorchServePorts | None = None,
        config: Path | None = None,
        settings: Mapping[str, object] | None = None,
        *,
        split_pools: bool = True,
        predict_workers: int | None = None,
    ) -> None:
        self.model_store = model_store
        self.models = models  # name -> .mar file name
        self.run_dir = run_dir
        self.ports = ports or TorchServePorts()
        self.config = config or write_config(
            run_dir / "config.properties", model_store, self.ports, extra=settings
        )
        self.split_pools = split_pools
        self.predict_workers = predict_workers
        self.process: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None

    @property
    def registered(self) -> dict[str, str]:
        """TorchServe's model names -> ``.mar``: each model and its forward-only pool."""
        names = dict(self.models)
        if self.split_pools:
            names.update({predict_pool(name): mar for name, mar in self.models.items()})
        return names

    @property
    def grpc_address(self) -> str:
        """``host:port`` of its gRPC inference API, what the gateway fronts."""
        return f"127.0.0.1:{self.ports.grpc_inference}"

    @property
    def key_file(self) -> Path:
        """Where TorchServe writes its keys (its working directory)."""
        return self.run_dir / KEY_FILE

    def pools(self, name: str) -> tuple[PoolSize, PoolSize]:
        """The explain and forward-only pools' sizes of served model ``name``."""
        explain = archive_pool(self.model_store / self.models[name])
        if self.predict_workers is None:
            return explain, explain
        return explain, PoolSize(self.predict_workers, explain.batch_size)

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log_dir = self.run_dir / "logs"
        # The pid file goes to Python's temp dir ($TMPDIR) and the worker sockets, model
        # unpacking and key file's siblings to Java's (java.io.tmpdir, which TorchServe's
        # launcher sets from $TEMP; Java itself ignores $TMPDIR): both private, so that
        # instances (tests beside `make serve`) neither refuse to start nor take each
        # other's sockets.
        private_tmp = self.run_dir / "tmp"
        private_tmp.mkdir(exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.key_file.unlink()  # the last run's: wait for this run's own
        env = {
            **os.environ,
            "LOG_LOCATION": str(log_dir),
            "METRICS_LOCATION": str(log_dir),
            "TMPDIR": str(private_tmp),
            "TEMP": str(private_tmp),
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
            "--ts-config",
            str(self.config),
            "--log-config",
            str(write_log_config(self.run_dir / "log4j2.xml")),
            "--model-store",
            str(self.model_store),
        ]
        if self.models:  # none: the management API registers them later
            command += ["--models", *[f"{n}={mar}" for n, mar in self.registered.items()]]
        self._log = (self.run_dir / "torchserve.out").open("ab")
        self.process = subprocess.Popen(
            command,
            cwd=self.run_dir,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def key(self, kind: str) -> str | None:
        """This run's ``inference`` or ``management`` key; ``None`` when auth is off or the
        keys are not written yet."""
        try:
            return str(json.loads(self.key_file.read_text())[kind]["key"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def management(self, method: str, path: str, timeout: float = 300.0) -> Any:
        """A call to the management API (with the management key), its JSON reply."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.ports.management}{path}", method=method
        )
        key = self.key("management")
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.loads(reply.read() or b"null")

    def ready(self) -> bool:
        """The frontend answers, and every model has a READY worker (management API)."""
        try:  # with no model to ask about, the frontend's answer is the whole question
            self.management("GET", "/models", timeout=2)
            for name in self.registered:
                described = self.management("GET", f"/models/{name}", timeout=2)
                workers = described[0].get("workers", []) if described else []
                if not any(w.get("status") == "READY" for w in workers):
                    return False
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return True

    def check_started(self) -> bool:
        """One look: ``True`` once every model has a READY worker (and the forward-only
        pools are sized).

        Raises:
            RuntimeError: TorchServe exited.
        """
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"TorchServe exited early; see {self.run_dir / 'logs'}")
        if not self.ready():
            return False
        self._size_predict_pools(timeout=180.0)
        return True

    def wait_ready(self, timeout: float = 180.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.check_started():
                return
            time.sleep(0.5)
        raise TimeoutError(f"TorchServe not ready after {timeout:.0f}s; see {self.run_dir}/logs")

    def _size_predict_pools(self, timeout: float) -> None:
        """Scale each forward-only pool to ``predict_workers`` (TorchServe starts it with
        the archive's worker count, the explain pool's)."""
        if not self.split_pools or self.predict_workers is None:
            return
        n = self.predict_workers
        for name in self.models:
            self.management(
                "PUT",
                f"/models/{predict_pool(name)}?min_worker={n}&max_worker={n}&synchronous=true",
                timeout=timeout,
            )

    def alive(self) -> bool:
        """Whether the launcher (and so its Java frontend) still runs."""
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the launcher, the Java frontend and its workers; return once all are gone.

        The launcher exits before the frontend has finished shutting down, so waiting for
        it alone would return while ports are still bound and workers still run; and when
        the frontend died, its workers may outlive it: the whole group is stopped.
        """
        if self.process is not None:
            group = self.process.pid  # its own session: the group id is its pid
            if self.process.poll() is None or _group_alive(group):
                with contextlib.suppress(ProcessLookupError):
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
            self._log = None

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
