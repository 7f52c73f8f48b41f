//! Entry points for the coverage-guided fuzzers in `fuzz/` and for the replay of their corpora that
//! `cargo test` runs. Each feeds arbitrary bytes, as the files a user might hand lorafast, to the code
//! that reads untrusted input: safetensors headers and shard indexes, `adapter_config.json` with the
//! adapter file it describes, and bitsandbytes quant states with the 4-bit tensors they describe.
//! Returning - with a result or a clean error - is success; a panic, hang or runaway allocation is a bug.
use std::cell::RefCell;
use std::path::{Path, PathBuf};

use crate::core::checkpoint::{Checkpoint, INDEX_NAME, SINGLE_NAME};
use crate::core::peft::{Adapter, CONFIG_NAME, WEIGHTS_NAME};
use crate::core::progress::Silent;
use crate::core::quant::checkpoint::{dequantize_checkpoint, quantized_weights};

/// A fuzz target: arbitrary bytes in, no panic out.
pub type Target = fn(&[u8]);

/// The fuzz targets, by the name of their corpus folder under `fuzz/corpus/`.
pub const TARGETS: [(&str, Target); 3] = [
    ("safetensors_checkpoint", safetensors_checkpoint),
    ("adapter_folder", adapter_folder),
    ("quantized_checkpoint", quantized_checkpoint),
];

/// Inputs with two files: a 2-byte little-endian length, the first file, then the second.
pub fn split(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 2 {
        return (&[], data);
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    (&data[2..2 + n], &data[2 + n..])
}

/// The inverse of [`split`], for writing seeds.
pub fn join(first: &[u8], second: &[u8]) -> Vec<u8> {
    let n = u16::try_from(first.len()).expect("first part under 64 KiB");
    let mut out = n.to_le_bytes().to_vec();
    out.extend_from_slice(first);
    out.extend_from_slice(second);
    out
}

thread_local! {
    static SCRATCH: RefCell<Option<PathBuf>> = const { RefCell::new(None) };
}

/// An empty folder for this thread's current input, under the temporary directory.
fn scratch() -> PathBuf {
    SCRATCH.with(|s| {
        let dir = s
            .borrow_mut()
            .get_or_insert_with(|| {
                std::env::temp_dir().join(format!(
                    "lorafast-fuzz-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ))
            })
            .clone();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("in")).expect("temporary directory is writable");
        dir
    })
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).expect("temporary directory is writable");
}

/// Elements read back per tensor at most, so that a large valid file does not slow the fuzzer down.
const READ_LIMIT: usize = 1 << 16;

/// A model folder: the first part (if any) as `model.safetensors.index.json`, the second as the shard
/// it names (`model.safetensors`); then every float tensor read back.
pub fn safetensors_checkpoint(data: &[u8]) {
    let (index, file) = split(data);
    let dir = scratch().join("in");
    write(&dir, SINGLE_NAME, file);
    if !index.is_empty() {
        write(&dir, INDEX_NAME, index);
    }
    if let Ok(ck) = Checkpoint::open(&dir) {
        for (si, t) in ck.entries() {
            if t.float_type().is_some() && t.numel() <= READ_LIMIT {
                let values = ck.shards[si].read_f32(&t.name).expect("a validated tensor reads back");
                assert_eq!(values.len(), t.numel());
            }
        }
        let _ = crate::core::inspect::checkpoint(&dir);
    }
}

/// An adapter folder: `adapter_config.json` and `adapter_model.safetensors`; then the LoRA factors read
/// and the per-module rank and scaling rules applied.
pub fn adapter_folder(data: &[u8]) {
    let (config, weights) = split(data);
    let dir = scratch().join("in");
    write(&dir, CONFIG_NAME, config);
    write(&dir, WEIGHTS_NAME, weights);
    if let Ok(adapter) = Adapter::open(&dir) {
        for m in &adapter.modules {
            assert_eq!(m.a_shape[0], m.r);
            let _ = adapter.config.alpha_for(&m.module);
            if m.a_shape.iter().product::<usize>() <= READ_LIMIT {
                adapter.file.read_f32(&m.a).expect("a validated tensor reads back");
            }
        }
        let _ = crate::core::inspect::adapter(&dir);
    }
}

/// A pre-quantized 4-bit checkpoint: `config.json` and `model.safetensors` with quant states; then
/// every quant state parsed and the checkpoint dequantized.
pub fn quantized_checkpoint(data: &[u8]) {
    let (config, file) = split(data);
    let root = scratch();
    let dir = root.join("in");
    write(&dir, "config.json", config);
    write(&dir, SINGLE_NAME, file);
    let Ok(ck) = Checkpoint::open(&dir) else {
        return;
    };
    if quantized_weights(&ck).is_err() {
        return;
    }
    let _ = dequantize_checkpoint(&dir, &root.join("out"), None, Some(1), true, &Silent);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input the fuzzers kept (fuzz/corpus/TARGET/*) still runs clean.
    #[test]
    fn fuzz_corpora_replay_clean() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("corpus");
        for (name, target) in TARGETS {
            let dir = root.join(name);
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.expect("corpus entry").path())
                .collect();
            files.sort();
            assert!(!files.is_empty(), "{}: empty corpus", dir.display());
            for f in files {
                let data = std::fs::read(&f).expect("corpus file");
                if std::panic::catch_unwind(|| target(&data)).is_err() {
                    panic!("{} panics on {}", name, f.display());
                }
            }
        }
    }

    #[test]
    fn split_and_join_round_trip() {
        let joined = join(b"abc", b"defg");
        assert_eq!(split(&joined), (&b"abc"[..], &b"defg"[..]));
        assert_eq!(split(&[5]), (&b""[..], &[5u8][..]));
        assert_eq!(split(&[200, 0, 1]), (&[1u8][..], &b""[..]));
    }
}
