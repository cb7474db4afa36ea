"""Command line: ``python -m mechscope demo`` (also the ``mechscope`` console script)."""
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {
        "demo": "activation patching and causal tracing on the demo model, with a figure",
        "config": "the BLAS mechscope runs on, its kernels and threads",
        "bench": "benchmarks (python -m mechscope bench NAME; see python -m mechscope.bench)",
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: mechscope COMMAND [options]\n\ncommands:")
        for name, what in commands.items():
            print(f"  {name:<7} {what}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as demo
        return demo(rest)
    if command == "config":
        from . import show_config
        show_config()
        return 0
    from .bench.__main__ import main as bench
    return bench(rest)


if __name__ == "__main__":
    sys.exit(main())
