"""Run a real Label Studio 1.23.2 for end-to-end tests.

Label Studio lives in its own virtualenv (its pins differ from ours), cached at ``$SEGMASK_LS_VENV`` (default
``~/.cache/segmask/label-studio-1.23.2``) and guarded by a file lock and a stamp file, so an interrupted
install is redone and two test processes never install at once. Its first start runs ~45 s of migrations; the
migrated data directory is kept beside the venv as a template (``<venv>-data-template``) and copied per test
session, so later sessions start in a few seconds.

Entry points:

* :func:`running_label_studio` -- context manager yielding a :class:`LabelStudioServer` client; raises
  :class:`LabelStudioUnavailable` if installing or starting fails.
* :func:`label_studio_or_skip` -- the same, but turns :class:`LabelStudioUnavailable` into ``pytest.skip`` (or
  ``pytest.fail`` when ``SEGMASK_REQUIRE_LABEL_STUDIO=1``, as CI sets it).
* :func:`label_studio_session` -- generator body for a session-scoped fixture; wire it in ``conftest.py``
  with::

      from labelstudio_harness import label_studio_session
      label_studio = pytest.fixture(scope="session", name="label_studio")(label_studio_session)

The protocol notes are in ``docs/label-studio-protocol.md``; what each client method was verified to
send and receive against Label Studio 1.23.2 is written in its docstring.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import mimetypes
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import requests

logger = logging.getLogger(__name__)

LS_VERSION = "1.23.2"
LS_USERNAME = "segmask-e2e@example.com"
LS_PASSWORD = "segmask-e2e-password"
# Fixed 40-hex legacy user token (`--user-token`, `--enable-legacy-api-token`): `Authorization: Token <it>`.
LS_TOKEN = "5e9a3c0d7b1f4e2a8c6d0b9e7f1a3c5d2e4b6f80"

VENV_ENV = "SEGMASK_LS_VENV"
REQUIRE_ENV = "SEGMASK_REQUIRE_LABEL_STUDIO"
STAMP_NAME = ".segmask-installed"
TEMPLATE_STAMP_NAME = ".segmask-template"

INSTALL_TIMEOUT_S = 1500.0
STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0
LOG_TAIL_LINES = 40
# Only these variables of the caller's environment reach Label Studio: it reads many bare names (HOST, PORT,
# USERNAME, PASSWORD, DEBUG, SECRET_KEY, ...) as settings, so inheriting the whole environment is unsafe.
PASSTHROUGH_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")


class LabelStudioUnavailable(RuntimeError):
    """Label Studio could not be installed or started; the message names the cause, then a log tail."""


class LabelStudioAPIError(RuntimeError):
    """A Label Studio API call answered with an HTTP error status."""

    def __init__(self, response: requests.Response) -> None:
        self.response = response
        request = response.request
        super().__init__(f"{request.method} {request.url} -> {response.status_code}: {response.text[:2000]}")


# ----------------------------------------------------------------------------------------------------
# Paths, locks, logs


def venv_dir() -> Path:
    """The cached Label Studio venv: ``$SEGMASK_LS_VENV`` or ``~/.cache/segmask/label-studio-<version>``."""
    configured = os.environ.get(VENV_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "segmask" / f"label-studio-{LS_VERSION}"


def template_dir(venv: Path) -> Path:
    """The migrated data-directory template kept beside ``venv``."""
    return venv.with_name(venv.name + "-data-template")


def label_studio_executable(venv: Path) -> Path:
    """The ``label-studio`` console script of ``venv``."""
    return venv / "bin" / "label-studio"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (created if missing) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        logger.debug("waiting for lock %s", path)
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of the log at ``path`` (or a note that there is none)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _unavailable(cause: str, log_path: Path) -> LabelStudioUnavailable:
    return LabelStudioUnavailable(f"{cause}\n--- last lines of {log_path} ---\n{log_tail(log_path)}")


def _nice_prefix() -> list[str]:
    """``nice -n 10`` where available: the test machine's cores are shared."""
    nice = shutil.which("nice")
    return [nice, "-n", "10"] if nice else []


# ----------------------------------------------------------------------------------------------------
# Installing


