//! ggml's tensor types and their reference quantizers (`ggml-quants.c`, the `_ref` functions that
//! `llama-quantize` and `convert_hf_to_gguf.py` use when there is no importance matrix), ported operation
//! for operation: the same f32 products and sums in the same order, no fused multiply-adds, so the
//! blocks are byte-identical to llama.cpp's.
use half::f16;

use crate::core::dtype::FloatType;

/// `ggml_type`: the tensor types lorafast writes (ids from `ggml.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    BF16,
}

pub const QK_K: usize = 256;

impl GgmlType {
    /// Every type lorafast writes.
    pub const ALL: [GgmlType; 10] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// The ggml type that stores values of a float type as they are.
    pub fn of_float(t: FloatType) -> Self {
        match t {
            FloatType::F32 => GgmlType::F32,
            FloatType::F16 => GgmlType::F16,
            FloatType::BF16 => GgmlType::BF16,
        }
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    /// Bytes of a row of `n` elements (`n` a multiple of the block size).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_size() * self.type_size()
    }

    /// Encode one row (`x.len()` a multiple of the block size) into `out` (`row_bytes(x.len())` bytes).
    pub fn encode_row(self, x: &[f32], out: &mut [u8]) {
        debug_assert_eq!(x.len() % self.block_size(), 0);
        debug_assert_eq!(out.len(), self.row_bytes(x.len()));
        match self {
            GgmlType::F32 => FloatType::F32.encode(x, out),
            GgmlType::F16 => FloatType::F16.encode(x, out),
            GgmlType::BF16 => encode_bf16_row(x, out),
            GgmlType::Q4K => encode_q4k_blocks(x, out),
            GgmlType::Q5K => encode_q5k_blocks(x, out),
            GgmlType::Q6K => encode_q6k_blocks(x, out),
            GgmlType::Q8_0 => encode_q8_0_blocks(x, out),
            _ => {
                let (bs, ts) = (self.block_size(), self.type_size());
                for (x, y) in x.chunks_exact(bs).zip(out.chunks_exact_mut(ts)) {
                    match self {
                        GgmlType::Q8_0 => q8_0(x, y),
                        GgmlType::Q4_0 => q4_0(x, y),
                        GgmlType::Q5_0 => q5_0(x, y),
                        GgmlType::Q5_1 => q5_1(x, y),
                        GgmlType::Q4K => q4_k_blocks::<8>(x, y),
                        GgmlType::Q5K => q5_k_blocks::<8>(x, y),
                        GgmlType::Q6K => q6_k::<16>(x, y),
                        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!(),
                    }
                }
            }
        }
    }
}

// The K-quant blocks compiled for the widest SIMD the CPU has: the sub-block lanes become vector lanes,
// each lane's operations unchanged (Rust never fuses a multiply and an add), so the bytes do not change.
// Q4_K and Q5_K search two blocks side by side (16 lanes: one AVX-512 register per operation).
/// Blocks two at a time through `$blocks::<16>`, then a last odd one through `$blocks::<8>`. A macro, not
/// a generic function taking the encoders: that version measured 2.5x slower.
macro_rules! in_pairs {
    ($x:expr, $out:expr, $type_size:expr, $blocks:ident) => {{
        let (x, out, ts) = ($x, $out, $type_size);
        let quads = x.len() / (4 * QK_K);
        let (x4, x) = x.split_at(quads * 4 * QK_K);
        let (y4, out) = out.split_at_mut(quads * 4 * ts);
        for (x, y) in x4.chunks_exact(4 * QK_K).zip(y4.chunks_exact_mut(4 * ts)) {
            $blocks::<32>(x, y);
        }
        let pairs = x.len() / (2 * QK_K);
        let (x2, x1) = x.split_at(pairs * 2 * QK_K);
        let (y2, y1) = out.split_at_mut(pairs * 2 * ts);
        for (x, y) in x2.chunks_exact(2 * QK_K).zip(y2.chunks_exact_mut(2 * ts)) {
            $blocks::<16>(x, y);
        }
        for (x, y) in x1.chunks_exact(QK_K).zip(y1.chunks_exact_mut(ts)) {
            $blocks::<8>(x, y);
        }
    }};
}

