//! Storage precisions of weights, activations and optimizer state.
//!
//! Sources for the quantized formats:
//! - NF4: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023), §3 and
//!   bitsandbytes `functional.quantize_4bit`: two 4-bit codes per byte, one fp32 absmax per block
//!   of 64 weights; with double quantization the absmax values are themselves quantized to 8 bit
//!   in blocks of 256 with one fp32 scale per block plus one fp32 offset per tensor.
//! - INT8: Dettmers et al., "LLM.int8()" (2022) and bitsandbytes `Int8Params`: one int8 per
//!   weight plus one fp32 scale (`SCB`) per output row.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// A numeric storage format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Fp16,
    Bf16,
    Int8,
    Nf4,
}

/// NF4 block size (bitsandbytes `blocksize=64`, the QLoRA default).
pub const NF4_BLOCK: u128 = 64;
/// Double-quantization block size over the absmax values (bitsandbytes `blocksize=256`).
pub const NF4_DQ_BLOCK: u128 = 256;

impl Precision {
    pub const ALL: [Precision; 5] = [
        Precision::Fp32,
        Precision::Fp16,
        Precision::Bf16,
        Precision::Int8,
        Precision::Nf4,
    ];

    /// Whether this format can hold activations and gradients (a float format).
    pub fn is_float(self) -> bool {
        matches!(self, Precision::Fp32 | Precision::Fp16 | Precision::Bf16)
    }

    /// Bytes per element of a float format (fp32 4, fp16/bf16 2). Quantized formats have no
    /// per-element byte size; use [`Precision::storage_bytes`].
    pub fn float_bytes(self) -> u128 {
        match self {
            Precision::Fp32 => 4,
            Precision::Fp16 | Precision::Bf16 => 2,
            Precision::Int8 | Precision::Nf4 => {
                unreachable!("{self} is not a float format; callers check is_float first")
            }
        }
    }

    /// Bytes to store a weight matrix of `rows × cols` elements in this format, split into
    /// (data, quantization constants).
    pub fn storage_bytes(self, rows: u128, cols: u128, double_quant: bool) -> (u128, u128) {
        let n = rows * cols;
        match self {
            Precision::Fp32 | Precision::Fp16 | Precision::Bf16 => (n * self.float_bytes(), 0),
            // LLM.int8: int8 data + fp32 row-wise absmax scale (SCB) per output row.
            Precision::Int8 => (n, rows * 4),
            Precision::Nf4 => (n.div_ceil(2), nf4_constants_bytes(n, double_quant)),
        }
    }
}

/// Bytes of NF4 quantization constants for a tensor of `n` weights.
///
/// bitsandbytes `QuantState` per tensor: the absmax values — one fp32 per 64-block, or with
/// double quantization (`compress_statistics=True`) one uint8 per 64-block plus one fp32 per 256
/// of those and an fp32 offset — and the 16-entry fp32 NF4 code table; double quantization adds
/// the 256-entry fp32 dynamic map of the nested state. Checked byte for byte against the
/// `quant_state_bytes` measured on the H200 (`tests/data/h200-pytorch.jsonl`) (1B: 15,564,224 with, 60,824,576
/// without double quantization).
// ANCHOR: nf4_constants
pub fn nf4_constants_bytes(n: u128, double_quant: bool) -> u128 {
    let blocks = n.div_ceil(NF4_BLOCK);
    let code = 16 * 4;
    if double_quant {
        blocks + blocks.div_ceil(NF4_DQ_BLOCK) * 4 + 4 + 256 * 4 + code
    } else {
        blocks * 4 + code
    }
}
// ANCHOR_END: nf4_constants

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
            Precision::Nf4 => "nf4",
        })
    }
}

impl FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "float32" | "f32" => Ok(Precision::Fp32),
            "fp16" | "float16" | "f16" | "half" => Ok(Precision::Fp16),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            "int8" | "8bit" => Ok(Precision::Int8),
            "nf4" | "4bit" => Ok(Precision::Nf4),
            _ => Err(Error::InvalidValue {
                flag: "--weights/--compute",
                value: s.to_string(),
                expected: "fp32, fp16, bf16, int8 or nf4",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_with_double_quant_is_about_4_127_bits_per_weight() {
        // QLoRA paper §3: 4 + 8/64 + 32/(64·256) = 4.127 bits per parameter.
        let n = 4096 * 4096;
        let (data, consts) = Precision::Nf4.storage_bytes(4096, 4096, true);
        let bits = (data + consts) as f64 * 8.0 / n as f64;
        assert!((bits - 4.127).abs() < 0.001, "{bits}");
        // Without double quantization: 4 + 32/64 = 4.5 bits (+ the 64-byte code table).
        let (data, consts) = Precision::Nf4.storage_bytes(4096, 4096, false);
        assert_eq!(data + consts, n / 2 + n / 64 * 4 + 64);
    }

    #[test]
    fn int8_adds_one_fp32_scale_per_row() {
        assert_eq!(Precision::Int8.storage_bytes(10, 100, false), (1000, 40));
    }

    #[test]
    fn float_formats_have_no_constants() {
        assert_eq!(Precision::Bf16.storage_bytes(3, 5, true), (30, 0));
        assert_eq!(Precision::Fp32.storage_bytes(3, 5, true), (60, 0));
    }

    #[test]
    fn parses_names() {
        assert_eq!("BF16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert!("fp8".parse::<Precision>().is_err());
    }
}
