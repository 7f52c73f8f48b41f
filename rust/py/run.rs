//! Running a long core call from Python: the work runs on a helper thread with the GIL released, while
//! the calling (main) thread waits, runs the progress callback and watches for Ctrl-C.
//!
//! Worker threads never touch Python. Each progress report is handed to the calling thread, which runs
//! the callback and only then lets the worker go on. So a Ctrl-C - seen between waits, or raised
//! inside the callback as KeyboardInterrupt - has set the cancel flag before any worker does more work,
//! and the workers stop at their next check.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::prelude::*;

use crate::core::progress::Progress;
use crate::core::Result;

use super::errors::to_py;

enum Message {
    /// A progress report: (name, bytes); "" carries the total. The worker waits for `ack`.
    Report {
        name: String,
        bytes: u64,
        ack: mpsc::SyncSender<()>,
    },
    /// The work has returned.
    Done,
}

pub struct PyProgress {
    callback: Option<Py<PyAny>>,
    cancel: AtomicBool,
    /// Set while a call runs: where reports go.
    to_caller: Mutex<Option<mpsc::Sender<Message>>>,
}

impl PyProgress {
    pub fn new(callback: Option<Py<PyAny>>) -> Self {
        PyProgress {
            callback,
            cancel: AtomicBool::new(false),
            to_caller: Mutex::new(None),
        }
    }

    fn report(&self, name: &str, bytes: u64) {
        if self.callback.is_none() {
            return;
        }
        let Some(tx) = self.to_caller.lock().expect("never poisoned").clone() else {
            return;
        };
        let (ack, acked) = mpsc::sync_channel(1);
        let sent = tx.send(Message::Report {
            name: name.to_string(),
            bytes,
            ack,
        });
        if sent.is_ok() {
            let _ = acked.recv();
        }
    }
}

impl Progress for PyProgress {
    fn start(&self, total_bytes: u64) {
        self.report("", total_bytes);
    }
    fn advance(&self, name: &str, bytes: u64) {
        self.report(name, bytes);
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
    let (tx, rx) = mpsc::channel();
    *progress.to_caller.lock().expect("never poisoned") = Some(tx.clone());
    let progress = &progress;
    // Receivers are not Sync; the lock lets the wait run with the GIL released.
    let rx = Mutex::new(rx);
    std::thread::scope(|scope| {
        let worker = scope.spawn(move || {
            let result = work(progress);
            let _ = tx.send(Message::Done);
            result
        });
        let mut interrupt: Option<PyErr> = None;
        let stop = |e: PyErr, interrupt: &mut Option<PyErr>| {
            progress.cancel.store(true, Ordering::Relaxed);
            interrupt.get_or_insert(e);
        };
        loop {
            let message = py.detach(|| {
                rx.lock()
                    .expect("only this thread locks it")
                    .recv_timeout(Duration::from_millis(100))
            });
            match message {
                Ok(Message::Report { name, bytes, ack }) => {
                    if let Some(cb) = &progress.callback {
                        // A failing progress callback must not fail the call, but Ctrl-C inside it stops it.
                        if let Err(e) = cb.call1(py, (name, bytes)) {
                            if e.is_instance_of::<PyKeyboardInterrupt>(py) {
                                stop(e, &mut interrupt);
                            }
                        }
                    }
                    let _ = ack.send(());
                }
                Ok(Message::Done) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Err(e) = py.check_signals() {
                        stop(e, &mut interrupt);
                    }
                    if worker.is_finished() {
                        break; // it panicked before saying Done
                    }
                }
            }
        }
        *progress.to_caller.lock().expect("never poisoned") = None;
        let result = match worker.join() {
            Ok(r) => r,
            Err(_) => {
                return Err(pyo3::exceptions::PyRuntimeError::new_err(
                    "lorafast worker thread stopped unexpectedly",
                ))
            }
        };
        match interrupt {
            Some(e) => Err(e),
            None => result.map_err(to_py),
        }
    })
}
