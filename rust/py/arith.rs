//! Binding for adapter arithmetic: combine, extract, resize. Each returns the report as a dict.
use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::errors::to_py;
use super::parse_dtype;
use super::run::{run_detached, PyProgress};
use crate::core::arith::lowrank::RandomizedOptions;
use crate::core::arith::merge_fns::MajoritySign;
use crate::core::arith::{self, ArithReport, CombineOptions, ExtractOptions, Method, ResizeOptions};
use crate::core::dtype::FloatType;
use crate::core::Error;

fn report<'py>(py: Python<'py>, r: ArithReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("output", r.output)?;
    d.set_item("saved_tensors", r.saved_tensors)?;
    d.set_item("seconds", r.seconds)?;
    d.set_item("warnings", r.warnings)?;
    let modules = PyList::empty(py);
    for m in r.modules {
        let md = PyDict::new(py);
        md.set_item("module", m.module)?;
        md.set_item("rank", m.rank)?;
        md.set_item("energy", m.energy)?;
        modules.append(md)?;
    }
    d.set_item("modules", modules)?;
    Ok(d)
}

#[pyfunction]
#[pyo3(signature = (adapters, out, *, weights, method, density=None, rank=None, majority_sign="total", seed=0, svd_clamp=None, dtype=None, threads=None, overwrite=false, allow_different_bases=false, progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn combine<'py>(
    py: Python<'py>,
    adapters: Vec<PathBuf>,
    out: PathBuf,
    weights: Vec<f64>,
    method: &str,
    density: Option<f64>,
    rank: Option<usize>,
    majority_sign: &str,
    seed: u64,
    svd_clamp: Option<f64>,
    dtype: Option<&str>,
    threads: Option<usize>,
    overwrite: bool,
    allow_different_bases: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let majority_sign = match majority_sign {
        "total" => MajoritySign::Total,
        "frequency" => MajoritySign::Frequency,
        other => {
            return Err(to_py(Error::InvalidArgument(format!(
                "majority sign method {other:?}: use total or frequency"
            ))))
        }
    };
    let opts = CombineOptions {
        method: Method::parse(method).map_err(to_py)?,
        weights,
        density,
        rank,
        majority_sign,
        seed,
        svd_clamp,
        dtype: parse_dtype(dtype)?.unwrap_or(FloatType::F32),
        threads,
        overwrite,
        allow_different_bases,
    };
    let r = run_detached(py, PyProgress::new(progress), |p| {
        arith::combine(&adapters, &out, &opts, p)
    })?;
    report(py, r)
}

#[pyfunction]
#[pyo3(signature = (base, tuned, out, *, rank, energy=None, targets=None, modules_to_save=false, dtype=None, oversample=None, tol=None, max_iters=None, threads=None, overwrite=false, progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn extract<'py>(
    py: Python<'py>,
    base: PathBuf,
    tuned: PathBuf,
    out: PathBuf,
    rank: usize,
    energy: Option<f64>,
    targets: Option<Vec<String>>,
    modules_to_save: bool,
    dtype: Option<&str>,
    oversample: Option<usize>,
    tol: Option<f64>,
    max_iters: Option<usize>,
    threads: Option<usize>,
    overwrite: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let d = RandomizedOptions::default();
    let opts = ExtractOptions {
        rank,
        energy,
        targets,
        modules_to_save,
        dtype: parse_dtype(dtype)?.unwrap_or(FloatType::F32),
        svd: RandomizedOptions {
            oversample: oversample.unwrap_or(d.oversample),
            tol: tol.unwrap_or(d.tol),
            max_iters: max_iters.unwrap_or(d.max_iters),
            converge_subspace: false,
        },
        threads,
        overwrite,
    };
    let r = run_detached(py, PyProgress::new(progress), |p| {
        arith::extract(&base, &tuned, &out, &opts, p)
    })?;
    report(py, r)
}

#[pyfunction]
#[pyo3(signature = (adapter, out, *, rank=None, energy=None, dtype=None, threads=None, overwrite=false, progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn resize<'py>(
    py: Python<'py>,
    adapter: PathBuf,
    out: PathBuf,
    rank: Option<usize>,
    energy: Option<f64>,
    dtype: Option<&str>,
    threads: Option<usize>,
    overwrite: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = ResizeOptions {
        rank,
        energy,
        dtype: parse_dtype(dtype)?,
        threads,
        overwrite,
    };
    let r = run_detached(py, PyProgress::new(progress), |p| {
        arith::resize(&adapter, &out, &opts, p)
    })?;
    report(py, r)
}
