"""Reading pytorch_model.bin checkpoints without PyTorch.

Many classic checkpoints (TinyStories, OPT, older GPT-Neo and GPT-J uploads) ship only
as PyTorch's own format. That format is a zip archive: `<name>/data.pkl`, a pickle of
the state dict, and `<name>/data/<key>`, the raw little-endian bytes of each storage.
In the pickle a tensor is a call to torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, ...), and a storage a persistent id ('storage', torch.FloatStorage, key,
location, numel).

The pickle is read by an unpickler that knows only those names (and OrderedDict): any
other global, which an arbitrary pickle could use to run code, is refused. No
PyTorch is imported. Tensors are rebuilt from their storage with their own offset and
strides (a transposed view, two names sharing one storage), each copied into memory
of its own; only the tensors `wanted` are read.
"""
import collections
import io
import math
import pickle
import zipfile

import numpy as np

from . import _dtypes
from .checkpoint import open_regular

# torch's storage classes -> (NumPy dtype, is a float)
_STORAGES = {
    "FloatStorage": (np.dtype("<f4"), True), "HalfStorage": (np.dtype("<f2"), True),
    "BFloat16Storage": (np.dtype("<u2"), True), "DoubleStorage": (np.dtype("<f8"), True),
    "LongStorage": (np.dtype("<i8"), False), "IntStorage": (np.dtype("<i4"), False),
    "ShortStorage": (np.dtype("<i2"), False), "CharStorage": (np.dtype("i1"), False),
    "ByteStorage": (np.dtype("u1"), False), "BoolStorage": (np.dtype("?"), False),
}


class _StorageKind(str):
    """A torch storage class named in the pickle (only its name is kept)."""


class _Storage(tuple):
    """(key, storage class name, number of elements): a storage not yet read"""


class _Tensor(tuple):
    """(storage, element offset, shape, strides in elements): a tensor not yet read"""


def _rebuild_tensor(storage, offset, size, stride, *rest):
    return _Tensor((storage, offset, tuple(size), tuple(stride)))


def _rebuild_parameter(data, *rest):
    return data


_GLOBALS = {("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data, path):
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module, name):
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGES:
            return _StorageKind(name)
        raise ValueError(f"checkpoint {self.path}: refusing the pickled name {module}.{name} (mechscope reads "
                         "state dicts of tensors only, never code a pickle could run)")

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageKind) or not isinstance(pid[2], str)
                or not isinstance(pid[4], int) or pid[4] < 0):
            raise ValueError(f"checkpoint {self.path}: a storage reference of unknown form ({pid!r:.80})")
        return _Storage((pid[2], str(pid[1]), pid[4]))


def _is_count(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _state_dict(archive, path):
    """(the archive's folder name, {name: _Tensor}) from data.pkl"""
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise ValueError(f"checkpoint {path}: not a PyTorch checkpoint (no single <name>/data.pkl in the archive)")
    prefix = pickles[0][:-len("data.pkl")]
    order = prefix + "byteorder"
    if order in archive.namelist() and archive.read(order).strip() not in (b"little", b""):
        raise ValueError(f"checkpoint {path}: stored big-endian; mechscope reads little-endian checkpoints only")
    try:
        state = _Unpickler(archive.read(pickles[0]), path).load()
    except ValueError:
        raise
    except Exception as e:  # a damaged pickle: any of pickle's many errors
        raise ValueError(f"checkpoint {path}: its pickle cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"checkpoint {path}: does not hold a state dict (names -> tensors)")
    for name, t in state.items():
        if not isinstance(t, _Tensor):
            raise ValueError(f"checkpoint {path}: {name!r} is not a tensor")
        storage, offset, size, stride = t
        if (not isinstance(storage, _Storage) or not _is_count(offset) or len(size) != len(stride)
                or not all(_is_count(n) for n in size + stride)):
            raise ValueError(f"checkpoint {path}: tensor {name!r} has a malformed shape or layout")
    return prefix, state


def _storage_array(archive, prefix, storage, path):
    key, kind, numel = storage
    dtype = _STORAGES[kind][0]
    member = f"{prefix}data/{key}"
    try:
        raw = archive.read(member)
    except KeyError:
        raise ValueError(f"checkpoint {path}: storage {key} is missing from the archive") from None
    if len(raw) < numel * dtype.itemsize:
        raise ValueError(f"checkpoint {path}: storage {key} holds {len(raw)} bytes, {numel * dtype.itemsize} "
                         "expected: the file is truncated or damaged")
    return np.frombuffer(raw, dtype, count=numel)


def read_pytorch_bin(path, wanted=None, keep_half=False):
    """{name: float32 array} for the floating-point tensors of one pytorch_model.bin
    (other tensors: an empty array of their dtype, so that they can be reported
    unused). keep_half: float16 and bfloat16 tensors stay 2-byte. wanted: a predicate
    on names; other tensors are not read. ValueError naming the file for anything
    malformed, truncated or not a state dict."""
    with open_regular(path) as f:
        try:
            archive = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"checkpoint {path}: not a zip archive ({e}); mechscope reads PyTorch checkpoints "
                             "saved by torch 1.6 or later, or safetensors") from None
        with archive:
            prefix, state = _state_dict(archive, path)
            storages, out = {}, {}
            for name, (storage, offset, size, stride) in state.items():
                if wanted is not None and not wanted(name):
                    continue
                dtype, is_float = _STORAGES[storage[1]]
                if not is_float:
                    out[name] = np.zeros(0, dtype)  # not a weight: named as unused if the model sees it
                    continue
                if storage not in storages:
                    try:
                        storages[storage] = _storage_array(archive, prefix, storage, path)
                    except (zipfile.BadZipFile, OSError, EOFError) as e:
                        raise ValueError(f"checkpoint {path}: storage {storage[0]} cannot be read ({e})") from None
                flat = storages[storage]
                last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if math.prod(size) else offset - 1
                if last >= flat.size:
                    raise ValueError(f"checkpoint {path}: tensor {name!r} reaches past the end of its storage")
                view = np.lib.stride_tricks.as_strided(flat[offset:], size, [s * dtype.itemsize for s in stride])
                a = np.array(view, order="C")  # memory of its own, C order
                if storage[1] == "BFloat16Storage":
                    a = _dtypes.as_bfloat16(a) if keep_half else _dtypes.to_float32(_dtypes.as_bfloat16(a))
                elif storage[1] == "HalfStorage" and not keep_half or storage[1] == "DoubleStorage":
                    a = a.astype(np.float32)
                out[name] = a
    return out
