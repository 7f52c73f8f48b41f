//! The floating-point storage types a merge reads and writes, and their conversions to and from f32.
//! Rounding is round-to-nearest-even from an f32 value, as torch's `.to(dtype)` does.
use half::f16;
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
            // Little-endian bytes at an aligned address are the values already: no copy.
            FloatType::F32 if cfg!(target_endian = "little") && bytemuck::try_cast_slice::<u8, f32>(bytes).is_ok() => {
                out.copy_from_slice(bytemuck::cast_slice(bytes))
            }
            FloatType::F16 | FloatType::BF16
                if cfg!(target_endian = "little") && bytemuck::try_cast_slice::<u8, u16>(bytes).is_ok() =>
            {
                self.decode_u16(bytemuck::cast_slice(bytes), out)
            }
            FloatType::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            FloatType::F16 | FloatType::BF16 => {
                let halves: Vec<u16> = bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                self.decode_u16(&halves, out);
            }
        }
    }

    /// Decode 16-bit values (bf16 or f16 bit patterns) into f32.
    pub fn decode_u16(self, halves: &[u16], out: &mut [f32]) {
        match self {
            FloatType::BF16 => simd::widen_bf16(halves, out),
            FloatType::F16 => {
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(bytemuck::cast_slice::<u16, f16>(halves), out)
            }
            FloatType::F32 => unreachable!("f32 is not a 16-bit type"),
        }
    }

    /// Encode f32 values into little-endian bytes of this type, rounding to nearest even.
    pub fn encode(self, values: &[f32], out: &mut [u8]) {
        let mut words = vec![0u32; out.len().div_ceil(4)];
        let bytes = &mut bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..out.len()];
        self.encode_checked(values, bytes);
        out.copy_from_slice(bytes);
    }

    /// Encode like [`encode`](Self::encode) into a 4-byte aligned buffer; returns true when any value is
    /// NaN or infinite (checked in the same pass, for safe merges).
    pub fn encode_checked(self, values: &[f32], out: &mut [u8]) -> bool {
        debug_assert_eq!(out.len(), values.len() * self.size());
        match self {
            FloatType::F32 => {
                out.copy_from_slice(bytemuck::cast_slice(values));
                simd::any_nonfinite(values)
            }
            FloatType::BF16 => simd::narrow_bf16(values, bytemuck::cast_slice_mut(out)),
            FloatType::F16 => {
                let halves: &mut [f16] = bytemuck::cast_slice_mut(out);
                half::slice::HalfFloatSliceExt::convert_from_f32_slice(halves, values);
                simd::any_nonfinite(values) || halves.iter().any(|h| h.is_infinite())
            }
        }
    }

    /// Round an f32 to this type and back (the value torch holds after `.to(dtype)`).
    pub fn round_trip(self, v: f32) -> f32 {
        match self {
            FloatType::F32 => v,
            FloatType::F16 => f16::from_f32(v).to_f32(),
            FloatType::BF16 => f32::from_bits((simd::bf16_bits(v) as u32) << 16),
        }
    }
}

/// Elementwise kernels written so the compiler vectorizes them, compiled for x86-64 baseline, AVX2 and
/// AVX-512 and picked at run time.
pub mod simd {
    /// torch's `round_to_nearest_even`: RNE on the bit pattern, every NaN becomes 0x7FC0.
    #[inline(always)]
    pub fn bf16_bits(v: f32) -> u16 {
        let b = v.to_bits();
        let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
        if v.is_nan() {
            0x7FC0
        } else {
            rounded
        }
    }

    #[inline(always)]
    fn is_nonfinite_bits(b: u32) -> bool {
        b & 0x7F80_0000 == 0x7F80_0000
    }

    #[cfg(test)]
    thread_local! {
        /// The widest vector path tests let this thread take (2: AVX-512, 1: AVX2, 0: portable), to
        /// check that every path gives the same bits.
        pub static WIDEST: std::cell::Cell<u8> = const { std::cell::Cell::new(2) };
    }

    /// The widest vector path allowed: always AVX-512 outside tests.
    #[inline(always)]
    pub fn widest() -> u8 {
        #[cfg(test)]
        return WIDEST.with(|w| w.get());
        #[cfg(not(test))]
        2
    }

