//! Double quantization: the per-block absmax, centred on its mean, quantized blockwise (256) to
//! 8 bits against the signed dynamic map, as bitsandbytes 0.50's native CPU quantizer does it: a
//! 65,536-entry lookup table over [-1, 1] (not an exact nearest-value search).
use std::sync::OnceLock;

use super::mean::torch_mean;
use super::tables;

pub const NESTED_BLOCKSIZE: usize = 256;

#[derive(Debug, Clone)]
pub struct NestedAbsmax {
    /// One 8-bit code per 4-bit block.
    pub codes: Vec<u8>,
    /// f32 absmax per 256 codes.
    pub nested_absmax: Vec<f32>,
    /// The mean subtracted before quantizing (`nested_offset`).
    pub offset: f32,
    /// The 256-value map the codes index (`nested_quant_map`).
    pub code: Vec<f32>,
}

fn default_lut() -> &'static [u8] {
    static LUT: OnceLock<Vec<u8>> = OnceLock::new();
    LUT.get_or_init(|| {
        let code = tables::table(&tables::DYNAMIC_MAP_BITS);
        let mid: Vec<f32> = code.windows(2).map(|w| 0.5f32 * (w[0] + w[1])).collect();
        let mut lut = vec![0u8; 65536];
        let mut ci = 0usize;
        for (k, slot) in lut.iter_mut().enumerate() {
            let v = -1.0f32 + (2.0f32 * k as f32) / 65535.0f32;
            while ci < 255 && mid[ci] < v {
                ci += 1;
            }
            *slot = ci as u8;
        }
        lut
    })
}

impl NestedAbsmax {
    /// Quantize the f32 absmax vector; `torch_threads` fixes the summation order of the mean.
    pub fn quantize(absmax: &[f32], torch_threads: usize) -> Self {
        let offset = torch_mean(absmax, torch_threads);
        let lut = default_lut();
        let mut codes = vec![0u8; absmax.len()];
        let mut nested_absmax = Vec::with_capacity(absmax.len().div_ceil(NESTED_BLOCKSIZE));
        let mut centred = [0f32; NESTED_BLOCKSIZE];
        for (block, out) in absmax.chunks(NESTED_BLOCKSIZE).zip(codes.chunks_mut(NESTED_BLOCKSIZE)) {
            let c = &mut centred[..block.len()];
            for (d, a) in c.iter_mut().zip(block) {
                *d = *a - offset;
            }
            let m = c.iter().fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m });
            nested_absmax.push(m);
            let r = 1.0f32 / m;
            for (o, v) in out.iter_mut().zip(c.iter()) {
                let xn = (*v * r).clamp(-1.0, 1.0);
                // f32 arithmetic and a truncating cast, as the C++ kernel; NaN (m == 0) gives code 0.
                let idx = ((xn + 1.0f32) * 0.5f32 * 65535.0f32 + 0.5f32) as usize;
                *o = if xn.is_nan() { 0 } else { lut[idx.min(65535)] };
            }
        }
        NestedAbsmax {
            codes,
            nested_absmax,
            offset,
            code: tables::table(&tables::DYNAMIC_MAP_BITS),
        }
    }

    /// The f32 absmax back: `code[q] * nested_absmax[b / 256]`, then `+ offset` (two f32 roundings).
    pub fn dequantize(&self) -> Vec<f32> {
        self.codes
            .iter()
            .enumerate()
            .map(|(b, q)| self.code[*q as usize] * self.nested_absmax[b / NESTED_BLOCKSIZE] + self.offset)
            .collect()
    }
}
