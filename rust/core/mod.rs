//! The pure-Rust core: no Python types in here. The binding in `rust/py` is a thin layer over it.
pub mod arith;
pub mod checkpoint;
pub mod dtype;
pub mod error;
pub mod experts;
pub mod float8;
pub mod fuzzing;
pub mod gguf;
pub mod inspect;
pub mod io;
pub mod layers;
pub mod linalg;
pub mod merge;
pub mod peft;
pub mod pool;
pub mod progress;
pub mod quant;
pub mod staging;

pub use error::{Error, Result};
