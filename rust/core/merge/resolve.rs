//! PEFT's rules for where each adapter tensor lands in the base: LoRA modules onto base weights (with
//! the layout of the delta), `lora_B.bias` onto biases, and full tensors (`modules_to_save`, a resized
//! vocabulary) replacing base tensors or added beside them.
use std::collections::{BTreeMap, HashMap};

use crate::core::error::{Error, Result};
use crate::core::experts::{self, ExpertSlice};
use crate::core::layers::{is_conv1d, OUTPUTS};
use crate::core::peft::{Adapter, LayerKind};

use super::plan::{Layout, Step};
use super::source::Base;

pub const INPUT_EMBEDDINGS: [&str; 7] = [
    "model.embed_tokens.weight",
    "embed_tokens.weight",
    "transformer.wte.weight",
    "wte.weight",
    "model.decoder.embed_tokens.weight",
    "gpt_neox.embed_in.weight",
    "embeddings.word_embeddings.weight",
];

/// One LoRA module landing in a base tensor: (adapter, module index, layout, and for a LoRA on fused
/// expert parameters the experts and rows of its delta the tensor holds).
pub type Contribution = (usize, usize, Layout, Option<ExpertSlice>);

/// Everything the adapters do to the base, by base tensor name.
#[derive(Default)]
pub struct Resolution {
    pub contributions: BTreeMap<String, Vec<Contribution>>,
    pub bias_adds: BTreeMap<String, Vec<Step>>,
    /// Base tensor -> (adapter, key) saved in full that replaces it.
    pub replacements: BTreeMap<String, (usize, String)>,
    /// Tensors the base lacks (a new task head): (name, adapter, key).
    pub added: Vec<(String, usize, String)>,
    /// The first path component the adapter's module names have and the base's lack (`bert`).
    pub prefix: Option<String>,
    /// A resized vocabulary saved with the adapter.
    pub vocab_size: Option<usize>,
    /// Output embeddings that get a tensor of their own (the model is untied).
    pub untied: bool,
    pub warnings: Vec<String>,
}

/// Resolves PEFT module paths to base tensor names, tolerating the `base_model_prefix` being present on
/// one side only (e.g. `bert.encoder...` in the adapter, `encoder...` in a BertModel checkpoint).
struct Resolver<'a> {
    base: &'a Base,
    suffix_index: HashMap<String, Vec<&'a str>>,
}

enum Resolved {
    /// Same name, or the base lacks / has an extra first path component.
    Found(String),
    /// An output-embedding LoRA on a tied model: the delta lands in the input embedding.
    Tied(String),
    Missing,
}

impl<'a> Resolver<'a> {
    fn new(base: &'a Base) -> Self {
        let mut suffix_index: HashMap<String, Vec<&str>> = HashMap::new();
        for name in base.ck.tensor_names() {
            if let Some((_, rest)) = name.split_once('.') {
                suffix_index.entry(rest.to_string()).or_default().push(name);
            }
        }
        Resolver { base, suffix_index }
    }

    fn find(&self, param: &str) -> Option<String> {
        // PEFT saves names as modules are named in memory; transformers renames some on load (Mixtral's
        // `block_sparse_moe` is `mlp`, its router saved by `modules_to_save` included).
        experts::disk_modules(self.base.ck.model_type(), param)
            .iter()
            .find_map(|name| self.find_as_is(name))
    }

    fn find_as_is(&self, param: &str) -> Option<String> {
        let ck = &self.base.ck;
        if ck.contains(param) {
            return Some(param.to_string());
        }
        if let Some((_, rest)) = param.split_once('.') {
            if ck.contains(rest) {
                return Some(rest.to_string());
            }
        }
        match self.suffix_index.get(param).map(Vec::as_slice) {
            Some([one]) => Some(one.to_string()),
            _ => None,
        }
    }

    fn weight(&self, module: &str) -> Resolved {
        if let Some(k) = self.find(&format!("{module}.weight")) {
            return Resolved::Found(k);
        }
        let leaf = module.rsplit('.').next().unwrap_or(module);
        if OUTPUTS.contains(&leaf) {
            if let Some(k) = INPUT_EMBEDDINGS.iter().find(|k| self.base.ck.contains(k)) {
                return Resolved::Tied(k.to_string());
            }
        }
        Resolved::Missing
    }
}

