"""Exact primality test shared by CPython compute nodes and ESP32 boards.

This one file is deployed unchanged to MicroPython, so it keeps to the subset of
Python both interpreters share: no ``typing`` import at run time, no ``math.isqrt``,
no ``int.bit_length`` (MicroPython lacks it), no dataclasses, big-int ``pow`` only.

Decision procedure for an int ``n`` (every branch is exact except the last, which is
documented as such):

1. ``n < 2`` is not prime; trial division by the primes below 256 settles every ``n``
   with a small factor, and every ``n < 251**2``.
2. ``n < 2**64``: strong (Miller-Rabin) test to the bases
   2, 325, 9375, 28178, 450775, 9780504, 1795265022, skipping a base that is
   0 mod n. No composite below 2**64 passes all seven.
3. ``n < 3,317,044,064,679,887,385,961,981``: strong test to the 13 primes 2..41.
   The bound itself is the least composite that passes all thirteen.
4. Above that: BPSW, a strong base-2 test plus a strong Lucas test with Selfridge's
   method A parameters. No composite passing BPSW is known, but that is an
   empirical fact, not a proof.

With gmpy2 importable (CPython only), ``is_prime`` uses it for speed and still gives
exactly the answers of ``is_prime_pure``; see ``_is_prime_gmpy2`` for the argument.
"""

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable, List, Tuple

try:
    import gmpy2 as _gmpy2
except ImportError:  # MicroPython, or CPython without the optional extra
    _gmpy2 = None

__all__ = ["is_prime", "is_prime_pure", "filter_primes", "HAS_GMPY2"]

# True when is_prime takes the gmpy2 path.
HAS_GMPY2 = _gmpy2 is not None

# Primes below 256: trial division removes most composites before any modular power.
_SMALL_PRIMES = (
    2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71,
    73, 79, 83, 89, 97, 101, 103, 107, 109, 113, 127, 131, 137, 139, 149, 151,
    157, 163, 167, 173, 179, 181, 191, 193, 197, 199, 211, 223, 227, 229, 233,
    239, 241, 251,
)
# An n with no factor in _SMALL_PRIMES and below this square is prime.
_TRIAL_SQUARE = 251 * 251


def _product(values: "Tuple[int, ...]") -> int:
    """Product of a finite tuple of ints."""
    result = 1
    for v in values:
        result *= v
    return result


# One gcd with this replaces the trial-division loop on the gmpy2 path.
_SMALL_PRIMORIAL = _gmpy2.mpz(_product(_SMALL_PRIMES)) if _gmpy2 is not None else 1

# Seven bases exact below 2**64 (a base that is 0 mod n is skipped).
_BASES_64 = (2, 325, 9375, 28178, 450775, 9780504, 1795265022)
_LIMIT_64 = 1 << 64

# The first 13 primes are exact below this bound, which fools all thirteen.
_BASES_13 = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
_LIMIT_13 = 3317044064679887385961981

# Cap on the Selfridge search for D. A non-square n always meets a D with
# Jacobi(D/n) = -1, in practice among the first few dozen; the cap only makes the
# loop visibly finite, and hitting it raises rather than guessing.
_MAX_D_TRIES = 1 << 16


