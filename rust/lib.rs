//! lorafast: a pure-Rust core for LoRA checkpoint work, and (behind the `python` feature) its PyO3 binding.
pub mod core;

#[cfg(feature = "python")]
mod py;
