//! The type of every GGUF tensor: `convert_hf_to_gguf.py --outtype` for f32/f16/bf16/q8_0, and for the
//! 4-bit mixes what `llama-quantize` picks when given the converter's output in the model's own dtype
//! (`llama_tensor_get_type` in `src/llama-quant.cpp`, without an importance matrix).
use super::arch::Arch;
use super::quants::GgmlType;

/// `--type`: a converter output type or a `llama-quantize` file type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4KM,
    Q5KM,
    Q6K,
}

impl FileType {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "f32" => FileType::F32,
            "f16" => FileType::F16,
            "bf16" => FileType::BF16,
            "q8_0" => FileType::Q8_0,
            "q4_0" => FileType::Q4_0,
            "q4_k_m" => FileType::Q4KM,
            "q5_k_m" => FileType::Q5KM,
            "q6_k" => FileType::Q6K,
            _ => return None,
        })
    }

    pub const NAMES: &'static str = "f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k";

    /// `general.file_type` (`llama_ftype`).
    pub fn id(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q8_0 => 7,
            FileType::Q4KM => 15,
            FileType::Q5KM => 17,
            FileType::Q6K => 18,
            FileType::BF16 => 32,
        }
    }

    /// Written by `llama-quantize` (from the converter's output in the model's dtype), not the converter.
    pub fn is_quantize_mix(self) -> bool {
        matches!(self, FileType::Q4_0 | FileType::Q4KM | FileType::Q5KM | FileType::Q6K)
    }

    /// The converter's ggml type for a matrix.
    fn outtype(self) -> GgmlType {
        match self {
            FileType::F32 => GgmlType::F32,
            FileType::F16 => GgmlType::F16,
            FileType::BF16 => GgmlType::BF16,
            FileType::Q8_0 => GgmlType::Q8_0,
            _ => unreachable!("a llama-quantize mix has no converter outtype"),
        }
    }

    /// `llama_ftype_get_default_type`.
    fn default_type(self) -> GgmlType {
        match self {
            FileType::Q4_0 => GgmlType::Q4_0,
            FileType::Q4KM => GgmlType::Q4K,
            FileType::Q5KM => GgmlType::Q5K,
            FileType::Q6K => GgmlType::Q6K,
            other => other.outtype(),
        }
    }
}

/// The converter's type for tensor `name` (numpy `shape`) under `outtype` (`ModelBase.prepare_tensors`):
/// vectors, norms, biases, position embeddings and token types stay F32; q8_0 falls back to F16 for
/// rows that are not whole blocks.
pub fn converter_type(name: &str, shape: &[usize], outtype: FileType) -> GgmlType {
    // The router and the shared expert's gate stay f32 (the converter's list, as llama-quantize's).
    let forced_f32 = matches!(name, "position_embd.weight" | "token_types.weight")
        || name.ends_with(".ffn_gate_inp.weight")
        || name.ends_with(".ffn_gate_inp_shexp.weight");
    let suffix_ok = name.ends_with(".weight") || name.ends_with(".lora_a") || name.ends_with(".lora_b");
    if shape.len() <= 1 || name.ends_with("_norm.weight") || forced_f32 || !suffix_ok {
        return GgmlType::F32;
    }
    let t = outtype.outtype();
    if t == GgmlType::Q8_0 && shape.last().copied().unwrap_or(0) % 32 != 0 {
        return GgmlType::F16;
    }
    t
}

/// `llama-quantize`'s state over the model: tensors are visited in its order (see `quantize_order`), and
/// the attn_v / ffn_down counters choose which layers get more bits.
pub struct QuantizeMix {
    ftype: FileType,
    n_attention_wv: usize,
    n_layer: usize,
    i_attention_wv: usize,
    i_ffn_down: usize,
    tied_embeddings: bool,
    /// Llama with 80 layers and grouped-query attention (`LLM_TYPE_70B`).
    is_70b: bool,
    /// `{arch}.expert_count` (0 for a dense model): 8 experts get more bits in attention; with experts,
    /// ffn_down's layer is read from its name.
    n_expert: usize,
}

/// `ggml_n_dims`: trailing extents of 1 do not count (GGUF dims are numpy's shape reversed).
pub fn ggml_n_dims(shape: &[usize]) -> usize {
    let ne: Vec<usize> = shape.iter().rev().copied().collect();
    (1..ne.len()).rev().find(|&i| ne[i] > 1).map_or(1, |i| i + 1)
}

