"""The Sphinx documentation builds without a single warning (autodoc of the real docstrings included)."""

from __future__ import annotations

from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The mapping interface for autodoc options:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The mapping interface for autodoc options:PendingDeprecationWarning")
def test_docs_build_without_warnings(tmp_path: Path) -> None:
    build = pytest.importorskip("sphinx.cmd.build", reason="sphinx is not installed (pip install -e '.[docs]')")
    out = tmp_path / "html"
    status = build.build_main(["-W", "--keep-going", "-q", "-E", "-b", "html", "-d", str(tmp_path / "doctrees"),
                               str(DOCS), str(out)])
    assert status == 0, "sphinx reported warnings or errors (run: python -m sphinx -W -b html docs /tmp/html)"
    for page in ("index", "installation", "quickstart", "api", "cli", "design", "benchmarks",
                 "guide/synthesis", "guide/datasets", "guide/adapters", "guide/evaluation", "guide/ultralytics",
                 "guide/distillation", "guide/multi_gpu"):
        assert (out / f"{page}.html").is_file(), page
    api = (out / "api.html").read_text()
    for name in ("diode.Synthesizer", "diode.DeepInversionLoss", "diode.YOLOv3Adapter.from_pretrained",
                 "diode.YOLOv8Adapter.from_ultralytics", "diode.TorchvisionAdapter.from_name", "diode.create_adapter",
                 "diode.eval.detection_map", "diode.hub.fetch"):
        assert f'id="{name}"' in api, f"{name} is not documented"
