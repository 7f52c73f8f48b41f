//! The quant state bitsandbytes serializes beside each 4-bit weight (`QuantState.as_dict(packed=True)`):
//! a JSON object stored as uint8 bytes, written as Python's `json.dumps` writes it.
use super::{Absmax, QuantType, Quantized};
use crate::core::dtype::FloatType;

/// Python's `repr(float)`: the shortest string that round-trips, fixed notation for 1e-4 <= |x| < 1e16,
/// otherwise exponent notation with at least two exponent digits (`1e-05`).
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into(); // json.dumps spelling
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "d.ddde-5".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if negative { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let e_sign = if exp < 0 { "-" } else { "+" };
        format!("{sign}{m}e{e_sign}{:02}", exp.abs())
    }
}

/// The JSON bitsandbytes stores as `weight.quant_state.bitsandbytes__<type>`.
pub fn quant_state_json(
    q: &Quantized,
    quant_type: QuantType,
    blocksize: usize,
    dtype: FloatType,
    shape: &[usize],
) -> String {
    let shape = shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {blocksize}, \"dtype\": \"{}\", \"shape\": [{shape}]",
        quant_type.name(),
        dtype.torch_name()
    );
    if let Absmax::Nested(n) = &q.absmax {
        s.push_str(&format!(
            ", \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            python_float_repr(n.offset as f64)
        ));
    }
    s.push('}');
    s
}

#[cfg(test)]
mod tests {
    use super::python_float_repr as r;

    #[test]
    fn matches_python_repr() {
        assert_eq!(r(0.0526580810546875), "0.0526580810546875");
        assert_eq!(r(1e-5), "1e-05");
        assert_eq!(r(1.5e-5), "1.5e-05");
        assert_eq!(r(0.0001), "0.0001");
        assert_eq!(r(1.0), "1.0");
        assert_eq!(r(-2.5), "-2.5");
        assert_eq!(r(123456.0), "123456.0");
        assert_eq!(r(1e16), "1e+16");
        assert_eq!(r(0.1f32 as f64), "0.10000000149011612");
        assert_eq!(r(-3.0517578125e-05), "-3.0517578125e-05");
    }
}