crate::dispatch! {
    pub fn encode_q4k_blocks(x: &[f32], out: &mut [u8]) {
        in_pairs!(x, out, 144, q4_k_blocks)
    }
}

crate::dispatch! {
    pub fn encode_q5k_blocks(x: &[f32], out: &mut [u8]) {
        in_pairs!(x, out, 176, q5_k_blocks)
    }
}

crate::dispatch! {
    pub fn encode_q8_0_blocks(x: &[f32], out: &mut [u8]) {
        for (x, y) in x.chunks_exact(32).zip(out.chunks_exact_mut(34)) {
            q8_0(x, y);
        }
    }
}

crate::dispatch! {
    pub fn encode_q6k_blocks(x: &[f32], out: &mut [u8]) {
        let pairs = x.len() / (2 * QK_K);
        let (x2, x1) = x.split_at(pairs * 2 * QK_K);
        let (y2, y1) = out.split_at_mut(pairs * 2 * 210);
        for (x, y) in x2.chunks_exact(2 * QK_K).zip(y2.chunks_exact_mut(2 * 210)) {
            q6_k::<32>(x, y);
        }
        for (x, y) in x1.chunks_exact(QK_K).zip(y1.chunks_exact_mut(210)) {
            q6_k::<16>(x, y);
        }
    }
}

/// `ggml_compute_fp32_to_bf16`: round to nearest even; a NaN keeps its top bits and is made quiet.
/// Branch-free, so a loop of it vectorizes (the sum cannot overflow: NaNs take the other arm).
#[inline(always)]
pub fn bf16_bits(v: f32) -> u16 {
    let n = v.to_bits();
    let rounded = n.wrapping_add(0x7fff + ((n >> 16) & 1)) >> 16;
    let nan = (n >> 16) | 64;
    (if n & 0x7fff_ffff > 0x7f80_0000 { nan } else { rounded }) as u16
}

crate::dispatch! {
    /// Little-endian bf16 of `x`, `bf16_bits` on each value.
    pub fn encode_bf16_row(x: &[f32], out: &mut [u8]) {
        let mut bits = [0u16; 64];
        for (x, out) in x.chunks(64).zip(out.chunks_mut(128)) {
            for (b, v) in bits.iter_mut().zip(x) {
                *b = bf16_bits(*v);
            }
            for (o, b) in out.chunks_exact_mut(2).zip(&bits) {
                o.copy_from_slice(&b.to_le_bytes());
            }
        }
    }
}

fn fp16(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

fn from_fp16(b: [u8; 2]) -> f32 {
    f16::from_le_bytes(b).to_f32()
}

/// `nearest_int`: round half to even through the 1.5 * 2^23 trick (garbage, but the same garbage, for
/// |x| > 2^22).
#[inline(always)]
fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12582912.0f32;
    let i = val.to_bits() as i32;
    (i & 0x007f_ffff).wrapping_sub(0x0040_0000)
}

/// C's conversion of a float to `int8_t` as x86-64 compilers emit it (truncate to int32, keep the low
/// byte); the quantizers only convert values in range.
#[inline]
fn to_i8(v: f32) -> i8 {
    v as i32 as i8
}

/// `to_i8` of an integral float, without Rust's saturating conversion (whose NaN checks keep the loop
/// scalar): below 2^22 in magnitude the 1.5 * 2^23 trick is exact, and an infinity or NaN lands on a low
/// byte of 0, as x86's 0x80000000 does.
#[inline(always)]
fn integral_to_i8(v: f32) -> i8 {
    ((v + 12582912.0f32).to_bits().wrapping_sub(0x4b40_0000)) as u8 as i8
}

/// The value of largest magnitude (the first one, sign kept) and that magnitude.
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (amax, max)
}

#[inline(always)]
fn q8_0(x: &[f32], y: &mut [u8]) {
    // |v| as bits orders as the values do, so the largest is an integer max, which vectorizes; a NaN
    // (bits above infinity's) takes C's loop, whose MAX(a, b) = a > b ? a : b forgets it again.
    let top = x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
    let mut amax = f32::from_bits(top);
    if top > 0x7f80_0000 {
        amax = 0.0;
        for &v in x {
            amax = if amax > v.abs() { amax } else { v.abs() };
        }
    }
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&fp16(d));
    for (q, &v) in y[2..].iter_mut().zip(x) {
        *q = integral_to_i8((v * id).round()) as u8;
    }
}

