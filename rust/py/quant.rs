//! Binding for the 4-bit kernels: numpy arrays in (borrowed, no copy), numpy arrays out (moved).
use numpy::{PyArray1, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::reports::{merge_report, MergeReport};
use pyo3::types::PyDict;

use super::errors::to_py;
use crate::core::dtype::FloatType;
use crate::core::quant::{self, Absmax, Input, NestedAbsmax, QuantType, QuantizeOptions};
use crate::core::Error;

fn float_type(dtype: &str) -> PyResult<FloatType> {
    FloatType::parse(dtype).ok_or_else(|| to_py(Error::InvalidArgument(format!("unknown dtype {dtype:?}"))))
}

fn contiguous<'a, T: numpy::Element>(a: &'a PyReadonlyArray1<'_, T>, what: &str) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| to_py(Error::InvalidArgument(format!("{what} must be a contiguous 1-D array"))))
}

/// Quantize a flat array: f32 values, or 16-bit patterns (`dtype` "bf16"/"fp16") as uint16.
#[pyfunction]
#[pyo3(signature = (data, dtype, quant_type, blocksize, double_quant, torch_threads, shape))]
#[allow(clippy::too_many_arguments)]
pub fn quantize_4bit<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    dtype: &str,
    quant_type: &str,
    blocksize: usize,
    double_quant: bool,
    torch_threads: usize,
    shape: Vec<usize>,
) -> PyResult<Bound<'py, PyDict>> {
    let ft = float_type(dtype)?;
    let opts = QuantizeOptions {
        quant_type: QuantType::parse(quant_type).map_err(to_py)?,
        blocksize,
        double_quant,
        torch_threads: torch_threads.max(1),
    };
    let q = match ft {
        FloatType::F32 => {
            let a: PyReadonlyArray1<f32> = data.extract()?;
            let s = contiguous(&a, "data")?;
            py.detach(|| quant::quantize_4bit(Input::F32(s), &opts))
        }
        FloatType::F16 | FloatType::BF16 => {
            let a: PyReadonlyArray1<u16> = data.extract()?;
            let s = contiguous(&a, "data")?;
            let input = if ft == FloatType::F16 {
                Input::F16(s)
            } else {
                Input::BF16(s)
            };
            py.detach(|| quant::quantize_4bit(input, &opts))
        }
    }
    .map_err(to_py)?;
    let d = PyDict::new(py);
    // The quant state's JSON, as bitsandbytes serializes it (json.dumps of the fields).
    let json = quant::state::quant_state_json(&q, opts.quant_type, blocksize, ft, &shape);
    d.set_item("quant_state", json)?;
    d.set_item("packed", PyArray1::from_vec(py, q.packed))?;
    match q.absmax {
        Absmax::Plain(a) => d.set_item("absmax", PyArray1::from_vec(py, a))?,
        Absmax::Nested(n) => {
            d.set_item("absmax", PyArray1::from_vec(py, n.codes))?;
            d.set_item("nested_absmax", PyArray1::from_vec(py, n.nested_absmax))?;
            d.set_item("nested_offset", n.offset)?;
            d.set_item("nested_quant_map", PyArray1::from_vec(py, n.code))?;
        }
    }
    d.set_item("quant_map", PyArray1::from_vec(py, opts.quant_type.table().to_vec()))?;
    Ok(d)
}

/// A quant state's JSON bytes, parsed: quant_type, blocksize, dtype, shape, nested_offset (or None).
#[pyfunction]
pub fn parse_quant_state<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyDict>> {
    let st = quant::checkpoint::parse_state(data).map_err(|e| to_py(Error::InvalidArgument(e)))?;
    let d = PyDict::new(py);
    d.set_item("quant_type", st.quant_type.name())?;
    d.set_item("blocksize", st.blocksize)?;
    d.set_item("dtype", st.dtype.torch_name())?;
    d.set_item("shape", st.shape)?;
    d.set_item("nested_offset", st.nested_offset)?;
    Ok(d)
}

