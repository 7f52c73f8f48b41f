//! Mixture-of-experts: LoRA on fused expert parameters (PEFT's `target_parameters`), and where each
//! expert's delta lands in the tensors a checkpoint actually stores.
//!
//! What PEFT does (peft 0.21.2, `peft/tuners/lora/layer.py`, `ParamWrapper`; the full account with
//! quotes is `docs/moe.md`):
//! - A 3-D parameter `[E, d1, d2]` gets `lora_A [E*r, in]` and `lora_B [out, E*r]` (`update_layer`).
//!   transformers' experts modules store `[E, out, in]` (used as `F.linear(x, W[e])`) unless they set
//!   `is_transposed` (GPT-OSS: `[E, in, out]`, used as `x @ W[e]`); PEFT swaps in/out accordingly.
//! - `get_delta_weight`: `A.reshape(E, r, in)` (expert-major rows) and `B.reshape(out, r, E)` (rank-major
//!   columns), `einsum("o r e, e r i -> e o i") * scaling`: expert e's delta is
//!   `s * B[:, e::E] @ A[e*r:(e+1)*r]`, transposed for `is_transposed` modules.
//! - Scaling: `lora_alpha / r` (rsLoRA `/ sqrt(r)`), r and alpha from `rank_pattern` / `alpha_pattern`
//!   matched against `module.param` (`LoraModel._create_and_replace`, `current_key`).
//! - Several parameters of one module nest: wrappers are made in the module's `named_parameters`
//!   order (`BaseTuner._inject_parameters`), each wrapping the last, so the first registered parameter
//!   is the innermost - saved under `module.base_layer.lora_A.weight` when two are targeted - and the
//!   last the outermost (`module.lora_A.weight`).
//! - The merge (`ParamWrapper.merge`) casts the delta to the parameter's dtype before adding it: two
//!   roundings for 16-bit models. lorafast computes the delta in f32 and rounds once, as for every
//!   other weight.
//!
//! On disk (transformers 5.25, `conversion_mapping.py`): Qwen2/3-MoE, OLMoE, DeepSeek and friends keep
//! one Linear per expert (`mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`), Mixtral likewise under
//! `block_sparse_moe` (`w1` gate, `w3` up, `w2` down). transformers stacks them on load and concatenates
//! gate before up into `gate_up_proj [E, 2I, H]`; `save_pretrained` splits them back the same way. So
//! the fused delta's first `I` rows land in the expert's gate weight and the rest in its up weight.
//! GPT-OSS stores the fused parameters as they are in memory (`gate_up_proj [E, H, 2I]`, gate and up
//! interleaved in its columns).
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use crate::core::error::{Error, Result};
use crate::core::io::SafetensorsFile;
use crate::core::peft::AdapterConfig;

/// The parameter a LoRA wraps, and how many experts it stacks (1: a plain 2-D parameter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertParam {
    pub name: String,
    pub experts: usize,
}

/// Which PEFT release's layout a LoRA on a 3-D expert parameter `[E, d1, d2]` has, from the config's
/// `peft_version` (PEFT records it from 0.18.0 on, `peft/config.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamLayout {
    /// PEFT 0.17-0.18 (`ParamWrapper.__init__`: `self.num_experts, self.in_features, self.out_features =
    /// param.shape`): every 3-D parameter is read as `(E, in, out)`, so A is `[E*r, d1]`, B `[d2, E*r]` and
    /// `get_delta_weight` is `einsum("o r e, e r i -> e i o")`: expert e's delta is `(B_e A_e)^T`, also for
    /// transformers 5's `[E, out, in]` experts, whose "in" it takes for the output.
    Unswapped,
    /// PEFT >= 0.19 (`update_layer`, `_did_swap_in_out_features`): in and out swapped for a 3-D parameter
    /// unless the experts module sets `is_transposed`, so "in" is always the matmul's input.
    Swapped,
    /// No `peft_version` (PEFT 0.17, or another writer): the base's shapes decide where they can.
    Unknown,
}

impl ParamLayout {
    /// From `peft_version` as PEFT writes it (`0.18.1`, `0.19.0.dev0`, `0.21.2@<commit>`).
    pub fn from_version(version: Option<&str>) -> ParamLayout {
        let Some(v) = version else {
            return ParamLayout::Unknown;
        };
        let mut parts = v.split(['.', '@', '+']).map(|p| p.parse::<u64>());
        match (parts.next(), parts.next()) {
            (Some(Ok(0)), Some(Ok(minor))) if minor < 19 => ParamLayout::Unswapped,
            (Some(Ok(_)), Some(Ok(_))) => ParamLayout::Swapped,
            _ => ParamLayout::Unknown,
        }
    }
}

