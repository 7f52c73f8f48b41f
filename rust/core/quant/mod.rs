//! NF4 / FP4 4-bit quantization with double quantization, byte-identical to bitsandbytes 0.50 as it
//! runs on the CPU (`backends/default/ops.py` for 4-bit, the native LUT quantizer for the nested 8-bit
//! level, torch's cascade sum for the offset). Where bitsandbytes' CUDA kernels round differently
//! (FP4 thresholds and ties, all-zero NF4 blocks, nested codes) the CPU result is the one reproduced.
pub mod checkpoint;
mod mean;
pub mod nested;
pub mod state;
pub mod tables;

use rayon::prelude::*;

use crate::core::dtype::FloatType;
use crate::core::error::{Error, Result};

pub use nested::NestedAbsmax;

pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    Nf4,
    Fp4,
}

impl QuantType {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            _ => Err(Error::InvalidArgument(format!("quant type {s:?}: use nf4 or fp4"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// The 16 code values (`quant_map`), indexed by code.
    pub fn table(self) -> [f32; 16] {
        let bits = match self {
            QuantType::Nf4 => &tables::NF4_BITS,
            QuantType::Fp4 => &tables::FP4_BITS,
        };
        bits.map(f32::from_bits)
    }

    /// bitsandbytes' CPU quantizer: `bucketize` against f32 midpoints of the sorted values, then the
    /// sorted index mapped back to a code (identity for NF4).
    fn bucketizer(self) -> Bucketizer {
        let table = self.table();
        let order: [u8; 16] = match self {
            QuantType::Nf4 => std::array::from_fn(|i| i as u8),
            QuantType::Fp4 => tables::FP4_ORDER,
        };
        let sorted = order.map(|o| table[o as usize]);
        Bucketizer {
            bounds: std::array::from_fn(|i| (sorted[i] + sorted[i + 1]) / 2.0),
            order,
        }
    }
}

pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if BLOCKSIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "blocksize {blocksize}: bitsandbytes accepts {BLOCKSIZES:?}"
        )))
    }
}

struct Bucketizer {
    bounds: [f32; 15],
    order: [u8; 16],
}

impl Bucketizer {
    /// `torch.bucketize(x, bounds, right=False)`: the number of bounds strictly below x; NaN sorts last.
    #[inline(always)]
    fn code(&self, x: f32) -> u8 {
        let mut c = 0u8;
        for b in &self.bounds {
            c += (x > *b) as u8;
        }
        let c = if x.is_nan() { 15 } else { c };
        self.order[c as usize]
    }
}

/// A tensor to quantize, borrowed in its stored form.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    BF16(&'a [u16]),
}

