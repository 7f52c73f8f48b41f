//! FP8 E4M3 as torch's `float8_e4m3fn` stores it (the weight dtype of transformers' fine-grained FP8 and
//! of compressed-tensors' FP8 formats): 4 exponent bits (bias 7), 3 mantissa bits, no infinities, NaN at
//! 0x7F / 0xFF, largest finite 448. The cast from f32 is c10's `fp8e4m3fn_from_fp32_value`
//! (`torch/headeronly/util/Float8_e4m3fn.h`, torch 2.15): round to nearest even, a finite overflow or an
//! infinity saturated to +-448 (earlier torch releases gave NaN there; the quantizers clamp first, so their
//! output does not depend on it), NaN kept NaN.

/// The largest finite E4M3 value (`torch.finfo(torch.float8_e4m3fn).max`).
pub const E4M3_MAX: f32 = 448.0;

/// The value of an E4M3 code.
pub fn e4m3_to_f32(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((code >> 3) & 0xF);
    let mant = f32::from(code & 0x7);
    if exp == 0xF && code & 0x7 == 0x7 {
        return f32::NAN;
    }
    if exp == 0 {
        // Subnormal: mant * 2^-9 (exact in f32).
        return sign * mant * (1.0 / 512.0);
    }
    sign * (1.0 + mant / 8.0) * 2f32.powi(exp - 7)
}

/// `x` cast to E4M3 as torch casts it (see the module comment).
pub fn f32_to_e4m3(x: f32) -> u8 {
    // 480.0, the first magnitude that rounds past 448.
    const FIRST_OVER: u32 = 1087 << 20;
    // ((127 - 7) + (23 - 3) + 1) << 23: adding it shifts a value below 2^-6 into E4M3's subnormal bits.
    const DENORM_MASK: u32 = 141 << 23;
    let bits = x.to_bits();
    let sign = ((bits & 0x8000_0000) >> 24) as u8;
    let abs = bits & 0x7FFF_FFFF;
    let code = if abs >= FIRST_OVER {
        if abs > 0x7F80_0000 {
            0x7F
        } else {
            0x7E
        }
    } else if abs < (121 << 23) {
        // Below the smallest normal (2^-6): the float add rounds to nearest even at the subnormal step.
        (f32::from_bits(abs) + f32::from_bits(DENORM_MASK))
            .to_bits()
            .wrapping_sub(DENORM_MASK) as u8
    } else {
        let mant_odd = (abs >> 20) & 1;
        let rounded = abs
            .wrapping_add(((7u32).wrapping_sub(127) << 23).wrapping_add(0x7FFFF))
            .wrapping_add(mant_odd);
        match (rounded >> 20) as u8 {
            0x7F => 0x7E, // a carry into the NaN pattern saturates
            c => c,
        }
    };
    code | sign
}

/// How a block's scale is stored: an f32, or (`ue8m0`, DeepSeek-V3.1 style) a power of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleFormat {
    Float,
    Ue8m0,
}

/// A `[rows, cols]` matrix in blocks of `block` (rows, cols); edge blocks may be partial (the scale grid is
/// `ceil(rows / br) x ceil(cols / bc)`, as DeepSeek-V3's checkpoints store it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockGrid {
    pub rows: usize,
    pub cols: usize,
    pub block: (usize, usize),
}

impl BlockGrid {
    /// The scale grid's shape.
    pub fn scales(&self) -> (usize, usize) {
        (self.rows.div_ceil(self.block.0), self.cols.div_ceil(self.block.1))
    }

    /// The scale index of element (r, c).
    fn scale_at(&self, r: usize, c: usize) -> usize {
        (r / self.block.0) * self.scales().1 + c / self.block.1
    }
}

/// transformers' `Fp8Quantize._quantize_one` (`integrations/finegrained_fp8.py`) on f32 values: per block,
/// scale = 448 / amax as torch evaluates it (1 for an all-zero block), `weight_scale_inv` = 1 / scale (not amax / 448: the two
/// differ in about a third of blocks), codes = clamp(x * scale, +-448) cast to E4M3. With `Ue8m0` the
/// inverse is first rounded up to a power of two, 2^ceil(log2), and the scale is its exact reciprocal.
/// Returns the codes and the inverse scales, row-major over the grid.
pub fn quantize_blocks(values: &[f32], grid: BlockGrid, format: ScaleFormat) -> (Vec<u8>, Vec<f32>) {
    let (sr, sc) = grid.scales();
    let mut amax = vec![0f32; sr * sc];
    for r in 0..grid.rows {
        for (c, &x) in values[r * grid.cols..(r + 1) * grid.cols].iter().enumerate() {
            let a = &mut amax[grid.scale_at(r, c)];
            // (torch's amax propagates NaN; so does this)
            if x.abs() > *a || x.is_nan() {
                *a = x.abs();
            }
        }
    }
    let mut scales = Vec::with_capacity(amax.len());
    let mut inv = Vec::with_capacity(amax.len());
    for &m in &amax {
        // torch computes `448 / amax` as `amax.reciprocal() * 448` (Tensor.__rtruediv__): two roundings.
        let scale = if m > 0.0 { (1.0 / m) * E4M3_MAX } else { 1.0 };
        let mut i = 1.0 / scale;
        let mut s = scale;
        if format == ScaleFormat::Ue8m0 {
            i = pow2_ceil(i.max(f32::MIN_POSITIVE));
            s = 1.0 / i;
        }
        scales.push(s);
        inv.push(i);
    }
    let mut codes = vec![0u8; values.len()];
    for r in 0..grid.rows {
        for c in 0..grid.cols {
            let x = values[r * grid.cols + c] * scales[grid.scale_at(r, c)];
            codes[r * grid.cols + c] = f32_to_e4m3(x.clamp(-E4M3_MAX, E4M3_MAX));
        }
    }
    (codes, inv)
}

