//! Rotary position embeddings at explicit positions. Positions are arbitrary (not `0..S`) because
//! after Token-Selective Propagation the surviving tokens keep their original positions.
//! Frequencies and angles are computed in f32 exactly as transformers does, so logits match it.

use rayon::prelude::*;

use crate::spec::{ModelSpec, RopeScaling};

/// Inverse frequencies of one head (`head_dim / 2` of them), after any long-context scaling.
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(spec: &ModelSpec) -> Self {
        let dim = spec.head_dim;
        let base = spec.rope_theta;
        let mut inv_freq: Vec<f32> =
            (0..dim / 2).map(|i| 1.0 / (base.powf(((2 * i) as f32 / dim as f32) as f64) as f32)).collect();
        match spec.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor as f32),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let (factor, low, high, old) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                    original_max_position_embeddings as f32,
                );
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                for f in &mut inv_freq {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_wavelen { *f / factor } else { *f };
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    *f = if medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
        }
        Rope { inv_freq }
    }

    /// The inverse frequencies after scaling (what accelerator RoPE kernels take).
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// cos/sin of every (position, frequency) pair, computed once per sequence of positions.
    pub fn table(&self, positions: &[u32]) -> RopeTable {
        let half = self.inv_freq.len();
        let mut cos = vec![0.0f32; positions.len() * half];
        let mut sin = vec![0.0f32; positions.len() * half];
        cos.par_chunks_mut(half).zip(sin.par_chunks_mut(half)).zip(positions).for_each(|((c, s), &p)| {
            for ((c, s), &f) in c.iter_mut().zip(s.iter_mut()).zip(&self.inv_freq) {
                let angle = (p as f32 * f) as f64;
                *c = angle.cos() as f32;
                *s = angle.sin() as f32;
            }
        });
        RopeTable { cos, sin, half }
    }
}

/// Precomputed rotation for a fixed list of positions; row `i` of the activations uses entry `i`.
pub struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl RopeTable {
    /// Rotates `n_heads` consecutive heads starting at column `offset` of every row of `x` (rows
    /// `row_stride` apart), in the rotate-half convention of HF Llama.
    pub fn apply(&self, x: &mut [f32], row_stride: usize, first_row: usize, offset: usize, n_heads: usize) {
        let (half, dim) = (self.half, 2 * self.half);
        x.par_chunks_mut(row_stride).enumerate().for_each(|(row, xs)| {
            let row = first_row + row;
            let (cos, sin) = (&self.cos[row * half..][..half], &self.sin[row * half..][..half]);
            for head in xs[offset..offset + n_heads * dim].chunks_exact_mut(dim) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x0, x1) = (a[i], b[i]);
                    a[i] = x0 * cos[i] - x1 * sin[i];
                    b[i] = x1 * cos[i] + x0 * sin[i];
                }
            }
        });
    }
}
