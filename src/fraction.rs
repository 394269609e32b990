//! Rates as exact fractions. A budget is the floor of a prompt length times a rate (C = ⌊L·r⌋,
//! T = ⌊L·t⌋, C = ⌊T·r/t⌋ after ℓ*); computed in f64, r/t of 0.1 and 0.3 is 0.33333333333333337,
//! which no integer graph can reproduce. Every budget is instead the floor of an exact product with
//! the rate's nearest fraction of denominator ≤ 10⁶, so the CPU engine, the ONNX graphs and the
//! TensorRT plugins compute the same integers from the same `(num, den)`.

/// The largest denominator a rate is taken with.
pub const MAX_DENOMINATOR: u64 = 1_000_000;

/// num / den, in lowest terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fraction {
    pub num: u64,
    pub den: u64,
}

impl Fraction {
    /// The fraction nearest `x` (≥ 0, finite) with a denominator up to [`MAX_DENOMINATOR`] (ties to
    /// the smaller denominator), from the continued fraction of x's exact binary value.
    pub fn nearest(x: f64) -> Fraction {
        if !(x.is_finite() && x > 0.0) {
            return Fraction { num: 0, den: 1 };
        }
        // x = n / d exactly, with d a power of two (rates far below 2⁻⁶⁰ round to 0).
        let (mut n, mut d) = exact(x);
        let (mut p0, mut q0, mut p1, mut q1) = (0u128, 1u128, 1u128, 0u128);
        let max = MAX_DENOMINATOR as u128;
        while d != 0 {
            let a = n / d;
            let q2 = q0 + a * q1;
            if q2 > max {
                // The best approximations left: the semiconvergent with the largest allowed
                // denominator, or the last convergent.
                let k = (max - q0) / q1;
                let (ps, qs) = (p0 + k * p1, q0 + k * q1);
                let (xn, xd) = exact(x);
                let off = |p: u128, q: u128| (p * xd).abs_diff(xn * q) as f64 / q as f64;
                let (p, q) = if off(p1, q1) <= off(ps, qs) { (p1, q1) } else { (ps, qs) };
                return Fraction::reduced(p as u64, q as u64);
            }
            (p0, q0, p1, q1) = (p1, q1, p0 + a * p1, q2);
            (n, d) = (d, n - a * d);
        }
        Fraction::reduced(p1 as u64, q1 as u64)
    }

    fn reduced(num: u64, den: u64) -> Fraction {
        let g = gcd(num, den).max(1);
        Fraction { num: num / g, den: den / g }
    }

    /// self / other (other non-zero).
    pub fn over(self, other: Fraction) -> Fraction {
        Fraction::reduced(self.num * other.den, self.den * other.num.max(1))
    }

    /// ⌊n · self⌋.
    pub fn floor_mul(self, n: usize) -> usize {
        (n as u128 * self.num as u128 / self.den as u128) as usize
    }

    pub fn value(self) -> f64 {
        self.num as f64 / self.den as f64
    }
}

/// x (finite, > 0) as n / 2^k exactly, scaled so both fit a u128 with room for the products above.
fn exact(x: f64) -> (u128, u128) {
    let bits = x.to_bits();
    let exponent = ((bits >> 52) & 0x7ff) as i32;
    let mantissa = if exponent == 0 { (bits & ((1 << 52) - 1)) << 1 } else { (bits & ((1 << 52) - 1)) | (1 << 52) };
    // x = mantissa · 2^(exponent − 1075).
    let shift = exponent - 1075;
    if shift >= 0 {
        return ((mantissa as u128) << shift.min(40), 1);
    }
    let down = -shift;
    if down > 60 {
        // Below 2⁻⁸: keep 60 fractional bits (a rate this small rounds to at most 1/10⁶ anyway).
        let drop = down - 60;
        return (if drop >= 64 { 0 } else { (mantissa >> drop) as u128 }, 1 << 60);
    }
    (mantissa as u128, 1 << down)
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_rates_are_their_decimal_fractions() {
        for (x, num, den) in [(0.1, 1, 10), (0.2, 1, 5), (0.3, 3, 10), (0.05, 1, 20), (0.125, 1, 8), (1.0, 1, 1)] {
            assert_eq!(Fraction::nearest(x), Fraction { num, den }, "{x}");
        }
        assert_eq!(Fraction::nearest(1.0 / 3.0), Fraction { num: 1, den: 3 });
        assert_eq!(Fraction::nearest(0.123456), Fraction { num: 1929, den: 15625 });
        assert_eq!(Fraction::nearest(0.0), Fraction { num: 0, den: 1 });
    }

    #[test]
    fn a_ratio_of_rates_is_exact() {
        let post = Fraction::nearest(0.1).over(Fraction::nearest(0.3));
        assert_eq!(post, Fraction { num: 1, den: 3 });
        // In f64 it is not: ⌊T·(0.1/0.3)⌋ would need 0.33333333333333337.
        assert_ne!(0.1 / 0.3, 1.0 / 3.0);
        assert_eq!(post.floor_mul(300), 100);
        assert_eq!(post.floor_mul(299), 99);
    }

    #[test]
    fn the_nearest_fraction_is_nearest() {
        // Against a brute force over every denominator, on awkward values.
        for x in [std::f64::consts::PI - 3.0, std::f64::consts::FRAC_1_SQRT_2, 0.000_123_456_7, 0.999_999_9, 1e-7] {
            let f = Fraction::nearest(x);
            let err = (f.value() - x).abs();
            for den in [1u64, 7, 113, 999, 33215, 1_000_000] {
                let num = (x * den as f64).round();
                assert!(err <= (num / den as f64 - x).abs() + 1e-18, "{x}: {f:?} vs {num}/{den}");
            }
            assert!(f.den <= MAX_DENOMINATOR);
        }
    }
}
