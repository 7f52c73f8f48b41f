//! The PyO3 binding: converts arguments, runs the core with the GIL released, converts results.
mod arith;
mod errors;
mod quant;
mod run;

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::core::dtype::FloatType;
use crate::core::merge::{merge as merge_checkpoint, MergeOptions};
use crate::core::{inspect, Error};
use errors::to_py;
use run::{run_detached, PyProgress};

fn parse_dtype(dtype: Option<&str>) -> PyResult<Option<FloatType>> {
    dtype
        .map(|d| {
            FloatType::parse(d)
                .ok_or_else(|| Error::InvalidArgument(format!("unknown dtype {d:?}; use bf16, fp16 or fp32")))
        })
        .transpose()
        .map_err(to_py)
}

#[pyfunction]
#[pyo3(signature = (base, adapters, out, *, weights=None, dtype=None, threads=None, safe_merge=false, overwrite=false, progress=None, f32_outputs=vec![]))]
#[allow(clippy::too_many_arguments)]
fn merge<'py>(
    py: Python<'py>,
    base: PathBuf,
    adapters: Vec<PathBuf>,
    out: PathBuf,
    weights: Option<Vec<f32>>,
    dtype: Option<&str>,
    threads: Option<usize>,
    safe_merge: bool,
    overwrite: bool,
    progress: Option<Py<PyAny>>,
    f32_outputs: Vec<String>,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = MergeOptions {
        weights,
        dtype: parse_dtype(dtype)?,
        threads,
        safe_merge,
        overwrite,
        f32_outputs,
    };
    let report = run_detached(py, PyProgress::new(progress), |p| {
        merge_checkpoint(&base, &adapters, &out, &opts, p)
    })?;
    let d = PyDict::new(py);
    d.set_item("output", report.output)?;
    d.set_item("tensors_total", report.tensors_total)?;
    d.set_item("tensors_merged", report.tensors_merged)?;
    d.set_item("tensors_replaced", report.tensors_replaced)?;
    d.set_item("tensors_added", report.tensors_added)?;
    d.set_item("tensors_copied", report.tensors_copied)?;
    d.set_item("bytes_written", report.bytes_written)?;
    d.set_item("seconds", report.seconds)?;
    d.set_item("nonfinite_values", report.nonfinite_values)?;
    d.set_item("warnings", report.warnings)?;
    Ok(d)
}

/// The output guard alone (OUT must not overlap an input; an existing OUT needs overwrite), for
/// callers that want to fail before long work whose result will be written through the engine.
#[pyfunction]
#[pyo3(signature = (out, inputs, *, overwrite=false))]
fn check_output(out: PathBuf, inputs: Vec<PathBuf>, overwrite: bool) -> PyResult<PathBuf> {
    let inputs: Vec<&std::path::Path> = inputs.iter().map(PathBuf::as_path).collect();
    crate::core::staging::check_output(&out, &inputs, overwrite).map_err(to_py)
}

#[pyfunction]
fn inspect_checkpoint<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let s = py.detach(|| inspect::checkpoint(&path)).map_err(to_py)?;
    let d = PyDict::new(py);
    d.set_item("shards", s.shards)?;
    d.set_item("parameters", s.parameters)?;
    d.set_item("total_bytes", s.total_bytes)?;
    let tensors = PyList::empty(py);
    for t in s.tensors {
        let td = PyDict::new(py);
        td.set_item("name", t.name)?;
        td.set_item("dtype", t.dtype)?;
        td.set_item("shape", t.shape)?;
        td.set_item("bytes", t.bytes)?;
        tensors.append(td)?;
    }
    d.set_item("tensors", tensors)?;
    Ok(d)
}

#[pyfunction]
fn inspect_adapter<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let s = py.detach(|| inspect::adapter(&path)).map_err(to_py)?;
    let d = PyDict::new(py);
    d.set_item("config", serde_json::to_string(&s.config).expect("json"))?;
    d.set_item("trainable_parameters", s.trainable_parameters)?;
    d.set_item("file_bytes", s.file_bytes)?;
    d.set_item("saved_tensors", s.saved_tensors)?;
    d.set_item("ignored_modules", s.ignored_modules)?;
    let modules = PyList::empty(py);
    for m in s.modules {
        let md = PyDict::new(py);
        md.set_item("module", m.module)?;
        md.set_item("kind", m.kind)?;
        md.set_item("r", m.r)?;
        md.set_item("scaling", m.scaling)?;
        md.set_item("delta_norm", m.delta_norm)?;
        modules.append(md)?;
    }
    d.set_item("modules", modules)?;
    Ok(d)
}

#[pymodule(name = "_core")]
fn lorafast_core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_function(wrap_pyfunction!(check_output, m)?)?;
    m.add_function(wrap_pyfunction!(inspect_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(inspect_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(arith::combine, m)?)?;
    m.add_function(wrap_pyfunction!(arith::extract, m)?)?;
    m.add_function(wrap_pyfunction!(arith::resize, m)?)?;
    m.add_function(wrap_pyfunction!(quant::quantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(quant::dequantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(quant::dequantize_nested, m)?)?;
    m.add_function(wrap_pyfunction!(quant::quantize_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(quant::dequantize_checkpoint, m)?)?;
    Ok(())
}
