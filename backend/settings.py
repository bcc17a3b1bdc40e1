"""Every environment variable the backend reads, in one place.

``Settings.from_env()`` is called once by the app factory, the worker and the CLI; nothing else reads
``os.environ``. Each field's ``doc`` is what the README's settings table says (``segmask settings``
prints it).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

# The shipped model, located without importing segmodels (which would load torch in every process that
# only reads settings).
_SEGMODELS = Path(importlib.util.find_spec("segmodels").submodule_search_locations[0])
DEFAULT_MODEL_DIR = _SEGMODELS / "weights" / "default"
# The COCO128 images and annotations in the repository (data/README.md): the one name of the data directory
# that training, evaluation, the tests and the benchmarks default to (``--data`` takes any other).
DEFAULT_DATA_DIR = _SEGMODELS.parent / "data" / "coco128"


def _setting(env: str, default, doc: str, choices: tuple[str, ...] = ()):
    return field(default=default, metadata={"env": env, "doc": doc, "choices": choices})


@dataclass(frozen=True)
class Settings:
    """Backend configuration; see the README's settings table (generated from the ``doc`` strings)."""

    redis_url: str = _setting(
        "SEGMASK_REDIS_URL",
        "",
        "Redis URL for the RQ queues (e.g. redis://127.0.0.1:6379/0). Empty: embedded "
        "mode, jobs run inside the server process and no worker is needed.",
    )
    queue_prefix: str = _setting(
        "SEGMASK_QUEUE_PREFIX",
        "segmask",
        "Prefix of the queue names (<prefix>:interactive, :batch, :training); "
        "separate deployments sharing one Redis use different prefixes.",
    )
    label_studio_url: str = _setting(
        "LABEL_STUDIO_URL",
        "",
        "Base URL of Label Studio, for /data/upload images and the API; read by the server and every worker. "
        "Credentials go to this origin only. Empty: each project's /setup hostname, with that /setup's "
        "access_token only.",
    )
    label_studio_api_key: str = _setting(
        "LABEL_STUDIO_API_KEY",
        "",
        "A personal access token (exchanged for short-lived Bearer tokens) or a legacy token; read by the "
        "server and every worker, sent only to LABEL_STUDIO_URL (never without it). Empty: the access_token "
        "Label Studio sends in /setup (legacy tokens only).",
    )
    basic_auth_user: str = _setting(
        "SEGMASK_BASIC_AUTH_USER",
        "",
        "With SEGMASK_BASIC_AUTH_PASS: require HTTP Basic auth on every route "
        "except /webhook (Label Studio sends none there). Set the same pair in Label Studio's model "
        "settings.",
    )
    basic_auth_pass: str = _setting("SEGMASK_BASIC_AUTH_PASS", "", "Password for SEGMASK_BASIC_AUTH_USER.")
    admin_token: str = _setting(
        "SEGMASK_ADMIN_TOKEN",
        "",
        "Token admins send as X-Segmask-Admin-Token to POST /train. Empty: admin routes are off.",
    )
    webhook_secret: str = _setting(
        "SEGMASK_WEBHOOK_SECRET",
        "",
        "Shared secret /webhook requires, as ?token=<secret> in the webhook URL or the header "
        "X-Segmask-Webhook-Token (compared in constant time; 401 otherwise). The Train button's call passes "
        "with the model's Basic auth instead. Empty: /webhook is open, and acts only for projects that sent "
        "/setup.",
    )
    model_dir: Path = _setting(
        "SEGMASK_MODEL_DIR",
        DEFAULT_MODEL_DIR,
        "Checkpoint served while the model store has no published version (model.safetensors + model.json). "
        "Default: the shipped model.",
    )
    model_store: str = _setting(
        "SEGMASK_MODEL_STORE",
        "",
        "Directory of the versioned model store (retraining publishes there; `segmask versions`/`rollback`). "
        "Shared by the server and all workers. Empty: serve SEGMASK_MODEL_DIR only, no retraining. "
        "`make serve` sets var/models.",
    )
    retrain_every: int = _setting(
        "SEGMASK_RETRAIN_EVERY",
        20,
        "Start a training job after this many new or updated annotations in a project (0: only on request).",
    )
    retrain_count_ttl: int = _setting(
        "SEGMASK_RETRAIN_COUNT_TTL",
        3 * 24 * 3600,
        "Seconds a project's count of annotation changes towards SEGMASK_RETRAIN_EVERY is kept in Redis "
        "after its last change (then it starts again from 0).",
    )
    max_training_jobs: int = _setting(
        "SEGMASK_MAX_TRAINING_JOBS",
        2,
        "Training jobs queued or running at once, all projects together (in embedded mode: training "
        "threads). A request over it gets a 429; an automatic trigger is skipped and logged.",
    )
    device: str = _setting("SEGMASK_DEVICE", "auto", "auto (CUDA when present), cpu, cuda or cuda:N.")
    trunk_engine: str = _setting(
        "SEGMASK_TRUNK_ENGINE",
        "auto",
        "What runs the image trunk (segmodels.trunk_engine): auto (ONNX Runtime on a CPU, PyTorch on a "
        "GPU), torch, or onnxruntime (CPU only). Same masks to float32 rounding; ONNX Runtime computes a "
        "new image's features about 1.7x faster on a CPU (bench/bench_pipeline.py).",
    )
    feature_precision: str = _setting(
        "SEGMASK_FEATURE_PRECISION",
        "float16",
        "What a cached image's trunk features are stored as: float16 (half the memory of float32, so "
        "SEGMASK_FEATURE_CACHE_MB holds twice the images; the heads still compute in float32) or float32.",
        choices=("float16", "float32"),
    )
    affinity_ttl: int = _setting(
        "SEGMASK_AFFINITY_TTL",
        600,
        "With Redis: seconds after a worker's last job on an image during which clicks on that image go to "
        "that worker first, where its features are cached, through its click lane (backend.affinity, "
        "backend.click_lane; unless it is gone or busy with a batch). 0: every click takes the shared queue.",
    )
    preannotate: bool = _setting(
        "SEGMASK_PREANNOTATE",
        True,
        "Whether /predict without a prompt (Label Studio opening a task, or Retrieve predictions) returns "
        "detections. false: it returns empty predictions, but still computes and keeps each task's image "
        "features for the clicks that follow.",
    )
    interactive_timeout: float = _setting(
        "SEGMASK_INTERACTIVE_TIMEOUT",
        20.0,
        "Seconds the server waits for a click/box job before answering 503.",
    )
    batch_timeout: float = _setting(
        "SEGMASK_BATCH_TIMEOUT",
        85.0,
        "Seconds the server waits for a batch pre-annotation request (Label Studio gives up after 100 s).",
    )
    # These two defaults are MaskPredictor.detect()'s (segmodels.predictor.PREANNOTATION_*).
    score_threshold: float = _setting(
        "SEGMASK_SCORE_THRESHOLD",
        0.5,
        "Pre-annotation keeps every detection scoring at least this (0..1). With a calibrated checkpoint "
        "(`segmask calibrate`; the shipped one is) the score is the probability that the detection is right "
        "(mask IoU >= 0.5 with an object of its label); else `predictor.detection_scores`.",
    )
    max_detections: int = _setting(
        "SEGMASK_MAX_DETECTIONS",
        0,
        "Pre-annotation keeps at most this many per image, best first; 0: no cap (every one above "
        "SEGMASK_SCORE_THRESHOLD).",
    )
    max_body_bytes: int = _setting(
        "SEGMASK_MAX_BODY_BYTES", 16 * 1024 * 1024, "Largest request body accepted (413 above)."
    )
    max_image_bytes: int = _setting(
        "SEGMASK_MAX_IMAGE_BYTES", 40 * 1024 * 1024, "Largest image file downloaded or read (413 above)."
    )
    max_image_pixels: int = _setting(
        "SEGMASK_MAX_IMAGE_PIXELS",
        50_000_000,
        "Largest image decoded, width x height (413 above; guards against decompression bombs).",
    )
    image_timeout: float = _setting("SEGMASK_IMAGE_TIMEOUT", 10.0, "Seconds allowed for one image download.")
    image_cache_mb: int = _setting(
        "SEGMASK_IMAGE_CACHE_MB",
        256,
        "Downloaded image bytes kept per process (LRU), so repeated clicks do not download again.",
    )
    feature_cache_mb: int = _setting(
        "SEGMASK_FEATURE_CACHE_MB",
        256,
        "Megabytes of image features a worker keeps (LRU; in GPU memory on a GPU), so clicks on a cached "
        "image skip the trunk. One image's take ~25 MB at 640x480 (30 MB once pre-annotated: the default "
        "holds 8) and ~54 MB at 1024x768 with float16 features (SEGMASK_FEATURE_PRECISION; twice that with "
        "float32); one larger than this is used, not kept.",
    )
    max_work_side: int = _setting(
        "SEGMASK_MAX_WORK_SIDE",
        1024,
        "Longest side, in pixels, of the image the model works on: larger images are downscaled after "
        "decoding, and results come back in the original's size and coordinates. Time and memory grow with "
        "its square (trunk on one CPU thread: 1.0 s at 640, 1.8 s at 1024, 2.8 s at 1280). Larger helps "
        "small objects and hurts large ones (objects past ~500 px outgrow the model's windows): first-click "
        "mIoU on COCO128 at 640/1024/1280, objects of 16-48 px at 640: 0.45/0.56/0.62; each image's "
        "largest: 0.71/0.56/0.51.",
    )
    local_files_root: str = _setting(
        "SEGMASK_LOCAL_FILES_ROOT",
        "",
        "Directory that /data/local-files/?d= paths are read from (Label "
        "Studio's LOCAL_FILES_DOCUMENT_ROOT). Empty: such images are fetched from Label Studio.",
    )
    allowed_hosts: tuple[str, ...] = _setting(
        "SEGMASK_ALLOWED_HOSTS",
        (),
        "Comma-separated host names or IPs on private networks that image URLs may "
        "point to, besides Label Studio's own host.",
    )
    log_level: str = _setting("SEGMASK_LOG_LEVEL", "INFO", "Python logging level.")
    host: str = _setting("SEGMASK_HOST", "0.0.0.0", "Address `segmask serve` listens on.")
    port: int = _setting("SEGMASK_PORT", 9090, "Port `segmask serve` listens on.")
    server_threads: int = _setting(
        "SEGMASK_SERVER_THREADS",
        64,
        "Request threads per server process. A request waiting for a worker or for the model holds one "
        "while it waits, so there are many (they cost little while they wait); /predict may hold "
        "SEGMASK_MAX_PREDICT_REQUESTS of them, and the rest answer /health, /metrics, /setup and /webhook "
        "however busy the model is.",
    )
    max_predict_requests: int = _setting(
        "SEGMASK_MAX_PREDICT_REQUESTS",
        0,
        "/predict requests one server process serves at once, waiting ones included; one more gets a "
        "503 `busy` at once (retry later). Must be below SEGMASK_SERVER_THREADS. 0: that less a quarter "
        "(48 of 64).",
    )
    torch_threads: int = _setting(
        "SEGMASK_TORCH_THREADS",
        0,
        "PyTorch threads of each request a process that runs the model (a worker; the server in embedded "
        "mode) serves at once (SEGMASK_MODEL_SLOTS), set at its start and logged. 0: OMP_NUM_THREADS when "
        "that is set, else its share of the usable cores (CPU affinity, capped by a cgroup v2 CPU quota, "
        "divided by SEGMASK_WORKERS_PER_HOST) divided among its model slots, at least 1.",
    )
    model_slots: int = _setting(
        "SEGMASK_MODEL_SLOTS",
        0,
        "Requests a process that runs the model serves at once (never two on one image), each on "
        "SEGMASK_TORCH_THREADS threads, or on every slot's threads while it runs alone. 0: one per thread of "
        "its share of the cores (usable cores / SEGMASK_WORKERS_PER_HOST); a worker runs two at most (a job "
        "and a click of its click lane). 1: one request at a time.",
    )
    workers_per_host: int = _setting(
        "SEGMASK_WORKERS_PER_HOST",
        1,
        "Processes running the model on one machine (`segmask worker`s; the embedded server counts as "
        "one), so that with SEGMASK_TORCH_THREADS=0 each takes its share of the cores instead of all of "
        "them: set it on every worker when several share a machine.",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> Settings:
        """Every field from ``environ`` (default ``os.environ``); ``overrides`` win (tests, CLI flags)."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, f.default, raw)
            choices = f.metadata["choices"]
            if choices and values.get(f.name, f.default) not in choices:
                raise ValueError(f"setting {f.metadata['env']}: {raw!r} is not one of {', '.join(choices)}")
        values.update(overrides)
        return cls(**values)

    @property
    def embedded(self) -> bool:
        """True when jobs run in-process (no Redis configured)."""
        return not self.redis_url

    @classmethod
    def documentation(cls) -> list[tuple[str, str, str]]:
        """``(variable, default, doc)`` for every setting, in declaration order."""
        rows = []
        for f in fields(cls):
            default = f.default
            shown = ",".join(default) if isinstance(default, tuple) else str(default)
            if isinstance(default, Path):
                shown = "the shipped model"
            rows.append((f.metadata["env"], shown, f.metadata["doc"]))
        return rows


def _parse(name: str, default, raw: str):
    try:
        if isinstance(default, bool):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, Path):
            return Path(raw)
        if isinstance(default, tuple):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise ValueError(f"setting {name}: cannot parse {raw!r}: {exc}") from exc
    return raw
