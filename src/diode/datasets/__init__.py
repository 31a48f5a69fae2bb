"""Procedural datasets for tests, tutorials and benchmarks.

:mod:`diode.datasets.shapes` renders a seedable, labelled detection world of simple shapes
(:func:`render_shapes`, :class:`ShapesDataset`, :func:`write_shapes_dataset`), an unlabelled
out-of-distribution proxy domain (:func:`render_proxy`) and uniform noise
(:func:`render_noise`).
"""

from __future__ import annotations

from diode.datasets.shapes import (
    SHAPE_NAMES,
    ShapesConfig,
    ShapesDataset,
    render_noise,
    render_proxy,
    render_shapes,
    write_image_folder,
    write_shapes_dataset,
)

__all__ = [
    "SHAPE_NAMES",
    "ShapesConfig",
    "ShapesDataset",
    "render_noise",
    "render_proxy",
    "render_shapes",
    "write_image_folder",
    "write_shapes_dataset",
]
