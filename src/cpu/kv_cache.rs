//! The KV cache of one request: per layer, head-major K and V with the original position of every
//! entry. Each layer is allocated once, for what prefill keeps plus `max_new_tokens`, so decoding
//! appends in place and never copies the cache.

use super::attention::KvView;

pub struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
    pos: Vec<u32>,
    len: usize,
    cap: usize,
    head_dim: usize,
    n_kv_heads: usize,
}

impl LayerCache {
    /// Stores entries `keep[g]` (indices into the `seq_len` rows of `k`/`v`, head-major
    /// `[Hk, seq_len, D]`) of every KV head; `None` keeps all rows in order.
    pub fn from_prefill(
        k: &[f32],
        v: &[f32],
        positions: &[u32],
        keep: Option<&[u32]>,
        n_kv_heads: usize,
        head_dim: usize,
        extra: usize,
    ) -> Self {
        let seq_len = positions.len();
        let kept = keep.map_or(seq_len, |k| k.len() / n_kv_heads);
        let cap = kept + extra;
        let mut c = LayerCache {
            k: vec![0.0; n_kv_heads * cap * head_dim],
            v: vec![0.0; n_kv_heads * cap * head_dim],
            pos: vec![0; n_kv_heads * cap],
            len: kept,
            cap,
            head_dim,
            n_kv_heads,
        };
        let d = head_dim;
        for g in 0..n_kv_heads {
            let rows: Box<dyn Iterator<Item = usize>> = match keep {
                Some(idx) => Box::new(idx[g * kept..(g + 1) * kept].iter().map(|&i| i as usize)),
                None => Box::new(0..seq_len),
            };
            for (slot, row) in rows.enumerate() {
                let (src, dst) = ((g * seq_len + row) * d, (g * cap + slot) * d);
                c.k[dst..dst + d].copy_from_slice(&k[src..src + d]);
                c.v[dst..dst + d].copy_from_slice(&v[src..src + d]);
                c.pos[g * cap + slot] = positions[row];
            }
        }
        c
    }

    /// Appends one token's K/V (`[Hk·D]` each) at `position`. Panics only if more tokens are
    /// appended than were reserved, which the session prevents.
    pub fn push(&mut self, k: &[f32], v: &[f32], position: u32) {
        assert!(self.len < self.cap, "KV cache reserved for fewer tokens than generated");
        let d = self.head_dim;
        for g in 0..self.n_kv_heads {
            let dst = (g * self.cap + self.len) * d;
            self.k[dst..dst + d].copy_from_slice(&k[g * d..(g + 1) * d]);
            self.v[dst..dst + d].copy_from_slice(&v[g * d..(g + 1) * d]);
            self.pos[g * self.cap + self.len] = position;
        }
        self.len += 1;
    }

    /// Entries per KV head.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of K and V held (f32), not counting the reserve for tokens not generated yet.
    pub fn bytes(&self) -> usize {
        2 * self.n_kv_heads * self.len * self.head_dim * std::mem::size_of::<f32>()
    }

    pub fn view(&self) -> KvView<'_> {
        KvView { k: &self.k, v: &self.v, pos: &self.pos, len: self.len, stride: self.cap }
    }

    /// Original positions of the entries of KV head `g`.
    pub fn positions(&self, g: usize) -> &[u32] {
        &self.pos[g * self.cap..g * self.cap + self.len]
    }
}
