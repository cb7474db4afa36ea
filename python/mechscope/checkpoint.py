"""Reading HuggingFace checkpoints: safetensors files, read into memory (PyTorch's
pytorch_model.bin: torch_file.py).

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
({name: {dtype, shape, data_offsets [begin, end)}} plus an optional
__metadata__), then the raw little-endian data. Each tensor is read into memory of
its own (float16 and bfloat16 kept as they are, or widened to float32); nothing stays mapped.
A mapped file that is truncated or rewritten while a model uses it (save_pretrained
into the same folder does exactly that) kills the process with SIGBUS on the next
run, or silently changes the weights; a model holding its own copy keeps the
weights it loaded. The cost is memory equal to the weights, not shared with other
processes that load the same file.
"""
import json
import math
import os
import re
import stat

import numpy as np

from . import _dtypes

_DTYPES = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_FLOAT = ("F32", "F16", "BF16", "F64")


def _to_float32(raw, dtype, keep_half=False):
    if dtype == "F32":
        return raw
    if keep_half and dtype == "F16":
        return raw
    if keep_half and dtype == "BF16":
        return _dtypes.as_bfloat16(raw)
    if dtype == "BF16":
        # bfloat16 is the top half of a float32
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def open_regular(path, what="checkpoint"):
    """Open a regular file for reading; ValueError for anything else. Opening does
    not block (a FIFO would wait for a writer forever)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot be opened ({e.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{what} {path}: not a regular file (a FIFO, device or directory); "
                             "mechscope reads checkpoints from regular files")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_json_object(path, what="checkpoint"):
    """The JSON object (a dict) in a regular file; ValueError naming the file otherwise."""
    with open_regular(path, what) as f:
        try:
            value = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{what} {path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} {path}: not a JSON object")
    return value


def is_present(path, what="checkpoint"):
    """True for a regular file, False if nothing is there, ValueError for anything else."""
    if not os.path.lexists(path):
        return False
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what} {path}: not a regular file (a FIFO, device or directory); "
                         "mechscope reads checkpoints from regular files")
    return True


def _read_exactly(f, offset, nbytes, path, name):
    """nbytes from offset, into new memory of their own (uint8)."""
    out = np.empty(nbytes, np.uint8)
    f.seek(offset)
    view, got = memoryview(out), 0
    while got < nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise ValueError(f"checkpoint {path}: tensor {name!r} is cut short (the file is truncated "
                             "or was rewritten while being read)")
        got += n
    return out


def _is_count(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _header_entry(path, name, info):
    """(dtype, shape, begin, end) of one tensor's header entry, checked for types."""
    where = f"checkpoint {path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise ValueError(f"{where}: its header entry is not a JSON object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise ValueError(f"{where}: dtype is missing or not a string ({dtype!r})")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise ValueError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n) for n in offsets):
        raise ValueError(f"{where}: data_offsets must be [begin, end] non-negative integers, got {offsets!r}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def read_safetensors(path, wanted=None, keep_half=False):
    """{name: float32 array} for the floating-point tensors of one file (other
    tensors: an empty array of their dtype, so that they can be reported unused).
    keep_half: F16 and BF16 tensors stay 2-byte (float16, _dtypes.BFLOAT16).

    wanted: a predicate on names; other tensors are skipped. Raises ValueError
    naming the file for anything truncated or inconsistent."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"checkpoint {path}: file is truncated (no header)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise ValueError(f"checkpoint {path}: header length {n} does not fit in the file "
                             f"({size} bytes): truncated or not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"checkpoint {path}: header is not valid JSON ({type(e).__name__}: {e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"checkpoint {path}: header is not a JSON object")
        data_size = size - 8 - n
        out = {}
        for name, info in header.items():
            if name == "__metadata__" or (wanted is not None and not wanted(name)):
                continue
            dtype, shape, begin, end = _header_entry(path, name, info)
            if dtype not in _DTYPES:
                raise ValueError(f"checkpoint {path}: tensor {name!r} has unsupported dtype {dtype}")
            nbytes = math.prod(shape) * _DTYPES[dtype].itemsize  # exact: no int64 overflow
            if not (0 <= begin <= end) or end - begin != nbytes:
                raise ValueError(f"checkpoint {path}: tensor {name!r} has {end - begin} bytes for shape "
                                 f"{list(shape)} of {dtype} ({nbytes} bytes expected)")
            if end > data_size:
                raise ValueError(f"checkpoint {path}: tensor {name!r} ends at byte {end} of the data but "
                                 f"the file holds only {data_size}: the file is truncated")
            if dtype not in _FLOAT:
                # not a weight: kept (unread) so that the model can name it as unused
                out[name] = np.zeros(0, _DTYPES[dtype])
                continue
            raw = _read_exactly(f, 8 + n + begin, nbytes, path, name).view(_DTYPES[dtype]).reshape(shape)
            out[name] = _to_float32(raw, dtype, keep_half)
    return out


def read_folder(folder, wanted=None, keep_half=False):
    """All tensors of a checkpoint folder: model.safetensors, shards listed in
    model.safetensors.index.json, or, when the folder has no safetensors, PyTorch's
    pytorch_model.bin or its shards (pytorch_model.bin.index.json), read without PyTorch."""
    from .torch_file import read_pytorch_bin  # noqa: PLC0415  (it imports this module)
    for index, single, read in (("model.safetensors.index.json", "model.safetensors", read_safetensors),
                                ("pytorch_model.bin.index.json", "pytorch_model.bin", read_pytorch_bin)):
        index, single = os.path.join(folder, index), os.path.join(folder, single)
        if is_present(index):
            return _read_shards(folder, index, read, wanted, keep_half)
        if is_present(single):
            return read(single, wanted, keep_half)
    raise ValueError(f"checkpoint {folder}: no model.safetensors, pytorch_model.bin or their shards' index")


def _read_shards(folder, index, read, wanted, keep_half):
    """The tensors of the shards an index file lists, each read by read(path, wanted, keep_half)."""
    with open_regular(index) as f:
        try:
            weight_map = json.loads(f.read())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError):
            raise ValueError(f"checkpoint {index}: not a valid index (no weight_map)") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise ValueError(f"checkpoint {index}: weight_map must map tensor names to shard file names")
    for shard in set(weight_map.values()):
        parts = shard.replace("\\", "/").split("/")
        if not shard or os.path.isabs(shard) or ".." in parts or "\0" in shard:
            raise ValueError(f"checkpoint {index}: shard {shard!r} is not a file name inside the folder")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(folder, shard)
        if not is_present(path):
            raise ValueError(f"checkpoint {folder}: shard {shard} listed in the index is missing")
        tensors.update(read(path, wanted, keep_half))
    missing = [k for k in weight_map if k not in tensors and (wanted is None or wanted(k))]
    if missing:
        raise ValueError(f"checkpoint {folder}: tensors listed in the index are missing from their shards: "
                         f"{missing[:5]}")
    return tensors


def hub_cache_dirs():
    """Where a local HuggingFace hub cache may be, most specific first."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        dirs.append(os.environ["HUGGINGFACE_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        dirs.append(os.path.join(os.environ["HF_HOME"], "hub"))
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    dirs.append(os.path.join(xdg, "huggingface", "hub"))
    return dirs


def hub_names(name):
    """The repository names a model may be cached under, `name` first: the names
    HuggingFace gives the classic GPT-2 models under their organisations (gpt2 ->
    openai-community/gpt2), and TransformerLens's short names of the models mechscope
    runs (gpt2-small, pythia-70m, tiny-stories-33M, tiny-stories-2L-33M, opt-125m,
    gpt-neo-125M, gpt-j-6B)."""
    names = [name]
    base = {"gpt2-small": "gpt2"}.get(name, name)
    if base in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        names += [base, "openai-community/" + base]
    elif base == "distilgpt2":
        names.append("distilbert/distilgpt2")
    elif re.fullmatch(r"pythia-[0-9.]+[mb](-deduped)?(-v0)?", base):
        names.append("EleutherAI/" + base)
    elif re.fullmatch(r"opt-[0-9.]+[mb]", base):
        names.append("facebook/" + base)
    elif re.fullmatch(r"gpt-neo-[0-9.]+[MB]|gpt-j-6B", base):
        names.append("EleutherAI/" + base)
    else:
        m = re.fullmatch(r"tiny-stories-(instruct-)?(?:([12])L-)?([0-9]+M)", base)
        if m:
            layers = {"1": "1Layer-", "2": "2Layers-"}.get(m.group(2), "")
            instruct = "Instruct-" if m.group(1) else ""
            if instruct and m.group(2) == "1":
                instruct = "Instuct-"  # (the repository's own spelling)
            names.append(f"roneneldan/TinyStories-{instruct}{layers}{m.group(3)}")
    return list(dict.fromkeys(names))


def _repo_folder(cache, name):
    """The cache's folder of repository `name`, its case as the cache spells it (a
    repository downloaded as EleutherAI/gpt-neo-125m is found as gpt-neo-125M too)."""
    folder = "models--" + name.replace("/", "--")
    if os.path.isdir(os.path.join(cache, folder)):
        return os.path.join(cache, folder)
    try:
        entries = os.listdir(cache)
    except OSError:
        return None
    same = [e for e in entries if e.lower() == folder.lower()]
    return os.path.join(cache, same[0]) if len(same) == 1 else None


def find_in_hub_cache(name, revision=None):
    """The snapshot folder of model `name` ('gpt2', 'org/model', or a name of hub_names)
    in a local hub cache, or None.

    revision: None for the main branch (refs/main; without it, the newest snapshot), or
    a branch or tag the cache has a ref for (Pythia's training checkpoints are branches,
    'step1000') or a full commit hash; a revision the cache does not hold is a
    ValueError naming the ones it does, never another snapshot."""
    if revision is not None and (not isinstance(revision, str) or not revision or os.path.isabs(revision)
                                 or ".." in revision.split("/") or "\0" in revision):
        raise ValueError(f"revision: expected a branch, tag or commit hash, got {revision!r}")
    for cache, repo_name in ((c, n) for n in hub_names(name) for c in hub_cache_dirs()):
        repo = _repo_folder(cache, repo_name)
        snapshots = os.path.join(repo or "", "snapshots")
        if repo is None or not os.path.isdir(snapshots):
            continue
        ref = os.path.join(repo, "refs", revision or "main")
        if os.path.isfile(ref):
            with open(ref) as f:
                candidate = os.path.join(snapshots, f.read().strip())
            if os.path.isdir(candidate):
                return candidate
        if revision is not None:
            if os.path.isdir(os.path.join(snapshots, revision)) and os.path.basename(revision) == revision:
                return os.path.join(snapshots, revision)
            refs = os.path.join(repo, "refs")
            held = sorted(os.listdir(refs)) if os.path.isdir(refs) else []
            raise ValueError(f"revision: {revision!r} of {repo_name} is not in the local HuggingFace cache ({repo}; "
                             f"its refs: {', '.join(held) or 'none'}; mechscope never downloads)")
        found = sorted((os.path.getmtime(os.path.join(snapshots, d)), d) for d in os.listdir(snapshots))
        if found:
            return os.path.join(snapshots, found[-1][1])
    return None