    #[macro_export]
    #[doc(hidden)]
    macro_rules! dispatch {
        ($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
            $(#[$doc])*
            pub fn $name($($arg: $ty),*) $(-> $ret)? {
                #[inline(always)]
                fn generic($($arg: $ty),*) $(-> $ret)? $body
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
                    unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { generic($($arg),*) }
                    #[target_feature(enable = "avx2")]
                    unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { generic($($arg),*) }
                    let widest = $crate::core::dtype::simd::widest();
                    if widest >= 2 && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vl") {
                        // SAFETY: the CPU supports these AVX-512 subsets (checked just above).
                        return unsafe { avx512($($arg),*) };
                    }
                    if widest >= 1 && is_x86_feature_detected!("avx2") {
                        // SAFETY: the CPU supports AVX2 (checked just above).
                        return unsafe { avx2($($arg),*) };
                    }
                }
                generic($($arg),*)
            }
        };
    }

    dispatch! {
        /// bf16 bit patterns -> f32 (exact: a shift).
        pub fn widen_bf16(src: &[u16], out: &mut [f32]) {
            for (o, h) in out.iter_mut().zip(src) {
                *o = f32::from_bits((*h as u32) << 16);
            }
        }
    }

    dispatch! {
        /// f32 -> bf16 bit patterns; true if any value is NaN or infinite.
        pub fn narrow_bf16(src: &[f32], out: &mut [u16]) -> bool {
            let mut bad = false;
            for (o, v) in out.iter_mut().zip(src) {
                bad |= is_nonfinite_bits(v.to_bits());
                *o = bf16_bits(*v);
            }
            bad
        }
    }

    dispatch! {
        /// True if any value is NaN or infinite.
        pub fn any_nonfinite(src: &[f32]) -> bool {
            src.iter().fold(false, |bad, v| bad | is_nonfinite_bits(v.to_bits()))
        }
    }

    dispatch! {
        /// w += d * s (two roundings, no fused multiply-add: as torch computes `W += delta * s`).
        pub fn add_scaled(w: &mut [f32], d: &[f32], s: f32) {
            for (w, d) in w.iter_mut().zip(d) {
                *w += *d * s;
            }
        }
    }

    dispatch! {
        /// Round every value to bf16 and back.
        pub fn round_bf16(w: &mut [f32]) {
            for v in w.iter_mut() {
                *v = f32::from_bits((bf16_bits(*v) as u32) << 16);
            }
        }
    }

    dispatch! {
        /// `round_bf16`, and true if any rounded value is NaN or infinite (one pass instead of two).
        pub fn round_bf16_checked(w: &mut [f32]) -> bool {
            let mut bad = false;
            for v in w.iter_mut() {
                let h = bf16_bits(*v);
                bad |= h & 0x7f80 == 0x7f80;
                *v = f32::from_bits((h as u32) << 16);
            }
            bad
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

    /// The one-pass check agrees with rounding and then scanning: overflow to infinity, NaN and infinity
    /// flag; the largest finite bf16 and subnormals do not.
    #[test]
    fn checked_bf16_rounding_flags_what_a_scan_would() {
        let cases: [&[f32]; 6] = [
            &[1.0, -2.5, 1e-40],
            &[3.389_531_4e38], // the largest finite bf16
            &[f32::MAX],       // rounds up to infinity
            &[0.5, f32::NAN],
            &[f32::NEG_INFINITY],
            &[],
        ];
        for values in cases {
            let (mut a, mut b) = (values.to_vec(), values.to_vec());
            simd::round_bf16(&mut a);
            let flagged = simd::round_bf16_checked(&mut b);
            assert_eq!(flagged, simd::any_nonfinite(&a), "{values:?}");
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let vals = [0.0f32, -1.5, 3.25, 65504.0, -0.0];
        for t in [FloatType::F32, FloatType::F16, FloatType::BF16] {
            let mut bytes = vec![0u8; vals.len() * t.size()];
            t.encode(&vals, &mut bytes);
            let mut back = vec![0f32; vals.len()];
            t.decode(&bytes, &mut back);
            assert_eq!(
                back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                vals.iter().map(|v| t.round_trip(*v).to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn bf16_matches_torch_rule_on_specials() {
        assert_eq!(simd::bf16_bits(f32::NAN), 0x7FC0);
        assert_eq!(simd::bf16_bits(-f32::NAN), 0x7FC0, "torch writes one canonical NaN");
        assert_eq!(simd::bf16_bits(f32::INFINITY), 0x7F80);
        assert_eq!(simd::bf16_bits(f32::MAX), 0x7F80, "rounds up to infinity");
        assert_eq!(simd::bf16_bits(-0.0), 0x8000);
        // The kernel agrees with the `half` crate's RNE on ordinary values.
        for bits in (0u32..u32::MAX).step_by(65_537) {
            let v = f32::from_bits(bits);
            if !v.is_nan() {
                assert_eq!(simd::bf16_bits(v), half::bf16::from_f32(v).to_bits(), "{v:e}");
            }
        }
    }

    #[test]
    fn encode_checked_flags_nonfinite() {
        for t in [FloatType::F32, FloatType::F16, FloatType::BF16] {
            let mut out = vec![0u8; 3 * t.size()];
            assert!(!t.encode_checked(&[1.0, 2.0, 3.0], &mut out));
            assert!(t.encode_checked(&[1.0, f32::INFINITY, 3.0], &mut out));
            assert!(t.encode_checked(&[f32::NAN, 2.0, 3.0], &mut out));
        }
        let mut out = vec![0u8; 2];
        assert!(FloatType::F16.encode_checked(&[1e6], &mut out), "overflows f16");
    }

    #[test]
    fn parse_names() {
        assert_eq!(FloatType::parse("bfloat16"), Some(FloatType::BF16));
        assert_eq!(FloatType::parse("FP16"), Some(FloatType::F16));
        assert_eq!(FloatType::parse("int8"), None);
    }
}
