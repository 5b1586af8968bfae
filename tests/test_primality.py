"""The prime test gives sympy's answers on every path: pure, gmpy2, and real MicroPython."""

import shutil
import subprocess
from pathlib import Path
from typing import Callable, List

import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st
from sympy.ntheory.primetest import mr

from core import primality
from core.primality import HAS_GMPY2, filter_primes, is_prime, is_prime_pure

CORE_DIR = Path(__file__).resolve().parent.parent / "core"

PATHS = [pytest.param(is_prime_pure, id="pure"), pytest.param(is_prime, id="is_prime")]

LIMIT_64 = 1 << 64
LIMIT_13 = 3317044064679887385961981

CARMICHAEL_SMALL = [561, 1105, 1729, 2465, 2821, 6601, 8911, 10585, 15841, 29341, 41041,
                    46657, 52633, 62745, 63973, 75361, 101101, 115921, 126217, 162401]


def chernick(k: int) -> int:
    """(6k+1)(12k+1)(18k+1), a Carmichael number when all three factors are prime."""
    return (6 * k + 1) * (12 * k + 1) * (18 * k + 1)


# k chosen so that all three factors are prime: below 2**64, in the 13-base range,
# in the BPSW range (~200 and ~300 bits).
CHERNICK_K = [242160, 8389341, 9223372036854780801, 79228162514264337593543960200]

# Arnault (1995): a 397-digit product of three primes that is a strong pseudoprime
# to every prime base below 307, so no fixed prime base set up to there rejects it.
ARNAULT_P1 = int(
    "29674495668685510550154174642905332730771991799853043350995075531276838753171770"
    "199594238596428121188033664754218345562493168782883"
)
ARNAULT = ARNAULT_P1 * (313 * (ARNAULT_P1 - 1) + 1) * (353 * (ARNAULT_P1 - 1) + 1)

# Strong pseudoprimes and the prime bases they fool.
STRONG_PSEUDOPRIMES = [
    (2047, [2]),
    (1373653, [2, 3]),
    (25326001, [2, 3, 5]),
    (3215031751, [2, 3, 5, 7]),
    (2152302898747, [2, 3, 5, 7, 11]),
    (3474749660383, [2, 3, 5, 7, 11, 13]),
    (341550071728321, [2, 3, 5, 7, 11, 13, 17, 19]),
    (3825123056546413051, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31]),
    (318665857834031151167461, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]),
    (3317044064679887385961981, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41]),
]

# Composite Mersenne numbers 2**p - 1 (p prime) are strong base-2 pseudoprimes:
# one per regime (7-base, 13-base, BPSW at 83 and at hundreds of digits).
COMPOSITE_MERSENNE_EXPONENTS = [11, 23, 59, 67, 79, 83, 97, 523, 601]


def hundreds_of_digits() -> List[int]:
    """Large primes and composites next to them."""
    m521 = (1 << 521) - 1
    m607 = (1 << 607) - 1
    p150 = sympy.nextprime(10**150)
    return [
        m521, m607, m521 - 2, m521 + 2, m607 - 2, m607 + 2, m521 * m607,
        (1 << 521) + 1, (1 << 607) + 1, m607 * m607,
        p150, p150 * sympy.nextprime(10**151), sympy.nextprime(10**300), ARNAULT,
    ]


def around(center: int, radius: int) -> range:
    """The integers within radius of center."""
    return range(center - radius, center + radius + 1)


def assert_matches_sympy(test: Callable[[int], bool], numbers: List[int]) -> None:
    """Every number gets sympy's answer; the failure message names the numbers that differ."""
    wrong = [n for n in numbers if test(n) != sympy.isprime(n)]
    assert wrong == []


@pytest.mark.parametrize("test", PATHS)
def test_smallest_cases(test: Callable[[int], bool]) -> None:
    assert [test(n) for n in (0, 1, 2, 3, 4, 5)] == [False, False, True, True, False, True]


@pytest.mark.parametrize("test", PATHS)
def test_negatives_are_not_prime(test: Callable[[int], bool]) -> None:
    assert not any(test(n) for n in (-1, -2, -3, -7, -(1 << 61) + 1, -((1 << 521) - 1)))


@pytest.mark.parametrize("test", PATHS)
def test_even_numbers_above_two_are_not_prime(test: Callable[[int], bool]) -> None:
    evens = [4, 6, 1 << 32, LIMIT_64, LIMIT_64 - 2, LIMIT_64 + 2, LIMIT_13 + 1, 1 << 607]
    assert not any(test(n) for n in evens)


@pytest.mark.parametrize("test", PATHS)
def test_every_number_below_70000(test: Callable[[int], bool]) -> None:
    assert_matches_sympy(test, list(range(-100, 70000)))


