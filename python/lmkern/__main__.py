"""python -m lmkern {info,demo,bench}"""
from __future__ import annotations

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lmkern", description="lmkern command line")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="print the build and runtime configuration")
    demo = sub.add_parser("demo", help="a small decoder LM generating with lmkern's kernels")
    demo.add_argument("--tokens", type=int, default=64, help="tokens to generate per configuration")
    bench = sub.add_parser("bench", help="the benchmark table (SPEC 7)")
    bench.add_argument("family", nargs="?", default=None)
    args = parser.parse_args(argv)
    if args.cmd == "info":
        import lmkern
        lmkern.show_config()
    elif args.cmd == "demo":
        from . import demo as demo_mod
        demo_mod.main(args)
    elif args.cmd == "bench":
        raise SystemExit("bench: not yet available")
    return 0


if __name__ == "__main__":
    sys.exit(main())