/// The order transformers' experts modules register their parameters in (every MoE architecture
/// transformers 5 fuses: `Qwen3MoeExperts`, `MixtralExperts`, `GptOssExperts`, ...), which decides the
/// nesting of PEFT's wrappers.
const REGISTRATION_ORDER: [&str; 4] = ["gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"];

/// Models whose experts module sets `is_transposed` (`[E, in, out]`).
const TRANSPOSED_EXPERTS: [&str; 1] = ["gpt_oss"];

/// Models whose experts are `[E, out, in]` (transformers' default): their orientation is known even when
/// `in == out`.
const ROW_EXPERTS: [&str; 12] = [
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_next",
    "mixtral",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
    "minimax",
    "phimoe",
    "granitemoe",
    "ernie4_5_moe",
];

/// Module leaves PEFT renames into expert parameters when it loads a LoRA on these model types
/// (`peft/utils/transformers_weight_conversion.py`, `_convert_peft_config_moe`: every `target_modules` entry
/// ending in one of them becomes a `target_parameters` one, with `rank_pattern` 2r for gate/up), so a
/// `target_modules` LoRA on a dense MLP or shared expert with these names cannot be loaded there.
/// Model types from transformers 5.25's `_MODEL_TO_CONVERSION_PATTERN`.
pub fn peft_remapped_leaves(model_type: Option<&str>) -> &'static [&'static str] {
    const QWEN2_MOE: [&str; 27] = [
        "Dots3NoteTextModel",
        "afmoe",
        "deepseek_v2",
        "deepseek_v3",
        "deepseek_v32",
        "dots1",
        "ernie4_5_moe",
        "glm4_moe",
        "glm4_moe_lite",
        "glm_moe_dsa",
        "glm4v_moe",
        "longcat_flash",
        "solar_open",
        "mellum",
        "qwen3_moe",
        "beam",
        "qwen3_omni_moe",
        "qwen3_omni_moe_thinker",
        "qwen3_omni_moe_text",
        "qwen3_next",
        "hunyuan_v1_moe",
        "flex_olmo",
        "olmoe",
        "sarvam_mla",
        "exaone_moe",
        "cohere2_moe",
        "UnlimitedOcrTextModel",
    ];
    match model_type {
        Some(t) if QWEN2_MOE.contains(&t) => &["gate", "gate_proj", "up_proj", "down_proj"],
        Some("minimax" | "minimax_m2") => &["gate", "w1", "w3", "w2"],
        _ => &[],
    }
}

/// Module leaves that PEFT >= 0.22 also maps onto expert parameters when a `target_modules` entry ends in
/// one: besides the model types above, Qwen2-MoE (added to its own `_MODEL_TO_CONVERSION_PATTERN`), where a
/// bare `up_proj` aimed at the shared expert would pull in `experts.gate_up_proj` at rank 2r too. A name
/// qualified by its parent (`shared_expert.up_proj`) maps to no expert parameter and stays a module target.
pub fn peft_converted_leaves(model_type: Option<&str>) -> &'static [&'static str] {
    match model_type {
        Some("qwen2_moe") => &["gate", "gate_proj", "up_proj", "down_proj"],
        Some("mixtral") => &["gate", "w1", "w3", "w2"],
        _ => peft_remapped_leaves(model_type),
    }
}

/// A wrapper saved in the adapter file: the module it belongs to and the parameter it wraps.
#[derive(Debug, Clone)]
pub struct Wrapped {
    pub module: String,
    pub param: String,
}

/// The parameters of `module` that `target_parameters` selects (PEFT's match: `module.param` equal to
/// an entry or ending with `.entry`), in registration order.
pub fn targeted_params(config: &AdapterConfig, module: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for t in &config.target_parameters {
        let param = t.rsplit('.').next().unwrap_or(t);
        let key = format!("{module}.{param}");
        if (key == *t || key.ends_with(&format!(".{t}"))) && !found.iter().any(|f| f == param) {
            found.push(param.to_string());
        }
    }
    let rank = |p: &str| REGISTRATION_ORDER.iter().position(|r| *r == p);
    found.sort_by_key(|p| rank(p).unwrap_or(usize::MAX));
    found
}

