//! Where output bytes land. Usually the whole output is laid out before any arithmetic and jobs write
//! straight into the shards (`Direct`). A double-quantized 4-bit output has quant-state JSONs whose
//! length depends on each weight's absmax mean, and so does every offset after them: then jobs write
//! into a scratch file in the staging folder (`Deferred`), and once every length is known the shards
//! are laid out and filled in the kernel from the inputs and the scratch file.
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rayon::prelude::*;

use crate::core::checkpoint::CheckpointWriter;
use crate::core::error::{Error, Result};
use crate::core::io::{PlannedTensor, SafetensorsFile, TensorEntry};

use super::plan::{Job, Origin, Output};
use super::sink::Dest;
use super::source::Base;

/// The output tensors of every job, with each job's source dtype for copies.
pub fn planned(base: &Base, adapters: &[crate::core::peft::Adapter], jobs: &[Job]) -> Vec<Vec<(PlannedTensor, bool)>> {
    jobs.iter()
        .map(|j| {
            let copy_dtype = match &j.origin {
                Origin::Base { shard, name } => base.ck.shards[*shard].get(name).expect("planned").dtype,
                Origin::Adapter { adapter, key } => adapters[*adapter].file.get(key).expect("planned").dtype,
                Origin::FourBit { .. } => safetensors::Dtype::U8,
            };
            j.planned(copy_dtype)
        })
        .collect()
}

/// Lay out every shard (in the base's shard order) with the given tensors; `states` fills in the
/// lengths of quant-state JSONs that were not known when planned.
pub fn lay_out(
    writer: &mut CheckpointWriter,
    shard_names: &[String],
    jobs: &[Job],
    planned: &[Vec<(PlannedTensor, bool)>],
    states: &HashMap<String, String>,
) -> Result<HashMap<String, usize>> {
    let mut shard_of = HashMap::new();
    for (si, shard_name) in shard_names.iter().enumerate() {
        let mut tensors = Vec::new();
        for (job, outs) in jobs.iter().zip(planned) {
            if job.out_shard != si {
                continue;
            }
            for (t, known) in outs {
                let mut t = t.clone();
                if !known {
                    t.shape = vec![states[&t.name].len()];
                }
                shard_of.insert(t.name.clone(), si);
                tensors.push(t);
            }
        }
        writer.add_shard(shard_name, &tensors)?;
    }
    Ok(shard_of)
}

/// Jobs write into the planned shards.
pub struct Direct<'a> {
    pub writer: &'a CheckpointWriter,
    pub shard_of: HashMap<String, usize>,
}

impl Dest for Direct<'_> {
    fn write(&self, tensor: &str, at: u64, bytes: &[u8]) -> Result<()> {
        self.writer.shard(self.shard_of[tensor]).write_at(tensor, at, bytes)
    }
    fn copy(&self, tensor: &str, file: &SafetensorsFile, entry: &TensorEntry) -> Result<()> {
        self.writer.shard(self.shard_of[tensor]).copy_from(tensor, file, entry)
    }
    fn state(&self, tensor: &str, json: &str) -> Result<()> {
        self.write(tensor, 0, json.as_bytes())
    }
}

/// Jobs write into a scratch file; copies and quant states wait for the layout.
pub struct Deferred {
    path: PathBuf,
    file: File,
    /// Output tensor -> (offset, length) in the scratch file.
    regions: HashMap<String, (u64, u64)>,
    states: Mutex<HashMap<String, String>>,
}

impl Deferred {
    /// A scratch file in `dir` with a region for every tensor that a job computes.
    pub fn new(dir: &Path, jobs: &[Job], planned: &[Vec<(PlannedTensor, bool)>]) -> Result<Self> {
        let path = dir.join(".lorafast-scratch");
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut regions = HashMap::new();
        let mut at = 0u64;
        for (job, outs) in jobs.iter().zip(planned) {
            if matches!(job.output, Output::Copy) {
                continue;
            }
            for (t, known) in outs.iter().filter(|(_, known)| *known) {
                let _ = known;
                let len = t.byte_len() as u64;
                regions.insert(t.name.clone(), (at, len));
                at += len;
            }
        }
        file.set_len(at).map_err(|e| Error::io(&path, e))?;
        Ok(Deferred {
            path,
            file,
            regions,
            states: Mutex::new(HashMap::new()),
        })
    }

    /// Bytes of scratch space the jobs will write.
    pub fn size(&self) -> u64 {
        self.regions.values().map(|(_, l)| *l).sum()
    }

    pub fn into_states(self) -> (Self, HashMap<String, String>) {
        let states = std::mem::take(&mut *self.states.lock().expect("never poisoned"));
        (self, states)
    }

    /// Fill the laid-out shards: copies from the inputs, computed tensors from the scratch file, quant
    /// states from memory; then remove the scratch file.
    pub fn fill(
        self,
        direct: &Direct,
        states: &HashMap<String, String>,
        jobs: &[Job],
        planned: &[Vec<(PlannedTensor, bool)>],
        base: &Base,
        adapters: &[crate::core::peft::Adapter],
    ) -> Result<()> {
        jobs.par_iter().zip(planned).try_for_each(|(job, outs)| -> Result<()> {
            if matches!(job.output, Output::Copy) {
                let (file, entry) = match &job.origin {
                    Origin::Base { shard, name } => (
                        &base.ck.shards[*shard],
                        base.ck.shards[*shard].get(name).expect("planned"),
                    ),
                    Origin::Adapter { adapter, key } => (
                        &adapters[*adapter].file,
                        adapters[*adapter].file.get(key).expect("planned"),
                    ),
                    Origin::FourBit { .. } => unreachable!("a 4-bit weight is copied as a base tensor"),
                };
                return direct.copy(&job.out_name, file, entry);
            }
            for (t, known) in outs {
                if *known {
                    let (off, len) = self.regions[&t.name];
                    direct
                        .writer
                        .shard(direct.shard_of[&t.name])
                        .copy_range(&t.name, &self.file, &self.path, off, len)?;
                } else {
                    direct.state(&t.name, &states[&t.name])?;
                }
            }
            Ok(())
        })?;
        drop(self.file);
        std::fs::remove_file(&self.path).map_err(|e| Error::io(&self.path, e))
    }
}

impl Dest for Deferred {
    fn write(&self, tensor: &str, at: u64, bytes: &[u8]) -> Result<()> {
        let (off, _) = self.regions[tensor];
        self.file
            .write_all_at(bytes, off + at)
            .map_err(|e| Error::io(&self.path, e))
    }
    fn copy(&self, _tensor: &str, _file: &SafetensorsFile, _entry: &TensorEntry) -> Result<()> {
        Ok(()) // done when the shards are filled
    }
    fn state(&self, tensor: &str, json: &str) -> Result<()> {
        self.states
            .lock()
            .expect("never poisoned")
            .insert(tensor.to_string(), json.to_string());
        Ok(())
    }
}
