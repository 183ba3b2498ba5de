"""python -m mhattn bench [...]: the benchmark harness (see mhattn.bench); python -m mhattn config."""

import sys


def main(argv):
    if argv[:1] == ["bench"]:
        from mhattn.bench import main as bench

        return bench(argv[1:])
    if argv[:1] == ["config"]:
        import mhattn

        mhattn.show_config()
        return 0
    print("usage: python -m mhattn bench [--help] | python -m mhattn config", file=sys.stderr)
    return 2


sys.exit(main(sys.argv[1:]))
