"""The ``diode`` command line: weights, detect, synthesize, distill, evaluate, show."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import statistics
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

logger = logging.getLogger("diode.cli")


# teacher / device helpers ----------------------------------------------------------------------

def _add_teacher_args(p: argparse.ArgumentParser, *, flag: str = "--teacher", required: bool = True) -> None:
    dest = flag.lstrip("-").replace("-", "_")
    p.add_argument(flag, dest=dest, metavar="SPEC",
                   help="the model: a registered name (see `diode weights list`, e.g. yolov3-tiny, yolov10n), "
                        "tv:BUILDER (torchvision, e.g. tv:ssdlite320_mobilenet_v3_large, with --weights and "
                        "--num-classes), yolov8:SPEC (e.g. yolov8:yolov8n with --weights), darknet:CFG, or an "
                        "Ultralytics checkpoint PATH.pt")
    p.add_argument("--cfg", help="darknet cfg (bundled name yolov3, yolov3-tiny, yolov3-spp, or a .cfg path) with "
                   "--weights; the same as " + flag + " darknet:CFG")
    p.add_argument("--weights", help="weights file for the model: darknet .weights, an Ultralytics .pt, or a "
                   f"state dict written by diode; with a registered {flag} NAME, a local copy of its file")
    p.add_argument("--num-classes", type=int, help="class count of a model built from an architecture spec")
    p.add_argument("--names", help="class names file, one per line (default: the model's, or COCO names for 80 "
                   "classes)")
    p.set_defaults(_teacher_flag=flag, _teacher_required=required)


def _model_spec(args: argparse.Namespace) -> str:
    """The spec string of the model flags (``--teacher``/``--model``, or ``--cfg``)."""
    name = getattr(args, args._teacher_flag.lstrip("-").replace("-", "_"))
    if name and args.cfg:
        raise SystemExit(f"error: give {args._teacher_flag} SPEC or --cfg CFG, not both")
    if name:
        return str(name)
    if args.cfg and args.weights:
        return f"darknet:{args.cfg}"
    raise SystemExit(f"error: give {args._teacher_flag} SPEC (e.g. yolov3-tiny), or --cfg CFG and --weights FILE")


def _load_teacher(args: argparse.Namespace, device: Any) -> Any:
    """A frozen adapter for the model flags (see :func:`diode.adapters.factory.create_adapter`)."""
    from diode.adapters.factory import create_adapter

    names = _read_names(args.names) if args.names else None
    return create_adapter(_model_spec(args), weights=args.weights, num_classes=args.num_classes, class_names=names,
                          device=device)


def _load_model(args: argparse.Namespace, device: Any) -> Any:
    """A model for evaluation: the same specs as a teacher (student weights via --weights student.pt)."""
    return _load_teacher(args, device)


def build_student(spec: str, *, teacher: Any, weights: str | None, device: Any) -> Any:
    """A trainable student with the teacher's classes: a registered name or an architecture spec.

    A bare darknet cfg name or path (``yolov3-tiny``, ``my.cfg``) is a ``darknet:`` spec here, as a
    student is built from scratch unless ``weights`` are given.
    """
    from diode import hub
    from diode.adapters.factory import create_adapter

    if spec in hub.REGISTRY and hub.get_entry(spec).format == "darknet" and weights is None:
        spec = f"darknet:{hub.get_entry(spec).arch}"
    elif ":" not in spec and spec not in hub.REGISTRY and Path(spec).suffix == ".cfg":
        spec = f"darknet:{spec}"
    student = create_adapter(spec, weights=weights, class_names=teacher.class_names, device=device, trainable=True)
    if student.num_classes != teacher.num_classes:
        raise SystemExit(f"error: the student {spec} has {student.num_classes} classes, the teacher "
                         f"{teacher.num_classes}")
    return student


def _read_names(path: str) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def _device(spec: str) -> Any:
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise SystemExit(f"error: --device {spec!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda requested but CUDA is not available; use --device cpu")
    return device


def _init_distributed(device_spec: str) -> tuple[Any, bool]:
    """Under torchrun: join the process group; the device becomes cuda:LOCAL_RANK (gloo on CPU)."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _device(device_spec), False
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_spec != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return (torch.device("cuda", local) if use_cuda else torch.device("cpu")), True