@pytest.mark.parametrize("test", PATHS)
def test_carmichael_numbers_are_composite(test: Callable[[int], bool]) -> None:
    large = [chernick(k) for k in CHERNICK_K]
    for k in CHERNICK_K:
        factors = [6 * k + 1, 12 * k + 1, 18 * k + 1]
        assert all(sympy.isprime(f) for f in factors)
        assert all((chernick(k) - 1) % (f - 1) == 0 for f in factors)  # Korselt
    assert [chernick(k) < LIMIT_64 for k in CHERNICK_K] == [True, False, False, False]
    assert LIMIT_64 < chernick(CHERNICK_K[1]) < LIMIT_13 < chernick(CHERNICK_K[2])
    assert not any(test(n) for n in CARMICHAEL_SMALL + large)


@pytest.mark.parametrize("test", PATHS)
@pytest.mark.parametrize("n, bases", STRONG_PSEUDOPRIMES, ids=[str(n) for n, _ in STRONG_PSEUDOPRIMES])
def test_strong_pseudoprimes_are_composite(test: Callable[[int], bool], n: int, bases: List[int]) -> None:
    assert mr(n, bases)  # they really do fool these bases
    assert not test(n)


@pytest.mark.parametrize("test", PATHS)
def test_arnault_number_fools_prime_bases_but_not_bpsw(test: Callable[[int], bool]) -> None:
    assert mr(ARNAULT, list(sympy.primerange(2, 307)))
    assert not test(ARNAULT)


@pytest.mark.parametrize("test", PATHS)
@pytest.mark.parametrize("p", COMPOSITE_MERSENNE_EXPONENTS)
def test_composite_mersenne_numbers_pass_base_two_but_are_composite(
    test: Callable[[int], bool], p: int
) -> None:
    n = (1 << p) - 1
    assert mr(n, [2]) and not sympy.isprime(n)
    assert not test(n)


@pytest.mark.parametrize("test", PATHS)
def test_around_two_to_the_64(test: Callable[[int], bool]) -> None:
    below, above = sympy.prevprime(LIMIT_64), sympy.nextprime(LIMIT_64)
    r_below, r_above = sympy.prevprime(1 << 32), sympy.nextprime(1 << 32)
    assert r_below * r_below < LIMIT_64 < r_below * r_above
    assert test(below) and test(above)
    assert not test(r_below * r_below) and not test(r_below * r_above)
    assert not test(sympy.prevprime(1 << 31) * sympy.nextprime(1 << 33))
    assert_matches_sympy(test, list(around(LIMIT_64, 3000)))


@pytest.mark.parametrize("test", PATHS)
def test_around_the_thirteen_base_bound(test: Callable[[int], bool]) -> None:
    below, above = sympy.prevprime(LIMIT_13), sympy.nextprime(LIMIT_13)
    root = sympy.integer_nthroot(LIMIT_13, 2)[0]
    q_below, q_above = sympy.prevprime(root), sympy.nextprime(root)
    assert q_below * q_below < LIMIT_13 < q_above * q_above
    assert test(below) and test(above)
    assert not test(q_below * q_below) and not test(q_below * q_above) and not test(q_above * q_above)
    assert_matches_sympy(test, list(around(LIMIT_13, 3000)))


@pytest.mark.parametrize("test", PATHS)
def test_numbers_with_hundreds_of_digits(test: Callable[[int], bool]) -> None:
    assert test((1 << 521) - 1) and test((1 << 607) - 1)
    assert_matches_sympy(test, hundreds_of_digits())
    assert_matches_sympy(test, list(around((1 << 607) - 1, 200)))


def test_bpsw_uses_the_strong_lucas_test_with_selfridge_parameters() -> None:
    # The composites passing it are exactly the strong Lucas pseudoprimes (OEIS A217255).
    passing = [n for n in range(3, 26000, 2) if primality._is_strong_lucas_probable_prime(n)]
    composites = [n for n in passing if not sympy.isprime(n)]
    assert composites == [5459, 5777, 10877, 16109, 18971, 22499, 24569, 25199]
    # ...and every one of them fails the strong base-2 half of BPSW.
    assert not any(mr(n, [2]) for n in composites)


@pytest.mark.skipif(not HAS_GMPY2, reason="gmpy2 is not installed")
def test_lucas_half_matches_gmpy2() -> None:
    import gmpy2

    odd = [n for n in range(43, 100001, 2) if not gmpy2.is_square(n)]
    differ = [n for n in odd if primality._is_strong_lucas_probable_prime(n) != gmpy2.is_strong_selfridge_prp(n)]
    assert differ == []


@given(st.integers(min_value=-1000, max_value=10**7))
@settings(max_examples=500, deadline=None)
def test_property_small(n: int) -> None:
    assert is_prime_pure(n) == is_prime(n) == sympy.isprime(n)


@given(st.integers(min_value=0, max_value=LIMIT_64 - 1))
@settings(max_examples=500, deadline=None)
def test_property_64_bit(n: int) -> None:
    assert is_prime_pure(n) == is_prime(n) == sympy.isprime(n)


