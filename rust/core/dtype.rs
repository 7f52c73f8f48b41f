//! The floating-point storage types a merge reads and writes, and their conversions to and from f32.
//! Rounding is round-to-nearest-even from an f32 value, as torch's `.to(dtype)` does.
use half::{bf16, f16};
use safetensors::Dtype;

/// A float storage type that merges compute in (through f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatType {
    F32,
    F16,
    BF16,
}

impl FloatType {
    pub fn from_safetensors(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 => Some(FloatType::F32),
            Dtype::F16 => Some(FloatType::F16),
            Dtype::BF16 => Some(FloatType::BF16),
            _ => None,
        }
    }

    pub fn to_safetensors(self) -> Dtype {
        match self {
            FloatType::F32 => Dtype::F32,
            FloatType::F16 => Dtype::F16,
            FloatType::BF16 => Dtype::BF16,
        }
    }

    /// Parse a user-facing name: `bf16`, `fp16`, `fp32` and the torch spellings.
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Some(FloatType::BF16),
            "fp16" | "f16" | "float16" | "half" => Some(FloatType::F16),
            "fp32" | "f32" | "float32" | "float" => Some(FloatType::F32),
            _ => None,
        }
    }

    /// The name transformers writes as `torch_dtype` / `dtype` in config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            FloatType::F32 => "float32",
            FloatType::F16 => "float16",
            FloatType::BF16 => "bfloat16",
        }
    }

    pub fn size(self) -> usize {
        match self {
            FloatType::F32 => 4,
            FloatType::F16 | FloatType::BF16 => 2,
        }
    }

    /// Decode little-endian bytes into f32 (exact for every type).
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) {
        debug_assert_eq!(bytes.len(), out.len() * self.size());
        match self {
            FloatType::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            FloatType::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
            FloatType::BF16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    // bf16 is the top half of an f32: widening is a shift.
                    *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
        }
    }

    /// Encode f32 values into little-endian bytes of this type, rounding to nearest even.
    pub fn encode(self, values: &[f32], out: &mut [u8]) {
        debug_assert_eq!(out.len(), values.len() * self.size());
        match self {
            FloatType::F32 => {
                for (c, v) in out.chunks_exact_mut(4).zip(values) {
                    c.copy_from_slice(&v.to_le_bytes());
                }
            }
            FloatType::F16 => {
                for (c, v) in out.chunks_exact_mut(2).zip(values) {
                    c.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
            FloatType::BF16 => {
                for (c, v) in out.chunks_exact_mut(2).zip(values) {
                    c.copy_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
        }
    }

    /// Round an f32 to this type and back (the value torch holds after `.to(dtype)`).
    pub fn round_trip(self, v: f32) -> f32 {
        match self {
            FloatType::F32 => v,
            FloatType::F16 => f16::from_f32(v).to_f32(),
            FloatType::BF16 => bf16::from_f32(v).to_f32(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties go to the even one, 1.0.
        let tie = 1.0f32 + 2f32.powi(-8);
        assert_eq!(FloatType::BF16.round_trip(tie), 1.0);
        let above = f32::from_bits(tie.to_bits() + 1);
        assert_eq!(FloatType::BF16.round_trip(above), 1.0 + 2f32.powi(-7));
    }

    #[test]
    fn encode_decode_round_trip() {
        let vals = [0.0f32, -1.5, 3.25, 65504.0, -0.0];
        for t in [FloatType::F32, FloatType::F16, FloatType::BF16] {
            let mut bytes = vec![0u8; vals.len() * t.size()];
            t.encode(&vals, &mut bytes);
            let mut back = vec![0f32; vals.len()];
            t.decode(&bytes, &mut back);
            assert_eq!(back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                vals.iter().map(|v| t.round_trip(*v).to_bits()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn parse_names() {
        assert_eq!(FloatType::parse("bfloat16"), Some(FloatType::BF16));
        assert_eq!(FloatType::parse("FP16"), Some(FloatType::F16));
        assert_eq!(FloatType::parse("int8"), None);
    }
}