/// Which saved wrappers (module paths with `.base_layer` nesting, as the adapter's keys give them) hold
/// a parameter LoRA, and of which parameter.
pub fn wrapped_params<'a>(
    config: &AdapterConfig,
    weights: &Path,
    wrappers: impl Iterator<Item = &'a str>,
) -> Result<HashMap<String, Wrapped>> {
    let mut out = HashMap::new();
    if config.target_parameters.is_empty() {
        return Ok(out);
    }
    // module -> the nesting depths saved for it
    let mut depths: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
    for w in wrappers {
        let (mut module, mut depth) = (w, 0);
        while let Some(inner) = module.strip_suffix(".base_layer") {
            module = inner;
            depth += 1;
        }
        depths
            .entry(module.to_string())
            .or_default()
            .push((depth, w.to_string()));
    }
    for (module, mut saved) in depths {
        let params = targeted_params(config, &module);
        if params.is_empty() {
            continue;
        }
        saved.sort();
        let nesting: Vec<usize> = saved.iter().map(|(d, _)| *d).collect();
        if nesting != (0..params.len()).collect::<Vec<_>>() {
            return Err(Error::adapter(
                weights,
                format!(
                    "module {module}: target_parameters selects {} of its parameters ({}), but the file holds {} \
                     LoRA wrapper(s) on it at nesting depths {nesting:?}; PEFT saves one per parameter",
                    params.len(),
                    params.join(", "),
                    saved.len()
                ),
            ));
        }
        if params.len() > 1 {
            if let Some(p) = params.iter().find(|p| !REGISTRATION_ORDER.contains(&p.as_str())) {
                return Err(Error::unsupported(
                    weights,
                    format!(
                        "module {module}: several parameters are targeted and the nesting order of {p} is unknown \
                         (lorafast knows {})",
                        REGISTRATION_ORDER.join(", ")
                    ),
                ));
            }
        }
        // The first registered parameter is the innermost wrapper (the deepest `base_layer`).
        let n = params.len();
        for (depth, wrapper) in saved {
            out.insert(
                wrapper,
                Wrapped {
                    module: module.clone(),
                    param: params[n - 1 - depth].clone(),
                },
            );
        }
    }
    Ok(out)
}

/// The wrapper path PEFT saves `module.param`'s LoRA under when the config targets `params` of the
/// module (registration order, as [`targeted_params`] gives them): the first registered is the innermost,
/// one `.base_layer` deeper per parameter registered after it.
pub fn wrapper_path(module: &str, param: &str, params: &[String]) -> String {
    let index = params
        .iter()
        .position(|p| p == param)
        .unwrap_or(params.len().saturating_sub(1));
    let depth = params.len().saturating_sub(1) - index.min(params.len().saturating_sub(1));
    format!("{module}{}", ".base_layer".repeat(depth))
}

/// The expert count of a parameter LoRA, from its factors: A `[E*r, in]`, B `[out, E*r]`.
pub fn param_shapes(weights: &Path, key: &str, r: usize, a: &[usize], b: &[usize]) -> Result<usize> {
    let fits = a.len() == 2 && b.len() == 2 && a[0].is_multiple_of(r) && a[0] > 0 && b[1] == a[0];
    if !fits {
        return Err(Error::shape(
            key,
            format!(
                "{}: parameter LoRA with A {a:?} and B {b:?} does not have PEFT's layout for rank {r} \
                 (A [experts * r, in], B [out, experts * r])",
                weights.display()
            ),
        ));
    }
    Ok(a[0] / r)
}

/// Which of a parameter LoRA's experts a stored tensor holds, and which rows of that expert's delta
/// (the delta as `[out, in]`, before any transpose).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertSlice {
    pub experts: usize,
    /// The one expert a per-expert tensor holds; None: the tensor stacks all of them (`[E, ., .]`).
    pub expert: Option<usize>,
    pub rows: Range<usize>,
    /// The factors are PEFT < 0.19's on an `[E, out, in]` parameter (`ParamLayout::Unswapped`): expert e's
    /// delta is `(B_e A_e)^T`, read as the factors `A_e^T` (B) and `B_e^T` (A) of the delta as `[out, in]`.
    pub unswapped: bool,
}