def _run_logged(command: list[str], what: str, log_path: Path, timeout: float) -> None:
    """Run ``command``, appending its output to ``log_path``; :class:`LabelStudioUnavailable` on failure."""
    shown = " ".join(command)
    logger.info("%s: %s", what, shown)
    with open(log_path, "a") as log:
        log.write(f"$ {shown}\n")
        log.flush()
        try:
            subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=True)
        except subprocess.TimeoutExpired as exc:
            raise _unavailable(f"{what} timed out after {timeout:.0f} s: {shown}", log_path) from exc
        except subprocess.CalledProcessError as exc:
            raise _unavailable(f"{what} failed (exit status {exc.returncode}): {shown}", log_path) from exc
        except OSError as exc:
            raise _unavailable(f"{what} failed ({exc}): {shown}", log_path) from exc


def _base_python() -> str:
    """The system ``python3`` used to create the venv (never the project's own venv interpreter)."""
    python = shutil.which("python3")
    if python is None:
        raise LabelStudioUnavailable("no python3 on PATH to create the Label Studio virtualenv")
    return python


def _install(venv: Path, log_path: Path) -> None:
    """Create ``venv`` from scratch and pip-install Label Studio into it, writing the stamp last."""
    if venv.exists():
        logger.warning("removing incomplete Label Studio venv %s (no stamp)", venv)
        shutil.rmtree(venv)
    log_path.write_text("")
    started = time.monotonic()
    _run_logged([*_nice_prefix(), _base_python(), "-m", "venv", str(venv)], "creating a venv", log_path, 300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    install = [*_nice_prefix(), *pip, f"label-studio=={LS_VERSION}"]
    _run_logged(install, f"installing Label Studio {LS_VERSION}", log_path, INSTALL_TIMEOUT_S)
    if not label_studio_executable(venv).exists():
        raise _unavailable(f"pip succeeded but {label_studio_executable(venv)} is missing", log_path)
    (venv / STAMP_NAME).write_text(json.dumps({"label-studio": LS_VERSION, "installed_at": time.time()}))
    logger.info("installed Label Studio %s in %s (%.0f s)", LS_VERSION, venv, time.monotonic() - started)


def ensure_label_studio(venv: Path | None = None) -> Path:
    """Install Label Studio into its cached venv unless already there; return the ``label-studio`` executable.

    A venv without the stamp file (an interrupted install) is deleted and redone. Raises
    :class:`LabelStudioUnavailable` (with the pip log tail) if installing fails, e.g. when PyPI is
    unreachable.
    """
    venv = venv or venv_dir()
    stamp = venv / STAMP_NAME
    with file_lock(venv.with_name(venv.name + ".lock")):
        if stamp.exists() and label_studio_executable(venv).exists():
            return label_studio_executable(venv)
        logger.info("installing Label Studio %s into %s (about 2 minutes)", LS_VERSION, venv)
        _install(venv, venv.with_name(venv.name + ".install.log"))
    return label_studio_executable(venv)


# ----------------------------------------------------------------------------------------------------
# Starting and stopping


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def label_studio_env(port: int, extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment Label Studio runs with: loopback ML backends allowed, no telemetry, fixed ``HOST``.

    ``extra_env`` adds or overrides variables, e.g. ``ML_TIMEOUT_PREDICT``, or, for local-files storage,
    ``LOCAL_FILES_SERVING_ENABLED=true`` with ``LOCAL_FILES_DOCUMENT_ROOT=<dir>``.
    """
    env = {name: os.environ[name] for name in PASSTHROUGH_ENV if name in os.environ}
    env.update(
        {
            "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",  # else 403 "reserved network address"
            "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            "SENTRY_DSN": "",  # else server errors are reported to Label Studio's Sentry (retries, slow)
            "FRONTEND_SENTRY_DSN": "",
            "HOST": f"http://127.0.0.1:{port}",  # the `hostname` LS sends to the backend's /setup
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra_env or {})
    return env


class LabelStudioProcess:
    """One ``label-studio start`` process in its own process group, logging to ``log_path``."""

    def __init__(
        self,
        executable: Path,
        data_dir: Path,
        log_path: Path,
        port: int | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.executable = executable
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_env = dict(extra_env or {})
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The ``label-studio start`` command line."""
        return [
            *_nice_prefix(),
            str(self.executable),
            "start",
            "--no-browser",
            "--data-dir",
            str(self.data_dir),
            "--internal-host",
            "127.0.0.1",
            "-p",
            str(self.port),
            "--username",
            LS_USERNAME,
            "--password",
            LS_PASSWORD,
            "--user-token",
            LS_TOKEN,
            "--enable-legacy-api-token",
        ]

    def start(self) -> None:
        """Launch Label Studio (returns at once; see :meth:`wait_healthy`)."""
        logger.info("starting Label Studio on %s (data %s, log %s)", self.url, self.data_dir, self.log_path)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            try:
                self.process = subprocess.Popen(
                    self.command(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=label_studio_env(self.port, self.extra_env),
                    cwd=self.data_dir,
                    start_new_session=True,
                )
            except OSError as exc:
                raise _unavailable(f"cannot run {self.executable}: {exc}", self.log_path) from exc

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Poll ``GET /health`` until 200; raise :class:`LabelStudioUnavailable` on early exit or deadline."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise _unavailable(f"Label Studio exited with code {code} during startup", self.log_path)
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    logger.info("Label Studio is up on %s after %.1f s", self.url, time.monotonic() - started)
                    return
            time.sleep(0.5)
        raise _unavailable(
            f"Label Studio did not answer {self.url}/health within {timeout:.0f} s", self.log_path
        )

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the process group, then SIGKILL it if it is still alive after ``timeout`` seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        pgid = self.process.pid  # start_new_session: the process leads its own group
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            try:
                self.process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                logger.warning("Label Studio did not stop on %s", signal.Signals(sig).name)
        logger.info("Label Studio on %s stopped (code %s)", self.url, self.process.returncode)


@contextlib.contextmanager
def _started(process: LabelStudioProcess, timeout: float) -> Iterator[LabelStudioProcess]:
    """Start ``process``, wait for health, always stop it on exit."""
    try:
        process.start()
        process.wait_healthy(timeout)
        yield process
    finally:
        process.stop()


def _template_stamp() -> str:
    return json.dumps(
        {"label-studio": LS_VERSION, "username": LS_USERNAME, "token": LS_TOKEN}, sort_keys=True
    )


def _template_is_valid(template: Path) -> bool:
    stamp = template / TEMPLATE_STAMP_NAME
    return stamp.exists() and stamp.read_text() == _template_stamp()


def ensure_data_template(
    executable: Path, venv: Path | None = None, timeout: float = STARTUP_TIMEOUT_S
) -> Path:
    """Return a migrated, empty data directory (user and token created), building it once if needed.

    Built in a scratch directory by one start + stop, stamped, then renamed into place, so an interrupted
    build leaves no half template. The stamp names the version and credentials; a mismatching template is
    rebuilt.
    """
    venv = venv or venv_dir()
    template = template_dir(venv)
    with file_lock(template.with_name(template.name + ".lock")):
        if _template_is_valid(template):
            return template
        for stale in template.parent.glob(f"{template.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted build (we hold the lock)
        scratch = template.with_name(f"{template.name}.partial-{os.getpid()}")
        log_path = template.with_name(template.name + ".log")
        log_path.write_text("")
        logger.info("building the Label Studio data template (migrations, about 45 s)")
        try:
            with _started(LabelStudioProcess(executable, scratch / "data", log_path), timeout):
                pass
            (scratch / "data" / TEMPLATE_STAMP_NAME).write_text(_template_stamp())
            shutil.rmtree(template, ignore_errors=True)
            (scratch / "data").rename(template)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return template


def _fresh_data_dir(template: Path, tmp_dir: Path) -> Path:
    data_dir = tmp_dir / "label-studio-data"
    shutil.copytree(template, data_dir, ignore=shutil.ignore_patterns(TEMPLATE_STAMP_NAME))
    return data_dir


@contextlib.contextmanager
def running_label_studio(
    tmp_dir: Path, *, extra_env: Mapping[str, str] | None = None, startup_timeout: float = STARTUP_TIMEOUT_S
) -> Iterator[LabelStudioServer]:
    """Install (cached), start a fresh Label Studio with its data under ``tmp_dir``, yield a client, stop it.

    Raises :class:`LabelStudioUnavailable` if installing or starting fails. Label Studio's output goes to
    ``tmp_dir/label-studio.log`` (``server.log_path``).
    """
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    executable = ensure_label_studio()
    template = ensure_data_template(executable)
    data_dir = _fresh_data_dir(template, tmp_dir)
    process = LabelStudioProcess(executable, data_dir, tmp_dir / "label-studio.log", extra_env=extra_env)
    with _started(process, startup_timeout):
        yield LabelStudioServer(process.url, LS_TOKEN, log_path=process.log_path)


def skip_or_fail(message: str) -> None:
    """``pytest.skip(message)``, or ``pytest.fail`` when ``SEGMASK_REQUIRE_LABEL_STUDIO=1`` (CI)."""
    if os.environ.get(REQUIRE_ENV, "") == "1":
        pytest.fail(f"Label Studio is required ({REQUIRE_ENV}=1) but unavailable: {message}", pytrace=False)
    pytest.skip(f"Label Studio unavailable: {message}")


@contextlib.contextmanager
def label_studio_or_skip(tmp_dir: Path, **kwargs: Any) -> Iterator[LabelStudioServer]:
    """:func:`running_label_studio`, skipping (or failing, see :func:`skip_or_fail`) when it cannot start.

    Only installation and startup failures are converted; errors raised inside the ``with`` body propagate.
    """
    with contextlib.ExitStack() as stack:
        problem = None
        try:
            server = stack.enter_context(running_label_studio(tmp_dir, **kwargs))
        except LabelStudioUnavailable as exc:
            problem = str(exc)
        if problem is not None:  # outside the except block: no chained traceback in the report
            skip_or_fail(problem)
        yield server


def label_studio_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """Body of a session-scoped ``label_studio`` fixture (see the module docstring for the wiring)."""
    with label_studio_or_skip(tmp_path_factory.mktemp("label-studio")) as server:
        yield server


# ----------------------------------------------------------------------------------------------------
# Client


class LabelStudioServer:
    """A thin ``requests`` client for the Label Studio API calls the end-to-end tests need.

    Every call sends ``Authorization: Token <token>`` and raises :class:`LabelStudioAPIError` on 4xx/5xx.
    """

    def __init__(self, url: str, token: str, log_path: Path | None = None, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.log_path = log_path
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {token}"

    def __repr__(self) -> str:
        return f"LabelStudioServer({self.url!r})"

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Send ``method path`` (relative to :attr:`url`) with the token; raise on an error status."""
        kwargs.setdefault("timeout", self.timeout)
        response = self.session.request(method, f"{self.url}{path}", **kwargs)
        if response.status_code >= 400:
            raise LabelStudioAPIError(response)
        return response

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of Label Studio's own output (useful in assertion messages)."""
        return log_tail(self.log_path, lines) if self.log_path else "(no log)"

    # --- projects and tasks ------------------------------------------------------------------------

    def create_project(self, title: str, label_config: str) -> int:
        """``POST /api/projects/`` ``{title, label_config}`` -> project id (the title needs 3+ characters)."""
        answer = self.request("POST", "/api/projects/", json={"title": title, "label_config": label_config})
        return int(answer.json()["id"])

    def import_images(self, project_id: int, paths: Iterable[Path | str]) -> list[int]:
        """Upload image files as tasks: ``POST /api/projects/{id}/import?return_task_ids=true`` (multipart).

        Each file gets its own field name (``file0``, ``file1``, ...): a repeated name keeps only the last
        file. Each task's ``data.image`` becomes ``/data/upload/<project>/<8 hex>-<file name>``, served only
        with auth. Answer: ``{task_count, annotation_count, prediction_count, duration, file_upload_ids,
        could_be_tasks_list, found_formats, data_columns, task_ids}``; returns ``task_ids``. Connected
        backends get a TASKS_CREATED webhook.
        """
        with contextlib.ExitStack() as stack:
            files = {}
            for index, path in enumerate(map(Path, paths)):
                mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                files[f"file{index}"] = (path.name, stack.enter_context(open(path, "rb")), mime)
            answer = self.request(
                "POST", f"/api/projects/{project_id}/import", params={"return_task_ids": "true"}, files=files
            )
        return [int(task_id) for task_id in answer.json()["task_ids"]]

    def tasks(self, project_id: int, all_fields: bool = False) -> list[dict[str, Any]]:
        """All tasks of a project via ``GET /api/tasks/?project=ID`` (paginated ``{tasks, total, ...}``).

        ``all_fields=True`` adds ``fields=all`` so tasks carry their ``annotations`` and ``predictions``.
        """
        tasks: list[dict[str, Any]] = []
        page = 1
        while True:
            params: dict[str, Any] = {"project": project_id, "page": page, "page_size": 100}
            if all_fields:
                params["fields"] = "all"
            answer = self.request("GET", "/api/tasks/", params=params).json()
            tasks.extend(answer["tasks"])
            if not answer["tasks"] or len(tasks) >= answer["total"]:
                return tasks
            page += 1

    def task(self, task_id: int) -> dict[str, Any]:
        """``GET /api/tasks/{id}/`` (includes ``annotations`` and ``predictions``)."""
        return self.request("GET", f"/api/tasks/{task_id}/").json()

    def download(self, path: str, authenticated: bool = True) -> requests.Response:
        """``GET`` a server path such as a task's ``/data/upload/...`` image, with or without the token.

        Does not raise on error statuses (the caller checks them) and does not follow redirects.
        """
        client = self.session if authenticated else requests
        return client.get(f"{self.url}{path}", timeout=self.timeout, allow_redirects=False)

    def create_annotation(self, task_id: int, result: list[dict[str, Any]]) -> int:
        """``POST /api/tasks/{id}/annotations/`` ``{result}`` -> the annotation id.

        Label Studio then POSTs an ANNOTATION_CREATED webhook to each connected backend's ``/webhook``
        (``{action, annotation, project, task}``), WITHOUT the backend's Basic auth header.
        """
        answer = self.request("POST", f"/api/tasks/{task_id}/annotations/", json={"result": result})
        return int(answer.json()["id"])

    # --- ML backends -------------------------------------------------------------------------------

    def connect_ml_backend(
        self,
        project_id: int,
        url: str,
        title: str = "segmask",
        is_interactive: bool = True,
        auth: tuple[str, str] | None = None,
        extra_params: Mapping[str, Any] | None = None,
    ) -> int:
        """Connect an ML backend: ``POST /api/ml`` -> the ML backend id.

        Body: ``{project, url, title, is_interactive}`` plus, with ``auth=(user, password)``, ``{auth_method:
        "BASIC_AUTH", basic_auth_user, basic_auth_pass}``; optional ``extra_params`` (a dict LS forwards in
        /setup) and ``timeout``. LS validates synchronously: it calls ``GET <url>/health`` then ``POST
        <url>/setup`` ``{project: "<id>.<created_at unix>", schema, hostname: $HOST, access_token: <the user's
        token>, extra_params}`` and repeats both once more (``update_state``), all with the Basic auth header
        if configured. A failing health/setup answers 400 with ``validation_errors``. Answer (201): ``{id,
        state: "CO", readable_state: "Connected", is_interactive, url, error_message, title, auth_method,
        basic_auth_user, basic_auth_pass_is_set, description, extra_params, model_version (from /setup),
        timeout, created_at, updated_at, auto_update, project}``. Connecting sets the project's
        ``model_version`` to ``title`` when it had none.
        """
        body: dict[str, Any] = {
            "project": project_id,
            "url": url,
            "title": title,
            "is_interactive": is_interactive,
        }
        if auth is not None:
            body.update({"auth_method": "BASIC_AUTH", "basic_auth_user": auth[0], "basic_auth_pass": auth[1]})
        if extra_params is not None:
            body["extra_params"] = dict(extra_params)
        return int(self.request("POST", "/api/ml", json=body).json()["id"])

    def ml_backends(self, project_id: int) -> list[dict[str, Any]]:
        """``GET /api/ml?project=ID`` (LS re-runs /health + /setup on every backend first)."""
        return self.request("GET", "/api/ml", params={"project": project_id}).json()

    def ml_backend(self, ml_backend_id: int) -> dict[str, Any]:
        """``GET /api/ml/{id}``; LS re-runs /health + /setup first (resetting ``state`` to "CO" if fine)."""
        return self.request("GET", f"/api/ml/{ml_backend_id}").json()

    def retrieve_predictions(self, project_id: int, task_ids: Iterable[int] | None = None) -> dict[str, Any]:
        """Data Manager action "Retrieve Predictions": LS calls the backend's ``/predict`` with a batch.

        ``POST /api/dm/actions?id=retrieve_tasks_predictions&project=ID`` with body ``{"selectedItems":
        {"all": false, "included": [ids]}}`` (or ``{"all": true, "excluded": []}`` for the whole project). LS
        first calls ``GET /health`` and ``POST /setup``, then ONE ``POST /predict`` ``{tasks: [...], project:
        "<id>.<ts>", label_config, params: {login, password, context: null}}`` holding only the selected tasks
        that lack a prediction with the current model_version (none if all have one). The backend must answer
        ``{"results": [{result, score, model_version}, ...]}`` one per task in order. Answer:
        ``{"processed_items": N, "detail": "Retrieved N predictions"}`` where N counts the selected tasks, NOT
        stored predictions: a failing backend gives the same answer, so check :meth:`predictions`.
        LS treats an empty ``included`` list as the whole project, so an empty ``task_ids`` sends nothing.
        """
        if task_ids is None:
            selected: dict[str, Any] = {"all": True, "excluded": []}
        else:
            selected = {"all": False, "included": [int(task_id) for task_id in task_ids]}
            if not selected["included"]:
                return {"processed_items": 0, "detail": "no tasks selected (nothing sent to Label Studio)"}
        params = {"id": "retrieve_tasks_predictions", "project": project_id}
        return self.request("POST", "/api/dm/actions", params=params, json={"selectedItems": selected}).json()

    def predictions(self, *, task: int | None = None, project: int | None = None) -> list[dict[str, Any]]:
        """``GET /api/predictions/?task=ID`` or ``?project=ID``: a list of ``{id, result, model_version,
        score, task, project, created_at, ...}`` with ``result`` stored verbatim from the backend."""
        if (task is None) == (project is None):
            raise ValueError("pass exactly one of task= or project=")
        params = {"task": task} if task is not None else {"project": project}
        return self.request("GET", "/api/predictions/", params=params).json()

    def interactive_annotating(
        self, ml_backend_id: int, task_id: int, context: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """What the editor calls on a smart keypoint/rectangle: ``POST /api/ml/{id}/interactive-annotating``.

        Body ``{"task": <task id>, "context": {"result": [<smart regions>]}}``. LS sends the backend ONE
        ``POST /predict`` (no /health or /setup first) with a single task serialized with ``drafts``,
        ``predictions``, ``annotations`` and ``file_upload`` as a file NAME, and ``params.context`` = the
        context verbatim. Answer is always 200 (404 only for a task outside the backend's project): ``{"data":
        <backend results[0]>}``, i.e. ``{"data": {"result": [...], "score", "model_version"}}``, or
        ``{"errors": ["..."]}`` when the backend fails, answers without ``results``, or the backend is not
        interactive. Nothing is stored.
        """
        body = {"task": task_id, "context": dict(context) if context is not None else None}
        return self.request("POST", f"/api/ml/{ml_backend_id}/interactive-annotating", json=body).json()

    def train(self, ml_backend_id: int) -> None:
        """The Train button: ``POST /api/ml/{id}/train`` (body ignored) -> 200 with an empty body.

        LS synchronously POSTs ``{"action": "START_TRAINING", "project": {<full project>}}`` to the backend's
        ``/webhook`` (100 s timeout, WITH Basic auth if configured). LS answers 200 even if the backend fails;
        it only records ``state``/``error_message``, which the next GET of the backend overwrites.
        """
        self.request("POST", f"/api/ml/{ml_backend_id}/train", json={})
