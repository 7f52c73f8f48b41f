//! PEFT LoRA adapters: `adapter_config.json` with PEFT's own matching rules, and the key layout of
//! `adapter_model.safetensors` (see peft `utils/other.py`, `tuners/tuners_utils.py`, `utils/save_and_load.py`).
use std::path::{Path, PathBuf};

use regex::Regex;
use serde_json::Value;

use crate::core::checkpoint::read_json;
use crate::core::error::{Error, Result};
use crate::core::experts::{self, ExpertParam};
use crate::core::io::SafetensorsFile;

pub const CONFIG_NAME: &str = "adapter_config.json";
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.";

/// `target_modules` / `exclude_modules`: a list of names, or one regex matched against the whole name.
#[derive(Debug, Clone)]
pub enum ModuleSet {
    None,
    Names(Vec<String>),
    Regex(Regex),
}

/// The LoRA config fields that matter for merging (unknown fields are ignored, as PEFT does).
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    pub path: PathBuf,
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    /// In file order: PEFT takes the first pattern that matches.
    pub rank_pattern: Vec<(String, Regex, usize)>,
    pub alpha_pattern: Vec<(String, Regex, f64)>,
    pub target_modules: ModuleSet,
    pub exclude_modules: ModuleSet,
    pub layers_to_transform: Option<Vec<i64>>,
    pub layers_pattern: Vec<String>,
    pub modules_to_save: Vec<String>,
    modules_to_save_re: Vec<Regex>,
    /// LoRA on raw parameters (PEFT's `ParamWrapper`), e.g. `mlp.experts.gate_up_proj`.
    pub target_parameters: Vec<String>,
    /// How its LoRAs on 3-D expert parameters are laid out (from `peft_version`).
    pub param_layout: crate::core::experts::ParamLayout,
    pub fan_in_fan_out: bool,
    pub use_dora: bool,
    pub lora_bias: bool,
    pub base_model_name_or_path: Option<String>,
    pub raw: Value,
}

/// Compile a Python `re` pattern with the Rust engine, or say clearly which pattern it cannot handle.
fn py_regex(path: &Path, field: &str, pattern: &str) -> Result<Regex> {
    Regex::new(pattern).map_err(|e| {
        Error::unsupported(
            path,
            format!("{field} pattern {pattern:?} is not supported by lorafast's regex engine: {e}"),
        )
    })
}

fn strings(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(a) => a.iter().map(|x| x.as_str().map(str::to_string)).collect(),
        _ => None,
    }
}

