"""A synthesis run folder on disk: resumable, atomic, one record per finished batch.

Layout::

    root/manifest.json        teacher, full config, seed, per-batch status and metrics
    root/images/000000.png    lossless images, numbered globally
    root/labels/000000.txt    YOLO labels (class cx cy w h, normalized)
    root/batches/000003.json  the commit record of batch 3 (written last)
    root/annotations.json     COCO annotations of every finished image
    root/preview.png          contact sheet of the first images with their boxes and classes
    root/log.txt              the job's progress lines (appended to by every run)
    root/metrics.csv          one row per logging point of every finished batch
    root/loss.png             each loss term against the iteration, mean over finished batches

Every file is written to a temporary name and renamed into place, and a batch
counts as finished only once its record exists, so a run killed at any moment
leaves either a finished batch or nothing of it (stale temporary files are
removed when the folder is opened again). :meth:`RunFolder.finalize` rewrites
``annotations.json``, ``preview.png``, ``metrics.csv``, ``loss.png`` and the
manifest from the batch records alone, so they always describe exactly the
finished batches, whichever process or run wrote them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from diode._boxes import Target
from diode.data.io import PathLike, atomic_write_json, save_image
from diode.data.labels import read_yolo_labels, write_coco, write_yolo_labels
from diode.data.records import RunRecords, plot_curves

logger = logging.getLogger(__name__)

#: Columns of a batch's history that are positions, not loss values.
_POSITION_KEYS = ("batch", "stage", "iteration", "step", "lr")

#: Config keys that may change between runs into the same folder without
#: invalidating finished batches (batch i depends only on the seed and i).
RESUMABLE_KEYS = frozenset({"num_images"})


class RunFolder:
    """Storage of one synthesis job.

    Args:
        root: the run folder (created if missing).
        config: the job's full configuration (JSON-serializable); a folder that
            already holds a run with a different config is refused.
        class_names: the teacher's class names, for the COCO file and previews.
        primary: the process that owns the folder (cleans stale temporary files and
            writes the manifest); other ranks of a distributed job pass ``False``
            and only write their batches.

    Raises:
        OSError: the folder cannot be created or written.
        ValueError: the folder holds a run with a different configuration.
    """

    def __init__(self, root: PathLike, *, config: dict[str, Any], class_names: Sequence[str],
                 primary: bool = True) -> None:
        self.root = Path(root)
        self.class_names = list(class_names)
        self.config = json.loads(json.dumps(config))
        if self.root.exists() and not self.root.is_dir():
            raise OSError(f"output folder {self.root} is not writable: it is a file")
        for sub in ("images", "labels", "batches"):
            try:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OSError(f"output folder {self.root} is not writable: {e}") from e
        if primary:
            self._remove_stale_temporaries()
        manifest = self.root / "manifest.json"
        if manifest.exists():
            self._check_same_config(json.loads(manifest.read_text())["config"])
        self.records = RunRecords(self.root, keep=lambda row: True) if primary else None
        if primary:
            self._write_manifest(status="running")

    def _remove_stale_temporaries(self) -> None:
        for folder in (self.root, self.root / "images", self.root / "labels", self.root / "batches"):
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    def _check_same_config(self, previous: dict[str, Any]) -> None:
        old = {k: v for k, v in previous.items() if k not in RESUMABLE_KEYS}
        new = {k: v for k, v in self.config.items() if k not in RESUMABLE_KEYS}
        diff = config_changes(old, new)
        if diff:
            shown = "; ".join(diff[:5]) + (f"; and {len(diff) - 5} more" if len(diff) > 5 else "")
            raise ValueError(f"{self.root} holds a run with a different configuration ({shown}); "
                             "use another output folder, or the same arguments to resume")

    def log(self, line: str) -> None:
        """Append one line to ``log.txt`` (the primary process only; other ranks do nothing)."""
        if self.records is not None:
            self.records.log(line)

    def _record_path(self, batch_index: int) -> Path:
        return self.root / "batches" / f"{batch_index:06d}.json"

    def record(self, batch_index: int) -> dict[str, Any] | None:
        """The commit record of a finished batch, or ``None``."""
        path = self._record_path(batch_index)
        return json.loads(path.read_text()) if path.exists() else None

    def is_done(self, batch_index: int) -> bool:
        """Whether batch ``batch_index`` finished (its record and all its files exist)."""
        rec = self.record(batch_index)
        if rec is None:
            return False
        return all((self.root / "images" / f).exists() and (self.root / "labels" / (Path(f).stem + ".txt")).exists()
                   for f in rec["images"])

    def discard_batch(self, batch_index: int, *, first_image: int, num_images: int) -> None:
        """Remove the image and label files of an unfinished batch (no record): after an interrupt,
        the folder then holds finished batches only. A finished batch is left alone."""
        if self.record(batch_index) is not None:
            return
        for j in range(first_image, first_image + num_images):
            (self.root / "images" / f"{j:06d}.png").unlink(missing_ok=True)
            (self.root / "labels" / f"{j:06d}.txt").unlink(missing_ok=True)

    def write_batch(self, batch_index: int, images: Tensor, targets: Sequence[Target], *,
                    first_image: int, metrics: dict[str, Any]) -> list[str]:
        """Write one batch's images and labels, then its commit record.

        Args:
            batch_index: index of the batch in the job.
            images: float ``[B, 3, H, W]`` in ``[0, 1]``.
            targets: ``B`` dicts, boxes xyxy pixels of ``images``.
            first_image: global index of the batch's first image (file numbering).
            metrics: JSON-serializable metrics stored in the record.

        Returns:
            The image file names written.
        """
        if len(targets) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(targets)} targets")
        h, w = images.shape[-2:]
        names = []
        cpu = images.detach().float().cpu()
        for j, t in enumerate(targets):
            stem = f"{first_image + j:06d}"
            save_image(self.root / "images" / f"{stem}.png", cpu[j])
            write_yolo_labels(self.root / "labels" / f"{stem}.txt", t["boxes"], t["labels"], (h, w))
            names.append(f"{stem}.png")
        atomic_write_json(self._record_path(batch_index),
                          {"batch": batch_index, "status": "done", "images": names, "height": h, "width": w,
                           "metrics": metrics})
        return names

    def _write_manifest(self, *, status: str, batches: dict[str, Any] | None = None) -> None:
        from diode import __version__

        atomic_write_json(self.root / "manifest.json", {
            "diode_version": __version__, "status": status, "config": self.config,
            "class_names": self.class_names, "batches": batches or {}})

    def finalize(self, num_batches: int, *, preview: int = 16, status: str | None = None) -> dict[str, Any]:
        """Write ``annotations.json``, ``preview.png``, ``metrics.csv``, ``loss.png`` and the manifest.

        Args:
            num_batches: batches of the job; the manifest says which finished.
            preview: number of images in the contact sheet (0: none).
            status: the manifest's status; default ``"complete"`` when every
                batch finished, else ``"partial"`` (a job passes ``"running"``
                while it runs and ``"interrupted"`` when stopped by a signal).

        Returns:
            The manifest written.
        """
        from diode.data.io import load_image
        from diode.viz import save_contact_sheet, target_caption

        batches: dict[str, Any] = {}
        files: list[tuple[str, int, int]] = []
        targets: list[Target] = []
        for i in range(num_batches):
            rec = self.record(i) if self.is_done(i) else None
            batches[str(i)] = rec or {"batch": i, "status": "missing"}
            if rec is None:
                continue
            for name in rec["images"]:
                files.append((name, rec["height"], rec["width"]))
                targets.append(read_yolo_labels(self.root / "labels" / (Path(name).stem + ".txt"),
                                                (rec["height"], rec["width"])))
        write_coco(self.root / "annotations.json", files, targets, self.class_names)
        if preview and files:
            shown = files[:preview]
            images = [load_image(self.root / "images" / name) for name, _, _ in shown]
            captions = [target_caption(t, self.class_names) for t in targets[: len(shown)]]
            save_contact_sheet(self.root / "preview.png", images, targets[: len(shown)],
                               class_names=self.class_names, captions=captions)
        self._write_metrics([b for b in batches.values() if b["status"] == "done"])
        done = all(b["status"] == "done" for b in batches.values())
        self._write_manifest(status=status or ("complete" if done else "partial"), batches=batches)
        return json.loads((self.root / "manifest.json").read_text())

    def _write_metrics(self, records: list[dict[str, Any]]) -> None:
        """``metrics.csv`` from the finished batches' histories (batch order) and ``loss.png``, their mean."""
        rows = [row for rec in records for row in history_rows(rec["batch"], rec["metrics"].get("history", []))]
        metrics = RunRecords(self.root, keep=lambda row: False)
        for row in rows:
            metrics.add_row(row)
        curves: dict[str, dict[float, list[float]]] = {}
        for row in rows:
            for term, value in row.items():
                if term not in _POSITION_KEYS:
                    curves.setdefault(term, {}).setdefault(float(row["step"]), []).append(float(value))
        if not curves:
            return
        series = {term: [(step, sum(v) / len(v)) for step, v in sorted(points.items())]
                  for term, points in curves.items()}
        what = f"mean over {len(records)} batches" if len(records) > 1 else "1 batch"
        plot_curves(self.root / "loss.png", series, x_label="iteration (all stages)",
                    title=f"synthesis loss terms, {what}")