fn q4_0(x: &[f32], y: &mut [u8]) {
    let (_, max) = signed_absmax(x);
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&fp16(d));
    for j in 0..16 {
        let xi0 = (to_i8(x[j] * id + 8.5) as i32).min(15) as u8;
        let xi1 = (to_i8(x[j + 16] * id + 8.5) as i32).min(15) as u8;
        y[2 + j] = xi0 | (xi1 << 4);
    }
}

fn q5_0(x: &[f32], y: &mut [u8]) {
    let (_, max) = signed_absmax(x);
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&fp16(d));
    let mut qh = 0u32;
    for j in 0..16 {
        let xi0 = (to_i8(x[j] * id + 16.5) as i32).min(31) as u8;
        let xi1 = (to_i8(x[j + 16] * id + 16.5) as i32).min(31) as u8;
        y[6 + j] = (xi0 & 0x0f) | ((xi1 & 0x0f) << 4);
        qh |= (((xi0 & 0x10) >> 4) as u32) << j;
        qh |= (((xi1 & 0x10) >> 4) as u32) << (j + 16);
    }
    y[2..6].copy_from_slice(&qh.to_le_bytes());
}

fn q5_1(x: &[f32], y: &mut [u8]) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&fp16(d));
    y[2..4].copy_from_slice(&fp16(min));
    let mut qh = 0u32;
    for j in 0..16 {
        let xi0 = ((x[j] - min) * id + 0.5) as i32 as u8;
        let xi1 = ((x[j + 16] - min) * id + 0.5) as i32 as u8;
        y[8 + j] = (xi0 & 0x0f) | ((xi1 & 0x0f) << 4);
        qh |= (((xi0 & 0x10) >> 4) as u32) << j;
        qh |= (((xi1 & 0x10) >> 4) as u32) << (j + 16);
    }
    y[4..8].copy_from_slice(&qh.to_le_bytes());
}