impl AdapterConfig {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_NAME);
        if !path.exists() {
            let what = if dir.is_dir() {
                "is not a PEFT adapter folder"
            } else {
                "does not exist"
            };
            return Err(Error::adapter(dir, format!("{what}: no {CONFIG_NAME}")));
        }
        Self::from_value(&path, read_json(&path)?)
    }

    pub fn from_value(path: &Path, raw: Value) -> Result<Self> {
        let bad = |reason: String| Error::adapter(path, reason);
        let obj = raw.as_object().ok_or_else(|| bad("expected a JSON object".into()))?;
        let peft_type = obj.get("peft_type").and_then(Value::as_str).unwrap_or("");
        if peft_type != "LORA" {
            let shown = if peft_type.is_empty() {
                "missing".to_string()
            } else {
                peft_type.to_string()
            };
            return Err(Error::unsupported(
                path,
                format!("peft_type is {shown}; lorafast merges LoRA adapters (peft_type LORA)"),
            ));
        }
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let flag = |k: &str| get(k).and_then(Value::as_bool).unwrap_or(false);
        // Variants whose merge math differs from plain LoRA: refuse rather than merge them wrongly.
        if get("layer_replication").is_some() {
            return Err(Error::unsupported(
                path,
                "layer_replication is set; PEFT itself refuses to merge such adapters",
            ));
        }
        let target_parameters = match get("target_parameters") {
            None => vec![],
            Some(v) => strings(v).ok_or_else(|| bad("target_parameters must be a list of names".into()))?,
        };
        if !target_parameters.is_empty() {
            // ParamWrapper's own refusals (peft/tuners/lora/layer.py, ParamWrapper.__init__): an adapter that
            // has them was not written by PEFT, and its merge would not be PEFT's.
            let dropout = get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
            for (set, what) in [
                (flag("use_dora"), "use_dora"),
                (flag("lora_bias"), "lora_bias"),
                (flag("fan_in_fan_out"), "fan_in_fan_out"),
                (dropout != 0.0, "lora_dropout != 0"),
            ] {
                if set {
                    return Err(Error::unsupported(
                        path,
                        format!("target_parameters with {what}: PEFT refuses LoRA on parameters with it too"),
                    ));
                }
            }
        }
        for k in [
            "alora_invocation_tokens",
            "trainable_token_indices",
            "arrow_config",
            "velora_config",
            "monteclora_config",
            "kasa_config",
        ] {
            if get(k).is_some() {
                return Err(Error::unsupported(
                    path,
                    format!("{k} is set; that LoRA variant cannot be merged by lorafast"),
                ));
            }
        }
        for k in ["use_bdlora", "use_qalora"] {
            if flag(k) {
                return Err(Error::unsupported(
                    path,
                    format!("{k} is true; that LoRA variant cannot be merged by lorafast"),
                ));
            }
        }
        if let Some(init) = get("init_lora_weights").and_then(Value::as_str) {
            let mutating = ["pissa", "olora", "corda", "lora_ga", "loftq", "mica"];
            if mutating.iter().any(|m| init.starts_with(m)) {
                return Err(Error::unsupported(
                    path,
                    format!(
                        "init_lora_weights is {init:?}, which changes the base weights when the adapter is loaded; \
                         save the adapter converted to plain LoRA (PEFT's save_pretrained(..., \
                         path_initial_model_for_weight_conversion=...)) and merge that"
                    ),
                ));
            }
        }
        let r = match get("r") {
            None => 8,
            Some(v) => v
                .as_u64()
                .filter(|&r| r > 0)
                .ok_or_else(|| bad(format!("r must be a positive integer, got {v}")))? as usize,
        };
        let lora_alpha = match get("lora_alpha") {
            None => 8.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| bad(format!("lora_alpha must be a number, got {v}")))?,
        };
        let mut rank_pattern = Vec::new();
        for (k, v) in get("rank_pattern").and_then(Value::as_object).into_iter().flatten() {
            let r = v
                .as_u64()
                .filter(|&r| r > 0)
                .ok_or_else(|| bad(format!("rank_pattern[{k:?}] must be a positive integer")))?;
            rank_pattern.push((k.clone(), pattern_key_regex(path, "rank_pattern", k)?, r as usize));
        }
        let mut alpha_pattern = Vec::new();
        for (k, v) in get("alpha_pattern").and_then(Value::as_object).into_iter().flatten() {
            let a = v
                .as_f64()
                .ok_or_else(|| bad(format!("alpha_pattern[{k:?}] must be a number")))?;
            alpha_pattern.push((k.clone(), pattern_key_regex(path, "alpha_pattern", k)?, a));
        }
        let module_set = |field: &str| -> Result<ModuleSet> {
            match get(field) {
                None => Ok(ModuleSet::None),
                Some(Value::String(s)) => Ok(ModuleSet::Regex(py_regex(path, field, &format!("^(?:{s})$"))?)),
                Some(v) => strings(v)
                    .map(ModuleSet::Names)
                    .ok_or_else(|| bad(format!("{field} must be a list of names or a regex string"))),
            }
        };
        let target_modules = module_set("target_modules")?;
        let exclude_modules = module_set("exclude_modules")?;
        let layers_to_transform = match get("layers_to_transform") {
            None => None,
            Some(Value::Number(n)) => Some(vec![n
                .as_i64()
                .ok_or_else(|| bad("layers_to_transform must be integers".into()))?]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|x| {
                        x.as_i64()
                            .ok_or_else(|| bad("layers_to_transform must be integers".into()))
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(_) => {
                return Err(bad(
                    "layers_to_transform must be an integer or a list of integers".into()
                ))
            }
        };
        let layers_pattern = get("layers_pattern").and_then(strings).unwrap_or_default();
        let modules_to_save = get("modules_to_save").and_then(strings).unwrap_or_default();
        let modules_to_save_re = modules_to_save
            .iter()
            .map(|m| py_regex(path, "modules_to_save", &format!(r"^(?:^|.*\.)(?:{m})(?:$|\..*)")))
            .collect::<Result<_>>()?;
        let use_dora = flag("use_dora");
        let lora_bias = flag("lora_bias");
        if use_dora && lora_bias {
            return Err(bad(
                "use_dora and lora_bias cannot both be set (PEFT does not allow it)".into(),
            ));
        }
        Ok(AdapterConfig {
            path: path.to_path_buf(),
            task_type: get("task_type").and_then(Value::as_str).map(str::to_string),
            r,
            lora_alpha,
            use_rslora: flag("use_rslora"),
            rank_pattern,
            alpha_pattern,
            target_modules,
            exclude_modules,
            layers_to_transform,
            layers_pattern,
            modules_to_save,
            modules_to_save_re,
            target_parameters,
            param_layout: crate::core::experts::ParamLayout::from_version(get("peft_version").and_then(Value::as_str)),
            fan_in_fan_out: flag("fan_in_fan_out"),
            use_dora,
            lora_bias,
            base_model_name_or_path: get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
            raw,
        })
    }

    /// PEFT's `get_pattern_key` + lookup: the first pattern `p` with `re.match(r"(.*\.)?(p)$", name)`.
    pub fn rank_for(&self, module: &str) -> usize {
        self.rank_pattern
            .iter()
            .find(|(_, re, _)| re.is_match(module))
            .map_or(self.r, |(_, _, r)| *r)
    }

    pub fn alpha_for(&self, module: &str) -> f64 {
        self.alpha_pattern
            .iter()
            .find(|(_, re, _)| re.is_match(module))
            .map_or(self.lora_alpha, |(_, _, a)| *a)
    }

    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA, as the Python float PEFT keeps.
    pub fn scaling_f64_for(&self, module: &str) -> f64 {
        let (r, alpha) = (self.rank_for(module) as f64, self.alpha_for(module));
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    /// The scaling as torch applies it to an f32 tensor.
    pub fn scaling_for(&self, module: &str) -> f32 {
        self.scaling_f64_for(module) as f32
    }

    pub fn is_module_to_save(&self, module: &str) -> bool {
        self.modules_to_save_re.iter().any(|re| re.is_match(module))
    }

    /// PEFT's `check_target_module_exists`: does the config put a LoRA layer on `module`?
    pub fn is_targeted(&self, module: &str) -> bool {
        match &self.exclude_modules {
            ModuleSet::Regex(re) if re.is_match(module) => return false,
            ModuleSet::Names(names) if names.iter().any(|e| module == e || module.ends_with(&format!(".{e}"))) => {
                return false
            }
            _ => {}
        }
        if self.is_module_to_save(module) {
            return false;
        }
        let names = match &self.target_modules {
            ModuleSet::None => return false,
            ModuleSet::Regex(re) => return re.is_match(module),
            ModuleSet::Names(names) => names,
        };
        if names.iter().any(|t| t == module) {
            return true;
        }
        let found = names.iter().any(|t| module.ends_with(&format!(".{t}")));
        match &self.layers_to_transform {
            Some(layers) if found && !layers.is_empty() => {
                layer_index(module, &self.layers_pattern).is_some_and(|i| layers.contains(&i))
            }
            _ => found,
        }
    }
}

fn pattern_key_regex(path: &Path, field: &str, key: &str) -> Result<Regex> {
    py_regex(path, field, &format!(r"^(?:.*\.)?(?:{key})$"))
}

/// The layer number in a module path, found as PEFT finds it (the first numbered segment).
fn layer_index(module: &str, layers_pattern: &[String]) -> Option<i64> {
    let patterns: Vec<String> = if layers_pattern.is_empty() {
        vec![r"^.*?\.[^.]*\.(\d+)\.".to_string()]
    } else {
        layers_pattern
            .iter()
            .map(|p| format!(r"^(?:.*?\.)?(?:{p})\.(\d+)\."))
            .collect()
    };
    patterns
        .iter()
        .find_map(|p| Regex::new(p).ok()?.captures(module)?.get(1)?.as_str().parse().ok())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// `lora_A.weight` / `lora_B.weight`: nn.Linear, or GPT-2's Conv1D (decided against the base).
    Linear,
    /// `lora_embedding_A` / `lora_embedding_B`.
    Embedding,
}

/// One LoRA-wrapped module of an adapter.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// Module path as the PEFT model names it, without `base_model.model.`.
    pub module: String,
    pub kind: LayerKind,
    pub a: String,
    pub b: String,
    /// `lora_B.bias` (lora_bias=true).
    pub bias: Option<String>,
    /// DoRA magnitude vector.
    pub magnitude: Option<String>,
    pub r: usize,
    pub scaling: f32,
    /// A's shape (r, in) and B's shape (out, r); for a parameter LoRA (r * experts, in) and
    /// (out, r * experts).
    pub a_shape: Vec<usize>,
    pub b_shape: Vec<usize>,
    /// LoRA on a parameter of `module` (`target_parameters`) rather than on the module itself.
    pub param: Option<ExpertParam>,
}