impl QuantizeMix {
    /// `names` are every GGUF tensor name; `n_layer` is `{arch}.block_count`.
    pub fn new(
        ftype: FileType,
        arch: Arch,
        names: &[&str],
        n_layer: usize,
        n_head: usize,
        n_head_kv: usize,
        n_expert: usize,
    ) -> Self {
        let n_attention_wv = names
            .iter()
            .filter(|n| n.contains("attn_v.weight") || n.contains("attn_qkv.weight") || n.contains("attn_kv_b.weight"))
            .count();
        QuantizeMix {
            ftype,
            n_attention_wv,
            n_layer,
            i_attention_wv: 0,
            i_ffn_down: 0,
            tied_embeddings: !names.contains(&"output.weight"),
            is_70b: arch == Arch::Llama && n_layer == 80 && n_head != n_head_kv,
            n_expert,
        }
    }

    /// The type of the next tensor in quantize order, whose converter type is `input`.
    pub fn next(&mut self, name: &str, shape: &[usize], input: GgmlType) -> GgmlType {
        if !allows_quantization(name, shape) {
            return input;
        }
        let ne0 = shape.last().copied().unwrap_or(1);
        let use_more_bits = |i: usize, n: usize| i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64) % 3 == 2;
        let mut t = self.ftype.default_type();
        let category = category(name);
        let k_mix = matches!(self.ftype, FileType::Q4KM | FileType::Q5KM);
        match category {
            Category::Output | Category::TokenEmbd if category == Category::Output || self.tied_embeddings => {
                if ne0 % t.block_size() != 0 {
                    t = GgmlType::Q8_0;
                } else if t != GgmlType::Q8_0 {
                    t = GgmlType::Q6K;
                }
            }
            Category::Output | Category::TokenEmbd => {}
            Category::AttnV | Category::AttnQkv => {
                if k_mix && use_more_bits(self.i_attention_wv, self.n_attention_wv) {
                    t = GgmlType::Q6K;
                }
                if self.is_70b && t == GgmlType::Q4K {
                    t = GgmlType::Q5K;
                }
                if self.n_expert == 8 {
                    t = GgmlType::Q8_0; // "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
                }
                self.i_attention_wv += 1;
            }
            Category::AttnK if self.n_expert == 8 => t = GgmlType::Q8_0,
            Category::AttnOutput if self.n_expert == 8 && self.ftype == FileType::Q4KM => t = GgmlType::Q5K,
            Category::AttnK | Category::AttnOutput => {}
            Category::FfnDown => {
                // Experts are not consecutive in the file: llama-quantize takes the layer from the name.
                let layer = if self.n_expert > 1 {
                    layer_of(name).unwrap_or(self.i_ffn_down)
                } else {
                    self.i_ffn_down
                };
                if k_mix && use_more_bits(layer, self.n_layer) {
                    t = GgmlType::Q6K;
                }
                self.i_ffn_down += 1;
            }
            Category::Other => {}
        }
        fallback(t, ne0)
    }
}

fn allows_quantization(name: &str, shape: &[usize]) -> bool {
    ggml_n_dims(shape) >= 2
        && name.ends_with("weight")
        && !name.contains("_norm.weight")
        && !name.contains("ffn_gate_inp.weight") // the router
        && name != "position_embd.weight"
        && name != "token_types.weight"
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Category {
    Output,
    TokenEmbd,
    AttnQkv,
    AttnV,
    AttnK,
    AttnOutput,
    FfnDown,
    Other,
}

/// N of a `blk.N.` name.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split_once('.')?.0.parse().ok()
}

/// `tensor_get_category`, reduced to the categories whose rules apply to these mixes.
fn category(name: &str) -> Category {
    if name == "output.weight" {
        Category::Output
    } else if name == "token_embd.weight" {
        Category::TokenEmbd
    } else if name.contains("attn_qkv.weight") {
        Category::AttnQkv
    } else if name.contains("attn_v.weight") {
        Category::AttnV
    } else if name.contains("attn_k.weight") {
        Category::AttnK
    } else if name.contains("attn_q.weight") {
        Category::Other
    } else if name.contains("attn_output.weight") {
        Category::AttnOutput
    } else if ["ffn_up", "ffn_gate"].iter().any(|p| name.contains(p)) {
        Category::Other
    } else if name.contains("ffn_down") {
        Category::FfnDown
    } else {
        Category::Other
    }
}

