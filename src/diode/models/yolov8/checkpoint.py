"""A safe reader of Ultralytics ``.pt`` checkpoints: a restricted unpickler that runs nothing from the file.

Such a checkpoint is a torch zip archive whose ``data.pkl`` pickles a dict
(``{"model": DetectionModel, "ema": ..., "train_args": ..., ...}``) of the
framework's own classes. Unpickling normally imports those classes and calls
whatever the file names, which is arbitrary code execution. Here:

- only an allow-list of data types is constructed: tensors (rebuilt by diode's
  own functions from the archive's storages), ``OrderedDict``, ``set``,
  ``frozenset``, ``slice``, ``torch.Size``, dtypes and devices;
- every other class named by the file (the framework's modules, ``torch.nn``
  layers, numpy scalars) becomes an inert :class:`Placeholder` that records the
  arguments and state it was given; no code of that class runs, and no real
  type's state setter runs either (state is set on placeholders only);
- a global outside the namespaces a model checkpoint refers to (``os.system``,
  ``subprocess.Popen``, ``builtins.eval``, ...) is refused with ``ValueError``
  before anything is built.

The architecture spec (the model's ``yaml`` attribute), class names, strides and
the state dict (from ``ema`` when present, else ``model``; FP16 as FP32) are then
read from the placeholders.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from diode.models.yolov8.builder import YOLOModel

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_DTYPES = {name: getattr(torch, name) for name in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "double", "float", "half", "long", "int", "short")}

#: Namespaces whose classes may appear in a model checkpoint: they become placeholders.
_PLACEHOLDER_NAMESPACES = ("ultralytics", "models", "utils", "torch", "numpy", "collections", "pathlib", "argparse",
                           "types", "datetime", "__main__")


class Placeholder:
    """An inert stand-in for a class named in a checkpoint; it records, and runs nothing.

    Attributes:
        origin: the dotted name the file gave (``"ultralytics.nn.modules.head.Detect"``).
        args: positional arguments the pickle passed when creating it.
        state: what the pickle set as its state (for ``nn.Module``: its ``__dict__``).
        items: values the pickle appended (list-like classes).
        mapping: items the pickle set by key (dict-like classes).
    """

    origin = "?"
    args: tuple[Any, ...]
    state: Any
    items: list[Any]
    mapping: dict[Any, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        obj.items = []
        obj.mapping = {}
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to do: :meth:`__new__` recorded the arguments."""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.mapping[key] = value

    def append(self, value: Any) -> None:
        """Record an appended value."""
        self.items.append(value)

    def extend(self, values: Any) -> None:
        """Record appended values."""
        self.items.extend(values)

    def attr(self, name: str, default: Any = None) -> Any:
        """A recorded attribute (``state`` as an instance ``__dict__``, or a ``(dict, slots)`` pair)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict | type(None)):
            state = {**(state[0] or {}), **(state[1] or {})}
        return state.get(name, default) if isinstance(state, dict) else default

    def __repr__(self) -> str:
        return f"Placeholder({self.origin})"


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _TensorType:
    name: str


def _rebuild_tensor(storage: Tensor, storage_offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *_: Any) -> Tensor:
    if not isinstance(storage, Tensor):
        raise pickle.UnpicklingError("a tensor refers to something that is not a storage of the archive")
    return storage.as_strided(tuple(size), tuple(stride), int(storage_offset))


def _rebuild_parameter(data: Tensor, *_: Any) -> Tensor:
    if not isinstance(data, Tensor):
        raise pickle.UnpicklingError("a parameter wraps something that is not a tensor")
    return data


def _rebuild_from_type(func: Any, new_type: Any, args: tuple[Any, ...], state: Any) -> Tensor:
    if func not in (_rebuild_tensor, _rebuild_parameter) or not isinstance(new_type, _TensorType):
        raise pickle.UnpicklingError("a tensor of an unsupported type")
    return func(*args)


def _encode(text: str, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding.lower() not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError("bytes with an unsupported encoding")
    return text.encode(encoding)


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    if not (isinstance(cls, type) and issubclass(cls, Placeholder)) or base is not object:
        raise pickle.UnpicklingError("an object reconstructed from an unsupported class")
    return cls()


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "object"): object,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): _TensorType("Tensor"),
    ("torch.nn.parameter", "Parameter"): _TensorType("Parameter"),
    ("_codecs", "encode"): _encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
    **{("torch", name): dtype for name, dtype in _DTYPES.items()},
}
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _RestrictedUnpickler(pickle._Unpickler):
    """Constructs allow-listed types and placeholders only; storages come from the zip archive.

    The pure-Python unpickler, so that ``BUILD`` (setting an object's state) can be
    limited to placeholders (and plain attributes of an ``OrderedDict``): no
    ``__setstate__`` of a real type runs either.
    """

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)
    stack: list[Any]

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Placeholder):
            inst.__setstate__(state)
        elif type(inst) is OrderedDict and isinstance(state, dict):  # a state dict's _metadata: plain attributes
            inst.__dict__.update(state)
        else:
            raise pickle.UnpicklingError(f"the file sets the state of a {type(inst).__name__}; only the "
                                         "placeholders of model classes take a state")

    dispatch[pickle.BUILD[0]] = _load_build

    def __init__(self, file: Any, load_storage: Callable[[str, torch.dtype], Tensor]) -> None:
        super().__init__(file)
        self._load_storage = load_storage
        self._placeholders: dict[str, type[Placeholder]] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module.split(".")[0] not in _PLACEHOLDER_NAMESPACES:
            raise pickle.UnpicklingError(
                f"the file refers to {module}.{name}, which is neither a model class nor a data type; "
                "diode does not run code from checkpoint files")
        key = f"{module}.{name}"
        if key not in self._placeholders:
            self._placeholders[key] = type(name, (Placeholder,), {"origin": key, "__module__": __name__})
        return self._placeholders[key]

    def persistent_load(self, pid: Any) -> Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        return self._load_storage(pid[2], pid[1].dtype)


@dataclass
class Checkpoint:
    """What diode reads from an Ultralytics checkpoint.

    Attributes:
        spec: the architecture spec (the model's ``yaml`` dict).
        state_dict: parameters and buffers, floating tensors as float32, keys as the
            framework names them (``model.0.conv.weight``, ...).
        class_names: one name per class, or ``None`` if the file has none.
        stride: the model's strides, e.g. ``(8.0, 16.0, 32.0)``, or ``()``.
        bn_eps: BatchNorm ``eps`` per module name (``model.0.bn``: ``0.001``).
        source: ``"ema"`` or ``"model"``: which entry the weights came from.
        half: the stored weights were FP16.
        model_class: the dotted class name of the stored model.
        meta: plain-typed top-level entries (``epoch``, ``date``, ``version``, ...).
    """

    spec: dict[str, Any]
    state_dict: OrderedDict[str, Tensor]
    class_names: list[str] | None
    stride: tuple[float, ...]
    bn_eps: dict[str, float]
    source: str
    half: bool
    model_class: str
    meta: dict[str, Any] = field(default_factory=dict)


def read_pickle(path: PathLike) -> Any:
    """Unpickle a torch zip archive with the restricted unpickler (placeholders for classes).

    Raises:
        ValueError: not a torch zip archive, or the pickle names a forbidden global or
            is malformed (the message says which).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a torch zip checkpoint ({_describe(path)}). Ultralytics .pt files are "
                         "zip archives saved by torch>=1.6; darknet .weights files go to "
                         "YOLOv3Adapter.from_darknet")
    with zipfile.ZipFile(path) as zf:
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path} is a zip file but not a torch checkpoint (no single <archive>/data.pkl)")
        root = pickles[0][: -len("data.pkl")]
        byteorder = f"{root}byteorder"
        if byteorder in zf.namelist() and zf.read(byteorder).strip() not in (b"little", b""):
            raise ValueError(f"{path} stores big-endian tensors, which diode does not read")
        storages: dict[str, Tensor] = {}

        def load_storage(key: str, dtype: torch.dtype) -> Tensor:
            if key not in storages:
                try:
                    data = bytearray(zf.read(f"{root}data/{key}"))
                except KeyError:
                    raise pickle.UnpicklingError(f"storage {key} is missing from the archive") from None
                storages[key] = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            return storages[key]

        with zf.open(pickles[0]) as f:
            try:
                return _RestrictedUnpickler(f, load_storage).load()
            except (pickle.UnpicklingError, TypeError, AttributeError, EOFError, IndexError, KeyError,
                    ValueError, RuntimeError) as e:
                raise ValueError(f"refused to load {path}: {e}") from None