impl Input<'_> {
    pub fn len(&self) -> usize {
        match self {
            Input::F32(x) => x.len(),
            Input::F16(x) | Input::BF16(x) => x.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> FloatType {
        match self {
            Input::F32(_) => FloatType::F32,
            Input::F16(_) => FloatType::F16,
            Input::BF16(_) => FloatType::BF16,
        }
    }

    /// Elements [start, start + out.len()) widened to f32 (exact).
    pub fn load(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            Input::F32(x) => out.copy_from_slice(&x[start..end]),
            Input::F16(x) => FloatType::F16.decode_u16(&x[start..end], out),
            Input::BF16(x) => FloatType::BF16.decode_u16(&x[start..end], out),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct QuantizeOptions {
    pub quant_type: QuantType,
    pub blocksize: usize,
    /// Double quantization (`compress_statistics`, `bnb_4bit_use_double_quant`).
    pub double_quant: bool,
    /// torch's intra-op thread count: the offset's summation order depends on it (for 2M+ weights).
    pub torch_threads: usize,
}

#[derive(Debug, Clone)]
pub enum Absmax {
    Plain(Vec<f32>),
    Nested(NestedAbsmax),
}

#[derive(Debug, Clone)]
pub struct Quantized {
    /// Two codes per byte, first element in the high nibble; `(n + 1) / 2` bytes.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

impl Quantized {
    /// The f32 absmax per block, as dequantization uses it.
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(a) => a.clone(),
            Absmax::Nested(n) => n.dequantize(),
        }
    }
}

/// Blocks handed to one task: enough work to amortize scheduling, a whole number of blocks.
const BLOCKS_PER_TASK: usize = 512;

/// Quantize a flat tensor blockwise to 4 bits.
pub fn quantize_4bit(input: Input<'_>, opts: &QuantizeOptions) -> Result<Quantized> {
    check_blocksize(opts.blocksize)?;
    let n = input.len();
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; n.div_ceil(opts.blocksize)];
    quantize_codes(input, opts.quant_type, opts.blocksize, &mut packed, &mut absmax);
    let absmax = if opts.double_quant {
        Absmax::Nested(NestedAbsmax::quantize(&absmax, opts.torch_threads))
    } else {
        Absmax::Plain(absmax)
    };
    Ok(Quantized { packed, absmax })
}

/// Codes and per-block absmax for `input`: a run of whole blocks of a tensor, starting at a block
/// boundary, of which only the tensor's last may be partial (bitsandbytes' "tail"); in parallel.
pub fn quantize_codes(input: Input<'_>, quant_type: QuantType, bs: usize, packed: &mut [u8], absmax: &mut [f32]) {
    let n = input.len();
    let task_elems = BLOCKS_PER_TASK * bs;
    // Scratch buffers live per worker: fresh ones per task would be mmap'ed and faulted in each time.
    let scratch = || (vec![0f32; task_elems], Vec::new());
    packed[..n.div_ceil(2)]
        .par_chunks_mut(task_elems / 2)
        .zip(absmax.par_chunks_mut(BLOCKS_PER_TASK))
        .enumerate()
        .for_each_init(scratch, |(x, codes), (t, (bytes, amax))| {
            let start = t * task_elems;
            let len = task_elems.min(n - start);
            let x = &mut x[..len];
            input.load(start, x);
            quantize_run(x, quant_type, bs, bytes, amax, codes);
        });
}

/// [`quantize_codes`] on this thread for a run of whole blocks (only a tensor's last may be partial):
/// `packed` gets (len + 1) / 2 bytes, `absmax` one value per block, and `codes` (scratch the caller
/// keeps) each element's 4-bit code.
pub fn quantize_run(
    x: &[f32],
    quant_type: QuantType,
    bs: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
    codes: &mut Vec<u8>,
) {
    let len = x.len();
    let bucketizer = quant_type.bucketizer();
    codes.resize(len + 1, 0);
    codes[len] = bucketizer.code(0.0); // the zero that pads an odd count
    kernels::block_codes(
        x,
        bs,
        &bucketizer.bounds,
        &mut codes[..len],
        &mut absmax[..len.div_ceil(bs)],
    );
    if quant_type == QuantType::Fp4 {
        kernels::remap(&mut codes[..len], &bucketizer.order);
    }
    kernels::pack(&codes[..len + 1], &mut packed[..len.div_ceil(2)]);
}

/// The hot loops, written for the vectorizer and compiled per instruction set (see `dtype::simd`).
mod kernels {
    use super::block_absmax;
    use crate::dispatch;

    /// Sorted-bucket index of each element (bucketize on bitsandbytes' f32 midpoints; NaN sorts last)
    /// and each block's stored absmax.
    /// NaN can only appear when the block's absmax is not finite (otherwise |x * (1 / m)| <= ~1), so the
    /// NaN check is compiled in for those blocks alone.
    #[inline(always)]
    fn codes_of<const CHECK_NAN: bool>(x: &[f32], scale: f32, divide: bool, bounds: &[f32; 15], out: &mut [u8]) {
        for (o, v) in out.iter_mut().zip(x) {
            let xn = if divide { *v / scale } else { *v * scale };
            // 32-bit counts: the same lane width as the floats, so the compares vectorize cleanly.
            let mut c = 0u32;
            for b in bounds {
                c += (xn > *b) as u32;
            }
            *o = if CHECK_NAN && xn.is_nan() { 15 } else { c as u8 };
        }
    }

    dispatch! {
        /// Per block: absmax, then codes (full blocks multiply by the reciprocal, the tail divides).
        pub fn block_codes(x: &[f32], bs: usize, bounds: &[f32; 15], codes: &mut [u8], absmax: &mut [f32]) {
            for ((xb, cb), am) in x.chunks(bs).zip(codes.chunks_mut(bs)).zip(absmax.iter_mut()) {
                let tail = xb.len() < bs;
                let (stored, clamped) = block_absmax(xb, tail);
                *am = stored;
                match (tail, clamped.is_finite()) {
                    (true, _) => codes_of::<true>(xb, clamped, true, bounds, cb),
                    (false, true) => codes_of::<false>(xb, 1.0 / clamped, false, bounds, cb),
                    (false, false) => codes_of::<true>(xb, 1.0 / clamped, false, bounds, cb),
                }
            }
        }
    }

    /// Sorted index -> code (FP4's table is not sorted).
    pub fn remap(codes: &mut [u8], order: &[u8; 16]) {
        for c in codes.iter_mut() {
            *c = order[(*c & 15) as usize];
        }
    }

    dispatch! {
        /// Two codes per byte, the first in the high nibble; `codes` holds one spare code for odd counts.
        pub fn pack(codes: &[u8], out: &mut [u8]) {
            for (o, pair) in out.iter_mut().zip(codes.chunks_exact(2)) {
                *o = (pair[0] << 4) | pair[1];
            }
        }
    }

    dispatch! {
        /// `table[code] * absmax` per element, block by block, as f32.
        pub fn dequantize_block(packed: &[u8], pairs: &[[f32; 2]; 256], absmax: f32, out: &mut [f32]) {
            for (o, b) in out.chunks_exact_mut(2).zip(packed) {
                let p = pairs[*b as usize];
                o[0] = p[0] * absmax;
                o[1] = p[1] * absmax;
            }
        }
    }
}

/// A block's absmax as bitsandbytes computes it (NaN-propagating), and the value it scales by:
/// full blocks store the raw max and multiply by 1 / max(absmax, 1e-38); the tail block stores
/// max(absmax, 1e-38) and divides by it.
#[inline]
pub fn block_absmax(x: &[f32], tail: bool) -> (f32, f32) {
    // Sixteen independent lanes so the loop vectorizes; NaN is tracked apart (a plain max drops it).
    const L: usize = 16;
    let (mut lanes, mut nan) = ([0f32; L], [false; L]);
    let chunks = x.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            let a = c[i].abs();
            lanes[i] = if a > lanes[i] { a } else { lanes[i] };
            nan[i] |= a.is_nan();
        }
    }
    let mut m = lanes.iter().fold(0f32, |m, a| if *a > m { *a } else { m });
    let mut any_nan = nan.iter().any(|n| *n);
    for v in rest {
        let a = v.abs();
        any_nan |= a.is_nan();
        m = if a > m { a } else { m };
    }
    let m = if any_nan { f32::NAN } else { m };
    let floor = 1e-38f32;
    let clamped = if m < floor { floor } else { m }; // NaN stays NaN, like torch.clamp
    (if tail { clamped } else { m }, clamped)
}

