//! How a long call reports progress and learns it should stop. Called between tensors, from worker
//! threads; the Python binding forwards to tqdm and checks for Ctrl-C here.
pub trait Progress: Sync {
    /// The total amount of work, in bytes of output.
    fn start(&self, _total_bytes: u64) {}
    /// `bytes` more are done (one tensor, `name`).
    fn advance(&self, _name: &str, _bytes: u64) {}
    /// True when the caller wants the call to stop early.
    fn cancelled(&self) -> bool {
        false
    }
}

/// Reports nothing, never cancels.
pub struct Silent;
impl Progress for Silent {}