# subcommands ---------------------------------------------------------------------------------

def cmd_weights(args: argparse.Namespace) -> int:
    from diode import hub

    if args.action == "list":
        for entry in hub.REGISTRY.values():
            cached = (hub.cache_dir() / entry.file_name).exists()
            size = f"{entry.size:,} B" if entry.size else "size not pinned"
            print(f"{entry.name:12s} {entry.format}:{entry.arch:12s} {size:18s} "
                  f"{'cached' if cached else 'not cached'}  "
                  f"{entry.description}")
            print(f"{'':12s} sha256={entry.sha256 or '(pinned on first download)'}")
        print(f"cache: {hub.cache_dir()}  (set DIODE_HOME to move it)")
        return 0
    if not args.name:
        raise SystemExit("error: `diode weights fetch` needs a NAME (see `diode weights list`)")
    path = hub.fetch(args.name, path=args.path, force=args.force)
    print(f"{args.name}: {path} ({path.stat().st_size:,} bytes, sha256 {hub.sha256_file(path)})")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from diode.data.io import load_image, save_image
    from diode.viz import draw_detections

    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file; give a folder for the annotated images")
    paths = _image_paths(args.images)
    device = _device(args.device)
    teacher = _load_teacher(args, device)
    for image_path in paths:
        image = load_image(image_path)
        det = _detect(teacher, image.to(device), size=args.size, conf=args.conf, iou=args.iou)
        print(f"{image_path}: {len(det['scores'])} detections")
        rows = zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(), strict=True)
        for box, score, label in rows:
            x1, y1, x2, y2 = (round(v, 1) for v in box)
            print(f"  {teacher.class_names[label]:15s} {score:.3f}  [{x1}, {y1}, {x2}, {y2}]")
        if out is not None:
            target = out / image_path.name  # same name and format as the input (a JPEG stays a JPEG)
            save_image(target, draw_detections(image, det, class_names=teacher.class_names))
            print(f"  wrote {target}")
    return 0


def _image_paths(specs: Sequence[str]) -> list[Path]:
    """Image files from ``detect``'s arguments: files, folders (their images, sorted) and glob patterns."""
    import glob

    from diode.data.folder import IMAGE_EXTENSIONS

    paths: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise SystemExit(f"error: folder {path} has no images ({'/'.join(IMAGE_EXTENSIONS)})")
            paths += found
        elif path.is_file():
            paths.append(path)
        elif glob.has_magic(spec):
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not found:
                raise SystemExit(f"error: no files match {spec!r}")
            paths += found
        else:
            raise SystemExit(f"error: image {spec} does not exist")
    return paths


def _detect(teacher: Any, image: Any, *, size: int | None, conf: float, iou: float | None) -> dict[str, Any]:
    """Detections in one photograph of any size, boxes in the photograph's pixels, tensors on the CPU.

    An adapter with its own ``detect`` (the bundled YOLO families) preprocesses photos as its family
    does (input size, padding, NMS IoU); any other is letterboxed to ``size`` (default 416) for
    ``predict``. ``None`` takes the adapter's defaults."""
    from diode.adapters._common import detect_photo

    options = {k: v for k, v in (("size", size), ("iou", iou)) if v is not None}
    if callable(getattr(teacher, "detect", None)):
        det = teacher.detect(image, conf=conf, **options)
    else:
        det = detect_photo(lambda x: teacher.predict(x, conf=conf, iou=options.get("iou", 0.45))[0], image,
                           int(options.get("size", 416)))
    return {k: v.detach().cpu() for k, v in det.items()}


