"""The deployment of docker/ for real: images built, the compose stack run with podman, Label Studio on it.

Opt-in (it builds ~5 GB of images and needs root):
``SEGMASK_CONTAINERS=1 .venv/bin/pytest -s -m containers tests/test_containers.py``. CI (``.ci/run``) sets
``SEGMASK_REQUIRE_CONTAINERS=1``: podman is then installed and set up by ``docker/podman-setup.sh`` when
missing, and a failure to set it up fails the test instead of skipping it.

What it does: builds docker/Dockerfile and stand-ins for the Redis and Label Studio 1.23.2 images (no registry
is reachable on CI machines) on a base image made locally with debootstrap; starts Redis, the segmask server,
one worker and Label Studio with ``podman-compose`` and docker/compose.yaml; connects the backend to a Label
Studio project by its service name (http://segmask:9090); makes a click through Label Studio's
``/api/ml/{id}/interactive-annotating`` and a batch "Retrieve predictions"; kills the worker's container and
checks the 503, then its recovery once the container runs again; tears everything down.

Everything it starts belongs to the compose project ``segmask-ctest-<random>``: its containers, network and
volumes are removed at the end, whether the test passed or not. The images are kept as a build cache under
fixed tags (``localhost/segmask:test``, ``localhost/segmask-redis-standin:7``,
``localhost/segmask-label-studio-standin:1.23.2``), so a later run rebuilds only what changed and they never
accumulate (``podman image prune`` removes the dangling layers a rebuild leaves).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests
from labelstudio_harness import LS_PASSWORD, LS_TOKEN, LS_USERNAME, LabelStudioServer
from ls_bodies import captured, interior_point

pytestmark = pytest.mark.containers

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
OPT_IN_ENV = "SEGMASK_CONTAINERS"
REQUIRE_ENV = "SEGMASK_REQUIRE_CONTAINERS"
BASE_IMAGE = os.environ.get("SEGMASK_BASE_IMAGE", "localhost/debian:bookworm")
HOST_CA = os.environ.get("SEGMASK_BUILD_CA", "/etc/ssl/certs/ca-certificates.crt")

# name -> (tag, Dockerfile, context)
IMAGES = {
    "segmask": ("localhost/segmask:test", DOCKER / "Dockerfile", ROOT),
    "redis": ("localhost/segmask-redis-standin:7", DOCKER / "standins" / "redis.Dockerfile", DOCKER),
    "label-studio": (
        "localhost/segmask-label-studio-standin:1.23.2",
        DOCKER / "standins" / "label-studio.Dockerfile",
        DOCKER,
    ),
}
SERVICES = ["redis", "segmask", "worker", "label-studio"]
BUILD_TIMEOUT_S = 1800
UP_TIMEOUT_S = 300
CONFIG = captured("setup")["schema"]
IMAGE_ID = 42  # a COCO128 image with a dog
SECOND_IMAGE_ID = 74


def report(line: str) -> None:
    """Measurements go to the terminal (run pytest with -s to see them as they come) and to the log."""
    print(f"[containers] {line}", flush=True)


def skip_or_fail(message: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"containers are required ({REQUIRE_ENV}=1) but unavailable: {message}", pytrace=False)
    pytest.skip(message)


def run(command: list[str], timeout: float, log: Path | None = None, check: bool = True, env=None):
    """Run a command; its output goes to ``log`` (appended) or is captured. Raises with the output's tail."""
    if log is not None:
        with open(log, "ab") as out:
            out.write(f"\n$ {' '.join(command)}\n".encode())
            out.flush()
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env=env)
        output = log.read_text(errors="replace")[-4000:]
    else:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        output = (done.stdout or "") + (done.stderr or "")
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} -> exit {done.returncode}\n{output[-4000:]}")
    return output


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def set_up_podman() -> str:
    """docker/podman-setup.sh (idempotent): podman configured, the base image, podman-compose; its path."""
    opted_in = os.environ.get(OPT_IN_ENV) == "1" or os.environ.get(REQUIRE_ENV) == "1"
    if not opted_in:
        pytest.skip(
            f"container test is opt-in: {OPT_IN_ENV}=1 .venv/bin/pytest -s -m containers "
            "tests/test_containers.py (root and podman; docker/podman-setup.sh installs podman on Debian)"
        )
    if shutil.which("podman") is None and os.environ.get(REQUIRE_ENV) != "1":
        pytest.skip(
            "podman is not installed: run `sudo docker/podman-setup.sh` (Debian: podman, buildah, runc, "
            f"debootstrap, podman-compose, a local base image), or set {REQUIRE_ENV}=1 to have the test do it"
        )
    if os.geteuid() != 0:
        skip_or_fail("the container test runs rootful podman: run it as root")
    try:
        output = run(["bash", str(DOCKER / "podman-setup.sh")], timeout=1200)
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        skip_or_fail(f"docker/podman-setup.sh failed: {exc}")
    compose = next(
        (line.split("=", 1)[1] for line in output.splitlines() if line.startswith("podman-compose=")), ""
    )
    if not compose or not Path(compose).exists():
        skip_or_fail(f"docker/podman-setup.sh did not report podman-compose:\n{output[-2000:]}")
    return compose


