//! Binding for adapter arithmetic: combine, extract, resize. Each returns an `ArithReport`.
use std::path::PathBuf;

use pyo3::prelude::*;

use super::errors::to_py;
use super::parse_dtype;
use super::reports::{arith_report, ArithReport};
use super::run::{run_detached, PyProgress};
use crate::core::arith::lowrank::RandomizedOptions;
use crate::core::arith::merge_fns::MajoritySign;
use crate::core::arith::{self, CombineOptions, ExtractOptions, Method, ResizeOptions};
use crate::core::dtype::FloatType;
use crate::core::Error;

#[pyfunction]
#[pyo3(signature = (adapters, out, *, weights, method, density=None, rank=None, majority_sign="total", seed=0, svd_clamp=None, dtype=None, threads=None, overwrite=false, allow_different_bases=false, progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn combine(
    py: Python<'_>,
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
) -> PyResult<ArithReport> {
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
    arith_report(py, r)
}

#[pyfunction]
#[pyo3(signature = (base, tuned, out, *, rank, energy=None, targets=None, modules_to_save=false, dtype=None, oversample=None, tol=None, max_iters=None, threads=None, overwrite=false, progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn extract(
    py: Python<'_>,
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
) -> PyResult<ArithReport> {
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
    arith_report(py, r)
}

#[pyfunction]
#[pyo3(signature = (adapter, out, *, rank=None, energy=None, dtype=None, threads=None, overwrite=false, progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn resize(
    py: Python<'_>,
    adapter: PathBuf,
    out: PathBuf,
    rank: Option<usize>,
    energy: Option<f64>,
    dtype: Option<&str>,
    threads: Option<usize>,
    overwrite: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<ArithReport> {
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
    arith_report(py, r)
}
