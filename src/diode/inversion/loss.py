"""DeepInversion loss for detectors: BatchNorm statistics, image priors and the task loss."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from diode.adapters.base import BN_TYPES, DetectorAdapter

#: The weights and options of :class:`DeepInversionLoss` that :meth:`DeepInversionLoss.replace` changes.
LOSS_OPTIONS = ("w_task", "w_bn", "first_bn_weight", "num_bn_layers", "w_tv1", "w_tv2", "w_l2")


def _batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel biased ``(var, mean)`` over every dimension but 1, in float32 or wider (no autograd).

    ``torch.batch_norm_update_stats`` (BatchNorm's own statistics kernel, no running statistics
    given) reads the activations without writing any: about half the time of ``sum(x)`` plus
    ``sum(x * x)`` on CPU, 4-10x faster than ``torch.var_mean`` over ``(N, H, W)``, and as
    accurate as a two-pass variance (``E[x^2] - mean^2`` in float32 cancels when the mean is
    large). Other devices (no such kernel) take ``var_mean``.
    """
    if x.device.type not in ("cpu", "cuda"):
        var, mean = torch.var_mean(x.float() if x.dtype != torch.float64 else x, (0, *range(2, x.ndim)), correction=0)
        return var, mean
    if x.device.type == "cpu" and x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # bf16/fp16 under CPU autocast
    mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    wide = torch.promote_types(x.dtype, torch.float32)
    return var.to(wide), mean.to(wide)


def _stats_grad(x: Tensor, mean: Tensor, grad_var: Tensor | None, grad_mean: Tensor | None) -> Tensor:
    """Gradient w.r.t. ``x`` of ``(var, mean)``: ``(g_mean + 2 g_var (x - mean)) / n`` as one ``addcmul``."""
    n = x.numel() // x.shape[1]
    g_var = grad_var if grad_var is not None else torch.zeros_like(mean)
    g_mean = grad_mean if grad_mean is not None else torch.zeros_like(mean)
    offset = torch.addcmul(g_mean, g_var, mean, value=-2.0).div_(n)
    shape = _channel_shape(x)
    if offset.dtype != x.dtype:
        offset, g_var = offset.to(x.dtype), g_var.to(x.dtype)
    return torch.addcmul(offset.view(shape), x, g_var.view(shape), value=2.0 / n)