def _stages_from_args(args: argparse.Namespace) -> list[Any]:
    from diode.inversion.synthesizer import Stage, fast_stages

    if args.stages:
        return load_stages(args.stages)
    if args.recipe == "reference":
        return [Stage(args.resolution, args.iterations, lr=args.lr)]
    return fast_stages(args.iterations, args.resolution, lr=args.lr)


def load_stages(path: str | os.PathLike[str]) -> list[Any]:
    """Read a stages TOML file: ``[[stage]]`` tables with Stage fields, plus optional
    ``[stage.augment]`` (AugmentationPipeline options) and ``[stage.loss]`` (loss weights)."""
    from diode.inversion.augment import AugmentationPipeline
    from diode.inversion.synthesizer import Stage

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SystemExit(f"error: cannot read stages file {path}: {e}") from e
    tables = data.get("stage")
    if not isinstance(tables, list) or not tables:
        raise SystemExit(f"error: {path} has no [[stage]] tables")
    stages = []
    for i, table in enumerate(tables):
        table = dict(table)
        augment = table.pop("augment", None)
        if "betas" in table:
            table["betas"] = tuple(table["betas"])
        try:
            stages.append(Stage(**table, augment=AugmentationPipeline(**augment) if augment is not None else None))
        except (TypeError, ValueError) as e:
            raise SystemExit(f"error: {path}, stage {i + 1}: {e}") from e
    return stages


def _sampler_from_args(spec: str, num_classes: int, class_prior: Any = None) -> Any:
    from diode.inversion.sampler import BBoxSampler

    if "+" in spec:  # a mixture, equal weights: onebox+tiles
        return BBoxSampler.mixture([_sampler_from_args(part, num_classes, class_prior) for part in spec.split("+")])
    kind, _, arg = spec.partition(":")
    try:
        if spec == "onebox":
            return BBoxSampler.onebox(num_classes=num_classes, class_prior=class_prior)
        if kind == "tiles":
            return BBoxSampler.tiles(num_classes=num_classes, k=int(arg) if arg else 4, class_prior=class_prior)
        if kind == "multibox":
            low, _, high = arg.partition("-") if arg else ("1", "", "4")
            k = (int(low), int(high or low))
            return BBoxSampler.multibox(num_classes=num_classes, k=k, class_prior=class_prior)
        if kind == "labels" and arg:
            return BBoxSampler.from_labels(arg, num_classes=num_classes, class_prior=class_prior)
        if kind == "stats" and arg:
            return BBoxSampler.from_statistics(arg, num_classes=num_classes, class_prior=class_prior)
    except ValueError as e:
        raise SystemExit(f"error: --sampler {spec}: {e}") from e
    raise SystemExit(f"error: --sampler must be onebox, tiles[:K], multibox[:LOW-HIGH], labels:PATH or "
                     f"stats:PATH, or several joined by + (a mixture), got {spec!r}")


def _class_prior_from_args(spec: str | None, teacher: Any) -> Any:
    """``None`` (uniform), or the teacher's own prior: ``teacher`` or ``teacher:T`` (temperature T)."""
    if not spec:
        return None
    from diode.inversion.prior import estimate_class_prior

    kind, _, temperature = spec.partition(":")
    if kind != "teacher":
        raise SystemExit(f"error: --class-prior must be teacher or teacher:T, got {spec!r}")
    try:
        return estimate_class_prior(teacher, temperature=float(temperature) if temperature else 1.0)
    except ValueError as e:
        raise SystemExit(f"error: --class-prior {spec}: {e}") from e


