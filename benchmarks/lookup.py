"""Lookup benchmark: ``SemBlendPipeline.plan`` latency without embedding, hits and misses, registration speed.

Full matrix (issue 2): 1K / 10K / 100K donors x 2K / 8K / 32K-token prompts (hits), and misses against 10K
unrelated 8K-token donors. The workload and method are described in :mod:`semblend.lookup_bench` and recorded in
the JSON. Run on an otherwise idle machine; takes a few minutes and ~6 GiB of memory at 100K donors::

    python benchmarks/lookup.py                 # writes benchmarks/results/lookup.json
    python benchmarks/lookup.py --quick --out /tmp/lookup.json
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from _common import RESULTS_DIR, setup_logging, write_json

from semblend.lookup_bench import QUICK, LookupBenchConfig, render_lookup_result, run_lookup_bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "lookup.json")
    ap.add_argument("--quick", action="store_true", help="small smoke-test matrix")
    ap.add_argument("--plans", type=int, default=None, help="timed plans per cell (default 200)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    setup_logging(args.verbose)
    bench = QUICK if args.quick else LookupBenchConfig()
    if args.plans is not None:
        bench = dataclasses.replace(bench, plans=args.plans, miss_plans=args.plans)
    result = run_lookup_bench(bench, progress=not args.no_progress)
    render_lookup_result(result)
    print(f"wrote {write_json(result, args.out)}")


if __name__ == "__main__":
    main()
