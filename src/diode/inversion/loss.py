"""DeepInversion loss for detectors: BatchNorm statistics, image priors and the task loss."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from diode.adapters.base import DetectorAdapter

_BN_TYPES = (nn.modules.batchnorm._NormBase, FrozenBatchNorm2d)

#: The weights and options of :class:`DeepInversionLoss` that :meth:`DeepInversionLoss.replace` changes.
LOSS_OPTIONS = ("w_task", "w_bn", "first_bn_weight", "num_bn_layers", "w_tv1", "w_tv2", "w_l2")


def _var_mean(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel biased variance and mean, no autograd (see :class:`_ChannelStats`)."""
    dims = [d for d in range(x.ndim) if d != 1]
    n = x.numel() // x.shape[1]
    wide = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 under autocast: square in float32
    mean = wide.sum(dims) / n
    mean_sq = wide.square().sum(dims) / n
    return (mean_sq - mean.square()).clamp_min(0), mean


class _ChannelStats(torch.autograd.Function):
    """Per-channel biased variance and mean over every dimension but 1, in float32 or wider.

    ``torch.var_mean`` over ``(N, H, W)`` is a slow Welford reduction on CPU with a
    multi-pass backward, and ``linalg.vector_norm`` over those dims is no better. This
    runs on every BN layer's input in every iteration, so it uses the two fastest
    reductions (``sum(x)`` and ``sum(x * x)``, ``var = E[x^2] - mean^2``; about 4x
    faster than either on CPU, in both memory formats) and exactly one tensor, the
    gradient, in the backward (``dx = (g_mean + 2 g_var (x - mean)) / n`` as a single
    ``addcmul``).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        var, mean = _var_mean(x)
        ctx.save_for_backward(x, mean)
        return var, mean

    @staticmethod
    def backward(ctx: Any, grad_var: Tensor, grad_mean: Tensor) -> Tensor:  # type: ignore[override]
        x, mean = ctx.saved_tensors
        return _stats_grad(x, mean, grad_var, grad_mean)


def _channel_shape(x: Tensor) -> list[int]:
    """``[1, -1, 1, ...]``: views a per-channel ``[C]`` vector for broadcasting against ``x``."""
    shape = [1] * x.ndim
    shape[1] = -1
    return shape


def _stats_grad(x: Tensor, mean: Tensor, grad_var: Tensor, grad_mean: Tensor) -> Tensor:
    """Gradient w.r.t. ``x`` of ``(var, mean)``: ``(g_mean + 2 g_var (x - mean)) / n`` in one ``addcmul``."""
    shape = _channel_shape(x)
    n = x.numel() // x.shape[1]
    scale = grad_var * (2.0 / n)
    offset = grad_mean / n - scale * mean
    return torch.addcmul(offset.view(shape).to(x.dtype), x, scale.view(shape).to(x.dtype))


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Biased variance and mean per channel (dim 1) over all other dims, differentiable.

    Computed in float32 (float64 stays float64), whatever the input dtype, so
    bf16/fp16 activations under autocast give accurate statistics.

    Args:
        x: ``[N, C, ...]`` activations (any float dtype).

    Returns:
        ``(var [C], mean [C])``, the statistics BatchNorm normalizes with in training mode.
    """
    return _ChannelStats.apply(x)  # type: ignore[no-any-return]


class _AffineWithStats(torch.autograd.Function):
    """An eval-mode BatchNorm (``y = x * scale + shift`` per channel) that also returns
    the per-channel ``(var, mean)`` of its input, with one fused backward.

    With a forward hook, the backward of a BN layer's input is three activation-sized
    passes: BatchNorm's own backward, the statistics' backward and the sum of the two.
    Here it is two: ``dx = x * a + b`` for the statistics, then ``dx += g * scale``
    in place. ``scale`` and ``shift`` are constants (the teacher is frozen).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        shape = _channel_shape(x)
        y = torch.addcmul(shift.view(shape).to(x.dtype), x, scale.view(shape).to(x.dtype))
        var, mean = _var_mean(x)
        ctx.save_for_backward(x, mean, scale)
        return y, var, mean

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, grad_var: Tensor, grad_mean: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        x, mean, scale = ctx.saved_tensors
        grad_x = _stats_grad(x, mean, grad_var, grad_mean)
        grad_x.addcmul_(grad_y, scale.view(_channel_shape(x)).to(grad_y.dtype))
        return grad_x, None, None


def _eval_affine(layer: nn.Module) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` of a BatchNorm layer that normalizes with its running statistics."""
    rm, rv = cast(Tensor, layer.running_mean), cast(Tensor, layer.running_var)
    scale = torch.rsqrt(rv.float() + float(layer.eps))  # type: ignore[arg-type]
    if getattr(layer, "weight", None) is not None:
        scale = scale * cast(Tensor, layer.weight).detach().float()
    shift = -rm.float() * scale
    if getattr(layer, "bias", None) is not None:
        shift = shift + cast(Tensor, layer.bias).detach().float()
    return scale, shift


