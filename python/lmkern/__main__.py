"""python -m lmkern {info,demo,bench}"""
from __future__ import annotations

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lmkern", description="lmkern command line")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="print the build and runtime configuration")
    demo = sub.add_parser("demo", help="a small decoder LM generating with lmkern's kernels")
    demo.add_argument("--tokens", type=int, default=64, help="tokens to generate per configuration (default 64)")
    demo.add_argument("--prompt", type=int, default=512, help="prompt length (default 512)")
    demo.add_argument("--configs", nargs="+", default=None, metavar="NAME",
                      help="configurations to run (default: all): mha tpa mor-cache mor-share kivi2 snapkv25 "
                           "streaming25 parscale4")
    demo.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                      help="where the fast runs go: cpu (NumPy arrays) or cuda (torch CUDA tensors; needs a GPU and PyTorch); "
                           "the references always run on the CPU")
    bench = sub.add_parser("bench", help="the benchmark table (SPEC 7)")
    bench.add_argument("family", nargs="?", default=None,
                       help="attention, tpa, mor, kv, parscale or cuda (default: all)")
    bench.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    bench.add_argument("--plot", metavar="FILE.png", default=None,
                       help="also plot achieved vs peak bandwidth and FLOP/s per kernel (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.cmd == "info":
        import lmkern
        lmkern.show_config()
    elif args.cmd == "demo":
        from . import demo as demo_mod
        return demo_mod.main(args)
    elif args.cmd == "bench":
        return run_bench(args)
    return 0


FAMILIES = ("attention", "tpa", "mor", "kv", "parscale", "cuda")


def find_benchmarks():
    """The benchmarks/ folder of a source checkout: the current directory's, else the one beside the
    package sources (an editable or in-place build).  Benchmarks are not installed with the wheel."""
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(os.getcwd(), "benchmarks"), os.path.join(here, "..", "..", "benchmarks")):
        if os.path.exists(os.path.join(cand, "_harness.py")):
            return os.path.abspath(cand)
    raise SystemExit("bench: run this from a source checkout of lmkern (the benchmarks/ folder is not installed)")


def run_bench(args):
    import importlib
    import os
    folder = find_benchmarks()
    sys.path.insert(0, folder)
    families = [args.family] if args.family else [f for f in FAMILIES if os.path.exists(os.path.join(folder, f"bench_{f}.py"))]
    for fam in families:
        if fam not in FAMILIES:
            raise SystemExit(f"bench: unknown family {fam!r}; choose from {', '.join(FAMILIES)}")
        mod = importlib.import_module(f"bench_{fam}")
        mod.main(["--quick"] if args.quick else [])
    if args.plot:
        import _harness
        _harness.plot(args.plot)
        print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
