//! Where a tensor's values come from: a float tensor of a checkpoint (or an adapter), or a bitsandbytes
//! 4-bit weight dequantized exactly as bitsandbytes does (`table[code] * absmax`, cast to the quant
//! state's dtype). Values are read as f32, a run of elements at a time.
use std::collections::BTreeMap;
use std::path::Path;

use crate::core::checkpoint::Checkpoint;
use crate::core::dtype::{simd, FloatType};
use crate::core::error::{Error, Result};
use crate::core::io::{SafetensorsFile, TensorEntry};
use crate::core::layers::is_conv1d;
use crate::core::quant::checkpoint::{quantized_weights, stored_absmax, StoredState};
use crate::core::quant::{dequantize_run, QuantType};

/// The base checkpoint, float or 4-bit.
pub struct Base {
    pub ck: Checkpoint,
    /// Each 4-bit weight's quant state, by weight name.
    pub quant: BTreeMap<String, StoredState>,
}

/// The tensors bitsandbytes stores beside a 4-bit weight `W`: `W.absmax`, `W.quant_map`, ...
const AUX_SUFFIXES: [&str; 4] = [".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"];
const STATE_TAG: &str = ".quant_state.bitsandbytes__";

impl Base {
    pub fn open(dir: &Path) -> Result<Self> {
        let ck = Checkpoint::open(dir)?;
        let quant = quantized_weights(&ck)?;
        Ok(Base { ck, quant })
    }

    pub fn is_quantized(&self) -> bool {
        !self.quant.is_empty()
    }

    /// The 4-bit weight an auxiliary tensor (absmax, quant state, ...) belongs to.
    pub fn aux_owner(&self, name: &str) -> Option<&str> {
        let owner = match name.split_once(STATE_TAG) {
            Some((w, _)) => w,
            None => AUX_SUFFIXES.iter().find_map(|s| name.strip_suffix(s))?,
        };
        self.quant.get_key_value(owner).map(|(k, _)| k.as_str())
    }

    /// Whether a 4-bit weight is stored transposed (GPT-2 Conv1D: transformers quantizes the transpose).
    pub fn transposed(&self, weight: &str) -> bool {
        let st = &self.quant[weight];
        st.shape.len() == 2 && is_conv1d(self.ck.model_type(), weight.strip_suffix(".weight").unwrap_or(weight))
    }

    /// The shape the model sees: a 4-bit weight's from its quant state (transposed back for Conv1D).
    pub fn logical_shape(&self, name: &str, entry: &TensorEntry) -> Vec<usize> {
        match self.quant.get(name) {
            Some(st) if self.transposed(name) => vec![st.shape[1], st.shape[0]],
            Some(st) => st.shape.clone(),
            None => entry.shape.clone(),
        }
    }

    /// The float type of a tensor's values as loaded (a 4-bit weight: its quant state's dtype).
    pub fn value_type(&self, name: &str, entry: &TensorEntry) -> Option<FloatType> {
        match self.quant.get(name) {
            Some(st) => Some(st.dtype),
            None => entry.float_type(),
        }
    }
}

/// One tensor's values, ready to be read a run of elements at a time (in its logical layout).
pub enum Source<'a> {
    Float {
        file: &'a SafetensorsFile,
        entry: &'a TensorEntry,
        ft: FloatType,
    },
    FourBit {
        file: &'a SafetensorsFile,
        packed: &'a TensorEntry,
        quant_type: QuantType,
        blocksize: usize,
        dtype: FloatType,
        absmax: Vec<f32>,
    },
    /// Values read whole and held (a transposed 4-bit weight: small GPT-2 Conv1D layers).
    Held { values: Vec<f32>, ft: FloatType },
}

