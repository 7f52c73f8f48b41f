//! The PyO3 binding: converts arguments, runs the core with the GIL released, converts results.
mod arith;
mod errors;
mod gguf;
mod quant;
mod reports;
mod run;

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::core::dtype::FloatType;
use crate::core::merge::{merge as merge_checkpoint, MergeOptions, Mode, QuantizeSpec};
use crate::core::quant::{check_blocksize, QuantType, QuantizeOptions};
use crate::core::{inspect, Error};
use errors::to_py;
use reports::{merge_report, MergeReport};
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
#[pyo3(signature = (base, adapters, out, *, weights=None, dtype=None, threads=None, safe_merge=false, overwrite=false, progress=None, requantize=false, quantize=None, blocksize=64, double_quant=true, compute_dtype=None, targets=None, skip_modules=vec![], torch_threads=1, stats=true))]
#[allow(clippy::too_many_arguments)]
fn merge(
    py: Python<'_>,
    base: PathBuf,
    adapters: Vec<PathBuf>,
    out: PathBuf,
    weights: Option<Vec<f32>>,
    dtype: Option<&str>,
    threads: Option<usize>,
    safe_merge: bool,
    overwrite: bool,
    progress: Option<Py<PyAny>>,
    requantize: bool,
    quantize: Option<&str>,
    blocksize: usize,
    double_quant: bool,
    compute_dtype: Option<&str>,
    targets: Option<Vec<(String, bool)>>,
    skip_modules: Vec<String>,
    torch_threads: usize,
    stats: bool,
) -> PyResult<MergeReport> {
    if adapters.is_empty() {
        return Err(to_py(Error::InvalidArgument("no adapter given".into())));
    }
    let mode = match (requantize, quantize) {
        (true, Some(_)) => {
            return Err(to_py(Error::InvalidArgument(
                "--requantize keeps a 4-bit base's settings; --quantize quantizes a float base: give one".into(),
            )))
        }
        (true, None) => Mode::Requantize,
        (false, Some(qt)) => {
            check_blocksize(blocksize).map_err(to_py)?;
            Mode::Quantize(QuantizeSpec {
                quant: QuantizeOptions {
                    quant_type: QuantType::parse(qt).map_err(to_py)?,
                    blocksize,
                    double_quant,
                    torch_threads: torch_threads.max(1),
                },
                compute_dtype: parse_dtype(compute_dtype)?,
                targets,
                skip_modules,
            })
        }
        (false, None) => Mode::Float,
    };
    let opts = MergeOptions {
        weights,
        dtype: parse_dtype(dtype)?,
        threads,
        safe_merge,
        overwrite,
        mode,
        torch_threads: torch_threads.max(1),
        stats,
    };
    let report = run_detached(py, PyProgress::new(progress), |p| {
        merge_checkpoint(&base, &adapters, &out, &opts, p)
    })?;
    merge_report(py, report)
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
    d.set_item("quantized_weights", s.quantized_weights)?;
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
    d.set_item("num_labels", s.num_labels)?;
    let modules = PyList::empty(py);
    for m in s.modules {
        let md = PyDict::new(py);
        md.set_item("module", m.module)?;
        md.set_item("kind", m.kind)?;
        md.set_item("r", m.r)?;
        md.set_item("scaling", m.scaling)?;
        md.set_item("delta_norm", m.delta_norm)?;
        md.set_item("param", m.param)?;
        md.set_item("expert_norms", m.expert_norms)?;
        modules.append(md)?;
    }
    d.set_item("modules", modules)?;
    Ok(d)
}

#[pymodule(name = "_core")]
fn lorafast_core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // The files an adapter's saved tokenizer consists of (they win over the base's in a merge).
    m.add("TOKENIZER_FILES", crate::core::merge::config::TOKENIZER_FILES.to_vec())?;
    m.add_class::<reports::MergeReport>()?;
    m.add_class::<reports::TensorReport>()?;
    m.add_class::<reports::ArithReport>()?;
    m.add_class::<reports::ModuleReport>()?;
    m.add_class::<reports::GgufReport>()?;
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_function(wrap_pyfunction!(check_output, m)?)?;
    m.add_function(wrap_pyfunction!(inspect_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(inspect_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(arith::combine, m)?)?;
    m.add_function(wrap_pyfunction!(arith::extract, m)?)?;
    m.add_function(wrap_pyfunction!(arith::resize, m)?)?;
    m.add_function(wrap_pyfunction!(quant::quantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(quant::dequantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(quant::float8_e4m3_encode, m)?)?;
    m.add_function(wrap_pyfunction!(quant::float8_e4m3_decode, m)?)?;
    m.add_function(wrap_pyfunction!(quant::fp8_quantize_blocks, m)?)?;
    m.add_function(wrap_pyfunction!(quant::fp8_dequantize_blocks, m)?)?;
    m.add_function(wrap_pyfunction!(quant::mxfp4_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(quant::dequantize_nested, m)?)?;
    m.add_function(wrap_pyfunction!(quant::parse_quant_state, m)?)?;
    m.add_function(wrap_pyfunction!(quant::quantize_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(quant::dequantize_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(gguf::gguf_plan, m)?)?;
    m.add_function(wrap_pyfunction!(gguf::gguf_architectures, m)?)?;
    m.add_function(wrap_pyfunction!(gguf::gguf_not_runnable, m)?)?;
    m.add_function(wrap_pyfunction!(gguf::gguf_write, m)?)?;
    m.add_function(wrap_pyfunction!(gguf::gguf_encode_rows, m)?)?;
    m.add_function(wrap_pyfunction!(gguf::gguf_lora_plan, m)?)?;
    m.add_function(wrap_pyfunction!(gguf::gguf_lora_write, m)?)?;
    Ok(())
}