pub fn shape_str(s: &[usize]) -> String {
    format!("[{}]", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

/// Where every adapter's modules and full tensors land; `weights` are the adapters' merge weights.
pub fn resolve(base: &Base, adapters: &[Adapter], weights: &[f32]) -> Result<Resolution> {
    let resolver = Resolver::new(base);
    let mut r = Resolution::default();
    for (ai, adapter) in adapters.iter().enumerate() {
        for m in &adapter.ignored_modules {
            r.warnings.push(format!(
                "{}: module {m} has LoRA tensors but the config does not target it; ignored (as PEFT does)",
                adapter.weights_path().display()
            ));
        }
        if adapter.modules.is_empty() {
            return Err(Error::adapter(
                &adapter.dir,
                "the adapter holds no LoRA module that its config targets",
            ));
        }
        resolve_modules(base, &resolver, adapter, ai, weights[ai], &mut r)?;
        resolve_saved(base, &resolver, adapters, ai, &mut r)?;
    }
    for (name, _, _) in &r.added {
        if let Some(other) = r.added.iter().filter(|(n, _, _)| n == name).nth(1) {
            return Err(Error::InvalidArgument(format!(
                "tensor {name} is saved in full by more than one adapter ({})",
                adapters[other.1].dir.display()
            )));
        }
    }
    Ok(r)
}

/// LoRA modules (and their `lora_B.bias`) onto base weights, each with the layout its delta takes.
fn resolve_modules(
    base: &Base,
    resolver: &Resolver,
    adapter: &Adapter,
    ai: usize,
    weight: f32,
    r: &mut Resolution,
) -> Result<()> {
    let path = adapter.weights_path();
    let model_type = base.ck.model_type();
    let mut missing = Vec::new();
    let mut resolved_any = false;
    for (mi, m) in adapter.modules.iter().enumerate() {
        if let Some(p) = &m.param {
            let find = |name: &str| {
                let key = resolver.find(name)?;
                let (_, entry) = base.ck.get(&key)?;
                Some((key.clone(), base.logical_shape(&key, entry)))
            };
            let landings = experts::locate(
                model_type,
                &m.module,
                p,
                (m.a_shape[1], m.b_shape[0]),
                adapter.config.param_layout,
                &find,
            )
            .map_err(|e| match e {
                Error::Shape { module, reason } => Error::shape(module, format!("{}: {reason}", path.display())),
                other => other,
            })?;
            for (key, transposed, slice) in landings {
                check_mergeable(base, &key, &format!("parameter {}", m.pattern_key()))?;
                let layout = if transposed { Layout::Transposed } else { Layout::Rows };
                r.contributions
                    .entry(key)
                    .or_default()
                    .push((ai, mi, layout, Some(slice)));
            }
            resolved_any = true;
            continue;
        }
        let (key, tied) = match resolver.weight(&m.module) {
            Resolved::Found(k) => (k, false),
            Resolved::Tied(k) => (k, true),
            Resolved::Missing => {
                missing.push(m.module.clone());
                continue;
            }
        };
        resolved_any = true;
        // The adapter names modules with a prefix the base lacks: remember it for renaming heads.
        if !tied && !key.starts_with(&m.module) {
            if let Some((head, rest)) = m.module.split_once('.') {
                if key.starts_with(rest) {
                    r.prefix.get_or_insert_with(|| head.to_string());
                }
            }
        }
        check_mergeable(base, &key, &format!("module {}", m.module))?;
        let (_, entry) = base.ck.get(&key).expect("resolved names exist");
        let ws = base.logical_shape(&key, entry);
        let (out_f, in_f) = (m.b_shape[0], m.a_shape[1]);
        let conv1d = is_conv1d(model_type, &m.module);
        let layout = match m.kind {
            LayerKind::Embedding if ws[..] == [in_f, out_f] => Layout::Transposed,
            LayerKind::Linear if conv1d && ws[..] == [in_f, out_f] => Layout::Transposed,
            LayerKind::Linear if !conv1d && ws[..] == [out_f, in_f] => Layout::Rows,
            LayerKind::Linear if adapter.config.fan_in_fan_out && ws[..] == [in_f, out_f] => Layout::Transposed,
            _ => {
                let kind = if m.kind == LayerKind::Embedding {
                    "embedding"
                } else {
                    "linear"
                };
                return Err(Error::shape(
                    &m.module,
                    format!(
                        "{}: {kind} LoRA with A {} and B {} does not fit base tensor {key} of shape {}",
                        path.display(),
                        shape_str(&m.a_shape),
                        shape_str(&m.b_shape),
                        shape_str(&ws)
                    ),
                ));
            }
        };
        r.contributions
            .entry(key.clone())
            .or_default()
            .push((ai, mi, layout, None));
        if let Some(bias) = &m.bias {
            let bias_key = resolver.find(&format!("{}.bias", m.module)).ok_or_else(|| {
                Error::shape(
                    &m.module,
                    "the adapter has lora_B.bias (lora_bias=true) but the base layer has no bias",
                )
            })?;
            r.bias_adds.entry(bias_key).or_default().push(Step::AddVector {
                adapter: ai,
                key: bias.clone(),
                coeff: weight * m.scaling,
            });
        }
    }
    if !resolved_any {
        return Err(Error::adapter(
            &adapter.dir,
            format!(
                "the adapter targets no module of the base {} (e.g. {}.weight is not in it)",
                base.ck.dir.display(),
                missing[0]
            ),
        ));
    }
    if let Some(m) = missing.first() {
        return Err(Error::shape(
            m,
            format!(
                "{}: the base {} has no tensor {m}.weight",
                path.display(),
                base.ck.dir.display()
            ),
        ));
    }
    Ok(())
}

/// A LoRA (`what`: the module or parameter) lands only in a float or a bitsandbytes 4-bit weight.
fn check_mergeable(base: &Base, key: &str, what: &str) -> Result<()> {
    let (_, entry) = base.ck.get(key).expect("resolved names exist");
    if base.value_type(key, entry).is_none() {
        return Err(Error::unsupported(
            &base.ck.dir,
            format!(
                "{what}: base tensor {key} has dtype {:?}; merging needs a float or bitsandbytes 4-bit weight",
                entry.dtype
            ),
        ));
    }
    Ok(())
}

/// Tensors saved in full (`modules_to_save` heads, a resized embedding): replacing base tensors, or
/// added where the base has none (a new task head).
fn resolve_saved(base: &Base, resolver: &Resolver, adapters: &[Adapter], ai: usize, r: &mut Resolution) -> Result<()> {
    let adapter = &adapters[ai];
    let path = adapter.weights_path();
    for saved in &adapter.saved {
        let module = saved.param.rsplit_once('.').map_or(saved.param.as_str(), |(m, _)| m);
        let target = match resolver.find(&saved.param) {
            Some(k) => k,
            None if adapter.config.is_module_to_save(module) => {
                r.untied |= OUTPUTS.iter().any(|h| saved.param == format!("{h}.weight"));
                r.added.push((saved.param.clone(), ai, saved.key.clone()));
                continue;
            }
            None => {
                r.warnings.push(format!(
                    "{}: tensor {} names no parameter of the base; ignored (as PEFT does)",
                    path.display(),
                    saved.key
                ));
                continue;
            }
        };
        if let Some((other, _)) = r.replacements.insert(target.clone(), (ai, saved.key.clone())) {
            return Err(Error::InvalidArgument(format!(
                "tensor {target} is saved in full by both {} and {}; merge them separately",
                adapters[other].dir.display(),
                adapter.dir.display()
            )));
        }
        let (_, entry) = base.ck.get(&target).expect("resolved");
        let base_shape = base.logical_shape(&target, entry);
        let st = adapter.file.get(&saved.key).expect("listed");
        // A resized vocabulary is the one shape change PEFT saves in full (embeddings, output head).
        let vocab_tensor =
            INPUT_EMBEDDINGS.contains(&target.as_str()) || OUTPUTS.iter().any(|h| target.starts_with(&format!("{h}.")));
        if st.shape != base_shape {
            if !(vocab_tensor && st.shape.len() == 2 && st.shape[1] == base_shape[1]) {
                return Err(Error::shape(
                    module,
                    format!(
                        "{}: saved tensor {} has shape {} but the base tensor {target} has {}",
                        path.display(),
                        saved.key,
                        shape_str(&st.shape),
                        shape_str(&base_shape)
                    ),
                ));
            }
            r.vocab_size = Some(st.shape[0]);
        }
    }
    Ok(())
}
