//! A Hugging Face model folder: `model.safetensors`, or shards listed by `model.safetensors.index.json`,
//! plus `config.json` and the other files (tokenizer, generation config) that travel with it.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::core::error::{Error, Result};
use crate::core::io::{OutputFile, PlannedTensor, SafetensorsFile, TensorEntry};
use crate::core::progress::Progress;
use crate::core::staging::Staging;

pub const INDEX_NAME: &str = "model.safetensors.index.json";
pub const SINGLE_NAME: &str = "model.safetensors";

#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    /// Shard files in index order (one entry for a single-file checkpoint).
    pub shards: Vec<SafetensorsFile>,
    /// File name of each shard, as the index names it.
    pub shard_names: Vec<String>,
    /// Tensor name -> shard number.
    locate: HashMap<String, usize>,
    /// `config.json`, when present.
    pub config: Option<serde_json::Value>,
    /// Whether the checkpoint came with an index file (and the output must too).
    pub sharded: bool,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            if dir.exists() {
                return Err(Error::InvalidArgument(format!(
                    "{}: expected a model folder (config.json + *.safetensors), got a file",
                    dir.display()
                )));
            }
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such model folder"),
            ));
        }
        let config = read_json_if_exists(&dir.join("config.json"))?;
        let index_path = dir.join(INDEX_NAME);
        let index = read_json_if_exists(&index_path)?;
        let (shard_names, sharded) = if let Some(index) = &index {
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::json(&index_path, "no weight_map object"))?;
            let mut names: Vec<String> = Vec::new();
            for v in map.values() {
                let s = v
                    .as_str()
                    .ok_or_else(|| Error::json(&index_path, "weight_map values must be file names"))?;
                if s.contains('/') || s.contains("..") {
                    return Err(Error::json(&index_path, format!("shard name {s:?} leaves the folder")));
                }
                if !names.iter().any(|n| n == s) {
                    names.push(s.to_string());
                }
            }
            names.sort();
            (names, true)
        } else if dir.join(SINGLE_NAME).exists() {
            (vec![SINGLE_NAME.to_string()], false)
        } else {
            let found = list_safetensors(dir)?;
            match found.len() {
                1 => (found, false),
                0 => {
                    let hint = if dir.join("pytorch_model.bin").exists()
                        || dir.join("pytorch_model.bin.index.json").exists()
                    {
                        "; it holds only pickle (.bin) weights: convert them to safetensors first \
                         (e.g. transformers' from_pretrained(...).save_pretrained(..., safe_serialization=True))"
                    } else {
                        ""
                    };
                    return Err(Error::InvalidArgument(format!(
                        "{}: no model.safetensors or {INDEX_NAME} found{hint}",
                        dir.display()
                    )));
                }
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "{}: several .safetensors files but no {INDEX_NAME} saying how they fit together",
                        dir.display()
                    )))
                }
            }
        };
        let mut shards = Vec::with_capacity(shard_names.len());
        let mut locate = HashMap::new();
        for (i, name) in shard_names.iter().enumerate() {
            let file = SafetensorsFile::open(&dir.join(name))?;
            for t in file.tensors() {
                if locate.insert(t.name.clone(), i).is_some() {
                    return Err(Error::Safetensors {
                        path: file.path.clone(),
                        reason: format!("tensor {} appears in more than one shard", t.name),
                    });
                }
            }
            shards.push(file);
        }
        if let Some(index) = &index {
            // Every tensor the index promises must be where it says.
            for (tensor, shard) in index["weight_map"].as_object().into_iter().flatten() {
                let shard = shard.as_str().unwrap_or_default();
                match locate.get(tensor) {
                    Some(&i) if shard_names[i] == shard => {}
                    _ => {
                        return Err(Error::json(
                            &index_path,
                            format!("weight_map says tensor {tensor} is in {shard}, but it is not there"),
                        ))
                    }
                }
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            shards,
            shard_names,
            locate,
            config,
            sharded,
        })
    }

    pub fn get(&self, name: &str) -> Option<(usize, &TensorEntry)> {
        let &i = self.locate.get(name)?;
        Some((i, self.shards[i].get(name)?))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.locate.contains_key(name)
    }

    /// Every tensor with its shard number, shard by shard in file order.
    pub fn entries(&self) -> impl Iterator<Item = (usize, &TensorEntry)> {
        self.shards
            .iter()
            .enumerate()
            .flat_map(|(si, s)| s.tensors().iter().map(move |t| (si, t)))
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.entries().map(|(_, t)| t.name.as_str())
    }

    pub fn total_bytes(&self) -> u64 {
        self.entries().map(|(_, t)| t.len).sum()
    }

    /// `config.json`'s field, if any.
    pub fn config_str(&self, key: &str) -> Option<&str> {
        self.config.as_ref()?.get(key)?.as_str()
    }

    pub fn model_type(&self) -> Option<&str> {
        self.config_str("model_type")
    }

    pub fn architecture(&self) -> Option<&str> {
        self.config
            .as_ref()?
            .get("architectures")?
            .as_array()?
            .first()?
            .as_str()
    }
}

