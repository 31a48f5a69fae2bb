"""Run-folder records of a long job: ``log.txt``, ``metrics.csv`` and ``loss.png``.

- ``log.txt``: the job's progress lines, the same a user sees in the terminal, one per line.
- ``metrics.csv``: one row per logging point (e.g. epoch, step, lr and every loss term).
- ``loss.png``: curves of chosen columns against another, drawn with PIL (no plotting
  dependency).

Lines and rows are appended with one ``write`` each and flushed, so an interrupted job
leaves whole lines; files rewritten as a whole (a pruned ``metrics.csv``, ``loss.png``)
go through :func:`~diode.data.io.atomic_write_bytes`.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from diode.data.io import PathLike, atomic_write_bytes, atomic_write_text

__all__ = ["LOG", "METRICS", "PLOT", "RunRecords", "plot_curves"]

LOG = "log.txt"
METRICS = "metrics.csv"
PLOT = "loss.png"

Row = Mapping[str, float | int | str]

# Distinct line colours, cycled.
_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


class RunRecords:
    """``log.txt`` and ``metrics.csv`` of a run folder, plus the ``loss.png`` drawn from them.

    Args:
        root: the run folder (created if missing).
        keep: on opening, the existing rows of ``metrics.csv`` for which ``keep(row)`` is true
            stay (e.g. the rows up to a resumed checkpoint, values as strings) and ``log.txt``
            is appended to; ``None`` starts both files afresh.

    Raises:
        OSError: the folder cannot be created or written.
    """

    def __init__(self, root: PathLike, *, keep: Callable[[dict[str, str]], bool] | None = None) -> None:
        self.root = Path(root)
        self.columns: list[str] = []
        self.rows: list[dict[str, str]] = []
        metrics = self.root / METRICS
        if keep is not None and metrics.is_file():
            with metrics.open(newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or [])
                self.rows = [row for row in reader if keep(row)]
        if keep is None or not (self.root / LOG).is_file():
            atomic_write_text(self.root / LOG, "")
        self._rewrite_metrics()

    def log(self, line: str) -> None:
        """Append one line (without its newline) to ``log.txt``."""
        with (self.root / LOG).open("a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")

    def add_row(self, row: Row) -> None:
        """Append a row to ``metrics.csv``; a column it adds rewrites the file with the wider header."""
        values = {k: _cell(v) for k, v in row.items()}
        self.rows.append(values)
        new = [k for k in values if k not in self.columns]
        if new:
            self.columns += new
            self._rewrite_metrics()
            return
        buffer = io.StringIO()
        csv.DictWriter(buffer, self.columns, lineterminator="\n").writerow(values)
        with (self.root / METRICS).open("a", encoding="utf-8", newline="") as f:
            f.write(buffer.getvalue())

    def plot(self, *, x: str, ys: Sequence[str], title: str = "", path: PathLike | None = None) -> Path | None:
        """Draw ``ys`` against ``x`` from the rows into ``loss.png`` (or ``path``); ``None`` without rows."""
        if not self.rows:
            return None
        series = {name: [(float(r[x]), float(r[name])) for r in self.rows
                         if r.get(name) not in (None, "") and r.get(x) not in (None, "")]
                  for name in ys}
        target = Path(path) if path is not None else self.root / PLOT
        plot_curves(target, series, x_label=x, title=title)
        return target

    def _rewrite_metrics(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.columns, lineterminator="\n")
        if self.columns:
            writer.writeheader()
            writer.writerows(self.rows)
        atomic_write_text(self.root / METRICS, buffer.getvalue())


def _cell(value: float | int | str) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def plot_curves(path: PathLike, series: Mapping[str, Sequence[tuple[float, float]]], *,
                x_label: str = "", title: str = "", size: tuple[int, int] = (800, 450)) -> None:
    """Draw named curves of ``(x, y)`` points as a PNG, written atomically.

    The y axis is logarithmic when every value is positive and they span more than a factor
    of 20; non-finite points are skipped.

    Args:
        path: the PNG to write.
        series: curve name -> points in drawing order.
        x_label: caption of the x axis.
        title: text above the plot.
        size: ``(width, height)`` of the image in pixels.
    """
    clean = {name: [(px, py) for px, py in points if math.isfinite(px) and math.isfinite(py)]
             for name, points in series.items()}
    clean = {name: points for name, points in clean.items() if points}
    width, height = size
    left, right, top, bottom = 70, 20, 40, 45
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 12), title, fill="black")
    xs = [px for points in clean.values() for px, _ in points]
    ys = [py for points in clean.values() for _, py in points]
    if not xs:
        draw.text((left, height // 2), "no finite values", fill="black")
        _save(image, path)
        return
    log_y = min(ys) > 0 and max(ys) / min(ys) > 20

    def fy(v: float) -> float:
        return math.log10(v) if log_y else v

    x0, x1 = min(xs), max(xs)
    y0, y1 = fy(min(ys)), fy(max(ys))
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_px(px: float, py: float) -> tuple[float, float]:
        return (left + (px - x0) / (x1 - x0) * plot_w, top + (1 - (fy(py) - y0) / (y1 - y0)) * plot_h)

    for i in range(5):
        value = y0 + (y1 - y0) * i / 4
        py = top + plot_h * (1 - i / 4)
        draw.line([(left, py), (width - right, py)], fill=(230, 230, 230))
        draw.text((4, py - 6), f"{10 ** value if log_y else value:.3g}", fill="black")
        vx = x0 + (x1 - x0) * i / 4
        px = left + plot_w * i / 4
        draw.text((px - 10, top + plot_h + 6), f"{vx:.3g}", fill="black")
    draw.line([(left, top), (left, top + plot_h), (width - right, top + plot_h)], fill="black")
    draw.text((left + plot_w // 2 - 20, height - 18), x_label + (" (log y)" if log_y else ""), fill="black")
    for i, (name, points) in enumerate(clean.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        pixels = [to_px(px, py) for px, py in points]
        if len(pixels) == 1:
            cx, cy = pixels[0]
            draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=colour)
        else:
            draw.line(pixels, fill=colour, width=2)
        ly = top + 12 + 14 * i
        draw.line([(width - right - 170, ly), (width - right - 152, ly)], fill=colour, width=2)
        draw.text((width - right - 146, ly - 6), name, fill=colour)
    _save(image, path)


def _save(image: Image.Image, path: PathLike) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