@given(st.integers(min_value=1 << 85, max_value=1 << 95))
@settings(max_examples=300, deadline=None)
def test_property_90_bit(n: int) -> None:
    assert is_prime_pure(n) == is_prime(n) == sympy.isprime(n)


@given(st.integers(min_value=1 << 295, max_value=1 << 305))
@settings(max_examples=150, deadline=None)
def test_property_300_bit(n: int) -> None:
    assert is_prime_pure(n) == is_prime(n) == sympy.isprime(n)


@given(st.sampled_from([1 << 20, 1 << 40, 1 << 63, 1 << 64, 1 << 80, 1 << 90, 1 << 300]),
       st.integers(min_value=0, max_value=1 << 30))
@settings(max_examples=200, deadline=None)
def test_property_primes_and_their_neighbours(scale: int, offset: int) -> None:
    # Random integers are rarely prime; this draws primes and the numbers next to them.
    p = sympy.nextprime(scale + offset * (scale >> 31 or 1))
    q = sympy.nextprime(p)
    for n in (p, p + 2, p * q, p * p):
        assert is_prime_pure(n) == is_prime(n) == sympy.isprime(n)


@pytest.mark.skipif(not HAS_GMPY2, reason="gmpy2 is not installed")
def test_gmpy2_path_equals_pure_path_on_special_numbers() -> None:
    numbers = (
        CARMICHAEL_SMALL + [chernick(k) for k in CHERNICK_K] + [n for n, _ in STRONG_PSEUDOPRIMES]
        + [(1 << p) - 1 for p in COMPOSITE_MERSENNE_EXPONENTS] + hundreds_of_digits()
        + list(around(407521 * 407527, 50)) + [407521 * 1000003, 299210837 * 1000003]
        + list(around(LIMIT_64, 500)) + list(around(LIMIT_13, 500))
    )
    assert [primality._is_prime_gmpy2(n) for n in numbers] == [is_prime_pure(n) for n in numbers]


@pytest.mark.parametrize("test", PATHS + [pytest.param(filter_primes, id="filter_primes")])
@pytest.mark.parametrize("bad", [True, False, 7.0, "7", None, b"7", [7]])
def test_rejects_anything_but_int(test: Callable[[int], bool], bad: object) -> None:
    with pytest.raises(TypeError):
        test([bad] if test is filter_primes else bad)


def test_filter_primes_keeps_input_order_and_duplicates() -> None:
    numbers = [10, 7, -7, 2, 7, (1 << 61) - 1, 1, 0, 3, 561, (1 << 607) - 1, 4]
    assert filter_primes(numbers) == [7, 2, 7, (1 << 61) - 1, 3, (1 << 607) - 1]


def test_filter_primes_takes_any_iterable() -> None:
    assert filter_primes(n for n in range(20)) == [2, 3, 5, 7, 11, 13, 17, 19]
    assert filter_primes(range(1 << 64, (1 << 64) + 100)) == list(sympy.primerange(1 << 64, (1 << 64) + 100))
    assert filter_primes([]) == []


MICROPYTHON_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import primality
try:
    primality.is_prime(True)
    print("accepts-bool")
except TypeError:
    print("rejects-bool")
print("gmpy2" if primality.HAS_GMPY2 else "pure")
# One number in, one answer out: the list itself would not fit a 100K heap.
with open(sys.argv[2]) as numbers:
    for line in numbers:
        print(1 if primality.is_prime(int(line)) else 0)
"""


@pytest.mark.skipif(shutil.which("micropython") is None, reason="micropython binary not found")
def test_same_answers_under_micropython_with_an_esp32_sized_heap(tmp_path: Path) -> None:
    numbers = (
        list(range(-5, 3000)) + CARMICHAEL_SMALL + [chernick(k) for k in CHERNICK_K]
        + [n for n, _ in STRONG_PSEUDOPRIMES] + [(1 << p) - 1 for p in COMPOSITE_MERSENNE_EXPONENTS]
        + list(around(LIMIT_64, 100)) + list(around(LIMIT_13, 100)) + hundreds_of_digits()
    )
    script = tmp_path / "run_primality.py"
    script.write_text(MICROPYTHON_SCRIPT)
    data = tmp_path / "numbers.txt"
    data.write_text("\n".join(str(n) for n in numbers))
    done = subprocess.run(
        ["micropython", "-X", "heapsize=100K", str(script), str(CORE_DIR), str(data)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    rejects_bool, arithmetic, *answers = done.stdout.split()
    assert (rejects_bool, arithmetic) == ("rejects-bool", "pure")
    expected = ["1" if sympy.isprime(n) else "0" for n in numbers]
    wrong = [n for n, got, want in zip(numbers, answers, expected) if got != want]
    assert len(answers) == len(numbers) and wrong == []
