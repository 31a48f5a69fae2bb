"""The anchor-free YOLO family (YOLOv5u, YOLOv8, YOLOv10, YOLO11) in plain torch.

Raw head outputs (what the model's forward returns and the loss reads):

- ``Detect``: ``list[Tensor]``, one ``[B, 4 * reg_max + nc, H_i, W_i]`` per level
  (distance-distribution logits of the 4 box sides first, then class logits).
- ``v10Detect``: ``{"one2many": [...], "one2one": [...]}``, each such a list.
"""