/// Dequantize to f32 values, then to `dtype` bytes: `round(table[code] * absmax[block])`.
pub fn dequantize_4bit(
    packed: &[u8],
    absmax: &[f32],
    quant_type: QuantType,
    blocksize: usize,
    n: usize,
    dtype: FloatType,
) -> Result<Vec<u8>> {
    check_blocksize(blocksize)?;
    if packed.len() < n.div_ceil(2) || absmax.len() < n.div_ceil(blocksize) {
        return Err(Error::InvalidArgument(format!(
            "{} packed bytes and {} absmax values cannot hold {n} elements at blocksize {blocksize}",
            packed.len(),
            absmax.len()
        )));
    }
    let mut out = vec![0u8; n * dtype.size()];
    dequantize_into(packed, absmax, quant_type, blocksize, dtype, &mut out);
    Ok(out)
}

/// `table[code] * absmax` as f32 for elements [start, start + out.len()) of a 4-bit weight, on this
/// thread: `packed` begins at the byte of element `start` (even), `absmax` is the whole weight's.
pub fn dequantize_run(
    packed: &[u8],
    absmax: &[f32],
    quant_type: QuantType,
    blocksize: usize,
    start: usize,
    out: &mut [f32],
) {
    debug_assert!(start.is_multiple_of(2) && blocksize.is_multiple_of(2));
    let table = quant_type.table();
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
        // SAFETY: the CPU supports AVX-512 F and BW (checked just above).
        unsafe { lookup::dequantize_run_avx512(packed, absmax, &table, blocksize, start, out) };
        return;
    }
    dequantize_run_portable(packed, absmax, &table, blocksize, start, out);
}