def _describe(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:1] == b"\x80":
        return "a bare pickle: a legacy torch file; re-save it with a recent torch"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "a binary file, e.g. darknet .weights"
    return "a text file"


def load_checkpoint(path: PathLike) -> Checkpoint:
    """Read an Ultralytics detection checkpoint without running code from it.

    Args:
        path: a ``.pt`` file saved by the framework (``best.pt``, ``yolov8n.pt``, ...).

    Raises:
        ValueError: not a torch zip checkpoint (darknet ``.weights``, text, ...), a plain
            state dict or other object without a model, a model without its
            architecture spec, or a refused pickle.
    """
    obj = read_pickle(path)
    if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds a plain state dict: diode needs the full Ultralytics checkpoint, which "
                         "carries the architecture spec; or build the model with YOLOModel(spec) and load it")
    if not isinstance(obj, Mapping) or not any(isinstance(obj.get(k), Placeholder) for k in ("ema", "model")):
        raise ValueError(f"{path} is not an Ultralytics checkpoint: expected a dict with a 'model' entry, got "
                         f"{type(obj).__name__}")
    source = "ema" if isinstance(obj.get("ema"), Placeholder) else "model"
    model = obj[source]
    spec = model.attr("yaml")
    if not isinstance(spec, dict) or "backbone" not in spec or "head" not in spec:
        raise ValueError(f"the {source} in {path} ({model.origin}) carries no architecture spec ('yaml')")
    state_dict: OrderedDict[str, Tensor] = OrderedDict()
    bn_eps: dict[str, float] = {}
    _collect(model, "", state_dict, bn_eps)
    if not state_dict:
        raise ValueError(f"the {source} in {path} has no weights")
    half = any(t.dtype == torch.float16 for t in state_dict.values())
    for k, t in state_dict.items():
        state_dict[k] = t.float() if t.is_floating_point() else t.clone()
    stride = model.attr("stride")
    meta = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, str | int | float | bool)}
    return Checkpoint(spec=dict(spec), state_dict=state_dict, class_names=_names(model.attr("names")),
                      stride=tuple(float(s) for s in stride.tolist()) if isinstance(stride, Tensor) else (),
                      bn_eps=bn_eps, source=source, half=half, model_class=model.origin, meta=meta)