def cmd_synthesize(args: argparse.Namespace) -> int:
    from diode.inversion.job import synthesize_dataset
    from diode.inversion.loss import DeepInversionLoss
    from diode.inversion.sampler import FPSampling
    from diode.inversion.synthesizer import Synthesizer

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file; give a folder for the run")
    for flag in ("num_images", "batch_size", "log_every"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"error: --{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    stages = _stages_from_args(args)
    device, distributed = _init_distributed(args.device)
    teacher = _load_teacher(args, device)
    fp = FPSampling(warmup=args.fp_warmup, every=args.fp_every) if args.fp_sampling else None
    synth = Synthesizer(teacher, loss=DeepInversionLoss(teacher), stages=stages, fp_sampling=fp,
                        log_every=args.log_every, amp=args.amp, compile=args.compile)
    sampler = _sampler_from_args(args.sampler, teacher.num_classes, _class_prior_from_args(args.class_prior, teacher))
    try:
        manifest = synthesize_dataset(synth, sampler, out, num_images=args.num_images, batch_size=args.batch_size,
                                      seed=args.seed, progress=False if args.quiet else None)
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    if not manifest:
        return 0
    lines = _synthesis_summary(manifest, teacher, out, batch_size=args.batch_size)
    for line in lines:
        print(line)
    _append_log(out, lines)
    return 0


def _synthesis_summary(manifest: dict[str, Any], teacher: Any, out: Path, *, batch_size: int) -> list[str]:
    """The closing lines of ``diode synthesize``: what was written and its two quality numbers, labelled."""
    done = [b for b in manifest["batches"].values() if b["status"] == "done"]
    maps = [b["metrics"]["inversion_map50"] for b in done if b["metrics"].get("inversion_map50") is not None]
    spi = [b["metrics"]["seconds_per_iteration"] for b in done]
    images = sum(len(b["images"]) for b in done)
    lines = [f"wrote {images} images to {out} ({manifest['status']}); preview: {out / 'preview.png'}, "
             f"loss curves: {out / 'loss.png'}"]
    try:
        from diode.eval import evaluate

        score = evaluate(teacher, out, batch_size=batch_size)
        lines.append(f"teacher mAP50 {score['map50']:.3f}, mAP50:95 {score['map']:.3f} on the {images} saved images "
                     f"(what `diode evaluate` reports on {out}: conf 0.001, NMS IoU 0.6, all images at once)")
    except ImportError as e:
        lines.append(f"teacher mAP on the saved images: skipped ({e})")
    if maps:
        ev = manifest["config"].get("synthesizer", {}).get("eval", {})
        lines.append(f"inversion mAP50 during synthesis: mean {statistics.mean(maps):.3f} over {len(maps)} batches "
                     f"(min {min(maps):.3f}, max {max(maps):.3f}; per batch, before saving as 8-bit PNG, "
                     f"conf {ev.get('conf', '?')}, NMS IoU {ev.get('iou', '?')})")
    if spi:
        lines.append(f"seconds per iteration: {statistics.median(spi):.4f} (median over {len(spi)} batches)")
    return lines


def _append_log(root: Path, lines: Sequence[str]) -> None:
    """Append lines the command printed to the run folder's ``log.txt``."""
    from diode.data.records import RunRecords

    records = RunRecords(root, keep=lambda row: True)
    for line in lines:
        records.log(line)


def cmd_show(args: argparse.Namespace) -> int:
    from diode.data.folder import DetectionFolder
    from diode.viz import save_contact_sheet, target_caption

    if args.num < 1:
        raise SystemExit(f"error: --num must be >= 1, got {args.num}")
    data = DetectionFolder(args.data, image_size=(args.size, args.size) if args.size else None)
    device = _device(args.device) if args.detections else None
    teacher = _load_teacher(args, device) if args.detections else None
    n = min(args.num, len(data))
    items = [data[i] for i in range(n)]
    names = _read_names(args.names) if args.names else _dataset_names(Path(args.data), data)
    if teacher is not None:
        names = names or list(teacher.class_names)
    out = Path(args.out) if args.out else Path(args.data) / "contact_sheet.png"
    images, targets, captions = [], [], []
    for image, target, _ in items:
        images.append(image)
        targets.append(target)
        captions.append(("labels: " if teacher is not None else "") + target_caption(target, names))
        if teacher is not None:
            det = teacher.predict(image[None].to(device), conf=args.conf, iou=args.iou)[0]
            det = {k: v.detach().cpu() for k, v in det.items()}
            images.append(image)
            targets.append(det)
            captions.append("teacher: " + target_caption(det, names))
    per_row = math.ceil(n**0.5) * (2 if teacher is not None else 1)
    save_contact_sheet(out, images, targets, class_names=names, captions=captions, nrow=per_row)
    what = ", each next to the teacher's detections" if teacher is not None else ""
    print(f"wrote {out} ({n} images{what})")
    return 0


def _dataset_names(root: Path, data: Any) -> list[str] | None:
    import json

    if getattr(data, "class_names", None):
        return list(data.class_names)
    manifest = root / "manifest.json"
    if manifest.exists():
        return json.loads(manifest.read_text()).get("class_names")
    if (root / "classes.txt").exists():
        return _read_names(str(root / "classes.txt"))
    return None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from diode.eval import evaluate

    device = _device(args.device)
    model = _load_model(args, device)
    size = (args.size, args.size) if args.size else None
    result = evaluate(model, args.data, batch_size=args.batch_size, image_size=size, conf=args.conf,
                      iou=args.iou)
    classes = _per_class_rows(result, model.class_names)
    print(f"mAP50 {result['map50']:.4f}  mAP50:95 {result['map']:.4f}  mAP75 {result['map75']:.4f}  "
          f"({len(classes)} classes with labels)")
    if classes:
        width = max(15, *(len(c["name"]) for c in classes))
        print(f"  {'class':{width}s}  {'AP50':>6s}  {'AP50:95':>7s}   (sorted by AP50)")
        for c in classes:
            print(f"  {c['name']:{width}s}  {c['ap50']:6.4f}  {c['ap50_95']:7.4f}")
    if args.json:
        from diode.data.io import atomic_write_json

        atomic_write_json(args.json, {"map50": result["map50"], "map": result["map"], "map75": result["map75"],
                                      "per_class": {str(k): v for k, v in result["per_class"].items()},
                                      "classes": classes})
    return 0


def _per_class_rows(result: dict[str, Any], names: Sequence[str]) -> list[dict[str, Any]]:
    """Per-class AP50 and AP50:95 with class names, best AP50 first (ties by name)."""
    rows = [{"id": int(c), "name": str(names[int(c)]) if int(c) < len(names) else str(c),
             "ap50": float(result["per_class_ap50"][c]), "ap50_95": float(ap)}
            for c, ap in result["per_class"].items()]
    return sorted(rows, key=lambda r: (-r["ap50"], r["name"]))


def cmd_distill(args: argparse.Namespace) -> int:
    import torch

    from diode._interrupt import RunInterrupted
    from diode.distill import Distiller
    from diode.eval import evaluate
    from diode.models.yolo import Darknet, save_darknet_weights

    device, distributed = _init_distributed(args.device)
    primary = not distributed or torch.distributed.get_rank() == 0
    out = Path(args.out)
    try:
        teacher = _load_teacher(args, device)
        student = build_student(args.student, teacher=teacher, weights=args.student_weights, device=device)
        size = (args.image_size, args.image_size)
        eval_fn = (lambda model, epoch: evaluate(model, args.eval_data, image_size=size)) if args.eval_data else None
        distiller = Distiller(teacher, student, mode=args.mode, epochs=args.epochs, batch_size=args.batch_size,
                              image_size=args.image_size, lr=args.lr, seed=args.seed, amp=args.amp, conf=args.conf,
                              score_sampling=args.score_sampling, mosaic=args.mosaic,
                              hsv=tuple(args.hsv) if args.hsv is not None else None,
                              augment=not args.no_augment, num_workers=args.workers, log_every=args.log_every)
        # Interrupted (Ctrl-C, SIGTERM), fit raises the one-line RunInterrupted after the last saved epoch.
        history = distiller.fit(args.data, out=out, eval_fn=eval_fn, progress=False if args.quiet else None)
    except RunInterrupted as e:
        if primary:
            raise
        return e.exit_code  # rank 0 alone says how far the job got
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    if not primary:
        return 0
    final = distiller.student_for_eval()
    summary = [f"distilled {args.student} ({args.mode}) for {len(history)} epochs: final loss "
               f"{history[-1]['loss']:.4f}" if history else f"distilled {args.student}: nothing to do"]
    if history and history[-1].get("eval"):
        scores = history[-1]["eval"]
        summary.append(f"eval on {args.eval_data}: mAP50 {scores['map50']:.4f}  mAP50:95 {scores['map']:.4f}")
    weights = f"student weights: {out / 'student.pt'} (state dict)"
    if isinstance(final.model, Darknet):
        save_darknet_weights(final.model, out / "student.weights")
        weights += f", {out / 'student.weights'} (darknet)"
    summary.append(weights)
    with (out / "log.txt").open("a", encoding="utf-8") as log:
        log.write("".join(line + "\n" for line in summary))
    print("\n".join(summary))
    return 0


# parser ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``diode`` command."""
    from diode import __version__

    parser = _Parser(prog="diode", description="Data-free knowledge distillation for object detection: synthesize "
                     "a dataset from a detector, distill a student. Input errors print one line `error: ...` and "
                     "exit with status 2; Ctrl-C / SIGTERM stop a job with one line and status 130 / 143.")
    parser.add_argument("--version", action="version", version=f"diode {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging: -v debug lines of diode, -vv of every library")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("weights", help="list or fetch pretrained weights")
    p.add_argument("action", choices=["list", "fetch"])
    p.add_argument("name", nargs="?", help="registered name (for fetch)")
    p.add_argument("--path", help="use this local file instead of downloading (verified by sha256)")
    p.add_argument("--force", action="store_true", help="download again even if cached")
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser("detect", help="run a detector on images, print and draw detections")
    _add_teacher_args(p)
    p.add_argument("images", nargs="+", help="image files, folders of images, or glob patterns ('photos/*.jpg')")
    p.add_argument("--out", help="folder for the annotated images (same file names and formats as the inputs)")
    p.add_argument("--conf", type=float, default=0.25, help="score threshold (default 0.25)")
    p.add_argument("--iou", type=float, help="NMS IoU threshold (default: the model family's, 0.45 for darknet "
                   "YOLO, 0.7 for the anchor-free YOLO family)")
    p.add_argument("--size", type=int, help="network input size (default: the model family's, 416 for darknet "
                   "YOLO, 640 for the anchor-free YOLO family)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("synthesize", help="synthesize a labelled dataset from a teacher (DIODE)")
    _add_teacher_args(p)
    p.add_argument("--out", required=True, help="run folder (re-running the same command resumes)")
    p.add_argument("--num-images", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--recipe", choices=["fast", "reference"], default="fast",
                   help="fast (default): coarse-to-fine within --iterations, the first half at half --resolution "
                        "and --lr, the rest at --resolution with a lower rate, task weight x8 (diode.fast_stages); "
                        "reference: one stage at --resolution and --lr with the reference recipe's weights (its "
                        "stage 1; the whole recipe is --stages examples/reference_recipe.toml)")
    p.add_argument("--resolution", type=int, default=160, help="final resolution (default 160)")
    p.add_argument("--iterations", type=int, default=2500, help="iterations in all (default 2500)")
    p.add_argument("--lr", type=float, default=0.2, help="learning rate of the first stage (default 0.2)")
    p.add_argument("--stages", help="TOML file with [[stage]] tables (overrides --recipe and the three options "
                   "above)")
    p.add_argument("--sampler", default="onebox",
                   help="box layouts: onebox (default), tiles[:K] (K boxes on a grid), multibox[:LOW-HIGH] "
                        "(random non-overlapping boxes, 1-4 by default), labels:PATH (a YOLO labels folder or a "
                        "run manifest), stats:PATH (new layouts drawn from a label set's box statistics); several "
                        "joined by + draw each image's layout from one of them (e.g. onebox+tiles)")
    p.add_argument("--class-prior", metavar="teacher[:T]",
                   help="sample classes from the teacher's own prior (estimated from neutral images, temperature "
                        "T, default 1) instead of uniformly")
    p.add_argument("--fp-sampling", action="store_true", help="add teacher false positives as targets")
    p.add_argument("--fp-warmup", type=int, default=800, help="first iteration of FP sampling (default 800)")
    p.add_argument("--fp-every", type=int, default=100, help="iterations between FP updates (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--amp", action="store_true", help="bf16/fp16 autocast (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the teacher")
    p.add_argument("--log-every", type=int, default=100, metavar="N",
                   help="every N iterations: a progress line (terminal and log.txt), a metrics.csv row and a "
                        "progress bar update; also the only host syncs of the loop (default 100)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no progress lines (log.txt still gets them); the summary stays")
    p.set_defaults(func=cmd_synthesize)

    from diode.distill import DistillConfig

    distill_defaults = DistillConfig()
    p = sub.add_parser("distill", help="train a student on images with the teacher as the only supervisor",
                       description="Train a student on unlabelled images with the teacher as the only supervisor. "
                       "Progress: a bar with ETA on a terminal, plain lines every --log-every steps; OUT gets "
                       "last.pt (resumable), student.pt, log.txt, metrics.csv and loss.png. Ctrl-C or SIGTERM stop "
                       "after the last finished epoch; re-running the same command resumes. Under `torchrun "
                       "--nproc_per_node N -m diode distill ...` the N processes share each batch (DDP).")
    _add_teacher_args(p)
    p.add_argument("--student", required=True, help="the student: an architecture spec or registered name as for "
                   "--teacher (a darknet cfg name or .cfg path builds it from scratch), with the teacher's classes")
    p.add_argument("--student-weights", help="initialise the student from these weights")
    p.add_argument("--data", required=True, help="image folder (e.g. a synthesis run folder)")
    p.add_argument("--out", required=True, help="run folder: last.pt (resumable), student.pt, log.txt, "
                   "metrics.csv, loss.png (and student.weights for a darknet student)")
    p.add_argument("--mode", choices=["outputs", "pseudo_labels", "hybrid"], default=distill_defaults.mode,
                   help="outputs: MSE on raw outputs (same head layout); pseudo_labels: the teacher's detections "
                        "train the student's own loss (any student with the teacher's classes); hybrid: both "
                        f"(default {distill_defaults.mode})")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16, help="images per step, over all processes together "
                   "under torchrun (default 16)")
    p.add_argument("--image-size", type=int, default=160, help="training resolution, a multiple of both models' "
                   "size divisor (default 160)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--conf", type=float, default=distill_defaults.conf,
                   help=f"score threshold of the pseudo labels (default {distill_defaults.conf})")
    p.add_argument("--score-sampling", action=argparse.BooleanOptionalAction, default=distill_defaults.score_sampling,
                   help="keep each pseudo label with probability equal to its score (soft targets)")
    p.add_argument("--mosaic", type=float, default=distill_defaults.mosaic,
                   help=f"probability of a 2x2 mosaic per image (default {distill_defaults.mosaic})")
    pseudo_hsv = " ".join(map(str, DistillConfig(mode="pseudo_labels").colour_gains))
    p.add_argument("--hsv", type=float, nargs=3, metavar=("H", "S", "V"),
                   help=f"colour jitter gains: hue turn, saturation and value factors (default {pseudo_hsv} for "
                        "pseudo_labels and hybrid, off for outputs; 0 0 0: off)")
    p.add_argument("--no-augment", action="store_true", help="no flip, crop and brightness/contrast jitter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-data", help="labelled folder evaluated after every epoch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--workers", type=int, default=0, help="image loading processes (default 0)")
    p.add_argument("--log-every", type=int, default=distill_defaults.log_every,
                   help=f"print a progress line every this many steps (default {distill_defaults.log_every})")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no progress lines")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("evaluate", help="COCO mAP of a model on a labelled folder")
    _add_teacher_args(p, flag="--model")
    p.add_argument("--data", required=True, help="folder with images/ and labels/ (YOLO) or annotations.json")
    p.add_argument("--size", type=int, default=0,
                   help="resize images to SIZE x SIZE (default 0: keep their size, as synthesized; "
                        "e.g. 416 for photographs)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--conf", type=float, default=0.001)
    p.add_argument("--iou", type=float, default=0.6)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the results to this JSON file (map50, map, map75, per-class AP50 "
                   "and AP50:95 with names)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("show", help="contact sheet of a dataset folder with its labels")
    p.add_argument("data", help="dataset folder (a run folder, images/+labels/, or images)")
    p.add_argument("--out", help="PNG to write (default DATA/contact_sheet.png)")
    p.add_argument("--num", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--size", type=int, default=0, help="resize images to SIZE x SIZE (default 0: keep; images of "
                   "different sizes are fitted into the largest cell)")
    p.add_argument("--detections", action="store_true",
                   help="show each image twice: its labels, then the detections of the model given with --teacher "
                        "(or --cfg/--weights)")
    _add_teacher_args(p, required=False)
    p.add_argument("--conf", type=float, default=0.25, help="score threshold of --detections (default 0.25)")
    p.add_argument("--iou", type=float, default=0.45, help="NMS IoU threshold of --detections (default 0.45)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (for --detections)")
    p.set_defaults(func=cmd_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diode`` command; returns the exit status.

    0: done; 2: an input error, printed as one line ``error: ...``; 130 / 143: stopped by
    SIGINT / SIGTERM, printed as one line (a synthesis or distillation job saves its state first).
    """
    from diode._interrupt import RunInterrupted, signal_number, sigterm_as_interrupt

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or an input error argparse already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        with _cli_logging(args.verbose, quiet=getattr(args, "quiet", False)), sigterm_as_interrupt():
            return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        print(str(e) if isinstance(e, RunInterrupted) else "interrupted", file=sys.stderr)
        return 128 + signal_number(e)
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        print(e.code if e.code.startswith("error: ") else f"error: {e.code}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line, ``error: ...`` with where to read more, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


class _LineFormatter(logging.Formatter):
    """Plain lines for people: INFO as is, other levels prefixed (``warning: ...``, ``debug diode.x: ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno == logging.INFO:
            return message
        if record.levelno < logging.INFO:
            return f"debug {record.name}: {message}"
        return f"{record.levelname.lower()}: {message}"


@contextlib.contextmanager
def _cli_logging(verbose: int, *, quiet: bool) -> Iterator[None]:
    """Meanwhile, ``diode.*`` loggers print plain lines on stderr: progress and downloads (INFO) by
    default, warnings only with ``--quiet``, debug lines with ``-v``; other libraries print warnings
    (everything with ``-vv``). The previous logging setup is restored afterwards."""
    package, root = logging.getLogger("diode"), logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter())
    other = logging.StreamHandler(sys.stderr)
    other.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved = (package.level, package.propagate, root.level)
    package.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    package.propagate = False
    package.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    root.addHandler(other)
    try:
        yield
    finally:
        package.removeHandler(handler)
        root.removeHandler(other)
        package.setLevel(saved[0])
        package.propagate = saved[1]
        root.setLevel(saved[2])


if __name__ == "__main__":
    sys.exit(main())
