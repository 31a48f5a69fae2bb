"""COCO-style detection mAP, model evaluation on a labelled folder, and teacher agreement.

The numbers come from the COCO evaluation protocol (101-point interpolated AP,
IoU thresholds 0.50:0.05:0.95, at most 100 detections per image, area range
"all") computed by ``faster-coco-eval`` or, as a fallback, ``pycocotools``
(``pip install "diode[eval]"``). Both are fed the same in-memory structures, so
they agree to floating-point precision.

Conventions of :func:`detection_map`:

- no predictions at all, or no ground-truth boxes at all, gives 0 for every
  metric (COCO's own answer for the latter is -1, "undefined");
- like COCO, a class without ground-truth boxes is left out of the mean (its
  false positives cost nothing) and does not appear in ``"per_class"``.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diode._boxes import Target, detections_as_targets
from diode._utils import device_of
from diode.adapters._common import module_mode
from diode.adapters.base import DetectorAdapter
from diode.data.folder import DetectionFolder
from diode.data.io import PathLike
from diode.data.labels import coco_dict

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "faster_coco_eval", "pycocotools")
_INSTALL_HINT = 'pip install "diode[eval]"'


def _zero_result(classes: Sequence[int]) -> dict[str, Any]:
    return {"map": 0.0, "map50": 0.0, "map75": 0.0, "per_class": {c: 0.0 for c in classes},
            "per_class_ap50": {c: 0.0 for c in classes}}


@contextlib.contextmanager
def _quiet_backend() -> Iterator[None]:
    """Silence the COCO backends meanwhile: pycocotools prints its tables, faster-coco-eval logs them at INFO."""
    backend_logger = logging.getLogger("faster_coco_eval")
    level = backend_logger.level
    backend_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        backend_logger.setLevel(level)


def _check_predictions(predictions: Sequence[Target]) -> None:
    for i, p in enumerate(predictions):
        if not isinstance(p, dict) or not {"boxes", "scores", "labels"} <= p.keys():
            raise ValueError(f"predictions[{i}] must be a dict with 'boxes', 'scores' and 'labels'")
        n = p["boxes"].shape[0]
        if p["boxes"].shape != (n, 4) or p["scores"].shape != (n,) or p["labels"].shape != (n,):
            raise ValueError(
                f"predictions[{i}] must hold boxes [N, 4], scores [N] and labels [N], got "
                f"{tuple(p['boxes'].shape)}, {tuple(p['scores'].shape)}, "
                f"{tuple(p['labels'].shape)}"
            )


def _check_labels(predictions: Sequence[Target], num_classes: int) -> None:
    for i, p in enumerate(predictions):
        labels = p["labels"]
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"predictions[{i}]['labels'] must be integer class ids, got {labels.dtype}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"predictions[{i}] has class ids outside [0, {num_classes}); "
                "pass the right num_classes"
            )


def _coco_results(predictions: Sequence[Target]) -> list[dict[str, Any]]:
    """Detections as a COCO result list (image ids ``1..N``, category ids ``label + 1``)."""
    results: list[dict[str, Any]] = []
    for image_id, p in enumerate(predictions, start=1):
        b = p["boxes"].detach().to("cpu", torch.float64)
        for (x1, y1, x2, y2), score, label in zip(
            b.tolist(), p["scores"].tolist(), p["labels"].tolist(), strict=True
        ):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    return results


def _run_cocoeval(
    backend: str, gt: dict[str, Any], dt: list[dict[str, Any]]
) -> tuple[np.ndarray, np.ndarray]:
    """Run COCO bbox evaluation; return ``(stats [12], precision [T, R, K, A, M])``."""
    order = ("faster_coco_eval", "pycocotools") if backend == "auto" else (backend,)
    for name in order:
        try:
            if name == "faster_coco_eval":
                from faster_coco_eval import COCO
                from faster_coco_eval import COCOeval_faster as COCOeval
            else:
                from pycocotools.coco import COCO
                from pycocotools.cocoeval import COCOeval
        except ImportError:
            continue
        with _quiet_backend():
            coco_gt = COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(dt), iouType="bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return np.asarray(evaluator.stats), np.asarray(evaluator.eval["precision"])
    raise ImportError(
        f"detection mAP needs faster-coco-eval or pycocotools (tried {', '.join(order)}): "
        f"{_INSTALL_HINT}"
    )


def detection_map(
    predictions: Sequence[Target],
    targets: Sequence[Target],
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    backend: str = "auto",
) -> dict[str, Any]:
    """COCO-style mAP of ``predictions`` against ``targets``.

    Args:
        predictions: one dict per image: ``"boxes"`` float ``[N, 4]`` xyxy pixels,
            ``"scores"`` ``[N]``, ``"labels"`` int ``[N]``.
        targets: one dict per image: ``"boxes"`` ``[M, 4]`` xyxy pixels, ``"labels"`` ``[M]``.
        num_classes: number of classes; defaults to ``len(class_names)`` or to the
            largest label seen plus one.
        class_names: optional names; only used to infer ``num_classes``.
        backend: ``"auto"`` (faster-coco-eval, else pycocotools),
            ``"faster_coco_eval"`` or ``"pycocotools"``.

    Returns:
        ``{"map": AP@[.50:.95], "map50": AP@.50, "map75": AP@.75,
        "per_class": {label: AP@[.50:.95]}, "per_class_ap50": {label: AP@.50}}``
        as Python floats in ``[0, 1]``; the per-class dicts list the classes that
        have ground-truth boxes.

    Raises:
        ImportError: neither backend is installed (``pip install "diode[eval]"``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if len(predictions) != len(targets):
        raise ValueError(
            f"predictions has {len(predictions)} entries but targets has {len(targets)}; "
            "give one dict per image to both"
        )
    _check_predictions(predictions)
    if num_classes is None and class_names is not None:
        num_classes = len(class_names)
    if num_classes is None:
        seen = [int(t["labels"].max()) for t in (*targets, *predictions) if t["labels"].numel()]
        num_classes = max(seen, default=-1) + 1
    _check_labels(predictions, num_classes)
    # Image sizes do not matter to bbox evaluation; annotation ids start at 1, which
    # COCOeval needs (it reads a matched id of 0 as "unmatched").
    gt = coco_dict(
        [(str(i), 0, 0) for i in range(len(targets))], targets, [str(c) for c in range(num_classes)]
    )
    dt = _coco_results(predictions)
    gt_classes = sorted({a["category_id"] - 1 for a in gt["annotations"]})
    if not dt or not gt_classes:
        return _zero_result(gt_classes)
    stats, precision = _run_cocoeval(backend, gt, dt)
    result = _zero_result(gt_classes)
    result.update(
        map=max(float(stats[0]), 0.0),
        map50=max(float(stats[1]), 0.0),
        map75=max(float(stats[2]), 0.0),
    )
    for c in gt_classes:
        # precision[T, R, K, A, M]: all IoU thresholds and recall points, area "all", 100 dets.
        p = precision[:, :, c, 0, -1]
        p = p[p > -1]
        result["per_class"][c] = float(p.mean()) if p.size else 0.0
        p50 = precision[0, :, c, 0, -1]  # IoU threshold 0.50 is the first of the ten
        p50 = p50[p50 > -1]
        result["per_class_ap50"][c] = float(p50.mean()) if p50.size else 0.0
    return result


def _batches(
    data: Tensor | PathLike | DetectionFolder, batch_size: int, image_size: tuple[int, int] | None
) -> Iterator[tuple[list[Tensor], list[Target]]]:
    """Yield ``(images [3, H, W] each, targets)`` chunks of at most ``batch_size`` images."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(data, Tensor):
        if image_size is not None:
            raise ValueError(
                "image_size applies only when data is a folder path; resize the tensor yourself"
            )
        images = data[None] if data.ndim == 3 else data
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be a float tensor [B, 3, H, W] in [0, 1], got {tuple(data.shape)}"
            )
        for start in range(0, images.shape[0], batch_size):
            chunk = list(images[start : start + batch_size])
            yield chunk, [{} for _ in chunk]
        return
    if isinstance(data, DetectionFolder):
        if image_size is not None:
            raise ValueError(
                "image_size applies only when data is a folder path; "
                "give it to DetectionFolder instead"
            )
        folder = data
    else:
        folder = DetectionFolder(data, image_size=image_size)
    for start in range(0, len(folder), batch_size):
        items = [folder[i] for i in range(start, min(start + batch_size, len(folder)))]
        yield [item[0] for item in items], [item[1] for item in items]


def _predict(
    adapter: DetectorAdapter,
    images: list[Tensor],
    *,
    conf: float,
    iou: float,
    device: torch.device | str | None,
) -> list[Target]:
    """Run ``adapter.predict`` on images grouped by size; predictions come back on the CPU."""
    device = device_of(adapter) if device is None else torch.device(device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(k)
    out: list[Target] = [{} for _ in images]
    for idx in groups.values():
        batch = torch.stack([images[k] for k in idx]).to(device)
        for k, p in zip(idx, adapter.predict(batch, conf=conf, iou=iou), strict=True):
            out[k] = {key: v.detach().cpu() for key, v in p.items()}
    return out


@contextlib.contextmanager
def _eval_mode(*adapters: DetectorAdapter) -> Iterator[None]:
    """The adapters' models in eval mode under inference mode; each module's own mode restored after."""
    with contextlib.ExitStack() as stack:
        for a in adapters:
            stack.enter_context(module_mode(a.model, False))
        with torch.inference_mode():
            yield


def evaluate(
    adapter: DetectorAdapter,
    data: PathLike | DetectionFolder,
    *,
    batch_size: int = 8,
    image_size: tuple[int, int] | None = None,
    conf: float = 0.001,
    iou: float = 0.6,
    device: torch.device | str | None = None,
    backend: str = "auto",
) -> dict[str, Any]:
    """COCO mAP of ``adapter`` on a labelled image folder.

    Args:
        adapter: the detector; its model is put in eval mode for the run and restored after.
        data: a labelled folder (see :class:`~diode.data.folder.DetectionFolder`) or one.
        batch_size: images per ``adapter.predict`` call.
        image_size: ``(height, width)`` to resize images (and boxes) to when ``data`` is a path.
        conf: score threshold of the predictions (low, as usual for mAP).
        iou: NMS IoU threshold of the predictions.
        device: where images go; defaults to the device of the adapter's parameters.
        backend: see :func:`detection_map`.

    Returns:
        :func:`detection_map` of the predictions against the folder's labels.
    """
    folder = (
        data if isinstance(data, DetectionFolder) else DetectionFolder(data, image_size=image_size)
    )
    if not folder.labelled:
        raise ValueError(
            f"data {folder.root} has no labels (labels/ or annotations.json); "
            "use diode.eval.agreement to compare against a teacher instead"
        )
    predictions: list[Target] = []
    targets: list[Target] = []
    with _eval_mode(adapter):
        for images, batch_targets in _batches(folder, batch_size, None):
            predictions += _predict(adapter, images, conf=conf, iou=iou, device=device)
            targets += batch_targets
    result = detection_map(predictions, targets, num_classes=adapter.num_classes, backend=backend)
    logger.debug(
        "evaluated %d images: mAP %.4f, mAP50 %.4f", len(targets), result["map"], result["map50"]
    )
    return result


def agreement(
    student: DetectorAdapter,
    teacher: DetectorAdapter,
    images: Tensor | PathLike | DetectionFolder,
    *,
    conf: float = 0.25,
    iou: float = 0.45,
    student_conf: float = 0.001,
    student_iou: float = 0.6,
    batch_size: int = 8,
    image_size: tuple[int, int] | None = None,
    backend: str = "auto",
) -> dict[str, Any]:
    """COCO mAP of the student's detections against the teacher's, for unlabelled images.

    Args:
        student: the detector being scored.
        teacher: the detector whose detections (score > ``conf`` after NMS at ``iou``)
            serve as ground truth.
        images: float ``[B, 3, H, W]`` (or ``[3, H, W]``) RGB in ``[0, 1]``, an image
            folder path or a :class:`~diode.data.folder.DetectionFolder` (labels ignored).
        conf: the teacher's score threshold.
        iou: the teacher's NMS IoU threshold.
        student_conf: the student's score threshold (low, as usual for mAP).
        student_iou: the student's NMS IoU threshold.
        batch_size: images per ``predict`` call; each model gets them on its own device.
        image_size: ``(height, width)`` to resize to when ``images`` is a path.
        backend: see :func:`detection_map`.

    Returns:
        :func:`detection_map` of the student against the teacher.
    """
    if student.num_classes != teacher.num_classes:
        raise ValueError(
            f"student has {student.num_classes} classes but teacher has "
            f"{teacher.num_classes}; agreement needs the same classes"
        )
    student_preds: list[Target] = []
    teacher_preds: list[Target] = []
    with _eval_mode(student, teacher):
        for batch, _ in _batches(images, batch_size, image_size):
            teacher_preds += _predict(teacher, batch, conf=conf, iou=iou, device=None)
            student_preds += _predict(
                student, batch, conf=student_conf, iou=student_iou, device=None
            )
    teacher_targets = detections_as_targets(teacher_preds)
    return detection_map(
        student_preds, teacher_targets, num_classes=teacher.num_classes, backend=backend
    )
