//! ggml block formats → f32. Each format stores a row as blocks of `block().0` values in
//! `block().1` bytes (little-endian f16 scales, packed integer quants), so any whole row decodes on
//! its own.

use half::{bf16, f16};

#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Bf16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
}

/// Values per super-block of the k-quants.
const QK_K: usize = 256;

impl GgmlType {
    pub const SUPPORTED: &'static str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K";

    /// The type with ggml's numeric id (`enum ggml_type`).
    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            30 => Bf16,
            _ => return None,
        })
    }

    /// Names of ggml types fastkv knows of but does not decode, for error messages.
    pub fn name_of_unsupported(id: u32) -> Option<&'static str> {
        const NAMES: [(u32, &str); 12] = [
            (9, "Q8_1"),
            (10, "Q2_K"),
            (11, "Q3_K"),
            (15, "Q8_K"),
            (16, "IQ2_XXS"),
            (17, "IQ2_XS"),
            (18, "IQ3_XXS"),
            (19, "IQ1_S"),
            (20, "IQ4_NL"),
            (21, "IQ3_S"),
            (22, "IQ2_S"),
            (23, "IQ4_XS"),
        ];
        NAMES.iter().find(|(i, _)| *i == id).map(|(_, n)| *n)
    }

    /// (values, bytes) of one block.
    pub fn block(self) -> (usize, usize) {
        use GgmlType::*;
        match self {
            F32 => (1, 4),
            F16 | Bf16 => (1, 2),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q4_K => (QK_K, 144),
            Q5_K => (QK_K, 176),
            Q6_K => (QK_K, 210),
        }
    }

    /// Decodes whole blocks: `out.len() / block().0 == bytes.len() / block().1`.
    pub fn dequantize(self, bytes: &[u8], out: &mut [f32]) {
        let (n, nb) = self.block();
        debug_assert_eq!(bytes.len() / nb * n, out.len());
        let blocks = bytes.chunks_exact(nb).zip(out.chunks_exact_mut(n));
        use GgmlType::*;
        match self {
            F32 => blocks.for_each(|(b, o)| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            F16 => blocks.for_each(|(b, o)| o[0] = f16::from_le_bytes([b[0], b[1]]).to_f32()),
            Bf16 => blocks.for_each(|(b, o)| o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            Q4_0 => blocks.for_each(|(b, o)| q4(&b[2..], half(b, 0), 8, 0.0, o)),
            Q4_1 => blocks.for_each(|(b, o)| q4(&b[4..], half(b, 0), 0, half(b, 2), o)),
            Q5_0 => blocks.for_each(|(b, o)| q5(&b[2..], half(b, 0), 16, 0.0, o)),
            Q5_1 => blocks.for_each(|(b, o)| q5(&b[4..], half(b, 0), 0, half(b, 2), o)),
            Q8_0 => blocks.for_each(|(b, o)| {
                let d = half(b, 0);
                o.iter_mut().zip(&b[2..]).for_each(|(o, &q)| *o = d * q as i8 as f32);
            }),
            Q4_K => blocks.for_each(|(b, o)| q4_k(b, o)),
            Q5_K => blocks.for_each(|(b, o)| q5_k(b, o)),
            Q6_K => blocks.for_each(|(b, o)| q6_k(b, o)),
        }
    }
}

fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// 32 values from 16 bytes of nibbles (low nibbles first): `d·(q − off) + m`, in ggml's order of
/// operations so results are bit-identical.
fn q4(qs: &[u8], d: f32, off: i32, m: f32, out: &mut [f32]) {
    for (j, &q) in qs[..16].iter().enumerate() {
        out[j] = d * ((q & 0xF) as i32 - off) as f32 + m;
        out[j + 16] = d * ((q >> 4) as i32 - off) as f32 + m;
    }
}

/// As [`q4`] with a fifth bit per value from the 32-bit mask in front of the nibbles.
fn q5(b: &[u8], d: f32, off: i32, m: f32, out: &mut [f32]) {
    let qh = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (j, &q) in b[4..20].iter().enumerate() {
        let hi0 = ((qh >> j) & 1) << 4;
        let hi1 = ((qh >> (j + 16)) & 1) << 4;
        out[j] = d * (((q & 0xF) as u32 | hi0) as i32 - off) as f32 + m;
        out[j + 16] = d * (((q >> 4) as u32 | hi1) as i32 - off) as f32 + m;
    }
}

/// The 6-bit (scale, min) pair of sub-block `j` of a Q4_K/Q5_K super-block.
fn scale_min(scales: &[u8], j: usize) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        ((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))
    };
    (sc as f32, m as f32)
}

/// Q4_K: d, dmin (f16), 12 bytes of 6-bit scales/mins for 8 sub-blocks of 32, 128 bytes of nibbles;
/// each 32 bytes hold two sub-blocks (low nibbles, then high).
fn q4_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin, scales, qs) = (half(b, 0), half(b, 2), &b[4..16], &b[16..144]);
    for (chunk, (q, o)) in qs.chunks_exact(32).zip(out.chunks_exact_mut(64)).enumerate() {
        let (s0, m0) = scale_min(scales, 2 * chunk);
        let (s1, m1) = scale_min(scales, 2 * chunk + 1);
        for (l, &q) in q.iter().enumerate() {
            o[l] = d * s0 * (q & 0xF) as f32 - dmin * m0;
            o[l + 32] = d * s1 * (q >> 4) as f32 - dmin * m1;
        }
    }
}

/// Q5_K: as Q4_K plus 32 bytes of high bits; bit `2·chunk` / `2·chunk + 1` of byte `l` extends value `l`
/// of the chunk's low / high sub-block.
fn q5_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin, scales, qh, qs) = (half(b, 0), half(b, 2), &b[4..16], &b[16..48], &b[48..176]);
    for (chunk, (q, o)) in qs.chunks_exact(32).zip(out.chunks_exact_mut(64)).enumerate() {
        let (s0, m0) = scale_min(scales, 2 * chunk);
        let (s1, m1) = scale_min(scales, 2 * chunk + 1);
        for (l, &q) in q.iter().enumerate() {
            let h0 = ((qh[l] >> (2 * chunk)) & 1) << 4;
            let h1 = ((qh[l] >> (2 * chunk + 1)) & 1) << 4;
            o[l] = d * s0 * ((q & 0xF) | h0) as f32 - dmin * m0;
            o[l + 32] = d * s1 * ((q >> 4) | h1) as f32 - dmin * m1;
        }
    }
}

/// Q6_K: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 signed 8-bit scales (one per 16
/// values), f16 d. Each half of 128 values uses 64 low bytes, 32 high bytes and 8 scales.
fn q6_k(b: &[u8], out: &mut [f32]) {
    let (ql, qh, sc, d) = (&b[..128], &b[128..192], &b[192..208], half(b, 208));
    for h in 0..2 {
        let (ql, qh, sc, o) = (&ql[64 * h..], &qh[32 * h..], &sc[8 * h..], &mut out[128 * h..]);
        for l in 0..32 {
            let s = |k: usize| d * sc[l / 16 + 2 * k] as i8 as f32;
            let q = |low: u8, shift: u32| (low as i32 | (((qh[l] >> shift) & 3) as i32) << 4) - 32;
            o[l] = s(0) * q(ql[l] & 0xF, 0) as f32;
            o[l + 32] = s(1) * q(ql[l + 32] & 0xF, 2) as f32;
            o[l + 64] = s(2) * q(ql[l] >> 4, 4) as f32;
            o[l + 96] = s(3) * q(ql[l + 32] >> 4, 6) as f32;
        }
    }
}