impl LoraModule {
    /// The name PEFT matches rank and alpha patterns against: the module, or `module.param`.
    pub fn pattern_key(&self) -> String {
        match &self.param {
            Some(p) => format!("{}.{}", self.module, p.name),
            None => self.module.clone(),
        }
    }
}

/// A full tensor saved with the adapter (modules_to_save, biases, saved embeddings).
#[derive(Debug, Clone)]
pub struct SavedTensor {
    /// Parameter path in the PEFT model's naming (without `base_model.model.`, `base_layer.` removed).
    pub param: String,
    /// Tensor name inside adapter_model.safetensors.
    pub key: String,
}

#[derive(Debug)]
pub struct Adapter {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    pub file: SafetensorsFile,
    pub modules: Vec<LoraModule>,
    pub saved: Vec<SavedTensor>,
    /// Modules with LoRA tensors in the file that the config does not target: PEFT ignores them.
    pub ignored_modules: Vec<String>,
}

/// Records one adapter tensor in its module's parts.
type SetPart = fn(&mut Parts, String);

#[derive(Default)]
struct Parts {
    a: Option<String>,
    b: Option<String>,
    bias: Option<String>,
    magnitude: Option<String>,
    embedding: bool,
}

impl Adapter {
    pub fn open(dir: &Path) -> Result<Self> {
        let config = AdapterConfig::load(dir)?;
        let weights = dir.join(WEIGHTS_NAME);
        if !weights.exists() {
            if dir.join("adapter_model.bin").exists() {
                return Err(Error::unsupported(
                    dir.join("adapter_model.bin"),
                    "pickle adapters are not loaded (they can run code); convert it to safetensors first: \
                     PeftModel.from_pretrained(base, path).save_pretrained(out) writes adapter_model.safetensors",
                ));
            }
            return Err(Error::adapter(dir, format!("no {WEIGHTS_NAME}")));
        }
        let file = SafetensorsFile::open(&weights)?;
        let mut parts: std::collections::BTreeMap<String, Parts> = Default::default();
        let mut saved = Vec::new();
        for t in file.tensors() {
            let key = &t.name;
            let rest = key.strip_prefix(KEY_PREFIX).ok_or_else(|| {
                Error::adapter(
                    &weights,
                    format!("tensor {key} does not start with {KEY_PREFIX:?}; not a PEFT LoRA adapter file"),
                )
            })?;
            let rest = rest.strip_prefix("_orig_mod.").unwrap_or(rest);
            let suffixes: [(&str, SetPart); 7] = [
                (".lora_A.weight", |p, k| p.a = Some(k)),
                (".lora_B.weight", |p, k| p.b = Some(k)),
                (".lora_B.bias", |p, k| p.bias = Some(k)),
                (".lora_embedding_A", |p, k| {
                    p.a = Some(k);
                    p.embedding = true
                }),
                (".lora_embedding_B", |p, k| {
                    p.b = Some(k);
                    p.embedding = true
                }),
                (".lora_magnitude_vector.weight", |p, k| p.magnitude = Some(k)),
                (".lora_magnitude_vector", |p, k| p.magnitude = Some(k)),
            ];
            if let Some((module, set)) = suffixes
                .iter()
                .find_map(|(s, set)| rest.strip_suffix(s).map(|m| (m, set)))
            {
                set(parts.entry(module.to_string()).or_default(), key.clone());
            } else if rest.contains(".lora_") || rest.contains("token_adapter") {
                return Err(Error::unsupported(
                    &weights,
                    format!("tensor {key} belongs to a LoRA variant lorafast cannot merge"),
                ));
            } else {
                saved.push(SavedTensor {
                    param: rest.replace(".base_layer.", "."),
                    key: key.clone(),
                });
            }
        }
        let mut modules = Vec::new();
        let mut ignored_modules = Vec::new();
        let params = experts::wrapped_params(&config, &weights, parts.keys().map(String::as_str))?;
        for (wrapper, p) in parts {
            let (Some(a), Some(b)) = (p.a, p.b) else {
                return Err(Error::adapter(
                    &weights,
                    format!("module {wrapper}: has lora tensors but not both A and B"),
                ));
            };
            if let Some(w) = params.get(&wrapper) {
                let a_shape = file.get(&a).map(|t| t.shape.clone()).unwrap_or_default();
                let b_shape = file.get(&b).map(|t| t.shape.clone()).unwrap_or_default();
                let key = format!("{}.{}", w.module, w.param);
                let r = config.rank_for(&key);
                let param = experts::param_shapes(&weights, &key, r, &a_shape, &b_shape)?;
                modules.push(LoraModule {
                    scaling: config.scaling_for(&key),
                    module: w.module.clone(),
                    kind: LayerKind::Linear,
                    a,
                    b,
                    bias: p.bias,
                    magnitude: p.magnitude,
                    r,
                    a_shape,
                    b_shape,
                    param: Some(ExpertParam {
                        name: w.param.clone(),
                        experts: param,
                    }),
                });
                continue;
            }
            if wrapper.ends_with(".base_layer") {
                return Err(Error::unsupported(
                    &weights,
                    format!("module {wrapper}: nested LoRA wrappers are only read for target_parameters"),
                ));
            }
            let module = wrapper;
            if !config.is_targeted(&module) {
                ignored_modules.push(module);
                continue;
            }
            let a_shape = file.get(&a).map(|t| t.shape.clone()).unwrap_or_default();
            let b_shape = file.get(&b).map(|t| t.shape.clone()).unwrap_or_default();
            if a_shape.len() != 2 || b_shape.len() != 2 {
                return Err(Error::unsupported(
                    &weights,
                    format!(
                        "module {module}: LoRA on convolution layers (A {a_shape:?}, B {b_shape:?}) is not supported"
                    ),
                ));
            }
            let r = config.rank_for(&module);
            let kind = if p.embedding {
                LayerKind::Embedding
            } else {
                LayerKind::Linear
            };
            if a_shape[0] != r || b_shape[1] != r {
                return Err(Error::shape(
                    &module,
                    format!(
                        "{}: A is {a_shape:?} and B is {b_shape:?}, but the config gives rank {r} for this module",
                        weights.display()
                    ),
                ));
            }
            if p.magnitude.is_some() && !config.use_dora {
                return Err(Error::adapter(
                    &weights,
                    format!("module {module}: has a DoRA magnitude vector but use_dora is false"),
                ));
            }
            if config.use_dora && p.magnitude.is_none() {
                return Err(Error::adapter(
                    &weights,
                    format!("module {module}: use_dora is true but lora_magnitude_vector is missing"),
                ));
            }
            modules.push(LoraModule {
                scaling: config.scaling_for(&module),
                module,
                kind,
                a,
                b,
                bias: p.bias,
                magnitude: p.magnitude,
                r,
                a_shape,
                b_shape,
                param: None,
            });
        }
        Ok(Adapter {
            dir: dir.to_path_buf(),
            config,
            file,
            modules,
            saved,
            ignored_modules,
        })
    }