/// `tensor_type_fallback`: rows that are not whole blocks of the chosen type.
fn fallback(t: GgmlType, ne0: usize) -> GgmlType {
    if ne0.is_multiple_of(t.block_size()) {
        return t;
    }
    let f = match t {
        GgmlType::Q4K => GgmlType::Q5_0,
        GgmlType::Q5K => GgmlType::Q5_1,
        GgmlType::Q6K => GgmlType::Q8_0,
        other => other,
    };
    if !ne0.is_multiple_of(f.block_size()) {
        GgmlType::F16
    } else {
        f
    }
}

/// `llama-quantize`'s tensor order (`weight_name_comparer`): tensors outside blocks first, by name, then
/// block by block in numeric order, by name within a block.
pub fn quantize_order(names: &[&str]) -> Vec<usize> {
    let key = |n: &str| -> (i64, String) {
        let layer = n
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|d| d.parse::<i64>().ok())
            .unwrap_or(-1);
        (layer, n.to_string())
    };
    let mut idx: Vec<usize> = (0..names.len()).collect();
    idx.sort_by_key(|&i| key(names[i]));
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_bits_layers_match_llama_cpp() {
        // The use_more_bits layer sets llama.cpp's rule gives for 12 and 32 layers.
        let layers = |n: usize| -> Vec<usize> {
            let names: Vec<String> = (0..n).map(|i| format!("blk.{i}.attn_v.weight")).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let mut mix = QuantizeMix::new(FileType::Q4KM, Arch::Llama, &refs, n, 8, 8, 0);
            (0..n)
                .filter(|&i| mix.next(&names[i], &[4096, 4096], GgmlType::BF16) == GgmlType::Q6K)
                .collect()
        };
        assert_eq!(layers(12), vec![0, 3, 6, 9, 10, 11]);
        assert_eq!(
            layers(32),
            vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
    }

    #[test]
    fn tied_embeddings_fallbacks_and_copies() {
        let names = ["token_embd.weight", "blk.0.ffn_up.weight", "blk.0.attn_norm.weight"];
        let mut mix = QuantizeMix::new(FileType::Q4_0, Arch::Qwen2, &names, 1, 2, 2, 0);
        assert_eq!(
            mix.next("token_embd.weight", &[1000, 896], GgmlType::BF16),
            GgmlType::Q8_0
        );
        assert_eq!(
            mix.next("blk.0.ffn_up.weight", &[100, 896], GgmlType::BF16),
            GgmlType::Q4_0
        );
        assert_eq!(mix.next("blk.0.attn_norm.weight", &[896], GgmlType::F32), GgmlType::F32);
        let mut mix = QuantizeMix::new(FileType::Q4KM, Arch::Bert, &names, 1, 2, 2, 0);
        assert_eq!(
            mix.next("blk.0.ffn_up.weight", &[1536, 384], GgmlType::F32),
            GgmlType::Q5_0
        );
        assert_eq!(
            mix.next("blk.0.ffn_up.weight", &[1536, 40], GgmlType::F32),
            GgmlType::F16
        );
        assert_eq!(ggml_n_dims(&[1, 384]), 1);
        assert_eq!(ggml_n_dims(&[2, 384]), 2);
        assert_eq!(
            converter_type("blk.0.attn_q.weight", &[64, 48], FileType::Q8_0),
            GgmlType::F16
        );
        assert_eq!(
            converter_type("token_types.weight", &[2, 64], FileType::BF16),
            GgmlType::F32
        );
    }

    #[test]
    fn quantize_order_is_numeric_by_block() {
        let names = [
            "blk.10.attn_q.weight",
            "token_embd.weight",
            "blk.2.attn_k.weight",
            "output_norm.weight",
            "blk.2.attn_k.bias",
        ];
        let order: Vec<&str> = quantize_order(&names).into_iter().map(|i| names[i]).collect();
        assert_eq!(
            order,
            [
                "output_norm.weight",
                "token_embd.weight",
                "blk.2.attn_k.bias",
                "blk.2.attn_k.weight",
                "blk.10.attn_q.weight"
            ]
        );
    }
}