/// The f32 absmax of a double-quantized state.
#[pyfunction]
pub fn dequantize_nested<'py>(
    py: Python<'py>,
    codes: PyReadonlyArray1<'py, u8>,
    nested_absmax: PyReadonlyArray1<'py, f32>,
    offset: f32,
    code: PyReadonlyArray1<'py, f32>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let codes = contiguous(&codes, "absmax")?;
    let blocks = codes.len().div_ceil(quant::nested::NESTED_BLOCKSIZE);
    if nested_absmax.len() < blocks || code.len() != 256 {
        return Err(to_py(Error::InvalidArgument(format!(
            "nested state: {} codes need {blocks} nested absmax values and a 256-value map (got {} and {})",
            codes.len(),
            nested_absmax.len(),
            code.len()
        ))));
    }
    let n = NestedAbsmax {
        codes: codes.to_vec(),
        nested_absmax: contiguous(&nested_absmax, "nested_absmax")?.to_vec(),
        offset,
        code: contiguous(&code, "nested_quant_map")?.to_vec(),
    };
    Ok(PyArray1::from_vec(py, py.detach(|| n.dequantize())))
}

/// Dequantize to the bytes of `dtype` (returned as a uint8 array; the caller views it).
#[pyfunction]
pub fn dequantize_4bit<'py>(
    py: Python<'py>,
    packed: PyReadonlyArray1<'py, u8>,
    absmax: PyReadonlyArray1<'py, f32>,
    quant_type: &str,
    blocksize: usize,
    n: usize,
    dtype: &str,
) -> PyResult<Bound<'py, PyArray1<u8>>> {
    let (ft, qt) = (float_type(dtype)?, QuantType::parse(quant_type).map_err(to_py)?);
    let (p, a) = (contiguous(&packed, "packed")?, contiguous(&absmax, "absmax")?);
    let out = py
        .detach(|| quant::dequantize_4bit(p, a, qt, blocksize, n, ft))
        .map_err(to_py)?;
    Ok(PyArray1::from_vec(py, out))
}

#[pyfunction]
#[pyo3(signature = (base, out, *, quant_type, blocksize, double_quant, compute_dtype=None, targets=None, skip_modules=vec![], keep_heads=false, torch_threads=1, threads=None, overwrite=false, progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn quantize_checkpoint(
    py: Python<'_>,
    base: std::path::PathBuf,
    out: std::path::PathBuf,
    quant_type: &str,
    blocksize: usize,
    double_quant: bool,
    compute_dtype: Option<&str>,
    targets: Option<Vec<(String, bool)>>,
    skip_modules: Vec<String>,
    keep_heads: bool,
    torch_threads: usize,
    threads: Option<usize>,
    overwrite: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<MergeReport> {
    use crate::core::quant::checkpoint::{quantize_checkpoint as run, QuantizeCheckpointOptions};
    let opts = QuantizeCheckpointOptions {
        quant: QuantizeOptions {
            quant_type: QuantType::parse(quant_type).map_err(to_py)?,
            blocksize,
            double_quant,
            torch_threads: torch_threads.max(1),
        },
        compute_dtype: compute_dtype.map(float_type).transpose()?,
        targets,
        skip_modules,
        keep_heads,
        threads,
        overwrite,
    };
    let r = super::run::run_detached(py, super::run::PyProgress::new(progress), |p| {
        run(&base, &out, &opts, p)
    })?;
    merge_report(py, r)
}

#[pyfunction]
#[pyo3(signature = (qdir, out, *, dtype=None, threads=None, overwrite=false, progress=None))]
pub fn dequantize_checkpoint(
    py: Python<'_>,
    qdir: std::path::PathBuf,
    out: std::path::PathBuf,
    dtype: Option<&str>,
    threads: Option<usize>,
    overwrite: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<MergeReport> {
    use crate::core::quant::checkpoint::dequantize_checkpoint as run;
    let dtype = dtype.map(float_type).transpose()?;
    let r = super::run::run_detached(py, super::run::PyProgress::new(progress), |p| {
        run(&qdir, &out, dtype, threads, overwrite, p)
    })?;
    merge_report(py, r)
}

/// f32 values cast to FP8 E4M3 codes as torch casts them (`core::float8`).
#[pyfunction]
pub fn float8_e4m3_encode<'py>(
    py: Python<'py>,
    values: PyReadonlyArray1<'_, f32>,
) -> PyResult<Bound<'py, PyArray1<u8>>> {
    let v = contiguous(&values, "values")?;
    let codes: Vec<u8> = v.iter().map(|&x| crate::core::float8::f32_to_e4m3(x)).collect();
    Ok(PyArray1::from_vec(py, codes))
}

