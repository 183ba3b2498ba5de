"""Sentence embeddings of a corpus on a Dask cluster: the model shipped to each worker once,
chunks of lines mapped over the workers, the embeddings put back in the lines' order.
examples/embed_corpus_dask.py is the command line around it; `python -m mhattn bench dask`
times it. Needs the `distributed` extra (Dask's distributed scheduler), imported when called.

    from distributed import Client
    from mhattn.models import SentenceEncoder
    from mhattn.models.cluster import embed_corpus, local_cluster

    model = SentenceEncoder.from_pretrained(path)
    with local_cluster(2, 1, processes=True) as cluster, Client(cluster) as client:
        emb = embed_corpus(client, model, lines, chunk=256, threads=1)

On a cluster of several machines, pass Client("tcp://scheduler:8786") instead.
"""

from __future__ import annotations

import numpy as np

__all__ = ["embed_chunk", "embed_corpus", "local_cluster", "ship"]


def embed_chunk(model, lines, threads):
    """One task: a chunk of lines on the worker's copy of the model."""
    return model.encode(lines, threads=threads)


def ship(client, model):
    """The model on every worker, once (client.scatter with broadcast): a future that tasks
    take in its place. The weights travel; each worker rebuilds the packed layers."""
    return client.scatter(model, broadcast=True)


def embed_corpus(client, model, lines, *, chunk=256, threads=1):
    """(len(lines), D) float32: lines cut into chunks of `chunk`, each embedded on some worker
    with `threads` kernel threads, put back in order. model is a SentenceEncoder, shipped to the
    workers first, or what ship() returned for it (to embed several corpora with one shipping)."""
    from distributed import Future

    remote = model if isinstance(model, Future) else ship(client, model)
    parts = [lines[i:i + chunk] for i in range(0, len(lines), chunk)]
    futures = client.map(embed_chunk, [remote] * len(parts), parts, threads=threads, pure=False)
    return np.concatenate(client.gather(futures)) if parts else np.zeros((0, 0), np.float32)


def local_cluster(workers, threads_per_worker, processes):
    """A Dask LocalCluster on this machine: worker processes listening on loopback only, or
    worker threads in this process (which talk in-process, over no network).

    Worker processes start without the MALLOC_TRIM_THRESHOLD_ that Dask sets for them by
    default: setting it also pins glibc's mmap threshold at 128 KB, so each of encode's
    temporaries of a few MB is a fresh mapping whose pages fault in on every call. That made a
    worker 25% slower than the same encode in a plain process (105 against 139 sentences/s on
    one thread, Zen 4). On a cluster of your own, start the workers with
    MALLOC_MMAP_THRESHOLD_=67108864 in their environment for most of the same gain."""
    import dask
    from distributed import LocalCluster

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    net = {"host": "127.0.0.1"} if processes else {}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
        return LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker,
                            processes=processes, dashboard_address=None, **net)