class _ChannelStats(torch.autograd.Function):
    """Per-channel biased variance and mean over every dimension but 1 (see :func:`_batch_stats`),
    with exactly one activation-sized tensor, the gradient, in the backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        var, mean = _batch_stats(x)
        ctx.save_for_backward(x, mean)
        return var, mean

    @staticmethod
    def backward(ctx: Any, grad_var: Tensor | None, grad_mean: Tensor | None) -> Tensor | None:  # type: ignore[override]
        if grad_var is None and grad_mean is None:
            return None
        x, mean = ctx.saved_tensors
        return _stats_grad(x, mean, grad_var, grad_mean)


def _channel_shape(x: Tensor) -> list[int]:
    """``[1, -1, 1, ...]``: views a per-channel ``[C]`` vector for broadcasting against ``x``."""
    shape = [1] * x.ndim
    shape[1] = -1
    return shape


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
    in place. ``scale`` and ``shift`` are constants already shaped ``[1, C, 1, ...]`` in
    ``x``'s dtype (the teacher is frozen).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        var, mean = _batch_stats(x)
        ctx.save_for_backward(x, mean, scale)
        return torch.addcmul(shift, x, scale), var, mean

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor | None, grad_var: Tensor | None,  # type: ignore[override]
                 grad_mean: Tensor | None) -> tuple[Tensor | None, None, None]:
        x, mean, scale = ctx.saved_tensors
        if grad_var is None and grad_mean is None:
            return (None if grad_y is None else grad_y * scale), None, None
        grad_x = _stats_grad(x, mean, grad_var, grad_mean)
        if grad_y is not None:
            grad_x.addcmul_(grad_y, scale)
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
    return (type(layer).forward in _PLAIN_FORWARDS and "forward" not in layer.__dict__
            and getattr(layer, "running_mean", None) is not None
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


#: The reference recipe's stage-1 loss options (DIODE's YOLOv3 numbers), the base every adapter's
#: :meth:`~diode.DetectorAdapter.synthesis_defaults` and every explicit argument override.
RECIPE_LOSS: dict[str, Any] = {"w_task": 0.5, "w_bn": 0.1, "first_bn_weight": 2.0, "num_bn_layers": None,
                               "w_tv1": 75.0, "w_tv2": 0.0, "w_l2": 0.0}

#: Names of the built-in terms in ``parts``; extra terms may not reuse them.
BUILTIN_TERMS = ("task", "bn", "tv_l1", "tv_l2", "l2")

#: An extra loss term: ``term(images, raw, targets) -> scalar`` on the augmented images, the teacher's
#: raw outputs and the augmented targets.
LossTerm = Callable[[Tensor, Any, list[dict[str, Tensor]]], Tensor]

_UNSET: Any = object()
BNStats = list[list[tuple[Tensor, Tensor]]]


class _TermPlan(NamedTuple):
    """Constant vectors of the vectorized BN term for one pattern of calls (see ``DeepInversionLoss.bn_term``)."""

    segment: Tensor  # [2 * sum C]: which call's mean norm (first half) or var norm (second half) an entry adds to
    weight: Tensor  # [calls]: c_l / (calls of layer l)
    share: Tensor  # [calls]: 1 / (calls of layer l)
    layer_of_call: Tensor  # [calls]

    @staticmethod
    def build(pattern: tuple[tuple[int, ...], ...], first_bn_weight: float, like: Tensor) -> _TermPlan:
        call_of_entry, layer_of_call, share = [], [], []
        for layer, calls in enumerate(pattern):
            for channels in calls:
                call_of_entry += [len(layer_of_call)] * channels
                layer_of_call.append(layer)
                share.append(1.0 / len(calls))
        n = len(layer_of_call)
        segment = torch.tensor(call_of_entry, dtype=torch.long)
        share_t = torch.tensor(share, dtype=like.dtype)
        coef = torch.tensor([first_bn_weight if i == 0 else 1.0 for i in layer_of_call], dtype=like.dtype)
        return _TermPlan(torch.cat([segment, segment + n]).to(like.device), (coef * share_t).to(like.device),
                         share_t.to(like.device), torch.tensor(layer_of_call, dtype=torch.long).to(like.device))


class DeepInversionLoss(nn.Module):
    """The DIODE objective on a batch of (augmented) images.

    ``L = w_task * task + w_bn * sum_l c_l * mean_k (||mu_lk - running_mean_l||_2 + ||var_lk - running_var_l||_2)
    + w_tv1 * TV_L1 + w_tv2 * TV_L2 + w_l2 * mean_b ||x_b||_2 + sum_t w_t * term_t``

    where ``mu_lk``, ``var_lk`` are the batch mean and biased variance over
    ``(N, H, W)`` of the input of BatchNorm layer ``l`` at its ``k``-th call in
    one forward (a layer shared across FPN levels is matched at every call, each
    call against the layer's running statistics, and the calls are averaged so a
    shared layer weighs as much as any other), ``c_1 = first_bn_weight`` and
    ``c_l = 1`` otherwise.

    Options left unset take the teacher's :meth:`~diode.DetectorAdapter.synthesis_defaults`,
    then :data:`RECIPE_LOSS` (the reference recipe's stage 1).

    Args:
        teacher: the frozen detector (any :class:`DetectorAdapter`).
        w_task: weight of the adapter's detection loss.
        w_bn: weight of the BatchNorm statistics term.
        first_bn_weight: ``c_1``, the weight of the first BN layer.
        num_bn_layers: use only the first BN layers: an ``int`` count ``k >= 1``, a ``float``
            fraction in ``(0, 1]`` of the teacher's layers (rounded up), or ``None`` for all.
        w_tv1: weight of TV-L1. w_tv2: weight of TV-L2. w_l2: weight of the image L2 norm.
        terms: extra named terms ``{name: (weight, term)}``, each ``term(images, raw, targets)``
            returning a scalar (e.g. :class:`~diode.CompetitionTerm`); logged under ``name``.

    Raises:
        ValueError: the teacher has no BatchNorm layer, a weight is negative, or a term is malformed.
    """

    def __init__(
        self,
        teacher: DetectorAdapter,
        *,
        w_task: float = _UNSET,
        w_bn: float = _UNSET,
        first_bn_weight: float = _UNSET,
        num_bn_layers: int | float | None = _UNSET,
        w_tv1: float = _UNSET,
        w_tv2: float = _UNSET,
        w_l2: float = _UNSET,
        terms: Mapping[str, tuple[float, LossTerm]] | None = None,
    ) -> None:
        super().__init__()
        given = {"w_task": w_task, "w_bn": w_bn, "first_bn_weight": first_bn_weight, "num_bn_layers": num_bn_layers,
                 "w_tv1": w_tv1, "w_tv2": w_tv2, "w_l2": w_l2}
        defaults = dict(teacher.synthesis_defaults())
        check_loss_options(defaults)
        options = {**RECIPE_LOSS, **defaults, **{k: v for k, v in given.items() if v is not _UNSET}}
        for name in ("w_task", "w_bn", "first_bn_weight", "w_tv1", "w_tv2", "w_l2"):
            value = options[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        _check_num_bn_layers(options["num_bn_layers"])
        layers = [m for m in teacher.bn_layers() if isinstance(m, BN_TYPES)]
        if not layers:
            raise ValueError(
                f"{type(teacher.model).__name__} has no BatchNorm layer: DeepInversion matches BatchNorm "
                "running statistics, so the teacher needs BatchNorm1d/2d, SyncBatchNorm or FrozenBatchNorm2d"
            )
        self.teacher = teacher
        self.w_task, self.w_bn = float(options["w_task"]), float(options["w_bn"])
        self.first_bn_weight = float(options["first_bn_weight"])
        self.num_bn_layers: int | float | None = options["num_bn_layers"]
        self.w_tv1, self.w_tv2, self.w_l2 = float(options["w_tv1"]), float(options["w_tv2"]), float(options["w_l2"])
        self.terms = _check_terms(terms)
        self._layers = layers
        self._active: BNStats | None = None
        self._plans: dict[Any, _TermPlan] = {}

    @property
    def bn_layers(self) -> list[nn.Module]:
        """The BatchNorm layers whose statistics are matched, in forward order."""
        k = self.num_bn_layers
        if isinstance(k, float):
            k = math.ceil(k * len(self._layers) - 1e-9)
        return self._layers[:k]

    def options(self) -> dict[str, Any]:
        """The resolved loss options (keys of :data:`LOSS_OPTIONS`), JSON-serializable."""
        return {k: getattr(self, k) for k in LOSS_OPTIONS}

    def replace(self, **changes: Any) -> DeepInversionLoss:
        """A copy with some options changed (e.g. a stage's ``first_bn_weight=0``); validated; terms kept."""
        check_loss_options(changes)
        return DeepInversionLoss(self.teacher, **{**self.options(), **changes}, terms=self.terms)

    def bind(self, teacher: DetectorAdapter) -> DeepInversionLoss:
        """The same options and terms for another teacher (e.g. the synthesizer's private copy)."""
        return DeepInversionLoss(teacher, **self.options(), terms=self.terms)

    @contextlib.contextmanager
    def hooks(self, *, private: bool = False) -> Iterator[BNStats]:
        """Record each BN input's (biased var, mean) at every call during forwards; always undone on exit.

        Yields one list per layer that the forwards fill with one ``(var [C], mean [C])`` per
        call (:meth:`forward` clears the lists before each teacher forward). Stock BatchNorm
        layers that normalize with running statistics take a fused path: the normalization and
        the statistics are one autograd node (one backward pass instead of three). Other layers
        (subclasses with their own forward, layers in training mode) get a plain forward hook.
        While the context is open, :meth:`forward` reuses these instead of installing its own.
        On exit, also after an exception, every module's ``__dict__`` is as it was.

        Args:
            private: the teacher is a model no one else holds (the :class:`~diode.Synthesizer`'s
                own copy). Fused layers then run the fused node as their ``forward``, set on the
                instance for the context. Otherwise only hooks are added: a pre-hook runs the fused
                node and hands the layer a ``[1, C, 1, ...]`` slice, whose output a forward hook
                replaces, which costs the hook dispatch and that small forward in every call
                (about 5 ms per iteration for a 95-layer YOLOv10n on CPU).
        """
        layers = self.bn_layers
        stats: BNStats = [[] for _ in layers]
        handles = []
        fuse = _fused_forward if private else _fused_hooks
        try:
            for i, layer in enumerate(layers):
                if _fusable(layer):
                    handles += fuse(layer, stats[i])
                else:
                    handles.append(layer.register_forward_hook(_stats_hook(stats[i])))
            previous, self._active = self._active, stats
            try:
                yield stats
            finally:
                self._active = previous
        finally:
            for h in handles:
                h.remove()

    def bn_term(self, stats: BNStats) -> tuple[Tensor, Tensor]:
        """Weighted BN-statistics loss and the per-layer values ``[L]`` (unweighted, mean over calls).

        All calls of all layers at once: their statistics are concatenated and the per-call
        norms are a handful of vectorized ops (a segment sum), where a teacher with a hundred
        BN layers would otherwise spend more on small per-layer ops than on its convolutions.
        """
        layers = self.bn_layers
        calls = [c for layer_calls in _require(stats) for c in layer_calls]
        var = torch.cat([v for v, _ in calls])
        plan = self._plan(stats, var)
        repeated = [layer for layer, c in zip(layers, stats, strict=True) for _ in c]
        running_mean = torch.cat([cast(Tensor, layer.running_mean) for layer in repeated]).to(var.dtype)
        running_var = torch.cat([cast(Tensor, layer.running_var) for layer in repeated]).to(var.dtype)
        mean = torch.cat([m for _, m in calls])
        squares = torch.cat([(mean - running_mean).square(), (var - running_var).square()])
        sums = squares.new_zeros(2 * len(calls)).index_add(0, plan.segment, squares)
        norms = sums.clamp_min(1e-30).sqrt().view(2, -1).sum(0)  # per call: ||mean - rm|| + ||var - rv||
        with torch.no_grad():
            per_layer = norms.new_zeros(len(layers)).index_add(0, plan.layer_of_call, norms * plan.share)
        return (norms * plan.weight).sum(), per_layer

    def _plan(self, stats: BNStats, like: Tensor) -> _TermPlan:
        """The index and weight vectors of :meth:`bn_term` for this pattern of calls (cached)."""
        key = (like.device, like.dtype, tuple(tuple(m.shape[0] for _, m in c) for c in stats))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _TermPlan.build(key[2], self.first_bn_weight, like)
        return plan

    def forward(self, images: Tensor, targets: list[dict[str, Tensor]], *,
                generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Run the teacher on ``images`` and compute the loss.

        Args:
            images: ``[B, 3, H, W]`` float in ``[0, 1]`` (already augmented).
            targets: boxes (xyxy pixels of ``images``) and labels per image.
            generator: passed to the teacher's ``task_loss`` (its only source of random draws).

        Returns:
            ``(total, parts)``: the scalar loss and detached per-term values: the built-in
            ``{"task", "bn", "tv_l1", "tv_l2", "l2"}``, one per extra term, and ``"bn_layers"``
            ``[L]`` (no host sync).
        """
        with contextlib.ExitStack() as stack:
            stats = self._active if self._active is not None else stack.enter_context(self.hooks())
            for calls in stats:
                calls.clear()
            raw = self.teacher.forward(images)
            task = self.teacher.task_loss(raw, targets, generator=generator)
            bn, bn_layers = self.bn_term(stats)  # after task_loss: layers it runs (R-CNN heads) count too
        tv_l1, tv_l2 = tv_losses(images)
        l2 = torch.linalg.vector_norm(images.flatten(1), dim=1).mean()
        parts = {"task": task, "bn": bn, "tv_l1": tv_l1, "tv_l2": tv_l2, "l2": l2}
        weighted = [(self.w_task, task), (self.w_bn, bn), (self.w_tv1, tv_l1), (self.w_tv2, tv_l2), (self.w_l2, l2)]
        for name, (weight, term) in self.terms.items():
            value = term(images, raw, targets)
            parts[name] = value
            weighted.append((weight, value))
        # Zero-weight terms stay out of the graph, so the backward never visits them.
        total = sum((w * t for w, t in weighted if w > 0), torch.zeros((), device=images.device))
        out = {k: v.detach() for k, v in parts.items()}
        out["bn_layers"] = bn_layers.detach()
        return total, out


def _stats_hook(calls: list[tuple[Tensor, Tensor]]) -> Callable[..., None]:
    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        calls.append(channel_stats(inputs[0]))
    return hook


def _fused_call(layer: nn.Module, calls: list[tuple[Tensor, Tensor]]) -> Callable[[Tensor], Tensor | None]:
    """``fused(x)``: ``layer``'s output as one fused affine+statistics node, ``(var, mean)`` recorded in ``calls``.

    Returns ``None`` (after recording the statistics) when the layer normalizes with batch
    statistics at that call (training mode): its own forward must run then.
    """
    affine: dict[tuple[int, torch.dtype], tuple[Tensor, Tensor]] = {}  # per context: the teacher is frozen

    def fused(x: Tensor) -> Tensor | None:
        if not _uses_running_stats(layer):
            calls.append(channel_stats(x))
            return None
        key = (x.ndim, x.dtype)
        if key not in affine:
            shape = _channel_shape(x)
            affine[key] = tuple(t.view(shape).to(x.dtype) for t in _eval_affine(layer))  # type: ignore[assignment]
        y, var, mean = _AffineWithStats.apply(x, *affine[key])
        calls.append((var, mean))
        return y  # type: ignore[no-any-return]

    return fused


def _fused_hooks(layer: nn.Module, calls: list[tuple[Tensor, Tensor]]) -> list[Any]:
    """Pre- and post-forward hooks running ``layer`` as one fused affine+statistics node."""
    fused = _fused_call(layer, calls)
    pending: list[Tensor] = []

    def pre(module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
        x = inputs[0]
        y = fused(x)
        if y is None:
            return None
        pending.append(y)
        # The layer's own forward now runs on one value per channel; its output is replaced below.
        return (x.detach()[(slice(0, 1), slice(None)) + (slice(0, 1),) * (x.ndim - 2)], *inputs[1:])

    def post(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
        return pending.pop() if pending else None

    # The post hook runs first, so any hook of the user's sees the real output.
    return [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post, prepend=True)]


class _InstanceForward:
    """Handle of a ``forward`` set on one module instance; ``remove()`` deletes it again."""

    def __init__(self, layer: nn.Module, forward: Callable[..., Tensor]) -> None:
        self.layer = layer
        layer.forward = forward  # type: ignore[method-assign]

    def remove(self) -> None:
        self.layer.__dict__.pop("forward", None)


def _fused_forward(layer: nn.Module, calls: list[tuple[Tensor, Tensor]]) -> list[Any]:
    """``layer.forward`` replaced by the fused node on this instance (a model no one else holds)."""
    fused = _fused_call(layer, calls)
    plain = type(layer).forward

    def forward(x: Tensor) -> Tensor:
        y = fused(x)
        return plain(layer, x) if y is None else y

    return [_InstanceForward(layer, forward)]


def _check_num_bn_layers(k: Any) -> None:
    if k is None:
        return
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ValueError(f"num_bn_layers must be an int >= 1, a fraction in (0, 1] or None, got {k!r}")
    if isinstance(k, int) and k < 1:
        raise ValueError(f"num_bn_layers must be >= 1 as a count, got {k}")
    if isinstance(k, float) and not 0 < k <= 1:
        raise ValueError(f"num_bn_layers as a float is a fraction of the layers in (0, 1], got {k}")


def _check_terms(terms: Mapping[str, tuple[float, LossTerm]] | None) -> dict[str, tuple[float, LossTerm]]:
    checked: dict[str, tuple[float, LossTerm]] = {}
    for name, entry in (terms or {}).items():
        if not isinstance(name, str) or not name or name in BUILTIN_TERMS or name in ("total", "bn_layers"):
            raise ValueError(f"extra loss term name {name!r} is empty or taken by a built-in term")
        if not isinstance(entry, tuple) or len(entry) != 2 or not callable(entry[1]):
            raise ValueError(f"terms[{name!r}] must be (weight, callable), got {entry!r}")
        weight = entry[0]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"terms[{name!r}] weight must be a number >= 0, got {weight!r}")
        checked[name] = (float(weight), entry[1])
    return checked


def check_loss_options(options: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming any key of ``options`` that is not in :data:`LOSS_OPTIONS`."""
    unknown = set(options) - set(LOSS_OPTIONS)
    if unknown:
        raise ValueError(f"unknown DeepInversionLoss option(s): {', '.join(sorted(unknown))}; "
                         f"valid: {', '.join(LOSS_OPTIONS)}")


def _require(stats: BNStats) -> BNStats:
    missing = [i for i, calls in enumerate(stats) if not calls]
    if missing:
        raise RuntimeError(f"BatchNorm layer(s) {missing} were not run by the teacher's forward; "
                           "set num_bn_layers to skip layers the forward does not use")
    return stats
