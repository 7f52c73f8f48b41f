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