def _check_int(n: int) -> None:
    """Reject non-ints early: a float or str would give silent nonsense, a bool is a flag."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError("primality needs an int, got %s" % type(n).__name__)


def _bit_length(n: int) -> int:
    """Bit length of n >= 0 (``int.bit_length`` is missing on MicroPython)."""
    return len(bin(n)) - 2 if n > 0 else 0


def _split_power_of_two(m: int) -> "Tuple[int, int]":
    """Return (d, s) with m = d * 2**s and d odd, for m > 0, without a loop."""
    s = _bit_length(m & -m) - 1
    return m >> s, s


def _small_factor_verdict(n: int) -> int:
    """Trial division for n >= 2: 1 prime, 0 composite, -1 undecided (needs a real test)."""
    for p in _SMALL_PRIMES:
        if n % p == 0:
            return 1 if n == p else 0
    return 1 if n < _TRIAL_SQUARE else -1


def _is_strong_probable_prime(n: int, a: int, d: int, s: int) -> bool:
    """Strong (Miller-Rabin) test of odd n to base a, where n - 1 = d * 2**s, d odd."""
    x = pow(a, d, n)
    last = n - 1
    if x == 1 or x == last:
        return True
    for _ in range(s - 1):
        x = x * x % n
        if x == last:
            return True
        if x == 1:
            return False  # a nontrivial square root of 1: n is composite
    return False


def _isqrt(n: int) -> int:
    """Floor square root by Newton's method (``math.isqrt`` is missing on MicroPython)."""
    if n < 2:
        return n
    bits = _bit_length(n)
    x = 1 << ((bits + 1) // 2)  # never below the root, so the iterates fall to it
    for _ in range(bits + 2):  # converges in O(log bits) steps; the bound is generous
        y = (x + n // x) >> 1
        if y >= x:
            return x
        x = y
    raise ArithmeticError("integer square root did not converge")


def _jacobi(a: int, n: int) -> int:
    """Jacobi symbol (a/n) for odd n > 0, by the binary reciprocity algorithm."""
    a %= n
    result = 1
    # Each pass strips the twos from a and then swaps and reduces, a Euclid step,
    # so passes are fewer than twice the bit length of n plus a few.
    for _ in range(2 * _bit_length(n) + 4):
        if a == 0:
            return result if n == 1 else 0
        twos = _bit_length(a & -a) - 1
        a >>= twos
        if twos & 1 and n % 8 in (3, 5):
            result = -result
        if a % 4 == 3 and n % 4 == 3:
            result = -result
        a, n = n % a, a
    raise ArithmeticError("Jacobi symbol did not terminate")


def _half_mod(x: int, n: int) -> int:
    """x / 2 modulo odd n."""
    x %= n
    if x & 1:
        x += n
    return x >> 1


def _is_strong_lucas_probable_prime(n: int) -> bool:
    """Strong Lucas test of odd n with Selfridge's method A: P = 1, Q = (1 - D) / 4.

    D is the first of 5, -7, 9, -11, ... with Jacobi(D/n) = -1. Requires n odd and
    larger than every D tried (true for the n that reach BPSW here).
    """
    if _isqrt(n) ** 2 == n:
        return False  # squares never meet a D with Jacobi -1; they are composite anyway
    d_param = 5
    for _ in range(_MAX_D_TRIES):
        j = _jacobi(d_param, n)
        if j == -1:
            break
        if j == 0:
            return False  # gcd(D, n) > 1 and |D| < n: a proper factor
        d_param = -d_param - 2 if d_param > 0 else -d_param + 2
    else:
        raise ArithmeticError("no Selfridge parameter found for %d" % n)
    q = (1 - d_param) // 4
    d, s = _split_power_of_two(n + 1)
    # Binary ladder over the bits of d from U_1 = 1, V_1 = P = 1, with Q**k alongside:
    # U_2k = U_k V_k, V_2k = V_k**2 - 2 Q**k, U_k+1 = (U_k + V_k)/2, V_k+1 = (D U_k + V_k)/2.
    u = 1
    v = 1
    qk = q % n
    for bit in bin(d)[3:]:
        u = u * v % n
        v = (v * v - 2 * qk) % n
        qk = qk * qk % n
        if bit == "1":
            u, v = _half_mod(u + v, n), _half_mod(d_param * u + v, n)
            qk = qk * q % n
    if u == 0 or v == 0:
        return True
    for _ in range(s - 1):
        v = (v * v - 2 * qk) % n
        if v == 0:
            return True
        qk = qk * qk % n
    return False


def _is_bpsw_probable_prime(n: int) -> bool:
    """BPSW for odd n without small factors: strong base 2 and strong Lucas (Selfridge A)."""
    d, s = _split_power_of_two(n - 1)
    return _is_strong_probable_prime(n, 2, d, s) and _is_strong_lucas_probable_prime(n)


def is_prime_pure(n: int) -> bool:
    """``is_prime`` in plain integer arithmetic: the path MicroPython always takes."""
    _check_int(n)
    if n < 2:
        return False
    verdict = _small_factor_verdict(n)
    if verdict >= 0:
        return verdict == 1
    if n >= _LIMIT_13:
        return _is_bpsw_probable_prime(n)
    bases = _BASES_64 if n < _LIMIT_64 else _BASES_13
    d, s = _split_power_of_two(n - 1)
    for a in bases:
        a %= n
        if a == 0:
            continue
        if not _is_strong_probable_prime(n, a, d, s):
            return False
    return True


def _is_prime_gmpy2(n: int) -> bool:
    """``is_prime_pure`` evaluated with gmpy2's C arithmetic: the same answer for every n.

    Why the answers agree: this runs the pure path's decision procedure step by step,
    only each step is computed by gmpy2. ``gmpy2.is_prime`` is deliberately not used:
    it is a probabilistic test (trial division, then Miller-Rabin/BPSW rounds that
    depend on the GMP version), so above _LIMIT_13 a "more careful" answer could
    differ from the pure BPSW one, and below it a True would need confirming anyway.
    - Trial division: for n > 251, n has a factor below 256 exactly when
      gcd(n, product of the primes below 256) > 1.
    - Strong test per base: ``gmpy2.is_strong_prp(n, a)`` is the same predicate for odd
      n, 2 <= a < n, gcd(a, n) = 1. A base 0 mod n is skipped in both paths; a base 1
      mod n passes in both; a base sharing a factor with n makes gmpy2 raise ValueError,
      and fails the pure test too, because a**d is then never 1 or -1 mod n.
    - Lucas: ``gmpy2.is_strong_selfridge_prp`` is the strong Lucas test with Selfridge's
      method A parameters; squares are rejected first, as in the pure path.
    """
    _check_int(n)
    if n < _TRIAL_SQUARE:
        return n >= 2 and _small_factor_verdict(n) == 1
    m = _gmpy2.mpz(n)
    if _gmpy2.gcd(m, _SMALL_PRIMORIAL) != 1:
        return False
    if n >= _LIMIT_13:
        if _gmpy2.is_square(m) or not _gmpy2.is_strong_prp(m, 2):
            return False
        return bool(_gmpy2.is_strong_selfridge_prp(m))
    bases = _BASES_64 if n < _LIMIT_64 else _BASES_13
    for a in bases:
        a %= n
        if a < 2:
            continue
        try:
            if not _gmpy2.is_strong_prp(m, a):
                return False
        except ValueError:  # gcd(a, n) > 1: a proper factor of n
            return False
    return True


def is_prime(n: int) -> bool:
    """True if the int n is prime. Negatives, 0 and 1 are not prime.

    Exact for every n below 3,317,044,064,679,887,385,961,981 (trial division, then
    deterministic Miller-Rabin base sets). Above that the answer is BPSW (strong
    base-2 Miller-Rabin plus strong Lucas test, Selfridge method A): no composite
    that passes it is known, but that is not a proof.

    Raises TypeError for anything but an int (a bool included). Uses gmpy2 when it
    is installed, with answers identical to ``is_prime_pure``.
    """
    if _gmpy2 is None:
        return is_prime_pure(n)
    return _is_prime_gmpy2(n)


def _filter_primes_gmpy2(numbers: "Iterable[int]") -> "List[int]":
    """``filter_primes`` with the common case inlined: a 64-bit n above every base, so no
    base is reduced or skipped; the same steps as ``_is_prime_gmpy2``, minus a call and the
    checks per number (about a tenth of the time of a batch)."""
    mpz, gcd, strong = _gmpy2.mpz, _gmpy2.gcd, _gmpy2.is_strong_prp
    primorial, bases, high = _SMALL_PRIMORIAL, _BASES_64, _LIMIT_64
    low = _BASES_64[-1] + 1
    out = []
    for n in numbers:
        if type(n) is int and low <= n < high:
            m = mpz(n)
            if gcd(m, primorial) != 1:
                continue
            try:
                for a in bases:
                    if not strong(m, a):
                        break
                else:
                    out.append(n)
            except ValueError:  # gcd(a, n) > 1: a proper factor of n
                pass
        elif _is_prime_gmpy2(n):
            out.append(n)
    return out


def filter_primes(numbers: "Iterable[int]") -> "List[int]":
    """The primes among numbers, in input order (duplicates kept): ``is_prime`` of each,
    the fastest way this interpreter has."""
    if _gmpy2 is None:
        return [n for n in numbers if is_prime_pure(n)]
    return _filter_primes_gmpy2(numbers)
