//! The one place core errors become Python exceptions: the classes live in `lorafast/errors.py`.
use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError};
use pyo3::prelude::*;

use crate::core::Error;

pub fn to_py(err: Error) -> PyErr {
    let class = match &err {
        Error::Interrupted => return PyKeyboardInterrupt::new_err("interrupted"),
        Error::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => "FileMissingError",
            std::io::ErrorKind::PermissionDenied => "FilePermissionError",
            _ => "LorafastIOError",
        },
        Error::Safetensors { .. } | Error::Json { .. } => "CheckpointError",
        Error::Adapter { .. } => "AdapterError",
        Error::Unsupported { .. } => "UnsupportedError",
        Error::Shape { .. } => "ShapeMismatchError",
        Error::NonFinite { .. } => "NonFiniteError",
        Error::Output { .. } => "OutputError",
        Error::InvalidArgument(_) => "InvalidArgumentError",
    };
    let message = err.to_string();
    Python::attach(|py| {
        let made = py
            .import("lorafast.errors")
            .and_then(|m| m.getattr(class))
            .and_then(|c| c.call1((message.clone(),)));
        match made {
            Ok(exc) => PyErr::from_value(exc),
            Err(_) => PyRuntimeError::new_err(message),
        }
    })
}
