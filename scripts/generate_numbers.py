"""Generate input files for the prime job: random integers, one a line.

    python scripts/generate_numbers.py data/input [--files 3] [--count 1000] [--bits 64]
        [--seed 1] [--duplicates 0.0] [--blank 0] [--bad 0] [--negatives 0] [--big 0]

Files are named input_dataset_001.txt, input_dataset_002.txt, ... With --duplicates, --blank,
--bad, --negatives and --big the files also hold repeated numbers, blank lines, lines that are
not integers, negative numbers and numbers above 2**64, to exercise the job's input handling.
The same seed always gives the same files.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

__all__ = ["generate_lines", "write_files", "main"]

_BAD_LINES = ("abc", "12x", "1.5", "0x1f", "--3", "1 2", "seven", "1e9", "#comment", "+-4")


def generate_lines(count: int, rng: random.Random, *, bits: int = 64, duplicates: float = 0.0,
                   blank: int = 0, bad: int = 0, negatives: int = 0, big: int = 0
                   ) -> Iterator[str]:
    """`count` numbers of up to `bits` bits (plus the extra lines asked for), shuffled in."""
    numbers: list[str] = []
    for _ in range(count):
        if numbers and duplicates > 0 and rng.random() < duplicates:
            numbers.append(rng.choice(numbers))
        else:
            numbers.append(str(rng.getrandbits(bits)))
    numbers += [str(-rng.getrandbits(bits) - 1) for _ in range(negatives)]
    numbers += [str(rng.getrandbits(96) | (1 << 95) | 1) for _ in range(big)]
    extras = [""] * blank + [rng.choice(_BAD_LINES) for _ in range(bad)]
    lines = numbers + extras
    if extras or negatives or big:
        rng.shuffle(lines)
    return iter(lines)


def write_files(directory: Path, *, files: int, count: int, bits: int, seed: int,
                duplicates: float = 0.0, blank: int = 0, bad: int = 0, negatives: int = 0,
                big: int = 0) -> list[Path]:
    """Write the files; their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for index in range(1, files + 1):
        path = directory / f"input_dataset_{index:03d}.txt"
        with open(path, "w", encoding="ascii") as f:
            chunk: list[str] = []
            for line in generate_lines(count, rng, bits=bits, duplicates=duplicates, blank=blank,
                                       bad=bad, negatives=negatives, big=big):
                chunk.append(line)
                if len(chunk) >= 65536:
                    f.write("\n".join(chunk) + "\n")
                    chunk.clear()
            if chunk:
                f.write("\n".join(chunk) + "\n")
        paths.append(path)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Generate input files of random integers for `master-node primes`.")
    parser.add_argument("directory", type=Path, help="where the files go (created if missing)")
    parser.add_argument("--files", type=int, default=3, help="number of files (default 3)")
    parser.add_argument("--count", type=int, default=1000,
                        help="random numbers per file (default 1000)")
    parser.add_argument("--bits", type=int, default=64,
                        help="numbers are uniform in 0 .. 2**bits - 1 (default 64)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--duplicates", type=float, default=0.0, metavar="FRACTION",
                        help="share of numbers that repeat an earlier one of the file (default 0)")
    parser.add_argument("--blank", type=int, default=0, help="blank lines per file (default 0)")
    parser.add_argument("--bad", type=int, default=0,
                        help="lines that are not integers, per file (default 0)")
    parser.add_argument("--negatives", type=int, default=0,
                        help="negative numbers per file (default 0)")
    parser.add_argument("--big", type=int, default=0,
                        help="96-bit odd numbers per file, above 2**64 (default 0)")
    args = parser.parse_args(argv)
    if args.files < 1 or args.count < 0 or args.bits < 2 or not 0 <= args.duplicates < 1 \
            or min(args.blank, args.bad, args.negatives, args.big) < 0:
        parser.error("need --files >= 1, --count >= 0, --bits >= 2, 0 <= --duplicates < 1 and "
                     "no negative line counts")
    try:
        paths = write_files(args.directory, files=args.files, count=args.count, bits=args.bits,
                            seed=args.seed, duplicates=args.duplicates, blank=args.blank,
                            bad=args.bad, negatives=args.negatives, big=args.big)
    except OSError as e:
        print(f"generate_numbers: error: {e}", file=sys.stderr)
        return 2
    total = args.count + args.negatives + args.big
    print(f"wrote {len(paths)} files of {total:,} numbers each to {args.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
