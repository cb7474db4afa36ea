"""The on-disk layout of an extraction, and the result object both paths return.

A folder holds one extraction:

    manifest.json             what was extracted (model fingerprint, sites, positions,
                              chunking, a digest of the data) and which chunks are done
    shards/chunk-000012/      one chunk's rows while the extraction runs:
        index.npy             [rows, 2] int64 (prompt, position)
        <site>.npy            [rows, *site shape]
    index.npy, <site>.npy     once every chunk is done: all rows in input order,
                              opened memory-mapped

Shard files are written first, then the manifest (replaced atomically) records the
batch or the chunk as done, so an interrupted extraction resumes with the first batch
the manifest does not list. A worker of a cluster writes its own shard directories and
only the driver writes the manifest (there a chunk is the unit that is redone).
"""
import hashlib
import json
import os
import shutil

import numpy as np

FORMAT = "mechscope-activations"
VERSION = 1
MANIFEST = "manifest.json"


def model_fingerprint(model):
    """A digest of the model's configuration and weights (a strided sample of every
    array: enough to tell checkpoints apart without reading gigabytes)."""
    cached = getattr(model, "_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.sha1(json.dumps(model.config, sort_keys=True, default=str).encode())
    for name in sorted(model._weights):
        a = model._weights[name].reshape(-1)
        h.update(name.encode())
        h.update(np.ascontiguousarray(a[:: max(1, a.size // 4096)]).tobytes())
    model._fingerprint = h.hexdigest()
    return model._fingerprint


def chunk_digest(tokens, positions):
    """A digest of one chunk's prompts and the positions taken from them."""
    h = hashlib.sha1()
    for t, p in zip(tokens, positions):
        h.update(np.int64(len(t)).tobytes())
        h.update(np.ascontiguousarray(t, np.int32).tobytes())
        h.update(np.int64(len(p)).tobytes())
        h.update(np.ascontiguousarray(p, np.int64).tobytes())
    return h.hexdigest()


def _site_file(folder, site):
    return os.path.join(folder, site + ".npy")


def _shard_dir(folder, chunk):
    return os.path.join(folder, "shards", f"chunk-{chunk:06d}")


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class Store:
    """An extraction folder being written (by one driver)."""

    def __init__(self, folder, spec, overwrite=False):
        if not isinstance(folder, (str, os.PathLike)):
            raise TypeError(f"out: expected a folder path, got {type(folder).__name__}")
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, MANIFEST)
        if os.path.exists(self.path):
            with open(self.path) as f:
                try:
                    manifest = json.load(f)
                except json.JSONDecodeError:
                    manifest = {}
            if manifest.get("format") != FORMAT:
                raise ValueError(f"out: {self.folder} has a {MANIFEST} that is not a mechscope extraction")
            if manifest["spec"] != spec:
                if not overwrite:
                    diff = sorted(k for k in set(spec) | set(manifest["spec"])
                                  if spec.get(k) != manifest["spec"].get(k))
                    raise ValueError(f"out: {self.folder} holds a different extraction (differs in: "
                                     f"{', '.join(diff)}); use another folder or pass overwrite=True")
                self._clear()
                manifest = None
        elif os.path.isdir(self.folder) and os.listdir(self.folder):
            if not overwrite:
                raise ValueError(f"out: {self.folder} is not empty and holds no mechscope extraction; "
                                 "use another folder or pass overwrite=True")
            self._clear()
            manifest = None
        else:
            manifest = None
        if manifest is None:
            os.makedirs(self.folder, exist_ok=True)
            manifest = {"format": FORMAT, "version": VERSION, "spec": spec, "chunks": {},
                        "complete": False}
            _write_json(self.path, manifest)
        self.manifest = manifest

    def _clear(self):
        for name in os.listdir(self.folder):
            p = os.path.join(self.folder, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)

    @property
    def complete(self):
        return self.manifest["complete"]

    def done(self, chunk):
        """The recorded digest of a finished chunk, or None."""
        entry = self.manifest["chunks"].get(str(chunk))
        return None if entry is None else entry["digest"]

    def mark_done(self, chunk, rows, digest):
        self.manifest["chunks"][str(chunk)] = {"rows": int(rows), "digest": digest}
        self.manifest.setdefault("partial", {}).pop(str(chunk), None)
        _write_json(self.path, self.manifest)

    def batches_done(self, chunk, digest, layout):
        """The batches of an unfinished chunk already written (the same prompts batched
        the same way), an empty set if none."""
        entry = self.manifest.get("partial", {}).get(str(chunk))
        if entry is None or entry["digest"] != digest or entry["layout"] != layout:
            return set()
        return set(entry["batches"])

    def mark_batch(self, chunk, digest, layout, batch):
        """Record that a batch of an unfinished chunk is in its shard files (flushed)."""
        partial = self.manifest.setdefault("partial", {})
        entry = partial.get(str(chunk))
        if entry is None or entry["digest"] != digest or entry["layout"] != layout:
            entry = partial[str(chunk)] = {"digest": digest, "layout": layout, "batches": []}
        entry["batches"].append(int(batch))
        _write_json(self.path, self.manifest)

    def finish(self, n_prompts, site_shapes):
        """All chunks done: gather the shards into one memory-mapped file per site (in
        input order, one chunk at a time: memory stays flat), then drop them."""
        chunks = sorted(int(c) for c in self.manifest["chunks"])
        if chunks != list(range(len(chunks))):
            raise RuntimeError(f"out: {self.folder} is missing chunks; run the extraction again to finish it")
        rows = [self.manifest["chunks"][str(c)]["rows"] for c in chunks]
        total = int(sum(rows))
        names = ["index"] + list(site_shapes)
        shapes = {"index": (2,)}
        shapes.update({s: tuple(v) for s, v in site_shapes.items()})
        for name in names:
            # plain writes of one shard after another: a memory map of the whole output
            # would count its written pages as resident memory until it is closed
            dtype = np.dtype(np.int64 if name == "index" else np.float32)
            tmp = _site_file(self.folder, name) + ".tmp"
            with open(tmp, "wb") as f:
                np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                         "fortran_order": False, "shape": (total,) + shapes[name]})
                for c, n in zip(chunks, rows):
                    part = np.load(_site_file(_shard_dir(self.folder, c), name))
                    if part.shape != (n,) + shapes[name] or part.dtype != dtype:
                        raise RuntimeError(f"out: shard {c} of {name} in {self.folder} is damaged; "
                                           "remove the folder and extract again")
                    f.write(np.ascontiguousarray(part).data)
                    del part
            os.replace(tmp, _site_file(self.folder, name))
        self.manifest.update(complete=True, n_prompts=int(n_prompts), n_rows=total,
                             sites={s: list(v) for s, v in site_shapes.items()})
        _write_json(self.path, self.manifest)
        shutil.rmtree(os.path.join(self.folder, "shards"), ignore_errors=True)


class Activations:
    """Extracted activations: for each site an array [rows, *site shape] (memory-mapped
    when extracted to a folder), one row per (prompt, position) taken, in input order.

    prompt, position: int64 [rows], the prompt (index in the data) and the token
    position of each row; with positions="last" there is one row per prompt, so
    acts[site][i] belongs to prompt i."""

    def __init__(self, values, index, n_prompts, path=None):
        self._values = dict(values)
        self.index = index
        self.n_prompts = int(n_prompts)
        self.path = path

    @classmethod
    def open(cls, folder):
        """Open a finished extraction folder (memory-mapped, nothing read yet)."""
        folder = os.fspath(folder)
        path = os.path.join(folder, MANIFEST)
        if not os.path.exists(path):
            raise ValueError(f"folder: {folder} holds no mechscope extraction (no {MANIFEST})")
        with open(path) as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"folder: {path} is not a mechscope extraction")
        if not manifest.get("complete"):
            raise ValueError(f"folder: the extraction in {folder} is not finished; run mechscope.extract "
                             "with the same arguments to resume it")
        values = {s: np.load(_site_file(folder, s), mmap_mode="r") for s in manifest["sites"]}
        index = np.load(_site_file(folder, "index"), mmap_mode="r")
        return cls(values, index, manifest["n_prompts"], path=folder)

    @property
    def sites(self):
        return list(self._values)

    @property
    def prompt(self):
        return np.asarray(self.index[:, 0])

    @property
    def position(self):
        return np.asarray(self.index[:, 1])

    def __getitem__(self, site):
        if site not in self._values:
            raise KeyError(f"site {site!r} was not extracted (extracted: {self.sites})")
        return self._values[site]

    def __contains__(self, site):
        return site in self._values

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def items(self):
        return self._values.items()

    def __repr__(self):
        where = f", path={self.path!r}" if self.path else ""
        return f"Activations({self.n_prompts} prompts, {len(self.index)} rows, {len(self._values)} sites{where})"

    def dask(self, site, rows_per_chunk=4096):
        """The site's values as a dask.array (lazy: blocks are read from the memory-mapped
        file when computed). Needs the optional dask package."""
        try:
            import dask.array as da
        except ImportError:
            raise ImportError("Activations.dask needs dask: pip install 'mechscope[dask]'") from None
        import dask

        value = self[site]
        if self.path is None:
            return da.from_array(value, chunks=(rows_per_chunk,) + value.shape[1:])
        # blocks that reopen the file by its path, so that a graph sent to the workers
        # of a cluster carries a file name, not the data
        file = _site_file(self.path, site)
        n = value.shape[0]
        blocks = [da.from_delayed(dask.delayed(_read_rows)(file, a, min(a + rows_per_chunk, n)),
                                  shape=(min(a + rows_per_chunk, n) - a,) + value.shape[1:], dtype=value.dtype)
                  for a in range(0, n, rows_per_chunk)]
        if not blocks:
            return da.zeros((0,) + value.shape[1:], dtype=value.dtype)
        return da.concatenate(blocks)


def _read_rows(file, a, b):
    return np.array(np.load(file, mmap_mode="r")[a:b])