/// FP8 E4M3 codes' values as f32.
#[pyfunction]
pub fn float8_e4m3_decode<'py>(
    py: Python<'py>,
    codes: PyReadonlyArray1<'_, u8>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let c = contiguous(&codes, "codes")?;
    let values: Vec<f32> = c.iter().map(|&x| crate::core::float8::e4m3_to_f32(x)).collect();
    Ok(PyArray1::from_vec(py, values))
}

fn block_grid(rows: usize, cols: usize, block: (usize, usize), n: usize) -> PyResult<crate::core::float8::BlockGrid> {
    if block.0 == 0 || block.1 == 0 || rows * cols != n {
        return Err(to_py(Error::InvalidArgument(format!(
            "{n} values are not a [{rows}, {cols}] matrix in blocks of {block:?}"
        ))));
    }
    Ok(crate::core::float8::BlockGrid { rows, cols, block })
}

/// E4M3 codes and their blocks' inverse scales.
type Fp8Blocks<'py> = (Bound<'py, PyArray1<u8>>, Bound<'py, PyArray1<f32>>);

/// transformers' fine-grained FP8 quantization of a `[rows, cols]` f32 matrix: (E4M3 codes, inverse scales).
#[pyfunction]
#[pyo3(signature = (values, rows, cols, block, scale_fmt="float"))]
pub fn fp8_quantize_blocks<'py>(
    py: Python<'py>,
    values: PyReadonlyArray1<'_, f32>,
    rows: usize,
    cols: usize,
    block: (usize, usize),
    scale_fmt: &str,
) -> PyResult<Fp8Blocks<'py>> {
    use crate::core::float8::{quantize_blocks, ScaleFormat};
    let v = contiguous(&values, "values")?;
    let grid = block_grid(rows, cols, block, v.len())?;
    let format = match scale_fmt {
        "float" => ScaleFormat::Float,
        "ue8m0" => ScaleFormat::Ue8m0,
        other => {
            return Err(to_py(Error::InvalidArgument(format!(
                "scale_fmt {other:?}: use float or ue8m0"
            ))))
        }
    };
    let (codes, inv) = quantize_blocks(v, grid, format);
    Ok((PyArray1::from_vec(py, codes), PyArray1::from_vec(py, inv)))
}

/// E4M3 codes of a `[rows, cols]` matrix times their blocks' inverse scales, as f32.
#[pyfunction]
pub fn fp8_dequantize_blocks<'py>(
    py: Python<'py>,
    codes: PyReadonlyArray1<'_, u8>,
    rows: usize,
    cols: usize,
    block: (usize, usize),
    inv_scales: PyReadonlyArray1<'_, f32>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let c = contiguous(&codes, "codes")?;
    let s = contiguous(&inv_scales, "inv_scales")?;
    let grid = block_grid(rows, cols, block, c.len())?;
    let (sr, sc) = grid.scales();
    if s.len() != sr * sc {
        return Err(to_py(Error::InvalidArgument(format!(
            "{} scales for a [{sr}, {sc}] grid",
            s.len()
        ))));
    }
    let mut out = vec![0f32; c.len()];
    crate::core::float8::dequantize_blocks(c, grid, s, &mut out);
    Ok(PyArray1::from_vec(py, out))
}

/// MXFP4 groups (`bytes` bytes each, one E8M0 scale each) dequantized to f32, before transformers' transpose.
#[pyfunction]
pub fn mxfp4_dequantize<'py>(
    py: Python<'py>,
    blocks: PyReadonlyArray1<'_, u8>,
    scales: PyReadonlyArray1<'_, u8>,
    bytes: usize,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let b = contiguous(&blocks, "blocks")?;
    let s = contiguous(&scales, "scales")?;
    if bytes == 0 || b.len() != s.len() * bytes {
        return Err(to_py(Error::InvalidArgument(format!(
            "{} block bytes are not {} groups of {bytes}",
            b.len(),
            s.len()
        ))));
    }
    let mut out = vec![0f32; 2 * b.len()];
    crate::core::float8::mxfp4_dequantize(b, s, bytes, &mut out);
    Ok(PyArray1::from_vec(py, out))
}