def history_rows(batch_index: int, history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``metrics.csv`` rows of one batch: ``batch``, then each logging record (``stage``,
    ``iteration`` within the stage, ``lr``, loss terms) with ``step``, the iteration counted
    over all stages, after ``iteration``."""
    offsets: dict[int, int] = {}
    for record in history:
        stage = int(record["stage"])
        offsets[stage + 1] = max(offsets.get(stage + 1, 0), int(record["iteration"]))
    rows = []
    for record in history:
        stage = int(record["stage"])
        start = sum(offsets.get(s, 0) for s in range(1, stage + 1))
        row: dict[str, Any] = {"batch": batch_index}
        for key, value in record.items():
            row[key] = value
            if key == "iteration":
                row["step"] = start + int(value)
        rows.append(row)
    return rows


_NEUTRAL: tuple[Any, ...] = ({}, [], None)


def config_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """What differs between two JSON-like configurations, one ``"path: old -> new"`` per changed leaf.

    Example: ``["synthesizer.stages[0].iterations: 200 -> 100"]``. A key present on one side
    only with an empty value (``{}``, ``[]``, ``None``) is no change: a setting a later
    diode version records, at its neutral default, so older run folders still resume.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if (key not in old and new[key] in _NEUTRAL) or (key not in new and old[key] in _NEUTRAL):
                continue
            if key not in old:
                out.append(f"{path}: (absent) -> {new[key]!r}")
            elif key not in new:
                out.append(f"{path}: {old[key]!r} -> (absent)")
            else:
                out += config_changes(old[key], new[key], path)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        pairs = enumerate(zip(old, new, strict=True))
        return [change for i, (a, b) in pairs for change in config_changes(a, b, f"{prefix}[{i}]")]
    return [] if old == new else [f"{prefix or 'config'}: {old!r} -> {new!r}"]