def _collect(module: Any, prefix: str, out: OrderedDict[str, Tensor], bn_eps: dict[str, float]) -> None:
    if not isinstance(module, Placeholder):
        raise ValueError(f"module {prefix.rstrip('.') or '<root>'} is a {type(module).__name__}, not a module")
    non_persistent = module.attr("_non_persistent_buffers_set") or set()
    tensors = [*(module.attr("_parameters") or {}).items(),
               *((k, v) for k, v in (module.attr("_buffers") or {}).items() if k not in non_persistent)]
    for name, value in tensors:
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise ValueError(f"{prefix}{name} is a {type(value).__name__}, not a tensor diode can read")
        out[prefix + name] = value
    if module.origin.endswith("BatchNorm2d") and isinstance(module.attr("eps"), float):
        bn_eps[prefix.rstrip(".")] = module.attr("eps")
    for name, child in (module.attr("_modules") or {}).items():
        if child is not None:
            _collect(child, f"{prefix}{name}.", out, bn_eps)


def _names(names: Any) -> list[str] | None:
    if isinstance(names, Mapping) and names:
        try:
            return [str(names[i]) for i in range(len(names))]
        except KeyError:
            return None
    if isinstance(names, list | tuple) and names:
        return [str(n) for n in names]
    return None


def load_model(path: PathLike) -> tuple[YOLOModel, Checkpoint]:
    """Build the checkpoint's architecture and load its weights strictly.

    BatchNorm ``eps`` values are taken from the file (the family trains with 1e-3).

    Returns:
        ``(model, checkpoint)``: a :class:`~diode.models.yolov8.builder.YOLOModel` in
        training mode with float32 weights, and what was read from the file.

    Raises:
        ValueError: everything :func:`load_checkpoint` raises, plus missing or
            unexpected keys, shape mismatches (named), or strides that disagree.
    """
    ckpt = load_checkpoint(path)
    model = YOLOModel(ckpt.spec)
    own = model.state_dict()
    missing = [k for k in own if k not in ckpt.state_dict]
    unexpected = [k for k in ckpt.state_dict if k not in own]
    if missing or unexpected:
        raise ValueError(f"{path}: the weights do not fit the spec's architecture; missing keys "
                         f"{_few(missing)}, unexpected keys {_few(unexpected)}")
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in ckpt.state_dict.items()
              if v.shape != own[k].shape]
    if shapes:
        raise ValueError(f"{path}: shape mismatch (checkpoint vs spec): {_few(shapes)}")
    model.load_state_dict(ckpt.state_dict, strict=True)
    modules = dict(model.named_modules())
    for name, eps in ckpt.bn_eps.items():
        bn = modules.get(name)
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.eps = eps
    if ckpt.stride and tuple(float(s) for s in model.strides) != ckpt.stride:
        raise ValueError(f"{path}: the checkpoint's strides {ckpt.stride} differ from the built model's "
                         f"{model.strides}")
    logger.info("loaded %s (%s, %s weights%s): %d tensors", path, ckpt.model_class, ckpt.source,
                ", FP16 -> FP32" if ckpt.half else "", len(ckpt.state_dict))
    return model, ckpt


def _few(items: list[str], n: int = 8) -> str:
    if not items:
        return "none"
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more
