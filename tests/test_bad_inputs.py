"""The bad-input corpus: every case gets a 4xx JSON error naming the problem, and the next good request
still succeeds (embedded mode, real model, real files)."""

import base64
import http.client
import io
import json
import threading

import pytest
from ls_bodies import captured, keypoints, rectangle, with_image
from PIL import Image
from upload_server import UPLOAD_TOKEN
from werkzeug.serving import make_server

from backend.app import create_app
from backend.settings import Settings

MAX_BODY = 256 * 1024
TOO_DEEP = "[" * 1000 + "]" * 1000


@pytest.fixture(scope="module")
def files(tmp_path_factory, coco128):
    root = tmp_path_factory.mktemp("local-files")
    good = (coco128 / "images" / "000000000009.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "notes.jpg").write_text("this is not an image")
    bomb = io.BytesIO()
    Image.new("1", (30000, 30000)).save(bomb, format="PNG")  # 30000^2 px, a few kB of zlib
    (root / "bomb.png").write_bytes(bomb.getvalue())
    (root / "good.jpg").write_bytes(good)
    return root


@pytest.fixture(scope="module")
def client(files, upload_server, ls_request):
    settings = Settings.from_env({}, local_files_root=str(files), max_body_bytes=MAX_BODY)
    client = create_app(settings).test_client()
    client.post(
        "/setup", json=dict(ls_request("setup"), hostname=upload_server.url, access_token=UPLOAD_TOKEN)
    )
    return client


def _click(ls_request, image: str | None = None, **changes) -> dict:
    body = keypoints(ls_request("predict-interactive-keypoint"), 9, [(50, 50, True)], label="person")
    if image is not None:
        body["tasks"][0]["data"]["image"] = image
    body.update(changes)
    return body


def _rotated(ls_request, rotation: object) -> dict:
    body = rectangle(ls_request("predict-interactive-rectangle"), 9, (20, 20, 40, 40), label="person")
    body["params"]["context"]["result"][0]["value"]["rotation"] = rotation
    return body


def _cases(ls_request) -> dict[str, tuple[object, int, str]]:
    """name -> (body: dict, or str for raw bytes, expected status, expected error kind)."""
    batch = with_image(ls_request("predict-batch"), 9)
    negative_only = keypoints(
        ls_request("predict-interactive-keypoint"), 9, [(50, 50, False)], label="person"
    )
    no_y = _click(ls_request)
    del no_y["params"]["context"]["result"][0]["value"]["y"]
    no_data = _click(ls_request)
    no_data["tasks"][0]["data"] = {}
    return {
        "malformed JSON": ("{'tasks': [", 400, "malformed_json"),
        "empty body": ("", 400, "malformed_json"),
        "JSON array": ("[1, 2]", 400, "bad_request"),
        "arrays nested 1000 deep": (TOO_DEEP, 400, "json_too_deep"),
        "objects nested 1000 deep": ('{"a":' * 1000 + "1" + "}" * 1000, 400, "json_too_deep"),
        "missing tasks": ({"label_config": batch["label_config"]}, 400, "missing_tasks"),
        "empty tasks": (dict(batch, tasks=[]), 400, "missing_tasks"),
        "tasks of strings": (dict(batch, tasks=["a"]), 400, "missing_tasks"),
        "missing label_config": ({"tasks": batch["tasks"]}, 400, "missing_label_config"),
        "broken label_config": (dict(batch, label_config="<View><Image"), 400, "bad_label_config"),
        "params not an object": (dict(batch, params=[1]), 400, "bad_params"),
        "context is a string": (_click(ls_request, params={"context": "click"}), 400, "bad_context"),
        "context result not a list": (
            _click(ls_request, params={"context": {"result": {}}}),
            400,
            "bad_context",
        ),
        "keypoint without y": (no_y, 400, "bad_context"),
        "rectangle rotation NaN": (_rotated(ls_request, float("nan")), 400, "bad_context"),
        "rectangle rotation Infinity": (_rotated(ls_request, float("inf")), 400, "bad_context"),
        "rectangle rotation a string": (_rotated(ls_request, "abc"), 400, "bad_context"),
        "rectangle rotation a list": (_rotated(ls_request, [1]), 400, "bad_context"),
        "rectangle rotation beyond float": (_rotated(ls_request, 10**400), 400, "bad_context"),
        "only negative points": (negative_only, 400, "bad_context"),
        "unknown label": (
            keypoints(ls_request("predict-interactive-keypoint"), 9, [(50, 50, True)], label="unicorn"),
            400,
            "unknown_label",
        ),
        "task without image": (no_data, 400, "missing_image"),
        "corrupt image": (_click(ls_request, "/data/local-files/?d=truncated.jpg"), 415, "not_an_image"),
        "text file as image": (_click(ls_request, "/data/local-files/?d=notes.jpg"), 415, "not_an_image"),
        "decompression bomb": (
            _click(ls_request, "/data/local-files/?d=bomb.png"),
            413,
            "image_too_many_pixels",
        ),
        "private URL": (_click(ls_request, "http://10.1.2.3/cat.jpg"), 403, "private_address"),
        "cloud metadata URL": (
            _click(ls_request, "http://169.254.169.254/latest/meta-data/"),
            403,
            "private_address",
        ),
        "file URL": (_click(ls_request, "file:///etc/passwd"), 400, "unsupported_url"),
        "path traversal": (
            _click(ls_request, "/data/local-files/?d=../../../etc/passwd"),
            403,
            "path_traversal",
        ),
        "absolute local path": (
            _click(ls_request, "/data/local-files/?d=/etc/passwd"),
            403,
            "path_traversal",
        ),
        "unresolvable image host": (
            _click(ls_request, "http://no-such-host.invalid/a.jpg"),
            422,
            "image_unreachable",
        ),
        "upload missing in Label Studio": (
            _click(ls_request, "/data/upload/1/missing.jpg"),
            422,
            "image_unreachable",
        ),
        "oversized body": (dict(batch, padding="x" * (MAX_BODY + 1)), 413, "body_too_large"),
        "batch of only bad images": (
            dict(batch, tasks=[_click(ls_request, "file:///x")["tasks"][0]]),
            400,
            "unsupported_url",
        ),
    }


CASES = _cases(captured)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_a_4xx_json_error_and_the_server_keeps_serving(client, ls_request, name):
    body, status, kind = CASES[name]
    if isinstance(body, str):
        answer = client.post("/predict", data=body, content_type="application/json")
    else:
        answer = client.post("/predict", data=json.dumps(body), content_type="application/json")
    error = answer.get_json()
    assert (answer.status_code, error["error"]) == (status, kind), error
    assert len(error["message"]) > 10
    good = client.post("/predict", json=_click(ls_request, "/data/local-files/?d=good.jpg"))
    assert good.status_code == 200 and good.get_json()["results"][0]["result"]


def test_webhook_without_an_action_is_400(client):
    answer = client.post("/webhook", json={"project": 1})
    assert answer.status_code == 400 and answer.get_json()["error"] == "bad_webhook"


def test_unknown_routes_and_methods_are_json_errors(client):
    assert client.get("/nope").get_json()["error"] == "not_found"
    assert client.get("/predict").status_code == 405 and client.get("/predict").get_json()["error"]


@pytest.mark.parametrize("path", ["/setup", "/webhook"])
def test_json_nested_too_deep_is_a_400_on_every_route(client, path):
    answer = client.post(path, data=TOO_DEEP, content_type="application/json")
    error = answer.get_json()
    assert (answer.status_code, error["error"]) == (400, "json_too_deep") and "nested" in error["message"]


def test_json_nested_within_the_depth_limit_is_served(client):
    deep: object = "end"
    for _ in range(49):  # 98 levels, with the body's own object 99 (the limit is 100)
        deep = {"next": [deep]}
    answer = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": 1, "extra": deep})
    assert answer.status_code == 200


@pytest.fixture(scope="module")
def guarded(client):
    settings = Settings.from_env({}, basic_auth_user="ls", basic_auth_pass="s3cret")
    dispatcher = client.application.extensions["segmask"]["service"].dispatcher
    return create_app(settings, dispatcher=dispatcher).test_client()


@pytest.mark.parametrize(
    "authorization",
    [
        "Basic é",
        "Basic " + base64.b64encode("ls:sécret".encode("latin-1")).decode(),
        "Basic not base64!",
        "Bearer x",
    ],
)
def test_undecodable_basic_auth_is_a_401(guarded, authorization):
    answer = guarded.get("/health", headers={"Authorization": authorization})
    assert answer.status_code == 401 and answer.get_json()["error"] == "unauthorized"


@pytest.fixture(scope="module")
def served(client):
    """The app behind a real HTTP server (werkzeug's, which, like gunicorn, decodes chunked bodies)."""
    server = make_server("127.0.0.1", 0, client.application, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_port
    server.shutdown()


def _post_chunked(port: int, path: str, body: bytes) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
    connection.request(
        "POST", path, body=chunks, headers={"Content-Type": "application/json"}, encode_chunked=True
    )
    response = connection.getresponse()
    answer = response.status, json.loads(response.read())
    connection.close()
    return answer


def test_a_chunked_body_over_the_limit_is_a_413(served):
    body = json.dumps({"action": "PROJECT_UPDATED", "padding": "x" * (MAX_BODY + 1000)}).encode()
    status, error = _post_chunked(served, "/webhook", body)
    assert (status, error["error"]) == (413, "body_too_large") and "SEGMASK_MAX_BODY_BYTES" in error[
        "message"
    ]


def test_a_chunked_body_within_the_limit_is_served(served):
    body = json.dumps({"action": "PROJECT_UPDATED", "padding": "x" * (MAX_BODY - 100)}).encode()
    assert _post_chunked(served, "/webhook", body)[0] == 200
