//! GGUF output: the tensor plan (for the metadata the Python layer builds), the streaming write, and the
//! block encoders on their own.
use std::path::PathBuf;

use numpy::PyReadonlyArray1;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::errors::to_py;
use super::reports::GgufReport;
use super::run::{run_detached, PyProgress};
use crate::core::gguf::{self, quants::GgmlType, FileType, GgufOptions};
use crate::core::merge::MergeOptions;
use crate::core::Error;

fn file_type(name: &str) -> PyResult<FileType> {
    FileType::parse(name).ok_or_else(|| {
        to_py(Error::InvalidArgument(format!(
            "unknown GGUF type {name:?}; use one of {}",
            FileType::NAMES
        )))
    })
}

fn options(
    file: &str,
    weights: Option<Vec<f32>>,
    threads: Option<usize>,
    overwrite: bool,
    safe_merge: bool,
    extra: Vec<(String, Vec<f32>)>,
) -> PyResult<GgufOptions> {
    Ok(GgufOptions {
        file_type: file_type(file)?,
        merge: MergeOptions {
            weights,
            threads,
            overwrite,
            safe_merge,
            torch_threads: 1,
            ..Default::default()
        },
        extra,
    })
}

/// (GGUF architecture, HF architecture, the converter outtype the tensors start from, [(name, numpy
/// shape, ggml type name)] in file order, the merged model's config.json).
type GgufPlanTuple = (
    String,
    String,
    String,
    Vec<(String, Vec<usize>, String)>,
    Option<String>,
);

/// The `config.json` architectures `gguf_plan` takes.
#[pyfunction]
pub fn gguf_architectures() -> Vec<&'static str> {
    gguf::arch::ARCHITECTURES.iter().map(|(name, _, _)| *name).collect()
}

/// The architectures the converter takes that `gguf_plan` refuses, since llama.cpp cannot run them as
/// transformers does: (architecture, why).
#[pyfunction]
pub fn gguf_not_runnable() -> Vec<(&'static str, &'static str)> {
    gguf::arch::NOT_RUNNABLE.to_vec()
}

/// The file `gguf_write` would write, as `GgufPlanTuple`.
#[pyfunction]
#[pyo3(signature = (base, adapters, *, file_type, weights=None, extra=Vec::new()))]
pub fn gguf_plan(
    py: Python<'_>,
    base: PathBuf,
    adapters: Vec<PathBuf>,
    file_type: &str,
    weights: Option<Vec<f32>>,
    extra: Vec<(String, Vec<f32>)>,
) -> PyResult<GgufPlanTuple> {
    let opts = options(file_type, weights, None, false, false, extra)?;
    let plan = py.detach(|| gguf::plan(&base, &adapters, &opts)).map_err(to_py)?;
    let outtype = format!("{:?}", plan.outtype).to_lowercase();
    Ok((
        plan.arch.name().to_string(),
        plan.hf_arch,
        outtype,
        plan.tensors
            .into_iter()
            .map(|t| (t.info.name, t.info.shape, t.info.ty.name().to_string()))
            .collect(),
        plan.config.map(|c| c.to_string()),
    ))
}

/// Merge `adapters` into `base` and write GGUF `out` with the GGUF-encoded key-value section `kv`.
#[pyfunction]
#[pyo3(signature = (base, adapters, out, kv, n_kv, *, file_type, weights=None, threads=None, overwrite=false, safe_merge=false, extra=Vec::new(), progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn gguf_write(
    py: Python<'_>,
    base: PathBuf,
    adapters: Vec<PathBuf>,
    out: PathBuf,
    kv: Vec<u8>,
    n_kv: u64,
    file_type: &str,
    weights: Option<Vec<f32>>,
    threads: Option<usize>,
    overwrite: bool,
    safe_merge: bool,
    extra: Vec<(String, Vec<f32>)>,
    progress: Option<Py<PyAny>>,
) -> PyResult<GgufReport> {
    let opts = options(file_type, weights, threads, overwrite, safe_merge, extra)?;
    let r = run_detached(py, PyProgress::new(progress), |p| {
        gguf::write(&base, &adapters, &out, &kv, n_kv, &opts, p)
    })?;
    Ok(report(r))
}

/// The LoRA GGUF file `gguf_lora_write` would write: (architecture, lora_alpha, [(name, numpy shape,
/// ggml type name)] in file order).
#[pyfunction]
#[pyo3(signature = (adapter, base, *, file_type))]
#[allow(clippy::type_complexity)]
pub fn gguf_lora_plan(
    py: Python<'_>,
    adapter: PathBuf,
    base: PathBuf,
    file_type: &str,
) -> PyResult<(String, f64, Vec<(String, Vec<usize>, String)>)> {
    let ft = self::file_type(file_type)?;
    let plan = py.detach(|| gguf::lora::plan(&adapter, &base, ft)).map_err(to_py)?;
    Ok((
        plan.arch.to_string(),
        plan.lora_alpha,
        plan.tensors
            .into_iter()
            .map(|t| (t.info.name, t.info.shape, t.info.ty.name().to_string()))
            .collect(),
    ))
}

/// Write `adapter` (for the model folder `base`) as a LoRA GGUF file with the key-value section `kv`.
#[pyfunction]
#[pyo3(signature = (adapter, base, out, kv, n_kv, *, file_type, overwrite=false))]
#[allow(clippy::too_many_arguments)]
pub fn gguf_lora_write(
    py: Python<'_>,
    adapter: PathBuf,
    base: PathBuf,
    out: PathBuf,
    kv: Vec<u8>,
    n_kv: u64,
    file_type: &str,
    overwrite: bool,
) -> PyResult<GgufReport> {
    let ft = self::file_type(file_type)?;
    let r = py
        .detach(|| gguf::lora::write(&adapter, &base, &out, &kv, n_kv, ft, overwrite))
        .map_err(to_py)?;
    Ok(report(r))
}

fn report(r: gguf::GgufReport) -> GgufReport {
    GgufReport {
        output: r.output,
        tensors: r.tensors,
        types: r.types,
        bytes_written: r.bytes_written,
        seconds: r.seconds,
        nonfinite_values: r.nonfinite_values,
        warnings: r.warnings,
    }
}

/// Encode rows of `row_len` f32 values as ggml type `ggml_type` (F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q5_1,
/// Q4_K, Q5_K, Q6_K), as llama.cpp's reference quantizers do.
#[pyfunction]
pub fn gguf_encode_rows<'py>(
    py: Python<'py>,
    values: PyReadonlyArray1<'py, f32>,
    row_len: usize,
    ggml_type: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let ty = GgmlType::ALL
        .into_iter()
        .find(|t| t.name().eq_ignore_ascii_case(ggml_type))
        .ok_or_else(|| to_py(Error::InvalidArgument(format!("unknown ggml type {ggml_type:?}"))))?;
    let x = values
        .as_slice()
        .map_err(|_| to_py(Error::InvalidArgument("values must be a contiguous 1-D array".into())))?;
    if row_len == 0 || x.len() % row_len != 0 || !row_len.is_multiple_of(ty.block_size()) {
        return Err(to_py(Error::InvalidArgument(format!(
            "{} values do not split into rows of {row_len} made of whole {}-element blocks",
            x.len(),
            ty.block_size()
        ))));
    }
    let mut out = vec![0u8; ty.row_bytes(row_len) * (x.len() / row_len)];
    py.detach(|| {
        for (row, o) in x.chunks_exact(row_len).zip(out.chunks_exact_mut(ty.row_bytes(row_len))) {
            ty.encode_row(row, o);
        }
    });
    Ok(PyBytes::new(py, &out))
}