/// [`dequantize_run`] without AVX-512: one lookup of a byte's two values at a time.
fn dequantize_run_portable(
    packed: &[u8],
    absmax: &[f32],
    table: &[f32; 16],
    blocksize: usize,
    start: usize,
    out: &mut [f32],
) {
    let pairs: [[f32; 2]; 256] = std::array::from_fn(|b| [table[b >> 4], table[b & 15]]);
    let mut done = 0;
    while done < out.len() {
        let e = start + done;
        // Block boundaries are even, so every run but a tensor's last starts and ends on a byte.
        let end = (done + blocksize - e % blocksize).min(out.len());
        let even = (end - done) / 2 * 2;
        let a = absmax[e / blocksize];
        kernels::dequantize_block(
            &packed[done / 2..(done + even) / 2],
            &pairs,
            a,
            &mut out[done..done + even],
        );
        if even < end - done {
            out[end - 1] = table[(packed[(end - 1) / 2] >> 4) as usize] * a;
        }
        done = end;
    }
}

/// Dequantization as 16-way table lookups: the 16 code values times a block's absmax fill one AVX-512
/// register, and `vpermps` looks up 16 codes at once. `table[code] * absmax` is the same f32 product
/// whichever way it is taken, so the result is bit-identical to the scalar kernel.
#[cfg(target_arch = "x86_64")]
mod lookup {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX-512 F and BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn dequantize_run_avx512(
        packed: &[u8],
        absmax: &[f32],
        table: &[f32; 16],
        blocksize: usize,
        start: usize,
        out: &mut [f32],
    ) {
        let t = _mm512_loadu_ps(table.as_ptr());
        let low = _mm_set1_epi8(0x0F);
        let mut done = 0;
        while done < out.len() {
            let e = start + done;
            let end = (done + blocksize - e % blocksize).min(out.len());
            let a = absmax[e / blocksize];
            let scaled = _mm512_mul_ps(t, _mm512_set1_ps(a));
            let mut i = done;
            // 32 elements (16 bytes) at a time: high nibbles first, as bitsandbytes packs them.
            while i + 32 <= end {
                assert!(i / 2 + 16 <= packed.len() && i + 32 <= out.len());
                // SAFETY: bytes i/2 .. i/2 + 16 lie inside `packed` (asserted above).
                let bytes = _mm_loadu_si128(packed.as_ptr().add(i / 2) as *const __m128i);
                let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
                let lo = _mm_and_si128(bytes, low);
                let first = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
                let second = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo));
                // SAFETY: elements i .. i + 32 lie inside `out` (asserted above).
                _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_permutexvar_ps(first, scaled));
                _mm512_storeu_ps(out.as_mut_ptr().add(i + 16), _mm512_permutexvar_ps(second, scaled));
                i += 32;
            }
            while i < end {
                let b = packed[i / 2];
                out[i] = table[(b >> 4) as usize] * a;
                if i + 1 < end {
                    out[i + 1] = table[(b & 15) as usize] * a;
                }
                i += 2;
            }
            done = end;
        }
    }
}