impl ExpertSlice {
    /// How many experts a tensor of this slice holds one after another.
    pub fn segments(&self) -> usize {
        if self.expert.is_some() {
            1
        } else {
            self.experts
        }
    }

    /// Expert e's factors of its delta as `[out, in]`, (A_e `[r, in]`, B_e of `rows` `[rows, r]`): A's rows
    /// `e*r..(e+1)*r` and, of B's `rows`, the columns `e, e+E, ...`; for `unswapped` factors the same
    /// read the other way round (B's columns are A_e^T, A's rows restricted to `rows` B_e^T).
    pub fn factors(
        &self,
        file: &SafetensorsFile,
        a: &str,
        b: &str,
        r: usize,
        segment: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let e = self.expert.unwrap_or(segment);
        if self.unswapped {
            // A `[E*r, d1]`: expert e's rows, their columns `rows` (d1 is the delta's out side).
            let a_e = file.read_f32_rows(a, e * r..(e + 1) * r)?;
            let d1 = a_e.len() / r.max(1);
            let mut b_e = Vec::with_capacity(self.rows.len() * r);
            for i in self.rows.clone() {
                b_e.extend((0..r).map(|k| a_e[k * d1 + i]));
            }
            // B `[d2, E*r]`: expert e's columns `e, e+E, ...`, transposed to `[r, d2]`.
            let bt = cached_rows(file, b, 0..file.rows(b))?;
            let width = r * self.experts;
            let d2 = bt.len() / width.max(1);
            let mut a_out = Vec::with_capacity(r * d2);
            for k in 0..r {
                a_out.extend((0..d2).map(|j| bt[j * width + k * self.experts + e]));
            }
            return Ok((a_out, b_e));
        }
        let a_e = file.read_f32_rows(a, e * r..(e + 1) * r)?;
        let rows = cached_rows(file, b, self.rows.clone())?;
        let width = rows.len() / self.rows.len().max(1);
        let mut b_e = Vec::with_capacity(self.rows.len() * r);
        for row in rows.chunks_exact(width.max(1)) {
            b_e.extend((0..r).map(|k| row[k * self.experts + e]));
        }
        Ok((a_e, b_e))
    }
}

/// B's rows `rows` as f32, read once for the experts that take their columns of them: the experts of one
/// parameter are merged one after another, each reading all `E*r` columns of the same rows and keeping
/// its `r`, so without this B is read E times over. The last few reads are kept per thread (bounded:
/// three row sets, the gate, up and down parts of a layer).
fn cached_rows(file: &SafetensorsFile, name: &str, rows: Range<usize>) -> Result<Arc<Vec<f32>>> {
    type Key = (u64, String, Range<usize>);
    thread_local! {
        static RECENT: RefCell<VecDeque<(Key, Arc<Vec<f32>>)>> = const { RefCell::new(VecDeque::new()) };
    }
    let key: Key = (file.id, name.to_string(), rows.clone());
    if let Some(hit) = RECENT.with(|c| c.borrow().iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone())) {
        return Ok(hit);
    }
    let values = Arc::new(file.read_f32_rows(name, rows)?);
    RECENT.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() >= 3 {
            c.pop_front();
        }
        c.push_back((key, values.clone()));
    });
    Ok(values)
}

/// How an experts module lays out a 3-D parameter: `[E, in, out]` (true) or `[E, out, in]`; None for a
/// model type whose experts lorafast does not know.
pub fn transposed(model_type: Option<&str>) -> Option<bool> {
    match model_type {
        Some(t) if TRANSPOSED_EXPERTS.contains(&t) => Some(true),
        Some(t) if ROW_EXPERTS.contains(&t) => Some(false),
        _ => None,
    }
}

/// The module's names on disk: itself, and for Mixtral its `block_sparse_moe` name (transformers 5
/// renames `.block_sparse_moe.` to `.mlp.` on load and back on save).
pub fn disk_modules(model_type: Option<&str>, module: &str) -> Vec<String> {
    let mut names = vec![module.to_string()];
    if model_type == Some("mixtral") && module.contains(".mlp.") {
        names.push(module.replace(".mlp.", ".block_sparse_moe."));
    }
    names
}

