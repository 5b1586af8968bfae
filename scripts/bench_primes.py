"""Speed of the prime routine alone, in one process, against sympy as the reference.

Measures numbers per second for ``is_prime_pure`` (what an ESP32 runs), ``is_prime``
(the gmpy2 path when gmpy2 is installed) and ``sympy.isprime``, on seeded random 64-bit
odd numbers and on 64-bit primes (the slow case: every base must be tried). A later
whole-fabric benchmark reuses ``measure_routine`` to separate fabric overhead from
arithmetic.

    python scripts/bench_primes.py [--count 200000] [--primes 10000] [--seed 1] [--json]
"""

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(_ROOT))

from core.primality import HAS_GMPY2, is_prime, is_prime_pure  # noqa: E402

try:
    import sympy
except ImportError:  # the reference is optional; ratios are then left out
    sympy = None

REFERENCE = "sympy.isprime"


def routines() -> List[Tuple[str, Callable[[int], bool]]]:
    """The routines compared, reference last."""
    found: List[Tuple[str, Callable[[int], bool]]] = [
        ("is_prime_pure", is_prime_pure),
        ("is_prime" + (" (gmpy2)" if HAS_GMPY2 else " (pure)"), is_prime),
    ]
    if sympy is not None:
        found.append((REFERENCE, sympy.isprime))
    return found


def _time_once(test: Callable[[int], bool], numbers: Sequence[int]) -> Tuple[float, List[bool]]:
    """Seconds for one pass over numbers, and the answers."""
    start = time.perf_counter()
    answers = [test(n) for n in numbers]
    return time.perf_counter() - start, answers


def measure_routine(numbers: Sequence[int], repeat: int = 1) -> Dict[str, Any]:
    """Numbers per second of each routine on numbers (best of repeat passes).

    Returns {"count", "routines": {name: {"seconds", "per_second", "primes"}},
    "ratio_vs_sympy": {name: per_second / sympy's}, "agree": all answers identical}.
    """
    if not numbers:
        raise ValueError("measure_routine needs at least one number")
    results: Dict[str, Dict[str, float]] = {}
    reference_answers: Optional[List[bool]] = None
    agree = True
    for name, test in routines():
        best = float("inf")
        answers: List[bool] = []
        for _ in range(max(1, repeat)):
            seconds, answers = _time_once(test, numbers)
            best = min(best, seconds)
        if reference_answers is None:
            reference_answers = answers
        agree = agree and answers == reference_answers
        results[name] = {
            "seconds": best,
            "per_second": len(numbers) / best if best > 0 else float("inf"),
            "primes": sum(answers),
        }
    ratios: Dict[str, float] = {}
    if REFERENCE in results:
        reference_speed = results[REFERENCE]["per_second"]
        ratios = {name: r["per_second"] / reference_speed for name, r in results.items()}
    return {"count": len(numbers), "routines": results, "ratio_vs_sympy": ratios, "agree": agree}


def random_odd_64(count: int, rng: random.Random) -> List[int]:
    """count random odd numbers with exactly 64 bits."""
    return [rng.getrandbits(64) | (1 << 63) | 1 for _ in range(count)]


def random_primes_64(count: int, rng: random.Random) -> List[int]:
    """count random 64-bit primes (picked with is_prime, outside any timing)."""
    primes: List[int] = []
    # About 1 in 22 odd 64-bit numbers is prime; the cap keeps the loop finite.
    for _ in range(1000 * count + 1000):
        if len(primes) == count:
            break
        candidate = rng.getrandbits(64) | (1 << 63) | 1
        if is_prime(candidate):
            primes.append(candidate)
    return primes


def environment() -> Dict[str, Any]:
    """What the figures depend on."""
    info: Dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                            "gmpy2": None, "sympy": None, "sympy_ground_types": None}
    if HAS_GMPY2:
        import gmpy2

        info["gmpy2"] = gmpy2.version()
    if sympy is not None:
        from sympy.external.gmpy import GROUND_TYPES

        info["sympy"] = sympy.__version__
        info["sympy_ground_types"] = GROUND_TYPES
    return info


def run(count: int, prime_count: int, seed: int, repeat: int) -> Dict[str, Any]:
    """Both data sets, measured."""
    rng = random.Random(seed)
    return {
        "seed": seed,
        "repeat": repeat,
        "environment": environment(),
        "random_odd_64": measure_routine(random_odd_64(count, rng), repeat),
        "primes_64": measure_routine(random_primes_64(prime_count, rng), repeat),
    }


def format_table(report: Dict[str, Any]) -> str:
    """A plain-text table of the report."""
    env = report["environment"]
    lines = [
        "python %s, gmpy2 %s, sympy %s (ground types %s), seed %d, best of %d"
        % (env["python"], env["gmpy2"] or "absent", env["sympy"] or "absent",
           env["sympy_ground_types"] or "-", report["seed"], report["repeat"]),
        "",
        "%-24s %-18s %12s %10s %9s" % ("data", "routine", "numbers/s", "us/number", "vs sympy"),
    ]
    for data in ("random_odd_64", "primes_64"):
        measured = report[data]
        label = "%s (%d)" % (data, measured["count"])
        for name, r in measured["routines"].items():
            ratio = measured["ratio_vs_sympy"].get(name)
            lines.append("%-24s %-18s %12.0f %10.2f %9s" % (
                label, name, r["per_second"], 1e6 / r["per_second"],
                "-" if ratio is None else "%.2fx" % ratio))
            label = ""
        if not measured["agree"]:
            lines.append("  !! routines disagree on %s" % data)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200000, help="random 64-bit odd numbers")
    parser.add_argument("--primes", type=int, default=10000, help="random 64-bit primes")
    parser.add_argument("--seed", type=int, default=1, help="RNG seed")
    parser.add_argument("--repeat", type=int, default=3, help="passes per routine; the best counts")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.count < 1 or args.primes < 1 or args.repeat < 1:
        parser.error("--count, --primes and --repeat must be at least 1")
    report = run(args.count, args.primes, args.seed, args.repeat)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    agree = report["random_odd_64"]["agree"] and report["primes_64"]["agree"]
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
