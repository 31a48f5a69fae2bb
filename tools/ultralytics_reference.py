"""Reference outputs of the Ultralytics package for diode's YOLOv8Adapter exactness tests.

RUNS ONLY IN A SCRATCH ENVIRONMENT WITH THE ULTRALYTICS PACKAGE (AGPL-3.0). diode never
depends on it and the tests never run this script; they read the JSON it writes
(``tests/fixtures/ultralytics_reference.json``). Set up, outside the repository::

    python -m venv --system-site-packages /work/scratch/ul83
    /work/scratch/ul83/bin/pip install --no-deps ultralytics==8.3.50
    /work/scratch/ul83/bin/pip install matplotlib psutil pandas py-cpuinfo requests
    OMP_NUM_THREADS=1 /work/scratch/ul83/bin/python tools/ultralytics_reference.py

Ultralytics 8.3 runs the YOLOv10 checkpoint end to end (one-to-one branch, no NMS)
as the family designs it; 8.4 runs this older checkpoint's one-to-many branch with
NMS unless its head's ``end2end`` is set, so 8.3 is the reference.

The script loads each checkpoint with Ultralytics' own loader and with diode's safe
reader, then:

- feeds the same input tensors (an analytic pattern and diode's letterbox of each
  photo) to both and reports the largest difference of the raw head outputs, against
  the model as stored and against the conv+BN-fused copy Ultralytics' predictor runs;
- runs Ultralytics' predictor on each photo (640 px, conf 0.25, its default IoU)
  and stores its detections;
- stores samples and sums of Ultralytics' raw outputs on the analytic input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from diode import hub
from diode.adapters._common import letterbox
from diode.adapters.ultralytics import PAD_VALUE, YOLOv8Adapter
from diode.data.io import load_image

MODELS = {"yolov10n": ("dog.jpg", "horses.jpg", "person.jpg", "kite.jpg"), "yolov8s-fall": ("person.jpg", "kite.jpg")}
SAMPLES = 64


def pattern(height: int = 256, width: int = 320) -> torch.Tensor:
    """A smooth deterministic test image ``[1, 3, H, W]`` in ``[0.05, 0.95]`` (also built by the tests)."""
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    chans = [0.5 + 0.45 * torch.sin(0.031 * (c + 1) * xx + 0.017 * (3 - c) * yy + c) for c in range(3)]
    return torch.stack(chans)[None].float()


def ultralytics_raw(model: torch.nn.Module, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Per-branch raw levels ``cat(box, cls)`` captured with hooks on the head's branches."""
    head = model.model[-1]
    captured: dict[str, torch.Tensor] = {}
    handles = []
    branches = {"one2many": ("cv2", "cv3"), "one2one": ("one2one_cv2", "one2one_cv3")}
    for names in branches.values():
        for name in names:
            if getattr(head, name, None) is None:
                continue
            for i, seq in enumerate(getattr(head, name)):
                handles.append(seq.register_forward_hook(
                    lambda mod, inp, out, k=f"{name}.{i}": captured.__setitem__(k, out)))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    out = {}
    for key, (box, cls) in branches.items():
        if f"{box}.0" in captured:
            out[key] = [torch.cat((captured[f"{box}.{i}"], captured[f"{cls}.{i}"]), 1) for i in range(head.nl)]
    return out


def diode_raw(adapter: YOLOv8Adapter, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    with torch.no_grad():
        raw = adapter.forward(x)
    return raw if isinstance(raw, dict) else {"one2many": raw}


def max_diff(a: dict[str, list[torch.Tensor]], b: dict[str, list[torch.Tensor]]) -> float:
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    return max(float((u - v).abs().max()) for k in a for u, v in zip(a[k], b[k], strict=True))


def summary(raw: dict[str, list[torch.Tensor]]) -> dict[str, list[dict]]:
    out = {}
    for key, levels in raw.items():
        rows = []
        for t in levels:
            flat = t.flatten().double()
            idx = torch.linspace(0, flat.numel() - 1, SAMPLES).long()
            rows.append({"shape": list(t.shape), "sum": float(flat.sum()), "abs_sum": float(flat.abs().sum()),
                         "index": idx.tolist(), "values": [round(float(v), 6) for v in flat[idx]]})
        out[key] = rows
    return out


def main() -> int:
    import ultralytics
    from ultralytics import YOLO

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=hub.cache_dir() / "test-images")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parents[1] / "tests/fixtures/ultralytics_reference.json")
    args = parser.parse_args()

    fixture: dict = {"ultralytics": ultralytics.__version__, "torch": torch.__version__, "imgsz": 640, "conf": 0.25,
                     "pattern": [1, 3, 256, 320], "models": {}}
    for name, photos in MODELS.items():
        path = hub.fetch(name)
        yolo = YOLO(str(path))
        reference = YOLO(str(path)).model.float().eval()  # predict() fuses conv+BN into yolo.model: keep one unfused
        adapter = YOLOv8Adapter.from_ultralytics(path)
        x = pattern()
        ref_raw = ultralytics_raw(reference, x)
        entry = {"sha256": hub.sha256_file(path), "pattern_raw": summary(ref_raw),
                 "pattern_max_abs_diff": max_diff(diode_raw(adapter, x), ref_raw), "photos": {}}
        print(f"{name}: pattern raw max |diode - ultralytics| = {entry['pattern_max_abs_diff']:.3g}")
        for photo in photos:
            image = load_image(args.images / photo)
            boxed = letterbox(image, 640, stride=adapter.size_divisor, fill=PAD_VALUE)[0][None]
            diff = max_diff(diode_raw(adapter, boxed), ultralytics_raw(reference, boxed))
            result = yolo.predict(str(args.images / photo), imgsz=640, conf=0.25, device="cpu", verbose=False)[0]
            fused = max_diff(diode_raw(adapter, boxed), ultralytics_raw(yolo.model, boxed))
            det = [{"box": [round(float(v), 2) for v in box], "score": round(float(score), 5), "label": int(label)}
                   for box, score, label in zip(result.boxes.xyxy, result.boxes.conf, result.boxes.cls, strict=True)]
            entry["photos"][photo] = {"sha256": hub.sha256_file(args.images / photo),
                                      "size": list(image.shape[-2:]), "raw_max_abs_diff": diff,
                                      "raw_max_abs_diff_fused": fused, "detections": det}
            print(f"  {photo}: raw max |diff| {diff:.3g} (its fused conv+BN inference model: {fused:.3g}), "
                  f"{len(det)} reference detections")
        fixture["models"][name] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
