//! The reports long calls return, defined once: frozen classes with read-only fields, typed in
//! `_core.pyi` (checked field by field by `mypy.stubtest`).
use std::path::PathBuf;

use pyo3::prelude::*;

use crate::core::arith;
use crate::core::merge;

/// What the merge kept of one merged weight.
#[pyclass(frozen, get_all, module = "lorafast._core")]
pub struct TensorReport {
    /// The weight's name in the output.
    pub name: String,
    /// ||Delta||_F: the change the adapters meant, in f32 before any rounding.
    pub delta_norm: f64,
    /// ||W||_F of the base as loaded.
    pub weight_norm: f64,
    /// ||Delta|| / ||W||.
    pub ratio: f64,
    /// <R, Delta> / ||Delta||^2, R = output - base as loaded: the share of the change that landed.
    pub retention: f64,
    /// ||R - Delta|| / ||Delta||.
    pub relative_error: f64,
}

#[pymethods]
impl TensorReport {
    fn __repr__(&self) -> String {
        format!(
            "TensorReport(name={:?}, ratio={:.3e}, retention={:.4}, relative_error={:.4})",
            self.name, self.ratio, self.retention, self.relative_error
        )
    }
}

/// What a merge (or a quantization / dequantization) did.
#[pyclass(frozen, get_all, module = "lorafast._core")]
pub struct MergeReport {
    pub output: PathBuf,
    pub tensors_total: usize,
    pub tensors_merged: usize,
    pub tensors_replaced: usize,
    pub tensors_added: usize,
    pub tensors_copied: usize,
    pub tensors_quantized: usize,
    pub tensors_dequantized: usize,
    pub elements_quantized: u64,
    pub bytes_written: u64,
    pub seconds: f64,
    pub nonfinite_values: u64,
    pub warnings: Vec<String>,
    /// Per merged weight, in the model's order (empty when not computed).
    pub tensors: Vec<Py<TensorReport>>,
}

#[pymethods]
impl MergeReport {
    fn __repr__(&self) -> String {
        format!(
            "MergeReport(output={:?}, tensors_merged={}, tensors_quantized={}, seconds={:.2})",
            self.output, self.tensors_merged, self.tensors_quantized, self.seconds
        )
    }
}

pub fn merge_report(py: Python<'_>, r: merge::MergeReport) -> PyResult<MergeReport> {
    let tensors = r
        .tensors
        .into_iter()
        .map(|t| {
            Py::new(
                py,
                TensorReport {
                    ratio: t.ratio(),
                    name: t.name,
                    delta_norm: t.delta_norm,
                    weight_norm: t.weight_norm,
                    retention: t.retention,
                    relative_error: t.relative_error,
                },
            )
        })
        .collect::<PyResult<_>>()?;
    Ok(MergeReport {
        output: r.output,
        tensors_total: r.tensors_total,
        tensors_merged: r.tensors_merged,
        tensors_replaced: r.tensors_replaced,
        tensors_added: r.tensors_added,
        tensors_copied: r.tensors_copied,
        tensors_quantized: r.tensors_quantized,
        tensors_dequantized: r.tensors_dequantized,
        elements_quantized: r.elements_quantized,
        bytes_written: r.bytes_written,
        seconds: r.seconds,
        nonfinite_values: r.nonfinite_values,
        warnings: r.warnings,
        tensors,
    })
}

/// What one module of a combined, extracted or resized adapter became.
#[pyclass(frozen, get_all, module = "lorafast._core")]
pub struct ModuleReport {
    pub module: String,
    pub rank: usize,
    /// Share of the module's delta energy the written factors hold (None where nothing is approximated).
    pub energy: Option<f64>,
}

/// What combine, extract or resize wrote.
#[pyclass(frozen, get_all, module = "lorafast._core")]
pub struct ArithReport {
    pub output: PathBuf,
    pub modules: Vec<Py<ModuleReport>>,
    /// Full tensors carried over (modules_to_save and the like).
    pub saved_tensors: usize,
    pub seconds: f64,
    pub warnings: Vec<String>,
}

#[pymethods]
impl ArithReport {
    /// Min, mean and median of the per-module energy shares (None when the method keeps everything).
    fn energy_summary(&self, py: Python<'_>) -> Option<std::collections::HashMap<&'static str, f64>> {
        let mut values: Vec<f64> = self.modules.iter().filter_map(|m| m.bind(py).get().energy).collect();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        let mean = values.iter().sum::<f64>() / n as f64;
        Some(
            [("min", values[0]), ("mean", mean), ("median", median)]
                .into_iter()
                .collect(),
        )
    }

    fn __repr__(&self) -> String {
        format!(
            "ArithReport(output={:?}, modules={}, seconds={:.2})",
            self.output,
            self.modules.len(),
            self.seconds
        )
    }
}

pub fn arith_report(py: Python<'_>, r: arith::ArithReport) -> PyResult<ArithReport> {
    let modules = r
        .modules
        .into_iter()
        .map(|m| {
            Py::new(
                py,
                ModuleReport {
                    module: m.module,
                    rank: m.rank,
                    energy: m.energy,
                },
            )
        })
        .collect::<PyResult<_>>()?;
    Ok(ArithReport {
        output: r.output,
        modules,
        saved_tensors: r.saved_tensors,
        seconds: r.seconds,
        warnings: r.warnings,
    })
}

/// What a GGUF write did.
#[pyclass(frozen, get_all, module = "lorafast._core")]
pub struct GgufReport {
    pub output: PathBuf,
    pub tensors: usize,
    /// (ggml type name, tensors of that type), in file order of first use.
    pub types: Vec<(String, usize)>,
    pub bytes_written: u64,
    pub seconds: f64,
    pub nonfinite_values: u64,
    pub warnings: Vec<String>,
}

#[pymethods]
impl GgufReport {
    fn __repr__(&self) -> String {
        format!(
            "GgufReport(output={:?}, tensors={}, types={:?}, bytes_written={}, seconds={:.2})",
            self.output, self.tensors, self.types, self.bytes_written, self.seconds
        )
    }
}