/// `make_qkx2_quants` (use_mad false) for N sub-blocks at once, lane k holding sub-block k: the same
/// f32 operations in the same order per lane as the scalar version, bit for bit. Levels are kept as
/// f32 (small integers, exact) so the lanes never leave the float registers.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn make_qkx2_quants_xn<const N: usize>(
    nmax: i32,
    x: &[[f32; N]; 32],
    w: &[[f32; N]; 32],
    l: &mut [[f32; N]; 32],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> ([f32; N], [f32; N]) {
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = [0f32; N];
    for k in 0..N {
        sum_x[k] = sum_w[k] * x[0][k];
    }
    for i in 1..32 {
        for k in 0..N {
            if x[i][k] < min[k] {
                min[k] = x[i][k];
            }
            if x[i][k] > max[k] {
                max[k] = x[i][k];
            }
            sum_w[k] += w[i][k];
            sum_x[k] += w[i][k] * x[i][k];
        }
    }
    let nmaxf = nmax as f32;
    let mut flat = [false; N];
    let mut iscale = [0f32; N];
    let mut scale = [0f32; N];
    for k in 0..N {
        if min[k] > 0.0 {
            min[k] = 0.0;
        }
        flat[k] = max[k] == min[k];
        iscale[k] = nmaxf / (max[k] - min[k]);
        scale[k] = 1.0 / iscale[k];
    }
    let mut best_error = [0f32; N];
    // The levels are nearest_int(l_iscale * (x - l_min)) clamped, of the best pass so far.
    let (mut l_iscale, mut l_min) = (iscale, min);
    for i in 0..32 {
        for k in 0..N {
            let q = nearest_int(iscale[k] * (x[i][k] - min[k])).clamp(0, nmax) as f32;
            let diff = scale[k] * q + min[k] - x[i][k];
            best_error[k] += w[i][k] * (diff * diff);
        }
    }
    let mut laux = [[0f32; N]; 32];
    for is in 0..=nstep {
        let (mut sum_l, mut sum_l2, mut sum_xl) = ([0f32; N], [0f32; N], [0f32; N]);
        for k in 0..N {
            iscale[k] = (rmin + rdelta * is as f32 + nmaxf) / (max[k] - min[k]);
        }
        for i in 0..32 {
            for k in 0..N {
                let lf = nearest_int(iscale[k] * (x[i][k] - min[k])).clamp(0, nmax) as f32;
                laux[i][k] = lf;
                let wl = w[i][k] * lf;
                sum_l[k] += wl;
                sum_l2[k] += wl * lf;
                sum_xl[k] += wl * x[i][k];
            }
        }
        let mut this_scale = [0f32; N];
        let mut this_min = [0f32; N];
        // D per lane, kept as a float (a bool array turned the selection below into a scalar loop of
        // unpredictable branches).
        let mut det = [0f32; N];
        // Branch-free per lane (both sides computed, one selected): the lanes stay in vector registers.
        for k in 0..N {
            let d = sum_w[k] * sum_l2[k] - sum_l[k] * sum_l[k];
            det[k] = d;
            let scale_k = (sum_w[k] * sum_xl[k] - sum_x[k] * sum_l[k]) / d;
            let min_k = (sum_l2[k] * sum_x[k] - sum_l[k] * sum_xl[k]) / d;
            let clamped = min_k > 0.0;
            this_min[k] = if clamped { 0.0 } else { min_k };
            this_scale[k] = if clamped { sum_xl[k] / sum_l2[k] } else { scale_k };
        }
        let mut cur_error = [0f32; N];
        for i in 0..32 {
            for k in 0..N {
                let diff = this_scale[k] * laux[i][k] + this_min[k] - x[i][k];
                cur_error[k] += w[i][k] * (diff * diff);
            }
        }
        for k in 0..N {
            // Remember how this pass made its levels rather than copying them: they are remade once
            // at the end by the same operations.
            // As a bit mask: the form the compiler keeps in vector registers.
            let take = 0u32.wrapping_sub(((det[k] > 0.0) & (cur_error[k] < best_error[k])) as u32);
            let pick = |new: f32, old: f32| f32::from_bits((new.to_bits() & take) | (old.to_bits() & !take));
            l_iscale[k] = pick(iscale[k], l_iscale[k]);
            l_min[k] = pick(min[k], l_min[k]);
            best_error[k] = pick(cur_error[k], best_error[k]);
            scale[k] = pick(this_scale[k], scale[k]);
            min[k] = pick(this_min[k], min[k]);
        }
    }
    for i in 0..32 {
        for k in 0..N {
            l[i][k] = nearest_int(l_iscale[k] * (x[i][k] - l_min[k])).clamp(0, nmax) as f32;
        }
    }
    for k in 0..N {
        if flat[k] {
            for row in l.iter_mut() {
                row[k] = 0.0;
            }
            scale[k] = 0.0;
        }
    }
    (scale, min.map(|m| -m))
}

/// The sub-block search of Q4_K / Q5_K for the N / 8 blocks in `x`, their N sub-blocks side by side
/// (one lane each).
#[inline(always)]
fn k_quant_search<const N: usize>(x: &[f32], nmax: i32, rmin: f32, nstep: i32) -> KSearch<N> {
    let mut xs = [[0f32; N]; 32];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        for (i, &v) in sub.iter().enumerate() {
            xs[i][j] = v;
        }
    }
    let mut sum_x2 = [0f32; N];
    for row in &xs {
        for k in 0..N {
            sum_x2[k] += row[k] * row[k];
        }
    }
    let mut ws = [[0f32; N]; 32];
    for (wrow, row) in ws.iter_mut().zip(&xs) {
        for k in 0..N {
            wrow[k] = (sum_x2[k] / 32.0).sqrt() + row[k].abs();
        }
    }
    let mut levels = [[0f32; N]; 32];
    let (scales, mins) = make_qkx2_quants_xn(nmax, &xs, &ws, &mut levels, rmin, 0.1, nstep);
    KSearch { levels, scales, mins }
}

/// What the sub-block search found: levels (`levels[i][k]`: element i of sub-block k), scales, mins.
struct KSearch<const N: usize> {
    levels: [[f32; N]; 32],
    scales: [f32; N],
    mins: [f32; N],
}