fn list_safetensors(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::json(path, format!("not valid JSON: {e}")))
}

pub fn read_json_if_exists(path: &Path) -> Result<Option<serde_json::Value>> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// Writes a checkpoint folder: shards laid out before any data, filled at their offsets from any
/// thread, then index, side files and config, all in a staging folder renamed into place at the end.
pub struct CheckpointWriter {
    staging: Staging,
    shards: Vec<OutputFile>,
    weight_map: BTreeMap<String, String>,
    total: u64,
}

impl CheckpointWriter {
    /// Claims OUT (refusing an existing one without `overwrite`, or one overlapping `inputs`) before
    /// any work is done.
    pub fn new(out: &Path, inputs: &[&Path], overwrite: bool) -> Result<Self> {
        Ok(CheckpointWriter {
            staging: Staging::new(out, inputs, overwrite)?,
            shards: vec![],
            weight_map: BTreeMap::new(),
            total: 0,
        })
    }

    /// Lay out the next shard file; returns its number.
    pub fn add_shard(&mut self, file_name: &str, tensors: &[PlannedTensor]) -> Result<usize> {
        for t in tensors {
            self.weight_map.insert(t.name.clone(), file_name.to_string());
            self.total += t.byte_len() as u64;
        }
        let fmt = HashMap::from([("format".to_string(), "pt".to_string())]);
        self.shards
            .push(OutputFile::create(&self.staging.tmp.join(file_name), tensors, &fmt)?);
        Ok(self.shards.len() - 1)
    }

    pub fn shard(&self, i: usize) -> &OutputFile {
        &self.shards[i]
    }

    /// Bytes of tensor data planned so far.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Every shard is laid out: check that OUT's filesystem can hold them, then report the total.
    pub fn start(&self, progress: &dyn Progress) -> Result<()> {
        self.staging.check_space(self.total)?;
        progress.start(self.total);
        Ok(())
    }

    /// Fail now if OUT's filesystem cannot hold `bytes` more.
    pub fn check_space(&self, bytes: u64) -> Result<()> {
        self.staging.check_space(bytes)
    }

    /// The staging folder (scratch files may live there, removed before `finish`).
    pub fn dir(&self) -> &Path {
        &self.staging.tmp
    }

    /// What claiming OUT cleared away (leftovers of killed runs), one line each.
    pub fn notices(&self) -> Vec<String> {
        self.staging.notices.clone()
    }

    /// Close the shards, write the index (when `sharded`), copy the side files of `side_files_from`,
    /// run `extra` on the folder, write `config`, then move the folder into place. Returns OUT and the
    /// bytes of its shards.
    pub fn finish(
        self,
        sharded: bool,
        side_files_from: &Path,
        extra: impl FnOnce(&Path) -> Result<()>,
        config: Option<&serde_json::Value>,
    ) -> Result<(PathBuf, u64)> {
        let mut bytes = 0;
        for o in self.shards {
            bytes += std::fs::metadata(&o.path).map_err(|e| Error::io(&o.path, e))?.len();
            o.finish()?;
        }
        let dir = self.staging.tmp.clone();
        if sharded {
            let index = serde_json::to_vec_pretty(&index_json(self.total, &self.weight_map)).expect("json");
            write_file(&dir.join(INDEX_NAME), &index)?;
        }
        copy_side_files(side_files_from, &dir)?;
        extra(&dir)?;
        if let Some(config) = config {
            write_file(
                &dir.join("config.json"),
                serde_json::to_string_pretty(config).expect("json").as_bytes(),
            )?;
        }
        Ok((self.staging.commit()?, bytes))
    }
}

pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Weight formats that the merged safetensors replace: never copied into the output.
fn is_weight_file(name: &str) -> bool {
    [
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".msgpack",
        ".h5",
        ".gguf",
    ]
    .iter()
    .any(|e| name.ends_with(e))
        || name == INDEX_NAME
        || name.ends_with(".index.json")
}

/// Copy config, tokenizer and other small files (and sub-folders, e.g. sentence-transformers modules).
pub fn copy_side_files(from: &Path, to: &Path) -> Result<()> {
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let entry = entry.map_err(|e| Error::io(from, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let (src, dst) = (entry.path(), to.join(&name));
        if name.starts_with('.') || is_weight_file(&name) {
            continue;
        }
        let kind = entry.file_type().map_err(|e| Error::io(&src, e))?;
        if kind.is_dir() {
            std::fs::create_dir_all(&dst).map_err(|e| Error::io(&dst, e))?;
            copy_side_files(&src, &dst)?;
        } else if src.is_file() {
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
        }
    }
    Ok(())
}

/// The index file transformers writes for a sharded checkpoint.
pub fn index_json(total_size: u64, weight_map: &BTreeMap<String, String>) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"total_size": total_size},
        "weight_map": weight_map,
    })
}