    pub fn weights_path(&self) -> PathBuf {
        self.dir.join(WEIGHTS_NAME)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: Value) -> AdapterConfig {
        AdapterConfig::from_value(Path::new("adapter_config.json"), v).unwrap()
    }

    #[test]
    fn rank_pattern_first_match_is_dot_bounded() {
        let c = cfg(json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
            "rank_pattern": {"q_proj": 2, "layers.1.self_attn.q_proj": 4, "^model.layers.0.self_attn.k_proj": 6}}));
        assert_eq!(
            c.rank_for("model.layers.1.self_attn.q_proj"),
            2,
            "order matters: q_proj comes first"
        );
        assert_eq!(
            c.rank_for("model.layers.0.self_attn.k_proj"),
            6,
            "^ anchors the whole name"
        );
        assert_eq!(c.rank_for("model.layers.3.self_attn.v_proj"), 8);
        let c = cfg(json!({"peft_type": "LORA", "rank_pattern": {"layers.1.self_attn.q_proj": 4, "proj": 3}}));
        assert_eq!(c.rank_for("model.layers.1.self_attn.q_proj"), 4);
        assert_eq!(
            c.rank_for("model.layers.11.self_attn.q_proj"),
            8,
            "a partial component does not match"
        );
    }

    #[test]
    fn scaling_plain_and_rslora() {
        let c = cfg(json!({"peft_type": "LORA", "r": 16, "lora_alpha": 32}));
        assert_eq!(c.scaling_for("x.q_proj"), 2.0);
        let c = cfg(json!({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "use_rslora": true}));
        assert_eq!(c.scaling_for("x.q_proj"), 8.0);
        let c = cfg(json!({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "alpha_pattern": {"v_proj": 64}}));
        assert_eq!(c.scaling_for("model.layers.0.self_attn.v_proj"), 4.0);
    }

    #[test]
    fn targeting_follows_peft() {
        let c = cfg(
            json!({"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"], "exclude_modules": ["model.layers.0.self_attn.v_proj"],
            "modules_to_save": ["score"], "layers_to_transform": [0, 1]}),
        );
        assert!(c.is_targeted("model.layers.0.self_attn.q_proj"));
        assert!(!c.is_targeted("model.layers.0.self_attn.v_proj"), "excluded");
        assert!(
            !c.is_targeted("model.layers.2.self_attn.q_proj"),
            "layer not transformed"
        );
        assert!(
            !c.is_targeted("model.layers.0.self_attn.xq_proj"),
            "suffix must be dot-bounded"
        );
        assert!(c.is_module_to_save("score") && !c.is_module_to_save("scores"));
        let c = cfg(json!({"peft_type": "LORA", "target_modules": ".*\\.(q|v)_proj"}));
        assert!(c.is_targeted("model.layers.7.self_attn.v_proj"));
        assert!(
            !c.is_targeted("model.layers.7.self_attn.v_proj.extra"),
            "regex must match the whole name"
        );
    }

    #[test]
    fn unsupported_configs_are_refused_with_a_reason() {
        let err = AdapterConfig::from_value(Path::new("c.json"), json!({"peft_type": "IA3"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("IA3") && err.contains("c.json"), "{err}");
        let err = AdapterConfig::from_value(
            Path::new("c.json"),
            json!({"peft_type": "LORA", "init_lora_weights": "pissa_niter_4"}),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("pissa"), "{err}");
        assert!(AdapterConfig::from_value(
            Path::new("c.json"),
            json!({"peft_type": "LORA", "layer_replication": [[0, 2]]})
        )
        .is_err());
        assert!(AdapterConfig::from_value(Path::new("c.json"), json!({"peft_type": "LORA", "r": 0})).is_err());
    }
}