/// `get_scale_min_k4`: the 6-bit scale and min of sub-block `j`.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The rest of Q4_K and Q5_K for one block: sub-block scales and mins packed to 6 bits, then every level
/// recomputed against the packed values. Writes d, dmin and scales into `head` (16 bytes).
#[inline(always)]
fn k_quant_pack<const N: usize>(x: &[f32], nmax: i32, found: &KSearch<N>, block: usize, head: &mut [u8], l: &mut [u8]) {
    let lanes = 8 * block..8 * block + 8;
    let (scales, mins) = (&found.scales[lanes.clone()], &found.mins[lanes]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut head[4..16];
    sc.fill(0);
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    head[0..2].copy_from_slice(&fp16(max_scale / 63.0));
    head[2..4].copy_from_slice(&fp16(max_min / 63.0));
    let (d_all, dmin_all) = (from_fp16([head[0], head[1]]), from_fp16([head[2], head[3]]));
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, &head[4..16]);
        let d = d_all * s as f32;
        if d == 0.0 {
            // The search's levels stand (the only place they are read).
            for (ii, row) in found.levels.iter().enumerate() {
                l[32 * j + ii] = row[8 * block + j] as u8;
            }
            continue;
        }
        let dm = dmin_all * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, nmax) as u8;
        }
    }
}

/// Q4_K of the N / 8 blocks in `x` (N = 8 or 16: one block, or two searched side by side).
#[inline(always)]
fn q4_k_blocks<const N: usize>(x: &[f32], y: &mut [u8]) {
    let found = k_quant_search::<N>(x, 15, -1.0, 20);
    let mut l = [0u8; QK_K];
    for (b, (x, y)) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(144)).enumerate() {
        k_quant_pack(x, 15, &found, b, &mut y[..16], &mut l);
        let qs = &mut y[16..144];
        for (c, chunk) in l.chunks_exact(64).enumerate() {
            for i in 0..32 {
                qs[32 * c + i] = chunk[i] | (chunk[i + 32] << 4);
            }
        }
    }
}