/// [`dequantize_4bit`] into a caller's buffer of `n * dtype.size()` bytes (sizes already checked).
pub fn dequantize_into(
    packed: &[u8],
    absmax: &[f32],
    quant_type: QuantType,
    blocksize: usize,
    dtype: FloatType,
    out: &mut [u8],
) {
    let task_elems = BLOCKS_PER_TASK * blocksize;
    // Reused per worker.
    out.par_chunks_mut(task_elems * dtype.size()).enumerate().for_each_init(
        || vec![0f32; task_elems],
        |vals, (t, bytes)| {
            let start = t * task_elems;
            let len = bytes.len() / dtype.size();
            dequantize_run(
                &packed[start / 2..],
                absmax,
                quant_type,
                blocksize,
                start,
                &mut vals[..len],
            );
            dtype.encode_checked(&vals[..len], bytes);
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(qt: QuantType, bs: usize, dq: bool) -> QuantizeOptions {
        QuantizeOptions {
            quant_type: qt,
            blocksize: bs,
            double_quant: dq,
            torch_threads: 1,
        }
    }

    #[test]
    fn spec_odd_length_examples() {
        // bnb-4bit-spec §2.6: [1.0, -1.0, 0.5] packs as f0 c7 (NF4) and 3b 50 (FP4).
        let x = [1.0f32, -1.0, 0.5];
        let q = quantize_4bit(Input::F32(&x), &opts(QuantType::Nf4, 64, false)).unwrap();
        assert_eq!(q.packed, vec![0xf0, 0xc7]);
        let q = quantize_4bit(Input::F32(&x), &opts(QuantType::Fp4, 64, false)).unwrap();
        assert_eq!(q.packed, vec![0x3b, 0x50]);
    }

    #[test]
    fn zero_blocks_follow_the_cpu_rules() {
        // A full all-zero block stores absmax 0 and NF4 code 7; a zero tail block stores 1e-38.
        let x = vec![0f32; 64 + 10];
        let q = quantize_4bit(Input::F32(&x), &opts(QuantType::Nf4, 64, false)).unwrap();
        assert!(q.packed.iter().all(|b| *b == 0x77));
        let Absmax::Plain(a) = q.absmax else { panic!() };
        assert_eq!(a, vec![0.0, 1e-38]);
    }

    #[test]
    fn round_trip_error_is_bounded() {
        let x: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0).collect();
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            let q = quantize_4bit(Input::F32(&x), &opts(qt, 64, true)).unwrap();
            let bytes = dequantize_4bit(&q.packed, &q.absmax_f32(), qt, 64, x.len(), FloatType::F32).unwrap();
            let y: &[f32] = bytemuck::cast_slice(&bytes);
            for (a, b) in x.iter().zip(y) {
                assert!((a - b).abs() <= 0.2 * 50.0 / 64.0, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn dequantize_runs_agree_with_the_portable_kernel() {
        // Whatever kernel this CPU picks, every run (odd starts within a block, odd lengths, partial
        // blocks) gives the portable kernel's bits.
        let n = 1000usize;
        let packed: Vec<u8> = (0..n.div_ceil(2)).map(|i| (i * 37 % 256) as u8).collect();
        for (qt, bs) in [(QuantType::Nf4, 64), (QuantType::Fp4, 32), (QuantType::Nf4, 128)] {
            let absmax: Vec<f32> = (0..n.div_ceil(bs)).map(|b| 0.01 + b as f32 * 0.37).collect();
            for (start, len) in [(0, n), (2, 90), (64, 65), (126, 1), (998, 2), (500, 499)] {
                let mut fast = vec![0f32; len];
                let mut slow = vec![0f32; len];
                dequantize_run(&packed[start / 2..], &absmax, qt, bs, start, &mut fast);
                dequantize_run_portable(&packed[start / 2..], &absmax, &qt.table(), bs, start, &mut slow);
                assert_eq!(
                    fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    slow.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn bad_blocksize_is_refused() {
        assert!(quantize_4bit(Input::F32(&[1.0]), &opts(QuantType::Nf4, 48, false)).is_err());
    }
}
