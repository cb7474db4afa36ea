"""mechscope.extract on a dask.distributed cluster of two worker processes: the same
files as the local path, each worker loading the model once, results as dask arrays."""
import os

import numpy as np
import pytest
from distributed import Client, LocalCluster

import mechscope as ms

SITES = ["blocks.0.hook_resid_pre", "blocks.2.hook_resid_post", "blocks.1.attn.hook_z"]


@pytest.fixture(scope="module")
def client():
    # distributed's nanny sets OMP_, MKL_ and OPENBLAS_NUM_THREADS=1 in this process's
    # environment before it starts the workers, and leaves them there: every later
    # subprocess of the suite (the notebooks' kernels, the demo command) would run on
    # one thread
    environ = dict(os.environ)
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    try:
        with Client(cluster) as c:
            yield c
        cluster.close()
    finally:
        os.environ.clear()
        os.environ.update(environ)


def test_cluster_extraction_equals_local(client, tmp_path):
    model = ms.Model.from_pretrained(ms.demo.DEMO_DIR)
    ioi = ms.demo.ioi_prompts(model, n=48, seed=2)
    rng = np.random.default_rng(0)
    prompts = [row[:rng.integers(3, 16)] for row in ioi["clean"]]
    kw = dict(positions="all", batch_size=4, chunk_size=6)
    local = ms.extract(model, prompts, SITES, out=tmp_path / "local", **kw)
    remote = ms.extract(model, prompts, SITES, out=tmp_path / "remote", client=client, **kw)
    np.testing.assert_array_equal(np.asarray(remote.index), np.asarray(local.index))
    for site in SITES:
        np.testing.assert_array_equal(np.asarray(remote[site]), np.asarray(local[site]), err_msg=site)
    # both worker processes took part, and each loaded the model once for its chunks
    loads = client.run(lambda: __import__("mechscope.model").model._SHARED_LOADS[0])
    assert sorted(loads.values()) == [1, 1], loads
    # the result opens as a dask array, computed on the cluster from the files
    lazy = remote.dask("blocks.2.hook_resid_post", rows_per_chunk=100)
    assert lazy.shape == local["blocks.2.hook_resid_post"].shape
    np.testing.assert_array_equal(client.compute(lazy).result(), np.asarray(local["blocks.2.hook_resid_post"]))
    # a finished cluster extraction is not redone, and a different one is refused
    again = ms.extract(model, prompts, SITES, out=tmp_path / "remote", client=client, **kw)
    assert again.path == remote.path
    with pytest.raises(ValueError, match="different extraction"):
        ms.extract(model, prompts, SITES[:1], out=tmp_path / "remote", client=client, **kw)


def test_cluster_extraction_needs_a_folder_and_a_path(client):
    model = ms.Model.from_pretrained(ms.demo.DEMO_DIR)
    with pytest.raises(ValueError, match="out: extraction on a Dask cluster"):
        ms.extract(model, [[0, 4, 5]], SITES, client=client)
    unsaved = ms.Model.from_config(dict(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=8))
    with pytest.raises(ValueError, match="model: extraction on a Dask cluster needs a model loaded from a folder"):
        ms.extract(unsaved, [[0, 4, 5]], "blocks.0.hook_resid_post", out="unused", client=client)