/// Q5_K of the N / 8 blocks in `x`.
#[inline(always)]
fn q5_k_blocks<const N: usize>(x: &[f32], y: &mut [u8]) {
    let found = k_quant_search::<N>(x, 31, -0.5, 15);
    let mut l = [0u8; QK_K];
    for (b, (x, y)) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(176)).enumerate() {
        k_quant_pack(x, 31, &found, b, &mut y[..16], &mut l);
        let (qh, ql) = y[16..176].split_at_mut(32);
        qh.fill(0);
        let (mut m1, mut m2) = (1u8, 2u8);
        for (c, chunk) in l.chunks_exact(64).enumerate() {
            for j in 0..32 {
                let mut l1 = chunk[j];
                if l1 > 15 {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                let mut l2 = chunk[j + 32];
                if l2 > 15 {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                ql[32 * c + j] = l1 | (l2 << 4);
            }
            m1 <<= 2;
            m2 <<= 2;
        }
    }
}

const GROUP_MAX_EPS: f32 = 1e-15;

/// `make_qx_quants` (rmse_type 1) for 16 sub-blocks at once, lane k holding sub-block k: the scalar
/// version's f32 operations in their order, per lane.
/// `make_qx_quants` (rmse_type 1, no weights) for N sub-blocks of 16 at once, lane k holding sub-block k,
/// each lane's operations in the scalar order. Returns the scales; `l` gets the levels plus `nmax`.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn make_qx_quants_xn<const N: usize>(nmax: i32, x: &[[f32; N]; 16], l: &mut [[i8; N]; 16]) -> [f32; N] {
    let (mut amax, mut max) = ([0f32; N], [0f32; N]);
    for row in x {
        for k in 0..N {
            if row[k].abs() > amax[k] {
                amax[k] = row[k].abs();
                max[k] = row[k];
            }
        }
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    // The weights x^2 and the products w * x, the same every pass.
    let (mut w, mut wx) = ([[0f32; N]; 16], [[0f32; N]; 16]);
    for i in 0..16 {
        for k in 0..N {
            w[i][k] = x[i][k] * x[i][k];
            wx[i][k] = w[i][k] * x[i][k];
        }
    }
    let sums = |iscale: &[f32; N]| {
        let (mut sumlx, mut suml2) = ([0f32; N], [0f32; N]);
        for i in 0..16 {
            for k in 0..N {
                let lf = level(iscale[k], x[i][k]) as f32;
                sumlx[k] += wx[i][k] * lf;
                suml2[k] += w[i][k] * lf * lf;
            }
        }
        (sumlx, suml2)
    };
    let mut iscale = [0f32; N];
    for k in 0..N {
        iscale[k] = (-nmax) as f32 / max[k];
    }
    // The levels are those of the best pass's iscale, remade once at the end.
    let mut best_iscale = iscale;
    let (sumlx, suml2) = sums(&iscale);
    let (mut scale, mut best) = ([0f32; N], [0f32; N]);
    for k in 0..N {
        scale[k] = if suml2[k] != 0.0 { sumlx[k] / suml2[k] } else { 0.0 };
        best[k] = scale[k] * sumlx[k];
    }
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        for k in 0..N {
            iscale[k] = -(nmax as f32 + 0.1 * is as f32) / max[k];
        }
        let (sumlx, suml2) = sums(&iscale);
        for k in 0..N {
            // Selected through a bit mask, which stays in vector registers (see make_qkx2_quants_xn).
            let take = 0u32.wrapping_sub(((suml2[k] > 0.0) & (sumlx[k] * sumlx[k] > best[k] * suml2[k])) as u32);
            let pick = |new: f32, old: f32| f32::from_bits((new.to_bits() & take) | (old.to_bits() & !take));
            let new_scale = sumlx[k] / suml2[k];
            best_iscale[k] = pick(iscale[k], best_iscale[k]);
            scale[k] = pick(new_scale, scale[k]);
            best[k] = pick(new_scale * sumlx[k], best[k]);
        }
    }
    for i in 0..16 {
        for k in 0..N {
            l[i][k] = (nmax + level(best_iscale[k], x[i][k])) as i8;
        }
    }
    for k in 0..N {
        if amax[k] < GROUP_MAX_EPS {
            for row in l.iter_mut() {
                row[k] = 0;
            }
            scale[k] = 0.0;
        }
    }
    scale
}

/// Q6_K of the N / 16 blocks in `x` (N = 16 or 32: one block, or two searched side by side).
#[inline(always)]
fn q6_k<const N: usize>(x: &[f32], y: &mut [u8]) {
    let mut xs = [[0f32; N]; 16];
    for (k, sub) in x.chunks_exact(16).enumerate() {
        for (i, &v) in sub.iter().enumerate() {
            xs[i][k] = v;
        }
    }
    let mut levels = [[0i8; N]; 16];
    let all_scales = make_qx_quants_xn::<N>(32, &xs, &mut levels);
    for (b, (x, y)) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(210)).enumerate() {
        let mut l = [0i8; QK_K];
        for (i, row) in levels.iter().enumerate() {
            for k in 0..16 {
                l[16 * k + i] = row[16 * b + k];
            }
        }
        let scales = &all_scales[16 * b..16 * b + 16];
        q6_k_pack(x, scales, &mut l, y);
    }
}

