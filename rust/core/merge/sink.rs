//! Where a job's values go: rounded to a float type, or quantized to NF4/FP4 exactly as bitsandbytes
//! does (block absmax, codes, double quantization of the absmax, the quant-state JSON).
use crate::core::dtype::FloatType;
use crate::core::error::Result;
use crate::core::io::{SafetensorsFile, TensorEntry};
use crate::core::quant::checkpoint::quantized_names;
use crate::core::quant::{quantize_run, Absmax, NestedAbsmax};

use super::plan::{FourBit, Job};

/// Where output bytes are written: straight into the planned shards, or a scratch area first.
pub trait Dest: Sync {
    /// `bytes` at byte `at` of output tensor `tensor`.
    fn write(&self, tensor: &str, at: u64, bytes: &[u8]) -> Result<()>;
    /// A tensor copied unchanged from an input file.
    fn copy(&self, tensor: &str, file: &SafetensorsFile, entry: &TensorEntry) -> Result<()>;
    /// A quant-state JSON (its length decides the layout, so it may arrive last).
    fn state(&self, tensor: &str, json: &str) -> Result<()>;
    /// Merged values `[start, start + values.len())` of `tensor`, to be stored as `t` (`buf`: scratch);
    /// true if any is NaN or infinite, or becomes so in `t`. `values` may be left rounded to `t`. By
    /// default encoded and written as bytes.
    fn write_float(
        &self,
        tensor: &str,
        t: FloatType,
        start: usize,
        values: &mut [f32],
        buf: &mut Vec<u8>,
    ) -> Result<bool> {
        buf.resize(values.len() * t.size(), 0);
        let nonfinite = t.encode_checked(values, buf);
        self.write(tensor, (start * t.size()) as u64, buf)?;
        Ok(nonfinite)
    }
}

/// A weight being quantized, run by run of whole blocks.
pub struct FourBitSink {
    pub q: FourBit,
    /// f32 absmax of every block (the stored values before double quantization).
    pub absmax: Vec<f32>,
    packed: Vec<u8>,
    /// The codes of the last run, one per element.
    pub codes: Vec<u8>,
}

impl FourBitSink {
    pub fn new(q: FourBit, numel: usize) -> Self {
        FourBitSink {
            q,
            absmax: vec![0f32; numel.div_ceil(q.quant.blocksize)],
            packed: Vec::new(),
            codes: Vec::new(),
        }
    }

    /// Quantize elements [start, start + values.len()) (start at a block boundary) and write their codes.
    pub fn write(&mut self, dest: &dyn Dest, name: &str, start: usize, values: &[f32]) -> Result<()> {
        let bs = self.q.quant.blocksize;
        self.packed.resize(values.len().div_ceil(2), 0);
        let blocks = start / bs..(start + values.len()).div_ceil(bs);
        quantize_run(
            values,
            self.q.quant.quant_type,
            bs,
            &mut self.packed,
            &mut self.absmax[blocks],
            &mut self.codes,
        );
        dest.write(name, (start / 2) as u64, &self.packed)
    }

    /// Write the absmax (double-quantized or not), the code table and the quant state; the absmax values
    /// bitsandbytes will dequantize with.
    pub fn finish(self, dest: &dyn Dest, job: &Job) -> Result<Vec<f32>> {
        let quant = self.q.quant;
        let names = quantized_names(&job.out_name, quant.quant_type, quant.double_quant);
        let f32_bytes = |v: &[f32]| -> Vec<u8> { bytemuck::cast_slice(v).to_vec() };
        let absmax = if quant.double_quant {
            Absmax::Nested(NestedAbsmax::quantize(&self.absmax, quant.torch_threads))
        } else {
            Absmax::Plain(self.absmax)
        };
        let loaded = match &absmax {
            Absmax::Plain(a) => {
                dest.write(&names[1], 0, &f32_bytes(a))?;
                a.clone()
            }
            Absmax::Nested(nested) => {
                dest.write(&names[1], 0, &nested.codes)?;
                dest.write(&names[3], 0, &f32_bytes(&nested.nested_absmax))?;
                dest.write(&names[4], 0, &f32_bytes(&nested.code))?;
                nested.dequantize()
            }
        };
        dest.write(&names[2], 0, &f32_bytes(&quant.quant_type.table()))?;
        dest.state(
            names.last().expect("a quant state"),
            &job.state_json(self.q, Some(&absmax)),
        )?;
        Ok(loaded)
    }
}

/// The absmax bitsandbytes dequantizes with, for the f32 absmax of a weight quantized with `q` (double
/// quantization rounds it through 8 bits).
pub fn loaded_absmax(q: FourBit, absmax: &[f32]) -> Vec<f32> {
    if q.quant.double_quant {
        NestedAbsmax::quantize(absmax, q.quant.torch_threads).dequantize()
    } else {
        absmax.to_vec()
    }
}