def build_images(log: Path) -> dict[str, float]:
    """Build the three images (layer cache kept); seconds each."""
    secret = ["--secret", f"id=pip_ca,src={HOST_CA}"] if Path(HOST_CA).exists() else []
    seconds = {}
    for name, (tag, dockerfile, context) in IMAGES.items():
        started = time.monotonic()
        previous = image_id(tag)
        command = ["podman", "build", "--layers", "-f", str(dockerfile), "-t", tag]
        command += ["--build-arg", f"BASE_IMAGE={BASE_IMAGE}", *secret, str(context)]
        run(command, BUILD_TIMEOUT_S, log=log)
        seconds[name] = time.monotonic() - started
        report(f"built {tag} in {seconds[name]:.0f} s")
        if previous and previous != image_id(tag):
            # The image this tag named before (now untagged), with the layers no other image uses: the cache
            # stays one image per tag. Fails harmlessly if something still uses it.
            subprocess.run(["podman", "rmi", previous], capture_output=True, timeout=300)
    return seconds


def image_id(tag: str) -> str:
    done = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", tag], capture_output=True, text=True, timeout=60
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def image_sizes() -> str:
    tags = [tag for tag, _, _ in IMAGES.values()] + [BASE_IMAGE]
    table = run(["podman", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}  {{.Size}}"], 60)
    return "\n".join(line for line in table.splitlines() if line.split("  ")[0] in tags)


class Stack:
    """The compose project: names, ports, and the commands that drive it."""

    def __init__(self, compose: str, tmp: Path) -> None:
        self.compose = compose
        self.project = f"segmask-ctest-{uuid.uuid4().hex[:8]}"
        self.tmp = tmp
        self.log = tmp / "compose.log"
        self.ls_port = free_port()
        self.segmask_port = free_port()
        self.env_file = tmp / "compose.env"
        settings = {
            "SEGMASK_IMAGE": IMAGES["segmask"][0],
            "REDIS_IMAGE": IMAGES["redis"][0],
            "LABEL_STUDIO_IMAGE": IMAGES["label-studio"][0],
            "LABEL_STUDIO_BIND": "127.0.0.1",
            "LABEL_STUDIO_PORT": str(self.ls_port),
            "SEGMASK_BIND": "127.0.0.1",
            "SEGMASK_PORT": str(self.segmask_port),
            "LABEL_STUDIO_USERNAME": LS_USERNAME,
            "LABEL_STUDIO_PASSWORD": LS_PASSWORD,
            "LABEL_STUDIO_USER_TOKEN": LS_TOKEN,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_API_KEY": "",  # the token of Label Studio's /setup (legacy token)
            "SEGMASK_WORKERS_PER_HOST": "1",  # one worker on this machine
            # Each task's best detection whatever its probability, so that every batch prediction has a
            # polygon to check (the calibrated default shows only likely-right ones: none on some images).
            "SEGMASK_SCORE_THRESHOLD": "0",
            "SEGMASK_MAX_DETECTIONS": "1",
        }
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        self.ls_url = f"http://127.0.0.1:{self.ls_port}"
        self.segmask_url = f"http://127.0.0.1:{self.segmask_port}"

    def compose_cmd(self, *args: str) -> list[str]:
        return [self.compose, "-p", self.project, "-f", str(DOCKER / "compose.yaml")] + [
            "--env-file",
            str(self.env_file),
            *args,
        ]

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def up(self) -> None:
        run(self.compose_cmd("up", "-d", "--no-build", *SERVICES), UP_TIMEOUT_S, log=self.log)

    def logs(self, service: str, lines: int = 40) -> str:
        done = subprocess.run(
            ["podman", "logs", "--tail", str(lines), self.container(service)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return f"--- {service} ---\n{done.stdout}{done.stderr}"

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=io.podman.compose.project={self.project}"
        found = {}
        for kind, command in {
            "containers": ["podman", "ps", "-a", "--filter", label, "--format", "{{.Names}}"],
            "pods": ["podman", "pod", "ls", "--filter", f"name={self.project}", "--format", "{{.Name}}"],
            "networks": ["podman", "network", "ls", "--format", "{{.Name}}"],
            "volumes": ["podman", "volume", "ls", "--format", "{{.Name}}"],
        }.items():
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
            names = [n for n in done.stdout.split() if kind == "containers" or n.startswith(self.project)]
            found[kind] = names
        return found

    def tear_down(self) -> None:
        """``down -v``, then remove whatever is left of this project by name (also after a failed ``up``)."""
        with contextlib.suppress(Exception):
            run(self.compose_cmd("down", "-v", "-t", "5"), 300, log=self.log, check=False)
        left = self.leftovers()
        removers = {
            "containers": ["podman", "rm", "-f", "-v"],
            "pods": ["podman", "pod", "rm", "-f"],
            "networks": ["podman", "network", "rm", "-f"],
            "volumes": ["podman", "volume", "rm", "-f"],
        }
        for kind, names in left.items():
            if names:
                subprocess.run(removers[kind] + names, capture_output=True, timeout=120)
        remaining = {kind: names for kind, names in self.leftovers().items() if names}
        report(f"torn down {self.project}: " + (f"LEFT OVER {remaining}" if remaining else "nothing left"))


def wait_for(url: str, what: str, timeout: float, stack: Stack, service: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=3).status_code == 200:
                return time.monotonic() - started
        time.sleep(1)
    raise AssertionError(f"{what} ({url}) did not answer within {timeout:.0f} s\n{stack.logs(service)}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Images built, the compose stack up (Label Studio, Redis, server, one worker); torn down at the end."""
    started = time.monotonic()
    compose = set_up_podman()
    tmp = tmp_path_factory.mktemp("containers")
    build_log = tmp / "build.log"
    report(f"podman set up in {time.monotonic() - started:.0f} s; build log {build_log}")
    try:
        build_seconds = build_images(build_log)
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"image build failed: {exc}", pytrace=False)
    report("image sizes (podman image ls):\n" + image_sizes())
    st = Stack(compose, tmp)
    st.build_seconds = build_seconds
    # A SIGTERM (a CI timeout, `kill`) ends the test through the teardown below, not by killing Python.
    previous_handler = signal.signal(signal.SIGTERM, interrupted)
    try:
        up_started = time.monotonic()
        st.up()
        ls_s = wait_for(f"{st.ls_url}/health", "Label Studio", UP_TIMEOUT_S, st, "label-studio")
        sm_s = wait_for(f"{st.segmask_url}/health", "segmask", UP_TIMEOUT_S, st, "segmask")
        report(
            f"stack {st.project} up: Label Studio healthy {ls_s:.0f} s, segmask {ls_s + sm_s:.0f} s after "
            f"`podman-compose up` (which took {time.monotonic() - up_started - ls_s - sm_s:.0f} s)"
        )
        yield st
    finally:
        if (
            os.environ.get("SEGMASK_CONTAINERS_KEEP") != "1"
        ):  # for debugging only; then `podman-compose down -v`
            st.tear_down()
        signal.signal(signal.SIGTERM, previous_handler)
        report(f"container test total {time.monotonic() - started:.0f} s")


def interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}: tearing the stack down")


@pytest.fixture(scope="module")
def project(stack, coco128):
    """A Label Studio project with two COCO128 images, our backend connected by its service name."""
    ls = LabelStudioServer(stack.ls_url, LS_TOKEN)
    project_id = ls.create_project("segmask containers", CONFIG)
    files = [coco128 / "images" / f"{i:012d}.jpg" for i in (IMAGE_ID, SECOND_IMAGE_ID)]
    task_ids = ls.import_images(project_id, files)
    ml_id = ls.connect_ml_backend(project_id, "http://segmask:9090")
    version = requests.post(f"{stack.segmask_url}/setup", json={}, timeout=30).json()["model_version"]
    return ls, project_id, dict(zip((IMAGE_ID, SECOND_IMAGE_ID), task_ids, strict=True)), ml_id, version


def click_context(coco128: Path) -> tuple[dict, float, float]:
    x, y, _ = interior_point(coco128, IMAGE_ID, "dog")
    context = captured("predict-interactive-keypoint")["params"]["context"]
    item = context["result"][0]
    item["value"].update(x=x, y=y, labels=["dog"], keypointlabels=["dog"])
    item.update(original_width=640, original_height=478)
    return context, x, y


def timed_click(ls: LabelStudioServer, ml_id: int, task_id: int, context: dict) -> tuple[dict, float]:
    started = time.monotonic()
    answer = ls.interactive_annotating(ml_id, task_id, context)
    return answer, (time.monotonic() - started) * 1000


def test_images_build_and_the_stack_comes_up(stack, project):
    ls, _, _, ml_id, version = project
    state = ls.ml_backend(ml_id)
    report(f"build seconds: {json.dumps({k: round(v) for k, v in stack.build_seconds.items()})}")
    report(
        f"Label Studio connected to http://segmask:9090: {state['readable_state']}, "
        f"model {state['model_version']}"
    )
    assert state["readable_state"] == "Connected" and state["model_version"] == version


def test_health_checks_volumes_and_users(stack, project):
    """What compose declares but podman-compose does not exercise by itself: health checks (run here by hand),
    the non-root users and their writable volumes, Redis's append-only file."""
    for service in ("redis", "segmask", "label-studio"):
        done = subprocess.run(
            ["podman", "healthcheck", "run", stack.container(service)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"{service} health check: {done.stdout}{done.stderr}"
    server, worker = stack.container("segmask"), stack.container("worker")
    for name in (server, worker):
        who = run(["podman", "exec", name, "id", "-u"], 60).strip()
        writable = ["sh", "-c", "test -w /var/lib/segmask/models && test -w /var/cache/segmask && echo ok"]
        assert who == "10001" and run(["podman", "exec", name, *writable], 60).strip() == "ok"
    appendonly = run(
        ["podman", "exec", stack.container("redis"), "redis-cli", "config", "get", "appendonly"], 60
    )
    assert appendonly.split() == ["appendonly", "yes"]
    versions = run(["podman", "exec", server, "segmask", "versions"], 120).strip()
    report(
        "health checks pass (redis, segmask, label-studio); server and worker run as uid 10001 with the "
        f"model store and cache volumes writable; Redis appendonly yes; `segmask versions`: "
        f"{versions.splitlines()}"
    )


def test_a_click_through_label_studio_comes_back_as_a_polygon(stack, project, coco128):
    ls, _, tasks, ml_id, version = project
    context, x, y = click_context(coco128)
    answers = [timed_click(ls, ml_id, tasks[IMAGE_ID], context) for _ in range(4)]
    answer, first_ms = answers[0]
    assert "errors" not in answer, f"{answer}\n{stack.logs('segmask')}\n{stack.logs('worker')}"
    [region] = answer["data"]["result"]
    assert region["type"] == "polygonlabels" and region["value"]["polygonlabels"] == ["dog"]
    points = region["value"]["points"]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    assert len(points) >= 3 and min(xs) < x < max(xs) and min(ys) < y < max(ys)
    assert answer["data"]["model_version"] == version
    later = [ms for a, ms in answers[1:]]
    assert all("errors" not in a for a, _ in answers[1:])
    report(
        f"click through Label Studio -> segmask -> Redis -> worker: polygon of {len(points)} points, "
        f"bbox x {min(xs):.1f}-{max(xs):.1f}% y {min(ys):.1f}-{max(ys):.1f}% (click at {x:.1f}%, {y:.1f}%), "
        f"label dog, model {answer['data']['model_version']}; latency first {first_ms:.0f} ms (image fetched "
        f"from Label Studio, features computed), again on the same image median "
        f"{statistics.median(later):.0f} ms "
        f"({', '.join(f'{ms:.0f}' for ms in later)})"
    )


def test_a_batch_prediction_is_stored_with_the_model_version(stack, project):
    ls, project_id, tasks, _, version = project
    started = time.monotonic()
    ls.retrieve_predictions(project_id, list(tasks.values()))
    seconds = time.monotonic() - started
    for image_id, task_id in tasks.items():
        stored = ls.predictions(task=task_id)
        assert len(stored) == 1, f"COCO {image_id}: {stored}\n{stack.logs('segmask')}\n{stack.logs('worker')}"
        [prediction] = stored
        assert prediction["model_version"] == version
        [region] = prediction["result"]
        assert region["type"] == "polygonlabels" and len(region["value"]["points"]) >= 3
        report(
            f"batch: task {task_id} (COCO {image_id}): {region['value']['polygonlabels'][0]}, "
            f"{len(region['value']['points'])} points, score {prediction['score']:.2f}, model {version}"
        )
    report(f"batch of {len(tasks)} tasks through Label Studio's Retrieve Predictions: {seconds:.1f} s")


def test_a_killed_worker_gives_503_and_the_restarted_one_serves_again(stack, project, coco128):
    ls, project_id, tasks, ml_id, _ = project
    context, _, _ = click_context(coco128)
    worker = stack.container("worker")
    run(["podman", "kill", "--signal", "KILL", worker], 60)
    killed = time.monotonic()
    report(f"killed {worker} (SIGKILL)")
    # The body Label Studio sends, straight to the backend, to see the status code it answers.
    body = captured("predict-interactive-keypoint")
    body["project"] = f"{project_id}.0"
    body["tasks"][0]["data"]["image"] = ls.task(tasks[IMAGE_ID])["data"]["image"]
    body["params"]["context"] = context
    direct = None
    while time.monotonic() - killed < 90:
        direct = requests.post(f"{stack.segmask_url}/predict", json=body, timeout=60)
        if direct.status_code == 503:
            break
        time.sleep(2)
    assert direct is not None and direct.status_code == 503, f"{direct.status_code}: {direct.text}"
    report(f"{time.monotonic() - killed:.0f} s after the kill: /predict -> 503 {direct.json()}")
    answer, ms = timed_click(ls, ml_id, tasks[IMAGE_ID], context)
    assert "errors" in answer, answer
    report(f"the click through Label Studio meanwhile: {ms:.0f} ms, {json.dumps(answer)[:300]}")
    state = container_state(worker)
    # `podman kill` (like `docker kill`) is a stop by the user: the restart policy leaves it stopped.
    report(f"worker container after `podman kill`: {state['Status']}; starting it again")
    assert state["Status"] != "running"
    restarted = time.monotonic()
    run(["podman", "start", worker], 120)
    answer, ms = click_until_served(ls, ml_id, tasks[IMAGE_ID], context)
    assert "errors" not in answer, f"{answer}\n{stack.logs('worker')}"
    points = answer["data"]["result"][0]["value"]["points"]
    report(
        f"recovered {time.monotonic() - restarted:.0f} s after the worker started again: click {ms:.0f} ms, "
        f"polygon of {len(points)} points"
    )


def test_a_crashed_worker_is_restarted_by_the_restart_policy(stack, project, coco128):
    """A worker process killed from outside (as the OOM killer does) comes back by the restart policy."""
    ls, _, tasks, ml_id, _ = project
    context, _, _ = click_context(coco128)
    worker = stack.container("worker")
    before = container_state(worker)
    restarts = int(run(["podman", "inspect", "--format", "{{.RestartCount}}", worker], 60).strip() or 0)
    os.kill(int(before["Pid"]), signal.SIGKILL)
    crashed = time.monotonic()
    while time.monotonic() - crashed < 60:
        count = int(run(["podman", "inspect", "--format", "{{.RestartCount}}", worker], 60).strip() or 0)
        if count > restarts and container_state(worker)["Status"] == "running":
            break
        time.sleep(1)
    else:
        raise AssertionError(f"{worker} was not restarted within 60 s: {container_state(worker)}")
    report(
        f"worker process SIGKILLed from the host: container restarted by its policy in "
        f"{time.monotonic() - crashed:.0f} s"
    )
    answer, ms = click_until_served(ls, ml_id, tasks[IMAGE_ID], context)
    assert "errors" not in answer, f"{answer}\n{stack.logs('worker')}"
    report(f"clicks served again {time.monotonic() - crashed:.0f} s after the crash (that click {ms:.0f} ms)")
    report("worker log (start):\n" + "\n".join(stack.logs("worker", 200).splitlines()[:12]))


def container_state(name: str) -> dict:
    return json.loads(run(["podman", "inspect", "--format", "{{json .State}}", name], 60))


def click_until_served(
    ls, ml_id: int, task_id: int, context: dict, timeout: float = 180
) -> tuple[dict, float]:
    started = time.monotonic()
    while True:
        answer, ms = timed_click(ls, ml_id, task_id, context)
        if "errors" not in answer or time.monotonic() - started > timeout:
            return answer, ms
        time.sleep(2)
