//! Running a long core call from Python: the GIL is released while it works, the calling (main) thread
//! polls for Ctrl-C and tells the workers to stop, and progress goes to an optional Python callback.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use pyo3::prelude::*;

use crate::core::progress::Progress;
use crate::core::Result;

use super::errors::to_py;

pub struct PyProgress {
    callback: Option<Py<PyAny>>,
    cancel: AtomicBool,
}

impl PyProgress {
    pub fn new(callback: Option<Py<PyAny>>) -> Self {
        PyProgress {
            callback,
            cancel: AtomicBool::new(false),
        }
    }
    fn call(&self, args: (&str, u64)) {
        if let Some(cb) = &self.callback {
            Python::attach(|py| {
                // A failing progress callback must not fail the merge.
                let _ = cb.call1(py, args);
            });
        }
    }
}

impl Progress for PyProgress {
    fn start(&self, total_bytes: u64) {
        self.call(("", total_bytes));
    }
    fn advance(&self, name: &str, bytes: u64) {
        self.call((name, bytes));
    }
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// Run `work` on a helper thread with the GIL released; Ctrl-C (seen by this thread) cancels it.
pub fn run_detached<T: Send>(
    py: Python<'_>,
    progress: PyProgress,
    work: impl FnOnce(&dyn Progress) -> Result<T> + Send,
) -> PyResult<T> {
    let progress = &progress;
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        // Receivers are not Sync; the lock lets the wait run with the GIL released.
        let rx = std::sync::Mutex::new(rx);
        scope.spawn(move || {
            let _ = tx.send(work(progress));
        });
        let mut interrupt: Option<PyErr> = None;
        loop {
            match py.detach(|| {
                rx.lock()
                    .expect("only this thread locks it")
                    .recv_timeout(Duration::from_millis(100))
            }) {
                Ok(result) => {
                    return match (interrupt, result) {
                        (Some(e), _) => Err(e),
                        (None, r) => r.map_err(to_py),
                    };
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if interrupt.is_none() {
                        if let Err(e) = py.check_signals() {
                            progress.cancel.store(true, Ordering::Relaxed);
                            interrupt = Some(e);
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(pyo3::exceptions::PyRuntimeError::new_err(
                        "lorafast worker thread stopped unexpectedly",
                    ));
                }
            }
        }
    })
}