/// A fused parameter's per-expert Linear weights as checkpoints store them, the fused rows split in
/// equal parts in this order (transformers' `Concatenate(dim=1)` and its reverse `Chunk`).
fn per_expert_names(param: &str) -> &'static [&'static [&'static str]] {
    match param {
        "gate_up_proj" => &[&["gate_proj", "up_proj"], &["w1", "w3"]],
        "down_proj" => &[&["down_proj"], &["w2"]],
        _ => &[],
    }
}

/// The fused parameter a per-expert Linear of a checkpoint is part of in memory (`gate_proj` / `w1` and
/// `up_proj` / `w3` of `gate_up_proj`, `down_proj` / `w2` of `down_proj`), and its names in split order.
pub fn fused_param(leaf: &str) -> Option<(&'static str, &'static [&'static str])> {
    ["gate_up_proj", "down_proj"].into_iter().find_map(|p| {
        per_expert_names(p)
            .iter()
            .find(|names| names.contains(&leaf))
            .map(|names| (p, *names))
    })
}

/// The experts module's path in memory for its path on disk (Mixtral's `block_sparse_moe` is `mlp`).
pub fn memory_module(model_type: Option<&str>, disk: &str) -> String {
    if model_type == Some("mixtral") {
        disk.replace(".block_sparse_moe.", ".mlp.")
    } else {
        disk.to_string()
    }
}

/// Where a parameter LoRA's delta lands: (base tensor, the delta transposed in it, which expert rows).
pub type Landing = (String, bool, ExpertSlice);

/// Resolves a tensor name against the base: the name it has there and its (logical) shape.
pub type Find<'a> = &'a dyn Fn(&str) -> Option<(String, Vec<usize>)>;

/// Find the stored tensors of `module.param` (`find` resolves a name against the base's tensors and
/// returns its name and shape) and check each against the LoRA's shapes: A `[E*r, in_f]`, B `[out_f, E*r]`,
/// laid out as `layout` says.
pub fn locate(
    model_type: Option<&str>,
    module: &str,
    p: &ExpertParam,
    (in_f, out_f): (usize, usize),
    layout: ParamLayout,
    find: Find,
) -> Result<Vec<Landing>> {
    let swapped = || {
        locate_as(
            model_type,
            module,
            p,
            (in_f, out_f),
            transposed(model_type),
            false,
            find,
        )
    };
    // PEFT < 0.19's factors read the other way round: the delta as [out, in] is [in_f, out_f], un-transposed.
    let unswapped = || locate_as(model_type, module, p, (out_f, in_f), Some(false), true, find);
    // 2-D parameters, and experts modules that set `is_transposed`, are read the same by every release.
    if p.experts == 1 || transposed(model_type) == Some(true) {
        return swapped();
    }
    match layout {
        ParamLayout::Swapped => swapped(),
        ParamLayout::Unswapped => unswapped(),
        ParamLayout::Unknown if in_f == out_f => Err(Error::unsupported(
            module,
            format!(
                "parameter {module}.{}: adapter_config.json has no peft_version, and for a square expert weight \
                 PEFT < 0.19 and PEFT >= 0.19 lay out its LoRA factors differently (A [E*r, out] or [E*r, in]); \
                 add \"peft_version\" (the PEFT release that wrote the adapter) to adapter_config.json",
                p.name
            ),
        )),
        ParamLayout::Unknown => swapped().or_else(|e| unswapped().map_err(|_| e)),
    }
}

/// [`locate`] for one reading of the factors: `orientation` the experts module's (`[E, in, out]`: true),
/// `unswapped` carried into the slices.
fn locate_as(
    model_type: Option<&str>,
    module: &str,
    p: &ExpertParam,
    (in_f, out_f): (usize, usize),
    orientation: Option<bool>,
    unswapped: bool,
    find: Find,
) -> Result<Vec<Landing>> {
    let e_count = p.experts;
    let whole = |expert| ExpertSlice {
        experts: e_count,
        expert,
        rows: 0..out_f,
        unswapped,
    };
    let key = format!("{module}.{}", p.name);
    for m in disk_modules(model_type, module) {
        if let Some((name, shape)) = find(&format!("{m}.{}", p.name)) {
            if e_count == 1 {
                // A 2-D parameter: PEFT takes it as (out, in), like a Linear weight.
                if shape[..] != [out_f, in_f] {
                    return Err(mismatch(&key, &name, &shape, &format!("[{out_f}, {in_f}]")));
                }
                return Ok(vec![(name, false, whole(Some(0)))]);
            }
            if shape.len() != 3 || shape[0] != e_count {
                return Err(Error::shape(
                    &key,
                    format!(
                        "the adapter has {e_count} experts but the base tensor {name} has shape {shape:?} \
                         (expected [{e_count}, ., .])"
                    ),
                ));
            }
            let rows = [out_f, in_f];
            let cols = [in_f, out_f];
            let t = match orientation {
                Some(t) => t,
                None if in_f != out_f => shape[1..] == cols,
                None => {
                    return Err(Error::unsupported(
                        &name,
                        format!(
                            "parameter {key}: the orientation of a square expert weight cannot be decided for \
                             model_type {model_type:?} ([E, out, in] or [E, in, out])"
                        ),
                    ))
                }
            };
            let want = if t { cols } else { rows };
            if shape[1..] != want {
                return Err(mismatch(
                    &key,
                    &name,
                    &shape,
                    &format!("[{e_count}, {}, {}] for model_type {model_type:?}", want[0], want[1]),
                ));
            }
            return Ok(vec![(name, t, whole(None))]);
        }
        for names in per_expert_names(&p.name) {
            if find(&format!("{m}.0.{}.weight", names[0])).is_none() {
                continue;
            }
            let part = out_f / names.len();
            if part * names.len() != out_f {
                return Err(Error::shape(
                    &key,
                    format!(
                        "the delta's {out_f} rows do not split into {} equal parts ({})",
                        names.len(),
                        names.join(", ")
                    ),
                ));
            }
            let mut landings = Vec::new();
            for e in 0..e_count {
                for (k, n) in names.iter().enumerate() {
                    let stored = format!("{m}.{e}.{n}.weight");
                    let (name, shape) = find(&stored).ok_or_else(|| {
                        Error::shape(
                            &key,
                            format!("the adapter has {e_count} experts but the base has no tensor {stored}"),
                        )
                    })?;
                    if shape[..] != [part, in_f] {
                        return Err(mismatch(&key, &name, &shape, &format!("[{part}, {in_f}]")));
                    }
                    let slice = ExpertSlice {
                        experts: e_count,
                        expert: Some(e),
                        rows: k * part..(k + 1) * part,
                        unswapped,
                    };
                    landings.push((name, false, slice));
                }
            }
            let extra = format!("{m}.{e_count}.{}.weight", names[0]);
            if find(&extra).is_some() {
                return Err(Error::shape(
                    &key,
                    format!("the adapter has {e_count} experts but the base has more (it has {extra})"),
                ));
            }
            return Ok(landings);
        }
    }
    Err(Error::shape(
        &key,
        format!(
            "the base has no tensor for parameter {} of {module} (looked for {key} and per-expert weights)",
            p.name
        ),
    ))
}

fn mismatch(key: &str, name: &str, shape: &[usize], want: &str) -> Error {
    Error::shape(
        key,
        format!("base tensor {name} has shape {shape:?}, but the adapter's factors need {want}"),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn wrapper_paths_nest_the_first_registered_parameter_innermost() {
        let both = ["gate_up_proj".to_string(), "down_proj".to_string()];
        assert_eq!(wrapper_path("m", "gate_up_proj", &both), "m.base_layer");
        assert_eq!(wrapper_path("m", "down_proj", &both), "m");
        assert_eq!(wrapper_path("m", "gate_up_proj", &both[..1]), "m");
    }

    use super::*;
    use serde_json::json;

    /// An adapter file with A `[E*r, 2]` and B `[3, E*r]` in f32, B's values `offset + column`.
    fn factor_file(path: &Path, experts: usize, r: usize, offset: f32) -> SafetensorsFile {
        use crate::core::dtype::FloatType;
        use crate::core::io::{OutputFile, PlannedTensor};
        let planned = |name: &str, shape: Vec<usize>| PlannedTensor {
            name: name.into(),
            dtype: safetensors::Dtype::F32,
            shape,
        };
        let width = experts * r;
        let tensors = [planned("a", vec![width, 2]), planned("b", vec![3, width])];
        let out = OutputFile::create(path, &tensors, &HashMap::new()).unwrap();
        let encode = |values: Vec<f32>| {
            let mut bytes = vec![0u8; values.len() * 4];
            FloatType::F32.encode(&values, &mut bytes);
            bytes
        };
        out.write_at("a", 0, &encode(vec![1.0; width * 2])).unwrap();
        let b: Vec<f32> = (0..3 * width).map(|i| offset + (i % width) as f32).collect();
        out.write_at("b", 0, &encode(b)).unwrap();
        out.finish().unwrap();
        SafetensorsFile::open(path).unwrap()
    }

    /// B's rows are read once for all experts (kept per thread), and a file opened anew - rewritten at the
    /// same path - is read anew, never served from what an earlier opening read.
    #[test]
    fn experts_share_one_read_of_b_but_not_across_openings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adapter.safetensors");
        let (experts, r) = (2, 2);
        let slice = ExpertSlice {
            experts,
            expert: None,
            rows: 0..3,
            unswapped: false,
        };
        let file = factor_file(&path, experts, r, 0.0);
        // Rank-major: expert e's column k is B's column k*E + e.
        for e in 0..experts {
            let (_, b) = slice.factors(&file, "a", "b", r, e).unwrap();
            let want: Vec<f32> = (0..3)
                .flat_map(|_| (0..r).map(move |k| (k * experts + e) as f32))
                .collect();
            assert_eq!(b, want, "expert {e}");
        }
        drop(file);
        let file = factor_file(&path, experts, r, 100.0);
        let (_, b) = slice.factors(&file, "a", "b", r, 1).unwrap();
        assert_eq!(b[..2], [101.0, 103.0]);
    }

    fn cfg(targets: &[&str]) -> AdapterConfig {
        AdapterConfig::from_value(
            Path::new("adapter_config.json"),
            json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_parameters": targets}),
        )
        .unwrap()
    }

    #[test]
    fn nesting_follows_registration_order_not_the_config() {
        let m = "model.layers.0.mlp.experts";
        for targets in [
            ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"],
            ["gate_up_proj", "down_proj"],
        ] {
            let c = cfg(&targets);
            let saved = [format!("{m}.base_layer"), m.to_string()];
            let w = wrapped_params(&c, Path::new("a"), saved.iter().map(String::as_str)).unwrap();
            assert_eq!(w[&format!("{m}.base_layer")].param, "gate_up_proj");
            assert_eq!(w[m].param, "down_proj");
        }
        let c = cfg(&["down_proj"]);
        let w = wrapped_params(&c, Path::new("a"), [m].into_iter()).unwrap();
        assert_eq!(w[m].param, "down_proj");
        // A wrapper too many is refused, naming the module.
        let err = wrapped_params(&c, Path::new("a"), [m, &format!("{m}.base_layer")[..]].into_iter()).unwrap_err();
        assert!(err.to_string().contains(m), "{err}");
        // The match is dot-bounded, as PEFT's.
        assert!(targeted_params(&cfg(&["xperts.down_proj"]), m).is_empty());
    }

    fn finder(tensors: Vec<(&'static str, Vec<usize>)>) -> impl Fn(&str) -> Option<(String, Vec<usize>)> {
        move |n: &str| {
            tensors
                .iter()
                .find(|(t, _)| *t == n)
                .map(|(t, s)| (t.to_string(), s.clone()))
        }
    }

    #[test]
    fn per_expert_checkpoints_take_gate_rows_then_up_rows() {
        let mut t = Vec::new();
        for e in ["0", "1"] {
            for n in ["w1", "w3"] {
                t.push((
                    &*format!("model.layers.0.block_sparse_moe.experts.{e}.{n}.weight").leak(),
                    vec![6, 8],
                ));
            }
        }
        let p = ExpertParam {
            name: "gate_up_proj".into(),
            experts: 2,
        };
        let l = locate(
            Some("mixtral"),
            "model.layers.0.mlp.experts",
            &p,
            (8, 12),
            ParamLayout::Swapped,
            &finder(t.clone()),
        )
        .unwrap();
        assert_eq!(l.len(), 4);
        assert_eq!(l[1].0, "model.layers.0.block_sparse_moe.experts.0.w3.weight");
        assert_eq!(l[1].2.rows, 6..12);
        assert_eq!(l[2].2.expert, Some(1));
        // Three experts in the adapter, two in the base.
        let p3 = ExpertParam {
            experts: 3,
            ..p.clone()
        };
        let err = locate(
            Some("mixtral"),
            "model.layers.0.mlp.experts",
            &p3,
            (8, 12),
            ParamLayout::Swapped,
            &finder(t),
        )
        .unwrap_err();
        assert!(err.to_string().contains("experts.2.w1.weight"), "{err}");
    }

    #[test]
    fn peft_versions_before_0_19_have_the_unswapped_layout() {
        use ParamLayout::*;
        for (v, want) in [
            (Some("0.18.1"), Unswapped),
            (Some("0.18.0.dev0"), Unswapped),
            (Some("0.19.0"), Swapped),
            (Some("0.21.2@3f1a2b"), Swapped),
            (Some("1.0.0"), Swapped),
            (Some("dev"), Unknown),
            (None, Unknown),
        ] {
            assert_eq!(ParamLayout::from_version(v), want, "{v:?}");
        }
    }

    #[test]
    fn unswapped_factors_land_transposed_in_per_expert_and_fused_tensors() {
        // Qwen3-MoE gate_up_proj [E=2, 2I=6, H=4] in memory; PEFT 0.18 saved A [E*r, 6], B [4, E*r].
        let p = ExpertParam {
            name: "gate_up_proj".into(),
            experts: 2,
        };
        let m = "model.layers.0.mlp.experts";
        let mut t = Vec::new();
        for e in ["0", "1"] {
            for n in ["gate_proj", "up_proj"] {
                t.push((&*format!("{m}.{e}.{n}.weight").leak(), vec![3, 4]));
            }
        }
        let l = locate(
            Some("qwen3_moe"),
            m,
            &p,
            (6, 4),
            ParamLayout::Unswapped,
            &finder(t.clone()),
        )
        .unwrap();
        assert_eq!(l.len(), 4);
        assert!(l.iter().all(|(_, transposed, s)| !transposed && s.unswapped));
        assert_eq!(l[1].2.rows, 3..6);
        // Read as PEFT >= 0.19 the same factors do not fit, and with no version the shapes decide.
        assert!(locate(
            Some("qwen3_moe"),
            m,
            &p,
            (6, 4),
            ParamLayout::Swapped,
            &finder(t.clone())
        )
        .is_err());
        let u = locate(Some("qwen3_moe"), m, &p, (6, 4), ParamLayout::Unknown, &finder(t)).unwrap();
        assert!(u[0].2.unswapped);
        // GPT-OSS sets is_transposed: every release reads it alike.
        let gpt = finder(vec![("model.layers.0.mlp.experts.gate_up_proj", vec![2, 4, 6])]);
        let g = locate(Some("gpt_oss"), m, &p, (4, 6), ParamLayout::Unswapped, &gpt).unwrap();
        assert!(g[0].1 && !g[0].2.unswapped);
        // A square weight with no version cannot be read either way.
        let square = finder(vec![("model.layers.0.mlp.experts.gate_up_proj", vec![2, 4, 4])]);
        let err = locate(Some("qwen3_moe"), m, &p, (4, 4), ParamLayout::Unknown, &square).unwrap_err();
        assert!(err.to_string().contains("peft_version"), "{err}");
    }

    #[test]
    fn fused_orientation_comes_from_the_architecture() {
        let p = ExpertParam {
            name: "gate_up_proj".into(),
            experts: 4,
        };
        let gpt = finder(vec![("model.layers.0.mlp.experts.gate_up_proj", vec![4, 8, 16])]);
        let l = locate(
            Some("gpt_oss"),
            "model.layers.0.mlp.experts",
            &p,
            (8, 16),
            ParamLayout::Swapped,
            &gpt,
        )
        .unwrap();
        assert!(l[0].1 && l[0].2.expert.is_none());
        // The same tensor in a model whose experts are [E, out, in] does not fit.
        assert!(locate(
            Some("qwen3_moe"),
            "model.layers.0.mlp.experts",
            &p,
            (8, 16),
            ParamLayout::Swapped,
            &gpt
        )
        .is_err());
        let square = finder(vec![("model.layers.0.mlp.experts.gate_up_proj", vec![4, 8, 8])]);
        let err = locate(
            Some("unknown_moe"),
            "model.layers.0.mlp.experts",
            &p,
            (8, 8),
            ParamLayout::Swapped,
            &square,
        )
        .unwrap_err();
        assert!(err.to_string().contains("orientation"), "{err}");
        let l = locate(
            Some("qwen3_moe"),
            "model.layers.0.mlp.experts",
            &p,
            (8, 8),
            ParamLayout::Swapped,
            &square,
        )
        .unwrap();
        assert!(!l[0].1);
    }
}
