"""Activations of many prompts at chosen positions: ``mechscope.extract``.

The data are read in chunks of prompts (so that an iterator larger than memory
streams through with flat memory); each chunk is sorted by length into batches
(little padding), run with only the requested sites cached and no logits (so the
forward stops after the deepest requested block), and its rows are written in input
order, into arrays or into the shard files of an extraction folder (mechscope.store).
"""
import itertools
import os

import numpy as np

from . import sites as site_names
from ._progress import progress_bar
from .store import Activations, Store, chunk_digest, model_fingerprint


def extract(model, data, sites, positions="last", batch_size=32, out=None, *, bucket=True,
            chunk_size=1024, overwrite=False, progress=None, client=None):
    """Activations of every prompt of ``data`` at ``sites`` and ``positions``.

    model: a mechscope.Model.
    data: texts (tokenized with the model's tokenizer, after a BOS token, as in
        Model.run), token arrays of any lengths (1-D int each, or one 2-D array), or an
        iterator/generator of either, read one chunk at a time.
    sites: site names or glob patterns ("blocks.*.hook_resid_post"); token sites only.
    positions: "last" (each prompt's last token: one row per prompt), "all" (every
        token), an int or a list of ints (negative ones count from each prompt's end),
        or a callable fn(tokens) -> int or list of ints, given each prompt's token ids.
    batch_size: prompts per forward pass.
    out: None (arrays in memory) or a folder: memory-mapped .npy files per site, an
        index and a manifest; running the same extraction again resumes it after the
        last finished chunk, and a folder holding another extraction is refused.
    bucket: sort each chunk's prompts by length before batching (less padding); the
        rows come back in input order either way.
    chunk_size: prompts per chunk (the unit of streaming, writing and resuming).
    client: a dask.distributed Client: chunks are run by the cluster's workers, each
        of which loads the model once from its folder and writes its own shards (out
        must be a folder all workers can reach).

    Returns mechscope.Activations: acts[site] is [rows, *site shape] with one row per
    (prompt, position) in input order; acts.prompt and acts.position say which.
    """
    from .model import Model

    if not isinstance(model, Model):
        raise TypeError(f"model: expected a mechscope.Model, got {type(model).__name__}")
    names = _check_sites(model, sites)
    spec_positions, positions_key = _check_positions(positions)
    for arg, v in (("batch_size", batch_size), ("chunk_size", chunk_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{arg}: expected a positive int, got {v!r}")
    if client is not None:
        if out is None:
            raise ValueError("out: extraction on a Dask cluster writes to a folder every worker can "
                             "reach; pass out=")
        if getattr(model, "path", None) is None:
            raise ValueError("model: extraction on a Dask cluster needs a model loaded from a folder "
                             "(Model.from_pretrained), which each worker loads from its path")
    items, total = _items(data)
    chunks = _chunks(model, items, spec_positions, int(chunk_size), total)
    first = next(chunks, None)  # tokenizes and checks the first chunk (all of a list) before work
    if first is None:
        raise ValueError("data: empty (no prompts)")
    chunks = itertools.chain([first], chunks)
    shapes = {n: _token_shape(model, n) for n in names}

    store = None
    if out is not None:
        spec = {"model": model_fingerprint(model), "sites": names, "positions": positions_key,
                "chunk_size": int(chunk_size), "data": chunk_digest(first[1], first[2])}
        store = Store(out, spec, overwrite=overwrite)
        if store.complete:
            return Activations.open(store.folder)

    run = dict(names=names, batch_size=int(batch_size), bucket=bool(bucket))
    with progress_bar(progress, "extract", "prompt", total) as bar:
        if client is not None:
            n_prompts = _extract_on_cluster(client, model, chunks, store, run, bar)
        else:
            n_prompts, parts = 0, []
            for chunk, (first_prompt, tokens, pos) in enumerate(chunks):
                n_prompts += len(tokens)
                digest = chunk_digest(tokens, pos) if store else None
                if store and _skip_done(store, chunk, digest, first_prompt, len(tokens)):
                    bar.update(len(tokens))
                    continue
                if store is None:
                    parts.append(run_chunk(model, tokens, pos, first_prompt, on_batch=bar.update, **run))
                else:
                    _chunk_to_store(model, store, chunk, digest, tokens, pos, first_prompt, shapes, run, bar)
    if store:
        store.finish(n_prompts, shapes)
        return Activations.open(store.folder)
    index = np.concatenate([p[0] for p in parts])
    values = {n: np.concatenate([p[1][n] for p in parts]) for n in names}
    return Activations(values, index, n_prompts)


# ---- checking the arguments --------------------------------------------------------------

def _check_sites(model, sites):
    if sites is None:
        raise ValueError("sites: expected a site name, a pattern or a list of them, got None")
    names = site_names.resolve(sites, model, "sites")
    if not names:
        raise ValueError("sites: no site given")
    for n in names:
        if n.endswith(site_names.ATTENTION):
            raise ValueError(f"sites: {n!r} is an attention site ([head, q, k] per prompt); extract "
                             "takes token sites, use Model.run for attention patterns")
    return names


def _check_positions(positions):
    """-> (what _take reads, a JSON-able description for the manifest)"""
    if isinstance(positions, str):
        if positions not in ("last", "all"):
            raise ValueError(f"positions: expected 'last', 'all', ints or a callable, got {positions!r}")
        return positions, positions
    if callable(positions):
        name = getattr(positions, "__qualname__", type(positions).__name__)
        return positions, f"callable {getattr(positions, '__module__', '')}.{name}"
    arr = np.asarray(positions)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer) or arr.ndim > 1 or arr.size == 0:
        raise TypeError(f"positions: expected 'last', 'all', an int, a non-empty list of ints or a "
                        f"callable, got {positions!r}")
    arr = arr.reshape(-1).astype(np.int64)
    return arr, arr.tolist()


def _token_shape(model, name):
    _, _, suffix = site_names.parse(name, model)
    return site_names.shape(suffix, model._shape_cfg, 1, 1)[2:]


def _items(data):
    """-> (an iterable of prompts, their number or None for an iterator)"""
    if isinstance(data, (str, bytes)):
        raise TypeError("data: expected a list of texts or token arrays (or an iterator of them), "
                        "got a single string; wrap it in a list")
    if isinstance(data, np.ndarray):
        if data.ndim == 2 or (data.ndim == 1 and data.dtype == object):
            return data, len(data)
        raise ValueError(f"data: an array of prompts must be 2-D token ids [prompts, pos], got shape "
                         f"{list(data.shape)}")
    if isinstance(data, (list, tuple)):
        return data, len(data)
    if isinstance(data, dict):
        raise TypeError("data: expected a list of texts or token arrays, got a dict")
    try:
        return iter(data), None
    except TypeError:
        raise TypeError(f"data: expected texts or token arrays (a list or an iterator), "
                        f"got {type(data).__name__}") from None


def _prompt_tokens(model, item, i):
    if isinstance(item, str):
        tokens = np.asarray([model._bos()] + model._encode(item), np.int64)
    else:
        tokens = np.asarray(item)
        if tokens.dtype == bool or not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"data: prompt {i} is not a text or integer token ids (dtype {tokens.dtype})")
        if tokens.ndim != 1:
            raise ValueError(f"data: prompt {i} has shape {list(tokens.shape)}, expected 1-D token ids")
    if tokens.size == 0:
        raise ValueError(f"data: prompt {i} is empty")
    if tokens.size > model.n_ctx:
        raise ValueError(f"data: prompt {i} has {tokens.size} tokens, more than n_ctx = {model.n_ctx}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= model.d_vocab:
        raise ValueError(f"data: prompt {i} has token id {lo if lo < 0 else hi}, out of range [0, {model.d_vocab})")
    return tokens.astype(np.int32)


def _take(spec, tokens, i):
    """Positions (int64, non-negative) of prompt i."""
    n = len(tokens)
    if isinstance(spec, str):
        return np.array([n - 1], np.int64) if spec == "last" else np.arange(n, dtype=np.int64)
    if callable(spec):
        raw = spec(tokens.copy())
        p = np.atleast_1d(np.asarray(raw))
        if p.size and (p.dtype == bool or not np.issubdtype(p.dtype, np.integer) or p.ndim != 1):
            raise TypeError(f"positions: the callable returned {raw!r} for prompt {i}; expected an int "
                            "or a list of ints")
        p = p.astype(np.int64)
        what = "the callable returned"
    else:
        p, what = spec, "position"
    bad = p[(p < -n) | (p >= n)]
    if bad.size:
        raise ValueError(f"positions: {what} {int(bad[0])} for prompt {i}, which has {n} tokens "
                         f"(valid: {-n} .. {n - 1})")
    return np.where(p < 0, p + n, p)


def _chunks(model, items, spec, chunk_size, total):
    """Yields (index of the chunk's first prompt, token arrays, position arrays). A list is
    tokenized and checked whole before the first chunk is handed out (errors come
    before any work); an iterator one chunk at a time."""
    if total is not None:
        tokens = [_prompt_tokens(model, item, i) for i, item in enumerate(items)]
        pos = [_take(spec, t, i) for i, t in enumerate(tokens)]
        for a in range(0, len(tokens), chunk_size):
            yield a, tokens[a:a + chunk_size], pos[a:a + chunk_size]
        return
    it, start = iter(items), 0
    while True:
        block = list(itertools.islice(it, chunk_size))
        if not block:
            return
        tokens = [_prompt_tokens(model, item, start + k) for k, item in enumerate(block)]
        yield start, tokens, [_take(spec, t, start + k) for k, t in enumerate(tokens)]
        start += len(block)


def _skip_done(store, chunk, digest, first_prompt, n):
    done = store.done(chunk)
    if done is None:
        return False
    if done != digest:
        raise ValueError(f"data: prompts {first_prompt}..{first_prompt + n - 1} differ from those extracted "
                         f"to {store.folder}; the data changed since (use another folder or overwrite=True)")
    return True


# ---- running one chunk ------------------------------------------------------------------------

def run_chunk(model, tokens, positions, first_prompt, names, batch_size, bucket, alloc=None,
              on_batch=None, skip=(), after_batch=None):
    """The rows of one chunk: index [rows, 2] (prompt, position) and {site: [rows, ...]},
    in input order, computed in batches of similar length. Batches whose number is in
    skip are already in the arrays (a resumed chunk); after_batch(k, index, values) is
    called when batch k is written."""
    alloc = alloc or _memory_alloc
    n = len(tokens)
    counts = np.array([len(p) for p in positions], np.int64)
    row_start = np.concatenate([[0], np.cumsum(counts)])
    rows = int(row_start[-1])
    index = alloc("index", (rows, 2), np.int64)
    index[:, 0] = first_prompt + np.repeat(np.arange(n, dtype=np.int64), counts)
    index[:, 1] = np.concatenate(positions) if rows else np.zeros(0, np.int64)
    values = {name: alloc(name, (rows,) + _token_shape(model, name), np.float32) for name in names}
    lengths = np.array([len(t) for t in tokens])
    order = np.argsort(lengths, kind="stable") if bucket else np.arange(n)
    order = order[counts[order] > 0]  # a prompt without positions is not run
    for k, s in enumerate(range(0, len(order), batch_size)):
        idx = order[s:s + batch_size]
        if k in skip:
            if on_batch is not None:
                on_batch(len(idx))
            continue
        T = int(lengths[idx].max())
        batch = np.zeros((len(idx), T), np.int32)
        mask = np.zeros((len(idx), T), np.int32)
        for row, i in enumerate(idx):
            batch[row, :lengths[i]] = tokens[i]
            mask[row, :lengths[i]] = 1
        result = model.run(batch, attention_mask=None if mask.all() else mask, cache=names, logits=None)
        b = np.repeat(np.arange(len(idx)), counts[idx])
        p = np.concatenate([positions[i] for i in idx])
        dest = np.concatenate([np.arange(row_start[i], row_start[i + 1]) for i in idx])
        for name in names:
            values[name][dest] = result.cache[name][b, p]
        if after_batch is not None:
            after_batch(k, index, values)
        if on_batch is not None:
            on_batch(len(idx))
    if on_batch is not None:
        on_batch(n - len(order))
    return index, values


def _chunk_to_store(model, store, chunk, digest, tokens, pos, first_prompt, shapes, run, bar):
    """Run one chunk into its shard files, each batch recorded in the manifest once it
    is on disk, so that an interruption loses at most the batch being computed."""
    layout = [run["batch_size"], run["bucket"]]
    skip = store.batches_done(chunk, digest, layout)
    if skip and not _shards_intact(store.folder, chunk, shapes, sum(len(p) for p in pos)):
        skip = set()  # the files do not hold what the manifest says: redo the chunk

    def after_batch(k, index, values):
        _flush(index, values)  # on disk before the manifest says so
        store.mark_batch(chunk, digest, layout, k)
    index, values = run_chunk(model, tokens, pos, first_prompt, alloc=_shard_alloc(store.folder, chunk, bool(skip)),
                              on_batch=bar.update, skip=skip, after_batch=after_batch, **run)
    store.mark_done(chunk, len(index), digest)


def _memory_alloc(name, shape, dtype):
    return np.empty(shape, dtype)


def _shard_alloc(folder, chunk, resume=False):
    """Arrays of a chunk as memory-mapped files in its shard directory; resume: reopen
    the files of a partly written chunk (checked by _shards_intact)."""
    from .store import _shard_dir, _site_file

    d = _shard_dir(folder, chunk)
    os.makedirs(d, exist_ok=True)

    def alloc(name, shape, dtype):
        path = _site_file(d, name)
        if resume:
            try:
                a = np.lib.format.open_memmap(path, mode="r+")
            except (OSError, ValueError):
                a = None
            if a is not None and a.shape == shape and a.dtype == dtype:
                return a
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    return alloc


def _shards_intact(folder, chunk, shapes, rows):
    """1 when every shard file of the chunk exists with its expected shape."""
    from .store import _shard_dir, _site_file

    expected = {"index": ((rows, 2), np.int64)}
    expected.update({n: ((rows,) + s, np.float32) for n, s in shapes.items()})
    for name, (shape, dtype) in expected.items():
        try:
            a = np.load(_site_file(_shard_dir(folder, chunk), name), mmap_mode="r")
        except (OSError, ValueError):
            return False
        if a.shape != shape or a.dtype != dtype:
            return False
    return True


def _flush(index, values):
    for a in [index, *values.values()]:
        if isinstance(a, np.memmap):
            a.flush()


# ---- on a Dask cluster --------------------------------------------------------------------------

def _chunk_task(model, folder, chunk, tokens, positions, first_prompt, run):
    """On a worker: the model arrives pickled by its path and is loaded once per worker
    process (Model's unpickling keeps it); the rows go to this chunk's shard files."""
    index, values = run_chunk(model, tokens, positions, first_prompt, alloc=_shard_alloc(folder, chunk), **run)
    _flush(index, values)
    rows = len(index)
    del index, values
    return rows


def _extract_on_cluster(client, model, chunks, store, run, bar):
    try:
        from distributed import wait
    except ImportError:
        raise ImportError("client: extraction on a cluster needs dask.distributed: "
                          "pip install 'mechscope[dask]'") from None
    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    pending, n_prompts = {}, 0

    def collect(futures):
        for fut in futures:
            chunk, digest, n = pending.pop(fut)
            store.mark_done(chunk, fut.result(), digest)
            bar.update(n)

    for chunk, (first_prompt, tokens, pos) in enumerate(chunks):
        n_prompts += len(tokens)
        digest = chunk_digest(tokens, pos)
        if _skip_done(store, chunk, digest, first_prompt, len(tokens)):
            bar.update(len(tokens))
            continue
        fut = client.submit(_chunk_task, model, store.folder, chunk, tokens, pos, first_prompt, run,
                            pure=False)
        pending[fut] = (chunk, digest, len(tokens))
        if len(pending) >= 2 * n_workers:  # a bounded number in flight: memory stays flat
            done, _ = wait(list(pending), return_when="FIRST_COMPLETED")
            collect(done)
    if pending:
        done, _ = wait(list(pending))
        collect(done)
    return n_prompts
