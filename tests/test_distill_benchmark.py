"""Smoke test of benchmarks/toy_cross_arch.py: distillation variants for the narrower student."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "toy_cross_arch.py"


def test_variants_run_on_the_smoke_configuration(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("toy_cross_arch", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_cross_arch"] = module
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(module)
        results = module.main(["--out", str(tmp_path), "--smoke", "--threads", "1",
                               "--variants", "pseudo_sampled_hsv,hybrid,same_outputs"])
    finally:
        torch.set_num_threads(threads)
    assert set(results) == {"pseudo_sampled_hsv", "hybrid", "same_outputs"}
    assert all(0.0 <= v <= 1.0 for r in results.values() for v in r.values())
    assert json.loads((tmp_path / "seed0" / "results.json").read_text()) == results
    assert "| hybrid |" in (tmp_path / "seed0" / "results.md").read_text()
    assert (tmp_path / "seed0" / "teacher.pt").is_file()
