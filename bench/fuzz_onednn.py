"""Hypothesis sweep of the onednn backend's integer conv (``O.qconv2d``) against the reference
(``R.qconv2d``) and a float64 convolution, in every output form tests/test_onednn.py checks.

By default the cases lie around the geometry of the one residual mismatch docs/cpu_backend.md
records (tests/onednn_cases.py's NEAR_RESIDUAL: tiny inputs, strides and asymmetric paddings up
to 3, so most cases take one of kernels/onednn.py's geometry rewrites); ``--broad`` draws from
the ranges of tests/test_onednn.py's fuzz instead. The same seed draws the same cases::

    nice python bench/fuzz_onednn.py --cases 20000 --seed 20261203

Prints the seed, the cases run and the time; on a mismatch also the first failing case as drawn
and hypothesis's shrunk one, and exits 1.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import hypothesis
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from onednn_cases import NEAR_RESIDUAL, check_qconv2d, conv_cases  # noqa: E402


def sweep(cases: int, seed: int, limits: dict) -> Tuple[int, Optional[dict], Optional[Exception]]:
    """Runs ``cases`` hypothesis examples drawn with ``seed`` from ``conv_cases(**limits)``;
    returns ``(examples run, the first failing case as drawn or None, the raised error or None)``;
    a failure stops the sweep (after hypothesis has shrunk it) and counts the examples up to it."""
    ran = 0
    failing: List[tuple] = []

    @settings(max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @hypothesis.seed(seed)
    @given(k=conv_cases(**limits))
    def run(k):
        nonlocal ran
        ran += 1
        try:
            check_qconv2d(k)
        except Exception:
            # the case as drawn, kept before shrinking: a failure that depends on what ran before
            # it may not survive shrinking
            if not failing:
                failing.append((ran, k))
            raise

    try:
        run()
    except Exception as e:  # reported with the case that raised it; main exits 1
        number, case = failing[0] if failing else (ran, None)
        return number, case, e
    return ran, None, None


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=20000, help="hypothesis examples to run")
    ap.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: from the clock, printed)")
    ap.add_argument("--broad", action="store_true", help="tests/test_onednn.py's fuzz ranges, not NEAR_RESIDUAL")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else time.time_ns() % 2**32
    limits = {} if args.broad else NEAR_RESIDUAL
    print(f"seed {seed}, {args.cases} cases, limits {limits or 'of tests/test_onednn.py'}", flush=True)
    t0 = time.perf_counter()
    ran, failing, error = sweep(args.cases, seed, limits)
    print(f"{ran} of {args.cases} cases run in {time.perf_counter() - t0:.0f} s")
    if error is None:
        print("no mismatch")
        return 0
    print(f"MISMATCH (seed {seed}), case {ran} as drawn: {failing}")
    print(f"{type(error).__name__}: {error}")
    for note in getattr(error, "__notes__", []):  # hypothesis's shrunk case
        print(note)
    return 1


if __name__ == "__main__":
    sys.exit(main())
