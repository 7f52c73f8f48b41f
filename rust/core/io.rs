//! Streaming safetensors IO.
//!
//! Reading: the header is parsed and validated by the reference `safetensors` crate over a memory map
//! (only the header pages are touched); tensor data is then read with positioned reads into small
//! buffers, so resident memory stays bounded whatever the file size.
//!
//! Writing: the whole layout (names, dtypes, shapes, offsets) is planned before any data is produced,
//! the header is written first, then each tensor is written at its own offset, from any thread.
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};

use crate::core::dtype::FloatType;
use crate::core::error::{Error, Result};

/// One tensor of a safetensors file: where its bytes are, absolutely, in the file.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    pub len: u64,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn float_type(&self) -> Option<FloatType> {
        FloatType::from_safetensors(self.dtype)
    }
}

/// An open, validated safetensors file.
#[derive(Debug)]
pub struct SafetensorsFile {
    pub path: PathBuf,
    /// Unique to this opening of the file in this process (a cache key that a later opening of a
    /// rewritten file at the same path never matches).
    pub id: u64,
    file: File,
    /// In data order.
    tensors: Vec<TensorEntry>,
    index: HashMap<String, usize>,
    pub metadata: Option<HashMap<String, String>>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let bad = |reason: String| Error::Safetensors {
            path: path.to_path_buf(),
            reason,
        };
        if file_len < 8 {
            return Err(bad(format!("file is {file_len} bytes, too short for a header")));
        }
        // SAFETY: the map is read-only and lives only while the header is parsed; lorafast never writes
        // to its inputs. Another process truncating the file meanwhile could fault, as with any mmap reader.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| bad(describe(&e)))?;
        drop(map);
        let data_start = 8 + header_len as u64;
        let mut tensors: Vec<TensorEntry> = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| TensorEntry {
                name,
                dtype: info.dtype,
                shape: info.shape.clone(),
                offset: data_start + info.data_offsets.0 as u64,
                len: (info.data_offsets.1 - info.data_offsets.0) as u64,
            })
            .collect();
        tensors.sort_by_key(|t| t.offset);
        let index = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        static OPENED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            id: OPENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            file,
            tensors,
            index,
            metadata: metadata.metadata().clone(),
        })
    }

    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Read `buf.len()` bytes of `entry` starting `start` bytes into its data.
    pub fn read_bytes(&self, entry: &TensorEntry, start: u64, buf: &mut [u8]) -> Result<()> {
        debug_assert!(start + buf.len() as u64 <= entry.len);
        self.file
            .read_exact_at(buf, entry.offset + start)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// A whole float tensor as f32 (adapters: small tensors only).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.read_f32_rows(name, 0..self.rows(name))
    }

    /// A tensor's length along its first dimension (1 for a scalar, 0 for a name it lacks).
    pub fn rows(&self, name: &str) -> usize {
        self.get(name).map_or(0, |e| e.shape.first().copied().unwrap_or(1))
    }

    /// Rows of a float tensor (along its first dimension) as f32, reading only their bytes.
    pub fn read_f32_rows(&self, name: &str, rows: std::ops::Range<usize>) -> Result<Vec<f32>> {
        let entry = self.get(name).ok_or_else(|| Error::Safetensors {
            path: self.path.clone(),
            reason: format!("no tensor named {name}"),
        })?;
        let ft = entry.float_type().ok_or_else(|| Error::Safetensors {
            path: self.path.clone(),
            reason: format!("tensor {name} has dtype {:?}, expected a float type", entry.dtype),
        })?;
        // A 0-d tensor is one row of one element.
        let width = entry.numel() / entry.shape.first().copied().unwrap_or(1).max(1);
        let mut bytes = vec![0u8; rows.len() * width * ft.size()];
        self.read_bytes(entry, (rows.start * width * ft.size()) as u64, &mut bytes)?;
        let mut out = vec![0f32; rows.len() * width];
        ft.decode(&bytes, &mut out);
        Ok(out)
    }
}

/// Turn the reference crate's error into a sentence a user can act on.
fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::InvalidHeaderDeserialization(j) => format!("header is not valid safetensors JSON ({j})"),
        E::InvalidHeader(_) => "header is not valid UTF-8".into(),
        E::HeaderTooLarge => "header length is larger than the 100 MB limit (corrupt file?)".into(),
        E::HeaderTooSmall => "file is too short for a header".into(),
        E::InvalidHeaderLength => "header length points past the end of the file (truncated?)".into(),
        E::InvalidOffset(name) => format!("tensor {name} has data offsets that overlap or leave a gap"),
        E::TensorInvalidInfo => "a tensor's data offsets do not match its shape and dtype".into(),
        E::MetadataIncompleteBuffer => {
            "data section does not match the header (file truncated or has trailing bytes)".into()
        }
        E::ValidationOverflow => "a tensor's shape overflows (corrupt header)".into(),
        other => other.to_string(),
    }
}

