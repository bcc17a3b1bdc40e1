"""The ``segmask`` command: train, evaluate and run models; serve the backend and its workers."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from backend.allocator import ensure_allocator_env
from backend.settings import DEFAULT_DATA_DIR as DEFAULT_DATA


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model stage on COCO-format data, or (--project) fine-tune on a Label Studio project",
    )
    p.add_argument(
        "stage",
        nargs="?",
        choices=["deepmask", "sharpmask", "multipathnet", "clicks", "first-click", "quality"],
    )
    p.add_argument(
        "--project",
        type=int,
        help="Label Studio project id: fine-tune the served version on its annotations and publish it if not "
        "worse (queued on the training queue with SEGMASK_REDIS_URL, else run here)",
    )
    p.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="directory with instances.json and images/"
    )
    p.add_argument("--out", type=Path, help="output directory of a stage (resumes when it holds a state)")
    p.add_argument(
        "--init", type=Path, help="checkpoint to start from (required for sharpmask, multipathnet)"
    )
    p.add_argument("--backbone", default="mobilenet_v2", choices=["mobilenet_v2", "resnet50"])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--steps-per-epoch", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4, help="AdamW's decoupled weight decay")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--trunk-trainable-from", default="s16", help="first trainable trunk tap (deepmask); 'none'"
    )
    p.add_argument("--no-augment", action="store_true", help="disable flips and photometric jitter")
    p.add_argument("--compact", action="store_true", help="store large weights as float16 (shipped models)")
    p.add_argument("--stop-after-steps", type=int, help="end this run after N steps (resume later)")
    p.add_argument(
        "--steps",
        type=int,
        help="clicks: training steps of the click head (batches of 16, default 1200); quality: of the "
        "quality head (batches of 64 objects' clicks, default 1000)",
    )
    p.add_argument(
        "--split",
        default="train",
        choices=["train", "fit", "fit2", "all"],
        help="the images trained on (fit leaves out the tune split, to choose settings on it; fit2 leaves "
        "out tune2, a second fold)",
    )
    p.add_argument(
        "--click-centred",
        type=float,
        default=0.0,
        help="deepmask, sharpmask: share of mask windows centred on an annotator's click instead of the "
        "object's box centre (0..1)",
    )
    p.add_argument(
        "--mask-sampling",
        default="category",
        choices=["category", "instance"],
        help="deepmask, sharpmask: mask windows drawn by category (the papers'), or uniformly among "
        "instances of at least 32x32 px",
    )
    p.add_argument("--max-images", type=int, help="quality: only the first N images of the split, by id")
    p.add_argument(
        "--paste-probability",
        type=float,
        help="chance of copy-paste augmentation per training crop or mask window (another instance pasted "
        "over it; clicks: default 0.5; deepmask, sharpmask: default 0)",
    )
    p.add_argument(
        "--window-probability",
        type=float,
        help="clicks, first-click: share of training crops framed as a first click is (a fragment or an "
        "overgrown mask of the object as the previous mask, the crop zoomed on it; default 0 for clicks, "
        "0.3 for first-click)",
    )
    p.add_argument(
        "--max-iterations",
        type=int,
        help="clicks, first-click: at most this many simulated rounds before the trained forward (default 3)",
    )
    p.add_argument(
        "--corrections",
        action=argparse.BooleanOptionalAction,
        help="clicks, first-click: whether each simulated round adds the annotator's next click; without, a "
        "round only feeds the head's prediction back, the first click alone, as a first click's second step "
        "sees it (default: with)",
    )
    p.add_argument(
        "--min-area",
        type=float,
        help="clicks: the smallest instances (px) the head trains on, all equally likely (default 32x32)",
    )


def run_train(args: argparse.Namespace) -> None:
    if args.project is not None:
        run_project_training(args.project)
        return
    if args.stage is None or args.out is None:
        raise SystemExit("segmask train: give a STAGE and --out, or --project ID")
    if args.stage in ("clicks", "first-click"):
        run_click_training(args)
        return
    if args.stage == "quality":
        run_quality_training(args)
        return
    from segmodels.train import train
    from segmodels.train_common import TrainConfig

    cfg = TrainConfig(
        stage=args.stage,
        data=str(args.data),
        out=str(args.out),
        init=str(args.init) if args.init else None,
        backbone=args.backbone,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        device=args.device,
        trunk_trainable_from=None if args.trunk_trainable_from == "none" else args.trunk_trainable_from,
        augment=not args.no_augment,
        compact=args.compact,
        stop_after_steps=args.stop_after_steps,
        split=args.split,
        click_centred=args.click_centred,
        mask_sampling=args.mask_sampling,
        paste_probability=args.paste_probability or 0.0,
    )
    print(train(cfg))


def run_click_training(args: argparse.Namespace) -> None:
    from segmodels.train_clicks import FIRST_CLICK_WINDOW_PROBABILITY, ClickTrainConfig, train_click_head

    if args.init is None:
        raise SystemExit(
            f"segmask train {args.stage}: give --init, the checkpoint whose trunk the head reads"
        )
    first_click = args.stage == "first-click"
    given = ("min_area", "paste_probability", "window_probability", "max_iterations", "corrections")
    options = {name: value for name in given if (value := getattr(args, name)) is not None}
    if first_click:
        options.setdefault("window_probability", FIRST_CLICK_WINDOW_PROBABILITY)
    cfg = ClickTrainConfig(
        data=str(args.data),
        init=str(args.init),
        out=str(args.out),
        split=args.split,
        steps=1200 if args.steps is None else args.steps,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        **options,
    )
    print(train_click_head(cfg, first_click))


def run_quality_training(args: argparse.Namespace) -> None:
    from segmodels.train_quality import QualityTrainConfig, train_quality_head

    if args.init is None:
        raise SystemExit("segmask train quality: give --init, the checkpoint whose windows the head ranks")
    cfg = QualityTrainConfig(
        data=str(args.data),
        init=str(args.init),
        out=str(args.out),
        split=args.split,
        max_images=args.max_images,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
    )
    if args.steps is not None:
        cfg.steps = args.steps
    print(train_quality_head(cfg))


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="click/box-to-mask, baselines, proposal AR, patch IoU, label top-1 and detection AP on a split",
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="COCO-format directory")
    p.add_argument(
        "--images-from",
        default="val",
        choices=["val", "train", "all", "tune", "fit", "tune2", "fit2"],
        help="the fixed split by image id (val, the test split: id %% 5 == 0; tune: id %% 5 == 1; fit: the "
        "other train images; tune2: id %% 5 == 2, fit2: the train images outside it)",
    )
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the shipped model)")
    p.add_argument("--out", type=Path, help="report directory (default: reports/eval-SPLIT)")
    p.add_argument("--max-images", type=int, help="only the first N images of the split, by id")
    p.add_argument(
        "--skip",
        default="",
        help="parts to skip: clicks,box,baselines,proposals,patches,labels,detection "
        "(labels and detection run only for checkpoints with a MultiPathNet)",
    )
    p.add_argument("--proposals-k", type=int, default=1000, help="proposals per image")
    p.add_argument(
        "--detection-proposals",
        type=int,
        default=100,
        help="refined windows detect() classifies per image for detection AP (default 100)",
    )
    p.add_argument("--patches", type=int, default=1000, help="jittered windows for the patch metrics")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def run_evaluate(args: argparse.Namespace) -> None:
    from segmodels.eval_report import format_tables
    from segmodels.evaluate import PARTS, evaluate

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(PARTS):
        raise SystemExit(f"segmask evaluate: unknown --skip {sorted(skip - set(PARTS))}; choose from {PARTS}")
    for name in ("max_images", "proposals_k", "patches", "detection_proposals"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"segmask evaluate: --{name.replace('_', '-')} must be at least 1")
    out = args.out or Path("reports") / f"eval-{args.images_from}"
    metrics = evaluate(
        args.data,
        args.images_from,
        out,
        checkpoint=args.checkpoint,
        max_images=args.max_images,
        skip=skip,
        proposals_k=args.proposals_k,
        patches=args.patches,
        device=args.device,
        command=" ".join(["segmask", *sys.argv[1:]]),
        detection_proposals=args.detection_proposals,
    )
    print(format_tables(metrics))
    print(f"report: {out / 'report.md'}")


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="fit the detection score's calibration (probability of being right) on the training images",
    )
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the shipped model)")
    p.add_argument("--out", type=Path, help="where to write the calibrated checkpoint (default: in place)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="COCO-format directory")
    p.add_argument("--max-images", type=int, help="only the first N training images, by id")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def run_calibrate(args: argparse.Namespace) -> None:
    from segmodels.data import CocoInstances
    from segmodels.fit_calibration import calibrate, write_calibration
    from segmodels.predictor import DEFAULT_CHECKPOINT, load_predictor

    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    predictor = load_predictor(checkpoint, args.device)
    if predictor.model.multipathnet is None:
        raise SystemExit(f"segmask calibrate: {checkpoint} has no MultiPathNet (labels) to calibrate")
    dataset = CocoInstances(args.data, "train")
    indices = sorted(range(len(dataset)), key=lambda i: dataset.images[i]["id"])[: args.max_images]
    calibration = calibrate(predictor, dataset, indices)
    out = write_calibration(checkpoint, args.out or checkpoint, calibration)
    for name, row in calibration.fit["cross_validation"].items():
        cells = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        print(f"{name}: {cells}")
    print(f"chose {calibration.fit['model']}; wrote {out / 'model.json'}")


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="labelled masks for image files: COCO predictions.json, results.json and overlays"
    )
    p.add_argument(
        "images", nargs="+", type=Path, metavar="IMAGE", help="image files (any format OpenCV reads)"
    )
    p.add_argument(
        "--out", type=Path, default=Path("predictions"), help="output directory (default predictions/)"
    )
    p.add_argument(
        "--checkpoint", type=Path, help="checkpoint directory with a MultiPathNet (default: shipped)"
    )
    p.add_argument("--score-threshold", type=float, default=0.5, help="minimum detection score (default 0.5)")
    p.add_argument(
        "--max-detections",
        type=int,
        default=0,
        help="at most this many detections per image, best first (default 0: no cap)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def run_predict(args: argparse.Namespace) -> None:
    from segmodels.export import predict_files
    from segmodels.predictor import load_predictor

    if args.max_detections < 0:
        raise SystemExit("segmask predict: --max-detections must be at least 0 (0: no cap)")
    if not 0.0 <= args.score_threshold <= 1.0:
        raise SystemExit("segmask predict: --score-threshold must be in [0, 1]")
    predictor = load_predictor(args.checkpoint, args.device)
    if predictor.model.multipathnet is None:
        raise SystemExit(
            f"segmask predict: {args.checkpoint or 'the shipped checkpoint'} has no MultiPathNet (labels); "
            "train one with `segmask train multipathnet` and pass --checkpoint"
        )
    summary = predict_files(
        predictor,
        args.images,
        args.out,
        score_threshold=args.score_threshold,
        max_detections=args.max_detections,
    )
    print(
        f"{summary.images} images, {summary.detections} detections: {args.out / 'predictions.json'}, "
        f"{args.out / 'results.json'}, overlays {args.out}/*.png"
    )
    if summary.failed:
        raise SystemExit(f"segmask predict: {len(summary.failed)} of {len(args.images)} images failed")


def run_project_training(project: int) -> None:
    import json

    import redis

    from backend.access import LabelStudioAccess, SetupRegistry
    from backend.settings import Settings
    from backend.training import TrainRequest, run_training
    from backend.training_scheduler import TrainingScheduler

    settings = Settings.from_env()
    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise SystemExit("segmask train --project needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    req = TrainRequest(project, "segmask train --project")  # with Redis, the worker uses its own settings
    if settings.redis_url:
        state = TrainingScheduler(settings, redis.Redis.from_url(settings.redis_url)).request(req)
        print(f"project {project}: training {state} (progress: GET /jobs, or <store>/jobs/{project}.json)")
        return
    access = LabelStudioAccess(settings, SetupRegistry())
    print(json.dumps(run_training(settings, req, access, rescore=None), indent=2))


def add_versions(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("versions", help="list the model store's versions and which one is served")
    p.add_argument("--json", action="store_true")
    r = sub.add_parser("rollback", help="serve an earlier version again (workers switch without a restart)")
    r.add_argument("version", help="a version name from `segmask versions` (e.g. v2)")


def run_versions(args: argparse.Namespace) -> None:
    import json

    from backend.settings import Settings
    from backend.versions import open_store, versions_json

    view = versions_json(open_store(Settings.from_env()))
    if args.json:
        print(json.dumps(view, indent=2))
        return
    print(f"store: {view['store'] or '(none: SEGMASK_MODEL_STORE is not set)'}; serving {view['current']}")
    for v in view["versions"]:
        mark = "*" if v["current"] else " "
        new = v["metrics"].get("new", {})
        shown = ", ".join(f"{k} {val:.3f}" for k, val in new.items() if isinstance(val, float))
        state = "published" if v["published"] else "never published"
        print(f"{mark} {v['version']:<24} {v['created'] or '':<26} {state:<16} {shown}")


def run_rollback(args: argparse.Namespace) -> None:
    from backend.settings import Settings
    from backend.versions import open_store

    store = open_store(Settings.from_env())
    try:
        store.rollback(args.version)
    except (KeyError, PermissionError) as exc:
        raise SystemExit(f"segmask rollback: {exc}") from None
    print(f"now serving {store.current_version()}")


def add_rescore(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rescore", help="rank a project's unlabelled tasks by uncertainty (writes predictions)"
    )
    p.add_argument("--project", type=int, required=True)


def run_rescore(args: argparse.Namespace) -> None:
    from backend.rescore import rescore
    from backend.runtime import Runtime
    from backend.settings import Settings
    from backend.training import TrainRequest

    settings = Settings.from_env()
    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise SystemExit("segmask rescore needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    req = TrainRequest(args.project, "segmask rescore")
    print(rescore(Runtime(settings), req)["rescored"], "tasks rescored")


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve the Label Studio ML backend (embedded mode without SEGMASK_REDIS_URL)"
    )
    p.add_argument("--host", help="listen address (default SEGMASK_HOST, 0.0.0.0)")
    p.add_argument("--port", type=int, help="port (default SEGMASK_PORT, 9090)")
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="gunicorn processes with Redis (embedded: always 1); /metrics sums their counts",
    )
    p.add_argument("--dev", action="store_true", help="Flask's development server instead of gunicorn")


def run_serve(args: argparse.Namespace) -> None:
    from backend.server import serve
    from backend.settings import Settings

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    serve(Settings.from_env(**overrides), workers=args.workers, dev=args.dev)


def add_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="an RQ worker with the model loaded once (needs SEGMASK_REDIS_URL); with several on one "
        "machine, set SEGMASK_WORKERS_PER_HOST on each so that they share its cores",
    )
    p.add_argument(
        "--queues", default="interactive,batch,training", help="queues to serve, highest priority first"
    )
    p.add_argument("--burst", action="store_true", help="exit when the queues are empty")


def run_worker(args: argparse.Namespace) -> None:
    from backend.settings import Settings
    from backend.worker import run_worker as work

    work(Settings.from_env(), tuple(q.strip() for q in args.queues.split(",") if q.strip()), burst=args.burst)


def add_settings(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("settings", help="list every environment variable the backend reads, with defaults")


def run_settings(args: argparse.Namespace) -> None:
    from backend.settings import Settings

    current = Settings.from_env()
    for (env, default, doc), value in zip(Settings.documentation(), vars(current).values(), strict=True):
        print(f"{env} (default {default}; now {value})\n    {doc}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segmask", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train(sub)
    add_evaluate(sub)
    add_calibrate(sub)
    add_predict(sub)
    add_serve(sub)
    add_worker(sub)
    add_settings(sub)
    add_versions(sub)
    add_rescore(sub)
    return parser


COMMANDS = {
    "train": run_train,
    "evaluate": run_evaluate,
    "calibrate": run_calibrate,
    "predict": run_predict,
    "serve": run_serve,
    "worker": run_worker,
    "settings": run_settings,
    "versions": run_versions,
    "rollback": run_rollback,
    "rescore": run_rescore,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ensure_allocator_env(["-m", "backend.cli", *argv])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    COMMANDS[args.command](args)


if __name__ == "__main__":
    main()