impl<'a> Source<'a> {
    pub fn float(file: &'a SafetensorsFile, entry: &'a TensorEntry) -> Result<Self> {
        let ft = entry.float_type().ok_or_else(|| Error::Safetensors {
            path: file.path.clone(),
            reason: format!(
                "tensor {} has dtype {:?}, expected a float type",
                entry.name, entry.dtype
            ),
        })?;
        Ok(Source::Float { file, entry, ft })
    }

    pub fn four_bit(base: &'a Base, weight: &str) -> Result<Self> {
        let st = &base.quant[weight];
        let absmax = stored_absmax(&base.ck, weight, st)?;
        let (si, packed) = base.ck.get(weight).expect("a quant state's weight exists");
        let file = &base.ck.shards[si];
        let n: usize = st.shape.iter().product();
        if absmax.len() != n.div_ceil(st.blocksize) {
            return Err(Error::Safetensors {
                path: file.path.clone(),
                reason: format!(
                    "tensor {weight}: {} absmax values do not fit shape {:?} at blocksize {}",
                    absmax.len(),
                    st.shape,
                    st.blocksize
                ),
            });
        }
        let source = Source::FourBit {
            file,
            packed,
            quant_type: st.quant_type,
            blocksize: st.blocksize,
            dtype: st.dtype,
            absmax,
        };
        if !base.transposed(weight) {
            return Ok(source);
        }
        // Stored as (out, in): read it whole and hand it out as the (in, out) the model sees.
        let (rows, cols) = (st.shape[0], st.shape[1]);
        let mut stored = vec![0f32; n];
        source.read(0, &mut stored, &mut Vec::new())?;
        let mut values = vec![0f32; n];
        for r in 0..rows {
            for c in 0..cols {
                values[c * rows + r] = stored[r * cols + c];
            }
        }
        Ok(Source::Held { values, ft: st.dtype })
    }

    /// The float type the values are exact in.
    pub fn value_type(&self) -> FloatType {
        match self {
            Source::Float { ft, .. } | Source::Held { ft, .. } => *ft,
            Source::FourBit { dtype, .. } => *dtype,
        }
    }

    /// Elements [start, start + out.len()) as f32. `raw` is scratch space the caller keeps between calls.
    /// A 4-bit source needs `start` even (two codes a byte).
    pub fn read(&self, start: usize, out: &mut [f32], raw: &mut Vec<u32>) -> Result<()> {
        let len = out.len();
        match self {
            Source::Float { file, entry, ft } => {
                raw.resize((len * ft.size()).div_ceil(4), 0);
                let bytes = &mut bytemuck::cast_slice_mut::<u32, u8>(raw)[..len * ft.size()];
                file.read_bytes(entry, (start * ft.size()) as u64, bytes)?;
                match ft {
                    FloatType::F32 => out.copy_from_slice(bytemuck::cast_slice(bytes)),
                    _ => ft.decode_u16(bytemuck::cast_slice(bytes), out),
                }
            }
            Source::FourBit {
                file,
                packed,
                quant_type,
                blocksize,
                dtype,
                absmax,
            } => {
                debug_assert!(start.is_multiple_of(2), "4-bit reads start on a byte");
                let nbytes = len.div_ceil(2);
                raw.resize(nbytes.div_ceil(4), 0);
                let bytes = &mut bytemuck::cast_slice_mut::<u32, u8>(raw)[..nbytes];
                file.read_bytes(packed, (start / 2) as u64, bytes)?;
                dequantize_run(bytes, absmax, *quant_type, *blocksize, start, out);
                // bitsandbytes casts the f32 product to the quant state's dtype.
                round_to(*dtype, out);
            }
            Source::Held { values, .. } => out.copy_from_slice(&values[start..start + len]),
        }
        Ok(())
    }
}

/// Round f32 values to a narrower float type, in place.
pub fn round_to(t: FloatType, w: &mut [f32]) {
    match t {
        FloatType::F32 => {}
        FloatType::BF16 => simd::round_bf16(w),
        FloatType::F16 => w.iter_mut().for_each(|v| *v = t.round_trip(*v)),
    }
}