/// A tensor to be written: its header entry. Data comes later, from whoever fills the file.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// A safetensors file whose header is written and whose data region is waiting to be filled.
#[derive(Debug)]
pub struct OutputFile {
    pub path: PathBuf,
    file: File,
    /// Absolute data offset of each planned tensor, by name.
    offsets: HashMap<String, u64>,
}

impl OutputFile {
    /// Create `path`, write the header for `tensors` (laid out the way the safetensors crate lays out
    /// its files: larger alignment first, then by name) and size the file.
    pub fn create(path: &Path, tensors: &[PlannedTensor], metadata: &HashMap<String, String>) -> Result<Self> {
        let mut order: Vec<&PlannedTensor> = tensors.iter().collect();
        order.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
        let mut infos = Vec::with_capacity(order.len());
        let mut at = 0usize;
        for t in &order {
            let len = t.byte_len();
            infos.push((
                t.name.clone(),
                TensorInfo {
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    data_offsets: (at, at + len),
                },
            ));
            at += len;
        }
        let data_len = at;
        let meta = Metadata::new(Some(metadata.clone()), infos.clone()).map_err(|e| Error::Output {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut header = serde_json::to_vec(&meta).map_err(|e| Error::json(path, e.to_string()))?;
        // The format pads the header with spaces so that the data starts 8-byte aligned.
        header.resize(header.len().next_multiple_of(8), b' ');
        let data_start = 8 + header.len() as u64;
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        file.set_len(data_start + data_len as u64)
            .map_err(|e| Error::io(path, e))?;
        let mut head = (header.len() as u64).to_le_bytes().to_vec();
        head.extend_from_slice(&header);
        file.write_all_at(&head, 0).map_err(|e| Error::io(path, e))?;
        let offsets = infos
            .into_iter()
            .map(|(n, i)| (n, data_start + i.data_offsets.0 as u64))
            .collect();
        Ok(OutputFile {
            path: path.to_path_buf(),
            file,
            offsets,
        })
    }

    pub fn offset_of(&self, name: &str) -> u64 {
        self.offsets[name]
    }

    /// Write `bytes` at `start` bytes into the data of tensor `name`.
    pub fn write_at(&self, name: &str, start: u64, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all_at(bytes, self.offset_of(name) + start)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Copy a tensor's bytes unchanged from an input file: in the kernel where it can, so that untouched
    /// tensors never pass through user space.
    pub fn copy_from(&self, name: &str, src: &SafetensorsFile, entry: &TensorEntry) -> Result<()> {
        self.copy_range(name, src.file(), &src.path, entry.offset, entry.len)
    }

    /// Copy `len` bytes at `src_off` of `src` into the start of tensor `name` (in the kernel where it can).
    pub fn copy_range(&self, name: &str, src: &File, src_path: &Path, src_off: u64, len: u64) -> Result<()> {
        let dst_off = self.offset_of(name);
        if copy_range_in_kernel(src, src_off, &self.file, dst_off, len) {
            return Ok(());
        }
        const CHUNK: u64 = 8 << 20;
        let mut buf = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0u64;
        while done < len {
            let n = CHUNK.min(len - done) as usize;
            src.read_exact_at(&mut buf[..n], src_off + done)
                .map_err(|e| Error::io(src_path, e))?;
            self.file
                .write_all_at(&buf[..n], dst_off + done)
                .map_err(|e| Error::io(&self.path, e))?;
            done += n as u64;
        }
        Ok(())
    }

    /// Close the file. No fsync, as `cp` and `save_pretrained` do not: the temporary folder and the final
    /// rename already keep a failed or interrupted run from leaving a half-written output.
    pub fn finish(self) -> Result<()> {
        drop(self.file);
        Ok(())
    }
}

/// `copy_file_range` the whole range; false (nothing or part copied) means: fall back to read/write,
/// which overwrites the same range from the start.
#[cfg(target_os = "linux")]
fn copy_range_in_kernel(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let (mut off_in, mut off_out) = (src_off as libc::loff_t, dst_off as libc::loff_t);
    let mut left = len as usize;
    while left > 0 {
        // SAFETY: both descriptors are open for the duration of the call and the offsets are plain
        // integers the kernel updates; no user memory is passed.
        let n = unsafe { libc::copy_file_range(src.as_raw_fd(), &mut off_in, dst.as_raw_fd(), &mut off_out, left, 0) };
        if n <= 0 {
            return false;
        }
        left -= n as usize;
    }
    true
}

#[cfg(not(target_os = "linux"))]
fn copy_range_in_kernel(_: &File, _: u64, _: &File, _: u64, _: u64) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_file(path: &Path, bytes: &[u8]) {
        std::fs::File::create(path).unwrap().write_all(bytes).unwrap();
    }

    fn sample(dir: &Path) -> PathBuf {
        let path = dir.join("a.safetensors");
        let tensors = vec![
            PlannedTensor {
                name: "w".into(),
                dtype: Dtype::BF16,
                shape: vec![2, 3],
            },
            PlannedTensor {
                name: "b".into(),
                dtype: Dtype::F32,
                shape: vec![3],
            },
        ];
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let out = OutputFile::create(&path, &tensors, &meta).unwrap();
        let mut w = vec![0u8; 12];
        FloatType::BF16.encode(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &mut w);
        out.write_at("w", 0, &w).unwrap();
        let mut b = vec![0u8; 12];
        FloatType::F32.encode(&[0.5, -0.5, 8.0], &mut b);
        out.write_at("b", 0, &b).unwrap();
        out.finish().unwrap();
        path
    }

    #[test]
    fn written_file_reads_back_through_the_reference_crate() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("w").unwrap().shape(), &[2, 3]);
        let f = SafetensorsFile::open(&path).unwrap();
        assert_eq!(f.read_f32("w").unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(f.read_f32("b").unwrap(), vec![0.5, -0.5, 8.0]);
        assert_eq!(f.metadata.as_ref().unwrap()["format"], "pt");
    }

    #[test]
    fn truncated_file_is_rejected_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        write_file(&path, &bytes[..bytes.len() - 4]);
        let err = SafetensorsFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("a.safetensors") && err.contains("truncated"), "{err}");
    }

    #[test]
    fn header_pointing_outside_the_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        let header = br#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,64]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0u8; 16]);
        write_file(&path, &bytes);
        let err = SafetensorsFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("bad.safetensors"), "{err}");
    }

    #[test]
    fn unknown_dtype_and_garbage_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let header = br#"{"w":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.push(0);
        write_file(&path, &bytes);
        let err = SafetensorsFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("Q7"), "{err}");
        write_file(&path, &[0xff; 40]);
        assert!(SafetensorsFile::open(&path).is_err());
        write_file(&path, b"abc");
        assert!(SafetensorsFile::open(&path)
            .unwrap_err()
            .to_string()
            .contains("too short"));
    }

    #[test]
    fn copy_from_copies_bytes_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let src = SafetensorsFile::open(&sample(dir.path())).unwrap();
        let entry = src.get("w").unwrap().clone();
        let dst_path = dir.path().join("b.safetensors");
        let planned = vec![PlannedTensor {
            name: "w".into(),
            dtype: Dtype::BF16,
            shape: vec![2, 3],
        }];
        let out = OutputFile::create(&dst_path, &planned, &HashMap::new()).unwrap();
        out.copy_from("w", &src, &entry).unwrap();
        out.finish().unwrap();
        let dst = SafetensorsFile::open(&dst_path).unwrap();
        assert_eq!(dst.read_f32("w").unwrap(), src.read_f32("w").unwrap());
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Arbitrary bytes never panic the reader: they open cleanly or give an error naming the file.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("p.safetensors");
            std::fs::write(&path, &bytes).unwrap();
            if let Err(e) = SafetensorsFile::open(&path) {
                prop_assert!(e.to_string().contains("p.safetensors"));
            }
        }

        /// A valid file with one byte of its header changed either still opens or fails with an error.
        #[test]
        fn mutated_headers_never_panic(at in 8usize..120, byte in any::<u8>(), shape in 1usize..5) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("m.safetensors");
            let planned = vec![PlannedTensor { name: "t".into(), dtype: Dtype::F32, shape: vec![shape, 3] }];
            OutputFile::create(&path, &planned, &HashMap::new()).unwrap().finish().unwrap();
            let mut bytes = std::fs::read(&path).unwrap();
            let at = at.min(bytes.len() - 1);
            bytes[at] = byte;
            std::fs::write(&path, &bytes).unwrap();
            if let Ok(f) = SafetensorsFile::open(&path) {
                // Whatever it opened as, every tensor lies inside the file.
                let len = bytes.len() as u64;
                prop_assert!(f.tensors().iter().all(|t| t.offset + t.len <= len));
            }
        }
    }
}