/// 2^ceil(log2(x)) for a positive finite x, exactly (torch's float log2 could land on the integer for x
/// just above a power of two; the bits cannot).
fn pow2_ceil(x: f32) -> f32 {
    let bits = x.to_bits();
    let exp = ((bits >> 23) & 0xFF) as i32;
    let mant = bits & 0x7F_FFFF;
    if exp == 0 {
        // (x >= f32::MIN_POSITIVE: never subnormal here)
        return f32::MIN_POSITIVE;
    }
    let e = exp - 127 + i32::from(mant != 0);
    2f32.powi(e)
}

/// Dequantize E4M3 codes with their blocks' inverse scales: each value the f32 product code x scale, as
/// transformers' `Fp8Dequantize` computes it before its one cast (and `_dequantize_fp8_weight` in f32,
/// which takes partial edge blocks).
pub fn dequantize_blocks(codes: &[u8], grid: BlockGrid, inv_scales: &[f32], out: &mut [f32]) {
    for r in 0..grid.rows {
        for c in 0..grid.cols {
            let k = r * grid.cols + c;
            out[k] = e4m3_to_f32(codes[k]) * inv_scales[grid.scale_at(r, c)];
        }
    }
}

/// The E2M1 (FP4) values of MXFP4's nibbles (transformers' `FP4_VALUES`, `integrations/mxfp4.py`).
pub const E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// MXFP4 groups as GPT-OSS stores its experts (`*_blocks`: `bytes` bytes a group, two E2M1 values a byte,
/// the low nibble first; `*_scales`: one E8M0 byte a group), as transformers' `_convert_moe_packed_tensors`
/// dequantizes them before its transpose: `torch.ldexp(E2M1, scale - 127)`, exact (every such product
/// from 2^-128 up is representable) but for an overflow to infinity at scale 255 (0.5 x 2^128 = 2^127 stays
/// finite). `out` holds `2 * bytes` values a group.
pub fn mxfp4_dequantize(blocks: &[u8], scales: &[u8], bytes: usize, out: &mut [f32]) {
    for ((group, &scale), o) in blocks
        .chunks_exact(bytes)
        .zip(scales)
        .zip(out.chunks_exact_mut(2 * bytes))
    {
        // 2^(scale - 127) is exact in f64; the product too; the cast to f32 rounds only an overflow.
        let factor = f64::from_bits(((i64::from(scale) - 127 + 1023) as u64) << 52);
        for (pair, &b) in o.chunks_exact_mut(2).zip(group) {
            pair[0] = (f64::from(E2M1_VALUES[usize::from(b & 0x0F)]) * factor) as f32;
            pair[1] = (f64::from(E2M1_VALUES[usize::from(b >> 4)]) * factor) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_finite_code_casts_back_to_itself() {
        for code in 0..=255u8 {
            let v = e4m3_to_f32(code);
            if v.is_nan() {
                assert!(code & 0x7F == 0x7F, "{code:#x}");
                assert_eq!(f32_to_e4m3(v) & 0x7F, 0x7F);
                continue;
            }
            let back = f32_to_e4m3(v);
            // +-0 keep their sign
            assert_eq!(back, code, "{code:#x} = {v}");
        }
        assert_eq!(e4m3_to_f32(0x7E), E4M3_MAX);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
    }

    #[test]
    fn ties_go_to_even_and_overflow_saturates() {
        // Between 1.0 (0x38) and 1.125 (0x39): the tie goes to the even code 0x38.
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        // Between 1.125 and 1.25 (0x3A): to 0x3A.
        assert_eq!(f32_to_e4m3(1.1875), 0x3A);
        assert_eq!(f32_to_e4m3(464.0), 0x7E); // the tie between 448 and 480 rounds down to even
        assert_eq!(f32_to_e4m3(1e6), 0x7E);
        assert_eq!(f32_to_e4m3(f32::NEG_INFINITY), 0xFE);
        assert_eq!(f32_to_e4m3(-0.0), 0x80);
        // Half the smallest subnormal is a tie to zero; a bit more rounds up.
        assert_eq!(f32_to_e4m3(2f32.powi(-10)), 0x00);
        assert_eq!(f32_to_e4m3(2f32.powi(-10) * 1.01), 0x01);
    }
}