_PLAIN_FORWARDS = (nn.BatchNorm1d.forward, nn.BatchNorm2d.forward, nn.BatchNorm3d.forward,
                   nn.SyncBatchNorm.forward, FrozenBatchNorm2d.forward)


def _fusable(layer: nn.Module) -> bool:
    """A stock BatchNorm with running statistics (a subclass with its own forward is not)."""
    return (type(layer).forward in _PLAIN_FORWARDS and getattr(layer, "running_mean", None) is not None
            and getattr(layer, "running_var", None) is not None)


def _uses_running_stats(layer: nn.Module) -> bool:
    return isinstance(layer, FrozenBatchNorm2d) or not layer.training


_TV_DIRECTIONS = ((0, 1), (1, 0), (1, -1), (1, 1))  # (dy, dx): horizontal, vertical, both diagonals


def _tv_slices(h: int, w: int, dy: int, dx: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """``(a, b)`` index pairs with ``x[b] - x[a]`` the neighbour difference along ``(dy, dx)``."""
    ya, yb = slice(0, h - dy), slice(dy, h)
    xa, xb = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    return (ya, xa), (yb, xb)


class _TotalVariation(torch.autograd.Function):
    """TV-L1 and TV-L2 over 4 directions with a hand-written backward.

    Through autograd, each direction's slices and subtraction cost four
    image-sized passes in the backward (two zero-filled slice gradients, their
    difference, the accumulation); here the gradient of a direction is one
    ``sign`` (plus ``d / ||d||`` when TV-L2 is used) added into two views.
    """

    @staticmethod
    def forward(ctx: Any, images: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        ctx.set_materialize_grads(False)  # an unused output (TV-L2 at weight 0) gets None: skipped
        h, w = images.shape[-2:]
        diffs = []
        tv_l1 = images.new_zeros((), dtype=torch.promote_types(images.dtype, torch.float32))
        tv_l2 = tv_l1.clone()
        norms = []
        for dy, dx in _TV_DIRECTIONS:
            (ya, xa), (yb, xb) = _tv_slices(h, w, dy, dx)
            d = images[..., yb, xb] - images[..., ya, xa]
            norm = torch.linalg.vector_norm(d, dtype=tv_l1.dtype)
            if d.numel():
                tv_l1 = tv_l1 + d.abs().sum(dtype=tv_l1.dtype) / d.numel()  # 4x faster than an L1 vector_norm
            tv_l2 = tv_l2 + norm
            diffs.append(d)
            norms.append(norm)
        ctx.save_for_backward(*diffs, *norms)
        ctx.shape, ctx.dtype = images.shape, images.dtype
        ctx.memory_format = (torch.channels_last if images.ndim == 4 and not images.is_contiguous()
                             and images.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
        return tv_l1, tv_l2

    @staticmethod
    def backward(ctx: Any, grad_l1: Tensor | None, grad_l2: Tensor | None) -> Tensor | None:  # type: ignore[override]
        saved = ctx.saved_tensors
        diffs, norms = saved[:4], saved[4:]
        h, w = ctx.shape[-2:]
        if grad_l1 is None and grad_l2 is None:
            return None
        grad = torch.empty(ctx.shape, dtype=ctx.dtype, device=diffs[0].device, memory_format=ctx.memory_format).zero_()
        for (dy, dx), d, norm in zip(_TV_DIRECTIONS, diffs, norms, strict=True):
            if not d.numel():
                continue
            (ya, xa), (yb, xb) = _tv_slices(h, w, dy, dx)
            if grad_l1 is not None:
                sign, coef = torch.sign(d), (grad_l1 / d.numel()).to(d.dtype)
                grad[..., yb, xb].addcmul_(sign, coef)
                grad[..., ya, xa].addcmul_(sign, coef, value=-1)
            if grad_l2 is not None:
                coef = (grad_l2 / norm.clamp_min(1e-12)).to(d.dtype)
                grad[..., yb, xb].addcmul_(d, coef)
                grad[..., ya, xa].addcmul_(d, coef, value=-1)
        return grad


def tv_losses(images: Tensor) -> tuple[Tensor, Tensor]:
    """Total-variation priors over 4 directions (horizontal, vertical, both diagonals).

    Args:
        images: ``[B, C, H, W]``.

    Returns:
        ``(tv_l1, tv_l2)``: the sum over directions of the mean absolute
        neighbour difference, and the sum over directions of the Frobenius norm
        of the differences (the DeepInversion definitions), in float32 or wider.
    """
    return _TotalVariation.apply(images)  # type: ignore[no-any-return]


class DeepInversionLoss(nn.Module):
    """The DIODE objective on a batch of (augmented) images.

    ``L = w_task * task + w_bn * sum_l c_l (||mu_l - running_mean_l||_2 + ||var_l - running_var_l||_2)
    + w_tv1 * TV_L1 + w_tv2 * TV_L2 + w_l2 * mean_b ||x_b||_2``

    where ``mu_l``, ``var_l`` are the batch mean and biased variance over
    ``(N, H, W)`` of the input of BatchNorm layer ``l``, ``c_1 =
    first_bn_weight`` and ``c_l = 1`` otherwise. Defaults are the reference
    recipe's stage 1.

    Args:
        teacher: the frozen detector (any :class:`DetectorAdapter`).
        w_task: weight of the adapter's detection loss.
        w_bn: weight of the BatchNorm statistics term.
        first_bn_weight: ``c_1``, the weight of the first BN layer.
        num_bn_layers: use only the first ``k`` BN layers (``None``: all).
        w_tv1: weight of TV-L1. w_tv2: weight of TV-L2. w_l2: weight of the image L2 norm.

    Raises:
        ValueError: the teacher has no BatchNorm layer, or a weight is negative.
    """

    def __init__(
        self,
        teacher: DetectorAdapter,
        *,
        w_task: float = 0.5,
        w_bn: float = 0.1,
        first_bn_weight: float = 2.0,
        num_bn_layers: int | None = None,
        w_tv1: float = 75.0,
        w_tv2: float = 0.0,
        w_l2: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("w_task", w_task), ("w_bn", w_bn), ("first_bn_weight", first_bn_weight),
                            ("w_tv1", w_tv1), ("w_tv2", w_tv2), ("w_l2", w_l2)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if num_bn_layers is not None and num_bn_layers < 1:
            raise ValueError(f"num_bn_layers must be >= 1 or None, got {num_bn_layers}")
        layers = [m for m in teacher.bn_layers() if isinstance(m, _BN_TYPES)]
        if not layers:
            raise ValueError(
                f"{type(teacher.model).__name__} has no BatchNorm layer: DeepInversion matches BatchNorm "
                "running statistics, so the teacher needs BatchNorm1d/2d, SyncBatchNorm or FrozenBatchNorm2d"
            )
        self.teacher = teacher
        self.w_task, self.w_bn, self.first_bn_weight = w_task, w_bn, first_bn_weight
        self.num_bn_layers = num_bn_layers
        self.w_tv1, self.w_tv2, self.w_l2 = w_tv1, w_tv2, w_l2
        self._layers = layers
        self._active: list[tuple[Tensor, Tensor] | None] | None = None

    @property
    def bn_layers(self) -> list[nn.Module]:
        """The BatchNorm layers whose statistics are matched, in forward order."""
        return self._layers[: self.num_bn_layers]

    def replace(self, **changes: Any) -> DeepInversionLoss:
        """A copy with some weights changed (e.g. a stage's ``first_bn_weight=0``); validated."""
        check_loss_options(changes)
        kwargs = {k: getattr(self, k) for k in LOSS_OPTIONS}
        kwargs.update(changes)
        return DeepInversionLoss(self.teacher, **kwargs)

    @contextlib.contextmanager
    def hooks(self) -> Iterator[list[tuple[Tensor, Tensor] | None]]:
        """Record each BN input's (biased var, mean) during forwards; always undone on exit.

        Yields the list the forwards fill, one ``(var [C], mean [C])`` per layer.
        Stock BatchNorm layers in eval mode get a fused forward for the duration (the
        normalization and the statistics share one backward pass; the output is the
        same; their running statistics and affine parameters are read once, when the
        context opens); other layers (subclasses, layers in training mode) get a
        forward hook.
        While the context is open, :meth:`forward` reuses these instead of installing
        its own (cheaper in a loop).
        """
        layers = self.bn_layers
        stats: list[tuple[Tensor, Tensor] | None] = [None] * len(layers)

        def make_hook(i: int):  # noqa: ANN202
            def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                stats[i] = channel_stats(inputs[0])
            return hook

        def make_forward(i: int, layer: nn.Module):  # noqa: ANN202
            plain = type(layer).forward
            scale, shift = _eval_affine(layer)

            def forward(x: Tensor) -> Tensor:
                if not _uses_running_stats(layer):
                    stats[i] = channel_stats(x)
                    return plain(layer, x)  # type: ignore[no-any-return]
                y, var, mean = _AffineWithStats.apply(x, scale, shift)
                stats[i] = (var, mean)
                return y  # type: ignore[no-any-return]
            return forward

        handles = []
        patched = []
        try:
            for i, layer in enumerate(layers):
                if _fusable(layer):
                    layer.forward = make_forward(i, layer)
                    patched.append(layer)
                else:
                    handles.append(layer.register_forward_hook(make_hook(i)))
            previous, self._active = self._active, stats
            try:
                yield stats
            finally:
                self._active = previous
        finally:
            for h in handles:
                h.remove()
            for layer in patched:
                del layer.forward

    def bn_term(self, stats: list[tuple[Tensor, Tensor] | None]) -> tuple[Tensor, Tensor]:
        """Weighted BN-statistics loss and the per-layer values ``[L]`` (unweighted)."""
        per_layer = []
        for (var, mean), layer in zip(_require(stats), self.bn_layers, strict=True):
            rm, rv = cast(Tensor, layer.running_mean), cast(Tensor, layer.running_var)
            per_layer.append(torch.linalg.vector_norm(mean - rm) + torch.linalg.vector_norm(var - rv))
        values = torch.stack(per_layer)
        coef = torch.ones_like(values)
        coef[0] = self.first_bn_weight
        return (coef * values).sum(), values

    def forward(self, images: Tensor, targets: list[dict[str, Tensor]]) -> tuple[Tensor, dict[str, Tensor]]:
        """Run the teacher on ``images`` and compute the loss.

        Args:
            images: ``[B, 3, H, W]`` float in ``[0, 1]`` (already augmented).
            targets: boxes (xyxy pixels of ``images``) and labels per image.

        Returns:
            ``(total, parts)``: the scalar loss and detached per-term values
            ``{"task", "bn", "tv_l1", "tv_l2", "l2", "bn_layers"}`` (no host sync).
        """
        if self._active is not None:
            stats = self._active
            raw = self.teacher.forward(images)
        else:
            with self.hooks() as stats:
                raw = self.teacher.forward(images)
        task = self.teacher.task_loss(raw, targets)
        bn, bn_layers = self.bn_term(stats)
        tv_l1, tv_l2 = tv_losses(images)
        l2 = torch.linalg.vector_norm(images.flatten(1), dim=1).mean()
        weighted = ((self.w_task, task), (self.w_bn, bn), (self.w_tv1, tv_l1), (self.w_tv2, tv_l2), (self.w_l2, l2))
        # Zero-weight terms stay out of the graph, so the backward never visits them.
        total = sum((w * term for w, term in weighted if w > 0), torch.zeros((), device=images.device))
        parts = {"task": task, "bn": bn, "tv_l1": tv_l1, "tv_l2": tv_l2, "l2": l2, "bn_layers": bn_layers}
        return total, {k: v.detach() for k, v in parts.items()}


def check_loss_options(options: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming any key of ``options`` that is not in :data:`LOSS_OPTIONS`."""
    unknown = set(options) - set(LOSS_OPTIONS)
    if unknown:
        raise ValueError(f"unknown DeepInversionLoss option(s): {', '.join(sorted(unknown))}; "
                         f"valid: {', '.join(LOSS_OPTIONS)}")


def _require(stats: list[tuple[Tensor, Tensor] | None]) -> list[tuple[Tensor, Tensor]]:
    missing = [i for i, s in enumerate(stats) if s is None]
    if missing:
        raise RuntimeError(f"BatchNorm layer(s) {missing} were not run by the teacher's forward; "
                           "set num_bn_layers to skip layers the forward does not use")
    return stats  # type: ignore[return-value]
