//! The GGUF container, version 3, byte for byte as gguf-py's `GGUFWriter` (and ggml's `gguf.cpp`) write
//! it: magic, version, tensor and key-value counts, the key-value section (built by the Python layer
//! with the `gguf` package and passed through as bytes), tensor infos, then the data, every tensor
//! starting at a multiple of 32 bytes and padded to one.
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

use crate::core::error::{Error, Result};
use crate::core::staging::Staging;

use super::quants::GgmlType;
use super::GgufReport;

pub const ALIGNMENT: u64 = 32;
const MAGIC: u32 = 0x4655_4747; // "GGUF"
const VERSION: u32 = 3;

/// One tensor of the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// numpy's shape (GGUF stores it reversed, fastest dimension first).
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    /// Drop trailing extents of 1 from the stored dims, as gguf.cpp (llama-quantize) does; gguf-py
    /// (the converter) keeps numpy's rank.
    pub trim_dims: bool,
}

impl TensorInfo {
    /// Bytes of the tensor's data, unpadded.
    pub fn nbytes(&self) -> u64 {
        let cols = self.shape.last().copied().unwrap_or(1);
        let rows: usize = self.shape[..self.shape.len().saturating_sub(1)].iter().product();
        (self.ty.row_bytes(cols) * rows) as u64
    }

    fn dims(&self) -> Vec<u64> {
        let mut ne: Vec<u64> = self.shape.iter().rev().map(|&d| d as u64).collect();
        if ne.is_empty() {
            ne.push(1);
        }
        if self.trim_dims {
            while ne.len() > 1 && *ne.last().expect("not empty") == 1 {
                ne.pop();
            }
        }
        ne
    }
}

pub fn pad(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Everything before the tensor data: header, key-values, tensor infos and the padding after them.
/// Returns it with each tensor's absolute offset in the file and the file's total size.
pub fn header(kv: &[u8], n_kv: u64, tensors: &[TensorInfo]) -> (Vec<u8>, Vec<u64>, u64) {
    let mut out = Vec::with_capacity(kv.len() + 64 * tensors.len() + 64);
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&n_kv.to_le_bytes());
    out.extend_from_slice(kv);
    let mut relative = Vec::with_capacity(tensors.len());
    let mut at = 0u64;
    for t in tensors {
        put_string(&mut out, &t.name);
        let dims = t.dims();
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.ty.id().to_le_bytes());
        out.extend_from_slice(&at.to_le_bytes());
        relative.push(at);
        at += pad(t.nbytes());
    }
    let data_start = pad(out.len() as u64);
    out.resize(data_start as usize, 0);
    let offsets = relative.iter().map(|r| data_start + r).collect();
    (out, offsets, data_start + at)
}

/// A GGUF file being written: the staging file with its header in place and its size set; tensors' data
/// go in at `offsets`, and `finish` renames it into place.
pub struct GgufFile {
    staging: Staging,
    file: File,
    path: PathBuf,
    /// Absolute offset of each tensor's data, in the order of the infos given.
    pub offsets: Vec<u64>,
    total: u64,
    types: Vec<(String, usize)>,
    started: Instant,
}

impl GgufFile {
    pub fn create(staging: Staging, kv: &[u8], n_kv: u64, tensors: &[TensorInfo], started: Instant) -> Result<Self> {
        let (head, offsets, total) = header(kv, n_kv, tensors);
        staging.check_space(total)?;
        let path = staging.tmp.clone();
        let file = File::options()
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        file.set_len(total).map_err(|e| Error::io(&path, e))?;
        file.write_all_at(&head, 0).map_err(|e| Error::io(&path, e))?;
        let mut types: Vec<(String, usize)> = Vec::new();
        for t in tensors {
            match types.iter_mut().find(|(n, _)| n == t.ty.name()) {
                Some((_, c)) => *c += 1,
                None => types.push((t.ty.name().to_string(), 1)),
            }
        }
        Ok(GgufFile {
            staging,
            file,
            path,
            offsets,
            total,
            types,
            started,
        })
    }

    /// `bytes` at absolute offset `at`.
    pub fn put(&self, at: u64, bytes: &[u8]) -> Result<()> {
        self.file.write_all_at(bytes, at).map_err(|e| Error::io(&self.path, e))
    }

    /// Close, rename into place, and report (with the staging sweep's notices before `warnings`).
    pub fn finish(self, warnings: Vec<String>, nonfinite_values: u64) -> Result<GgufReport> {
        // No fsync, as the merge engine's outputs: the rename publishes a complete file to readers, and
        // the page cache writes it back (an fsync here cost about 1.3 s of a 2.2 GB file).
        drop(self.file);
        let mut all = self.staging.notices.clone();
        all.extend(warnings);
        let output = self.staging.commit()?;
        Ok(GgufReport {
            output,
            tensors: self.offsets.len(),
            types: self.types,
            bytes_written: self.total,
            seconds: self.started.elapsed().as_secs_f64(),
            nonfinite_values,
            warnings: all,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_aligned_and_padded() {
        let t = |name: &str, shape: Vec<usize>, ty| TensorInfo {
            name: name.into(),
            shape,
            ty,
            trim_dims: false,
        };
        let tensors = [t("a", vec![3], GgmlType::F32), t("b", vec![2, 64], GgmlType::Q8_0)];
        let (head, offsets, total) = header(&[], 0, &tensors);
        assert_eq!(head.len() % 32, 0);
        assert_eq!(&head[..4], b"GGUF");
        assert_eq!(offsets[0], head.len() as u64);
        assert_eq!(offsets[1], offsets[0] + 32); // 12 bytes padded to 32
        assert_eq!(tensors[1].nbytes(), 2 * 2 * 34);
        assert_eq!(total, offsets[1] + pad(136));
        let trimmed = TensorInfo {
            trim_dims: true,
            ..t("c", vec![1, 384], GgmlType::F32)
        };
        assert_eq!(trimmed.dims(), vec![384]);
        assert_eq!(t("c", vec![1, 384], GgmlType::F32).dims(), vec![384, 1]);
    }
}
