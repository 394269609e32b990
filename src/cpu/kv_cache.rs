//! The KV cache of one request: per layer and cache head, K and V with the original position of
//! every entry. A layer caches either its KV heads (full, FastKV, StreamingLLM, …) or one entry list
//! per query head (SnapKV, AdaKV, HeadKV, PyramidKV, H2O as published), and AdaKV/HeadKV heads have
//! different lengths. Each layer is allocated once, for what prefill keeps plus `max_new_tokens`, so
//! decoding appends in place and never copies the cache.

use rayon::prelude::*;

use super::attention::{attention, Heads, KvView};

pub struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
    pos: Vec<u32>,
    /// Entries per cache head.
    lens: Vec<usize>,
    cap: usize,
    head_dim: usize,
    /// KV heads of the model: cache head c holds entries of KV head c / (cache heads / n_kv_heads).
    n_kv_heads: usize,
}

impl LayerCache {
    /// Stores entries `keep[c]` (indices into the `seq_len` rows of `k`/`v`, head-major
    /// `[Hk, seq_len, D]`) of every cache head c; `None` keeps all rows of every KV head in order.
    pub fn from_prefill(
        k: &[f32],
        v: &[f32],
        positions: &[u32],
        keep: Option<&[Vec<u32>]>,
        n_kv_heads: usize,
        head_dim: usize,
        extra: usize,
    ) -> Self {
        let seq_len = positions.len();
        let all: Vec<Vec<u32>>;
        let keep = match keep {
            Some(keep) => keep,
            None => {
                all = vec![(0..seq_len as u32).collect(); n_kv_heads];
                &all
            }
        };
        let lens: Vec<usize> = keep.iter().map(Vec::len).collect();
        let cap = lens.iter().max().copied().unwrap_or(0) + extra;
        let d = head_dim;
        let mut c = LayerCache {
            k: vec![0.0; keep.len() * cap * d],
            v: vec![0.0; keep.len() * cap * d],
            pos: vec![0; keep.len() * cap],
            lens,
            cap,
            head_dim,
            n_kv_heads,
        };
        let group = keep.len() / n_kv_heads;
        for (h, rows) in keep.iter().enumerate() {
            for (slot, &row) in rows.iter().enumerate() {
                let (src, dst) = (((h / group) * seq_len + row as usize) * d, (h * cap + slot) * d);
                c.k[dst..dst + d].copy_from_slice(&k[src..src + d]);
                c.v[dst..dst + d].copy_from_slice(&v[src..src + d]);
                c.pos[h * cap + slot] = positions[row as usize];
            }
        }
        c
    }

    /// Appends one token's K/V (`[Hk·D]` each) at `position` to every cache head. Panics only if
    /// more tokens are appended than were reserved, which the session prevents.
    pub fn push(&mut self, k: &[f32], v: &[f32], position: u32) {
        let d = self.head_dim;
        let group = self.lens.len() / self.n_kv_heads;
        for (h, len) in self.lens.iter_mut().enumerate() {
            assert!(*len < self.cap, "KV cache reserved for fewer tokens than generated");
            let (src, dst) = ((h / group) * d, (h * self.cap + *len) * d);
            self.k[dst..dst + d].copy_from_slice(&k[src..src + d]);
            self.v[dst..dst + d].copy_from_slice(&v[src..src + d]);
            self.pos[h * self.cap + *len] = position;
            *len += 1;
        }
    }

    /// Entries of the longest cache head (every head's length unless AdaKV/HeadKV).
    pub fn len(&self) -> usize {
        self.lens.iter().max().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cache heads: the model's KV heads, or its query heads for per-query-head methods.
    pub fn n_heads(&self) -> usize {
        self.lens.len()
    }

    /// Bytes of K and V held (f32), not counting the reserve for tokens not generated yet.
    pub fn bytes(&self) -> usize {
        2 * self.lens.iter().sum::<usize>() * self.head_dim * std::mem::size_of::<f32>()
    }

    /// Decode attention of one query row (`q`: `[H·D]` at `position`) over this cache into `out`.
    /// Equal-length heads go through one GQA attention call; ragged heads (one per query head)
    /// attend one by one over their own entries.
    pub fn attend(&self, q: &[f32], position: u32, heads: &Heads, out: &mut [f32]) {
        let (d, n) = (self.head_dim, self.lens.len());
        let window = heads.sliding_window;
        if self.lens.iter().all(|&l| l == self.lens[0]) {
            let kv = KvView { k: &self.k, v: &self.v, pos: &self.pos, len: self.lens[0], stride: self.cap };
            let heads = Heads { n_heads: heads.n_heads, n_kv_heads: n, head_dim: d, sliding_window: window };
            attention(q, &[position], 0, false, &kv, &heads, out);
            return;
        }
        let one = Heads { n_heads: 1, n_kv_heads: 1, head_dim: d, sliding_window: window };
        out.par_chunks_mut(d).enumerate().for_each(|(h, o)| {
            let (kv, pos) = (h * self.cap * d..(h + 1) * self.cap * d, h * self.cap..(h + 1) * self.cap);
            let view = KvView {
                k: &self.k[kv.clone()],
                v: &self.v[kv],
                pos: &self.pos[pos],
                len: self.lens[h],
                stride: self.cap,
            };
            attention(&q[h * d..(h + 1) * d], &[position], 0, false, &view, &one, o);
        });
    }

    /// Original positions of the entries of cache head `h`.
    pub fn positions(&self, h: usize) -> &[u32] {
        &self.pos[h * self.cap..h * self.cap + self.lens[h]]
    }
}