/// The rest of Q6_K for one block: sub-block scales to 8 bits, levels recomputed against them, packed.
#[inline(always)]
fn q6_k_pack(x: &[f32], scales: &[f32], l: &mut [i8; QK_K], y: &mut [u8]) {
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for &s in scales {
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        y.fill(0);
        return;
    }
    let (ql, rest) = y.split_at_mut(128);
    let (qh, rest) = rest.split_at_mut(64);
    let (sc, d_bytes) = rest.split_at_mut(16);
    let iscale = -128.0 / max_scale;
    d_bytes.copy_from_slice(&fp16(1.0 / iscale));
    for ib in 0..16 {
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }
    let d_all = from_fp16([d_bytes[0], d_bytes[1]]);
    for j in 0..16 {
        let d = d_all * (sc[j] as i8) as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            l[16 * j + ii] = (nearest_int(x[16 * j + ii] / d).clamp(-32, 31) + 32) as i8;
        }
    }
    for h in 0..2 {
        let (lh, ql, qh) = (
            &l[128 * h..128 * h + 128],
            &mut ql[64 * h..64 * h + 64],
            &mut qh[32 * h..32 * h + 32],
        );
        for i in 0..32 {
            let q = |k: usize| lh[i + 32 * k] as u8;
            ql[i] = (q(0) & 0x0f) | ((q(2) & 0x0f) << 4);
            ql[i + 32] = (q(1) & 0x0f) | ((q(3) & 0x0f) << 4);
            qh[i] = (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every encoder gives the same bytes on the AVX-512, AVX2 and portable paths (lanes are plain IEEE
    /// operations in C's order, so the vector width must not show), on rows that take the K-quants'
    /// four-, two- and one-block paths and on values that stress the searches: normal, heavy-tailed,
    /// flat, integral, all zero, tiny.
    #[test]
    fn every_vector_width_gives_the_same_bytes() {
        let mut seed = 0x2545_F491u32;
        let mut uniform = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed >> 8) as f32 / (1u32 << 24) as f32
        };
        let len = 7 * QK_K;
        let mut rows: Vec<Vec<f32>> = Vec::new();
        rows.push((0..len).map(|_| uniform() * 2.0 - 1.0).collect());
        rows.push(
            (0..len)
                .map(|_| {
                    let u = uniform().max(1e-6);
                    (-u.ln()).powi(3) * if uniform() < 0.5 { -1.0 } else { 1.0 }
                })
                .collect(),
        );
        rows.push(vec![0.375; len]);
        rows.push((0..len).map(|_| (uniform() * 31.0).round() - 15.0).collect());
        rows.push(vec![0.0; len]);
        rows.push((0..len).map(|_| (uniform() - 0.5) * 1e-30).collect());
        for ty in GgmlType::ALL {
            for (r, x) in rows.iter().enumerate() {
                let encode = |widest: u8| {
                    crate::core::dtype::simd::WIDEST.with(|w| w.set(widest));
                    let mut out = vec![0u8; ty.row_bytes(x.len())];
                    ty.encode_row(x, &mut out);
                    crate::core::dtype::simd::WIDEST.with(|w| w.set(2));
                    out
                };
                let widest = encode(2);
                assert_eq!(encode(1), widest, "{} row {r}: AVX2 differs", ty.name());
                assert_eq!(encode(0), widest, "{} row {r}: portable differs", ty.name());
            }
        }
    }

    /// The branch-free rounding is numpy's rule as gguf-py writes it (`(n + 0x7fff + ((n >> 16) & 1)) >> 16`
    /// in 64 bits, NaNs keeping their top bits with the quiet bit set), on every sign/exponent pattern with
    /// low bits at and around the ties; and a row encodes each value so.
    #[test]
    fn bf16_rounding_is_gguf_pys() {
        let reference = |v: f32| -> u16 {
            let n = v.to_bits();
            if n & 0x7fff_ffff > 0x7f80_0000 {
                ((n >> 16) | 64) as u16
            } else {
                ((n as u64 + 0x7fff + ((n >> 16) & 1) as u64) >> 16) as u16
            }
        };
        let mut values = Vec::new();
        for top in 0..=0x1ffu32 {
            for low in [0u32, 1, 0x7fff, 0x8000, 0x8001, 0xffff, 0x1_7fff, 0x1_8000, 0x7f_ffff] {
                values.push(f32::from_bits((top << 23) | low));
            }
        }
        for v in &values {
            assert_eq!(bf16_bits(*v), reference(*v), "{:#010x}", v.to_bits());
        }
        for len in [1usize, 63, 64, 65, 200] {
            let x = &values[..len];
            let mut out = vec![0u8; 2 * len];
            GgmlType::BF16.encode_row(x, &mut out);
            let expect: Vec<u8> = x.iter().flat_map(|v| reference(*v).to_le_bytes()).collect();
            assert_eq!(out, expect, "len {len}");
        }
    }

    #[test]
    fn integral_floats_convert_as_c_does_on_x86() {
        for i in -128..=127i32 {
            assert_eq!(integral_to_i8(i as f32), i as i8);
        }
        // cvttss2si gives 0x80000000 for these: low byte 0.
        for v in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert_eq!(integral_to_i8(v), 0);
        }
    }
}
