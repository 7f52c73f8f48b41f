//! lorafast's own rayon pool. A new pool per long call: nothing global that a `fork` (DataLoader
//! workers) could inherit in a broken state, and the size is the caller's choice.
use crate::core::error::{Error, Result};

pub const THREADS_ENV: &str = "LORAFAST_NUM_THREADS";

/// Threads to use: the argument, else `LORAFAST_NUM_THREADS`, else every core.
pub fn thread_count(requested: Option<usize>) -> Result<usize> {
    if let Some(n) = requested {
        return if n == 0 {
            Err(Error::InvalidArgument("threads must be at least 1".into()))
        } else {
            Ok(n)
        };
    }
    if let Ok(v) = std::env::var(THREADS_ENV) {
        return match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(Error::InvalidArgument(format!(
                "{THREADS_ENV}={v:?} is not a positive integer"
            ))),
        };
    }
    Ok(std::thread::available_parallelism().map_or(1, |n| n.get()))
}

pub fn build(requested: Option<usize>) -> Result<rayon::ThreadPool> {
    let n = thread_count(requested)?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("lorafast-{i}"))
        .build()
        .map_err(|e| Error::InvalidArgument(format!("cannot start {n} threads: {e}")))
}
