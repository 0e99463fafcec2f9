//! NF4 block quantization, bit-compatible with bitsandbytes' `quantize_4bit(quant_type="nf4")`.
//!
//! Sources:
//! - Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023), §3 (NormalFloat,
//!   double quantization) and Appendix E (the 16 NF4 values).
//! - bitsandbytes `functional.py` (`get_4bit_type("nf4")`, `create_dynamic_map`,
//!   `quantize_4bit`, `quantize_blockwise`) and `csrc/kernels.cu` (`kQuantizeBlockwise`,
//!   `dDequantizeNF4`): the codebook below, one absmax per block of 64 weights, two codes per
//!   byte with the **first** weight of a pair in the **high** nibble (`qvals[j] = q(v[2j]) << 4 |
//!   q(v[2j+1])`).
//! - Double quantization (`compress_statistics=True`): `offset = absmax.mean()`, then
//!   `absmax - offset` is quantized blockwise (blocks of 256) to 8 bit with the signed dynamic map
//!   of `create_dynamic_map(signed=True)`, one fp32 absmax per 256-block.
//!
//! Quantization picks the nearest codebook value (bitsandbytes walks a decision tree of the
//! midpoints, which is the same thing). Ties at a midpoint are broken towards the lower code here;
//! the tree does the same (`x > midpoint` goes up).

use crate::error::Error;

// ANCHOR: codebook
/// The NF4 codebook: bitsandbytes `functional.get_4bit_type("nf4")` (QLoRA paper, Appendix E),
/// quantiles of N(0, 1) normalised to [-1, 1] with an exact zero. Code `i` decodes to `NF4[i]`.
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];
// ANCHOR_END: codebook

/// Weights per absmax block (bitsandbytes `blocksize=64`, the QLoRA default); [`crate::dtype::NF4_BLOCK`].
pub const BLOCK: usize = crate::dtype::NF4_BLOCK as usize;
/// absmax values per double-quantization block (bitsandbytes `quantize_blockwise(blocksize=256)`
/// inside `quantize_4bit`); [`crate::dtype::NF4_DQ_BLOCK`].
pub const DQ_BLOCK: usize = crate::dtype::NF4_DQ_BLOCK as usize;

/// The nearest NF4 code of a value already divided by its block's absmax (in [-1, 1]).
pub fn nearest_code(x: f32) -> u8 {
    let mut code = 0u8;
    // Codes are sorted; walk up while x is above the midpoint to the next value.
    for i in 0..15 {
        let mid = (NF4[i] + NF4[i + 1]) / 2.0;
        if x > mid {
            code = (i + 1) as u8;
        } else {
            break;
        }
    }
    code
}

/// The signed 8-bit dynamic map of bitsandbytes `create_dynamic_map(signed=True,
/// max_exponent_bits=7, total_bits=8)`: for exponent i = 0..6, 2^i fraction values (midpoints of
/// `linspace(0.1, 1, 2^i + 1)`) scaled by 10^(i-6), both signs; plus 0 and 1; sorted.
pub fn dynamic_map() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let items = (1usize << i) + 1;
        let bounds: Vec<f32> = (0..items)
            .map(|k| 0.1 + 0.9 * k as f32 / (items - 1) as f32)
            .collect();
        let scale = 10f32.powi(i - 6);
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// Quantization constants of an NF4 tensor: one absmax per 64-block, plain or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// fp32 absmax per block (`compress_statistics=False`).
    Plain(Vec<f32>),
    /// 8-bit codes of `absmax - offset` in the dynamic map, one fp32 scale per 256 codes.
    Double {
        codes: Vec<u8>,
        scales: Vec<f32>,
        offset: f32,
    },
}

impl Absmax {
    /// The fp32 absmax of every block (decoded if double-quantized).
    pub fn values(&self) -> Vec<f32> {
        match self {
            Absmax::Plain(v) => v.clone(),
            Absmax::Double {
                codes,
                scales,
                offset,
            } => {
                let map = dynamic_map();
                codes
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| map[c as usize] * scales[i / DQ_BLOCK] + offset)
                    .collect()
            }
        }
    }

    /// Bytes these constants occupy (what [`crate::dtype::nf4_constants_bytes`] predicts, minus
    /// the 256-entry code table that bitsandbytes shares between all layers).
    pub fn bytes(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len() * 4,
            Absmax::Double { codes, scales, .. } => codes.len() + scales.len() * 4 + 4,
        }
    }
}

/// Quantizes `absmax` values with bitsandbytes' double quantization.
pub fn double_quantize(absmax: &[f32]) -> Absmax {
    let map = dynamic_map();
    let offset = if absmax.is_empty() {
        0.0
    } else {
        absmax.iter().map(|&a| f64::from(a)).sum::<f64>() as f32 / absmax.len() as f32
    };
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let mut codes = Vec::with_capacity(centred.len());
    let mut scales = Vec::with_capacity(centred.len().div_ceil(DQ_BLOCK));
    for block in centred.chunks(DQ_BLOCK) {
        let scale = block.iter().fold(0f32, |m, &v| m.max(v.abs()));
        scales.push(scale);
        for &v in block {
            let x = if scale > 0.0 { v / scale } else { 0.0 };
            codes.push(nearest_in(&map, x));
        }
    }
    Absmax::Double {
        codes,
        scales,
        offset,
    }
}

/// Index of the value of a sorted table nearest to `x`.
fn nearest_in(table: &[f32; 256], x: f32) -> u8 {
    let hi = table.partition_point(|&v| v < x).min(255);
    if hi == 0 {
        return 0;
    }
    let lo = hi - 1;
    if (x - table[lo]).abs() <= (table[hi] - x).abs() {
        lo as u8
    } else {
        hi as u8
    }
}

/// A matrix stored as NF4: packed codes and absmax constants, row-major `rows × cols`.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Matrix {
    pub rows: usize,
    pub cols: usize,
    /// Two codes per byte, first weight in the high nibble.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

impl Nf4Matrix {
    /// Quantizes a row-major `rows × cols` fp32 matrix. `rows·cols` must be even and a multiple
    /// of the block size (every Llama Linear is; bitsandbytes pads otherwise).
    pub fn quantize(
        values: &[f32],
        rows: usize,
        cols: usize,
        double_quant: bool,
    ) -> Result<Nf4Matrix, Error> {
        let n = rows * cols;
        if values.len() != n || n == 0 || n % BLOCK != 0 {
            return Err(Error::Unsupported(format!(
                "NF4 needs a non-empty {rows}×{cols} matrix whose size is a multiple of {BLOCK} (got {} values); choose --hidden/--intermediate multiples of 64",
                values.len()
            )));
        }
        let mut packed = vec![0u8; n / 2];
        let mut absmax = Vec::with_capacity(n / BLOCK);
        for (b, block) in values.chunks(BLOCK).enumerate() {
            let amax = block.iter().fold(0f32, |m, &v| m.max(v.abs()));
            absmax.push(amax);
            let inv = if amax > 0.0 { 1.0 / amax } else { 0.0 };
            for (j, pair) in block.chunks(2).enumerate() {
                let hi = nearest_code(pair[0] * inv);
                let lo = nearest_code(pair[1] * inv);
                packed[b * BLOCK / 2 + j] = (hi << 4) | lo;
            }
        }
        let absmax = if double_quant {
            double_quantize(&absmax)
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Nf4Matrix {
            rows,
            cols,
            packed,
            absmax,
        })
    }

    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Dequantizes into `out` (length `rows·cols`), reusing the caller's buffer.
    pub fn dequantize_into(&self, out: &mut [f32]) {
        let absmax = self.absmax.values();
        self.dequantize_with(&absmax, out);
    }

    /// Dequantizes with already-decoded absmax values (the hot loop the benchmark times).
    pub fn dequantize_with(&self, absmax: &[f32], out: &mut [f32]) {
        for ((chunk, bytes), &amax) in out
            .chunks_mut(BLOCK)
            .zip(self.packed.chunks(BLOCK / 2))
            .zip(absmax)
        {
            for (pair, &byte) in chunk.chunks_mut(2).zip(bytes) {
                pair[0] = NF4[(byte >> 4) as usize] * amax;
                pair[1] = NF4[(byte & 0x0F) as usize] * amax;
            }
        }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len()];
        self.dequantize_into(&mut out);
        out
    }

    /// Bytes held: packed codes plus constants.
    pub fn bytes(&self) -> usize {
        self.packed.len() + self.absmax.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codebook_is_sorted_symmetric_ends_and_exact_zero() {
        assert!(NF4.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((NF4[0], NF4[7], NF4[15]), (-1.0, 0.0, 1.0));
    }

    #[test]
    fn round_trip_hits_hand_checked_codebook_values() {
        // One block of 64, absmax 2.0 (set by the last weight). Values chosen by hand:
        // 0.9  / 2 = 0.45   -> nearest 0.4407098 (code 12) -> 0.8814197
        // -0.1 / 2 = -0.05  -> between -0.0910500 and 0 (midpoint -0.045525): code 6 -> -0.1821
        // 0.03 / 2 = 0.015  -> nearest 0 (code 7)            -> 0
        // 1.3  / 2 = 0.65   -> between 0.5626170 and 0.7229568 (midpoint 0.6427869): code 14
        let mut w = vec![0f32; 64];
        w[0] = 0.9;
        w[1] = -0.1;
        w[2] = 0.03;
        w[3] = 1.3;
        w[63] = 2.0;
        let q = Nf4Matrix::quantize(&w, 1, 64, false).unwrap();
        assert_eq!(q.absmax, Absmax::Plain(vec![2.0]));
        assert_eq!(q.packed[0], (12 << 4) | 6);
        assert_eq!(q.packed[1], (7 << 4) | 14);
        let d = q.dequantize();
        assert!((d[0] - 0.881_419_7).abs() < 1e-6);
        assert!((d[1] + 0.182_100_07).abs() < 1e-6);
        assert_eq!(d[2], 0.0);
        assert!((d[3] - 1.445_913_7).abs() < 1e-6);
        assert_eq!(d[63], 2.0);
        // Every codebook value times absmax survives the round trip exactly.
        let exact: Vec<f32> = (0..64).map(|i| NF4[i % 16] * 3.0).collect();
        let q = Nf4Matrix::quantize(&exact, 8, 8, false).unwrap();
        assert_eq!(q.dequantize(), exact);
    }

    #[test]
    fn packing_puts_the_first_weight_in_the_high_nibble() {
        // Weight 0 = -1 (code 0), weight 1 = +1 (code 15): bitsandbytes packs 0x0F, not 0xF0.
        let mut w = vec![0f32; 64];
        w[0] = -1.0;
        w[1] = 1.0;
        let q = Nf4Matrix::quantize(&w, 2, 32, false).unwrap();
        assert_eq!(q.packed[0], 0x0F);
        assert_eq!(q.packed[1], 0x77); // two zeros: code 7 twice
        assert_eq!(q.packed.len(), 32);
    }

    #[test]
    fn dynamic_map_matches_bitsandbytes_shape() {
        let m = dynamic_map();
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m[255], 1.0);
        // The largest negative value: -(0.1+0.9·63/64 + 1)/2 ·1 = -0.99296875 (i = 6, last mean).
        assert!((m[0] + 0.992_968_75).abs() < 1e-6, "{}", m[0]);
        // The smallest magnitude: 1e-6 × 0.55 (i = 0, the single mean of linspace(0.1, 1, 2)).
        assert!(m.contains(&0.0));
        assert!(m.iter().any(|&v| (v - 0.55e-6).abs() < 1e-12));
    }

    #[test]
    fn double_quant_round_trip_is_within_the_8bit_step() {
        // 600 absmax values between 0.02 and 0.08 (3 blocks of 256, the last partial).
        let absmax: Vec<f32> = (0..600).map(|i| 0.02 + 0.06 * (i as f32 / 599.0)).collect();
        let dq = double_quantize(&absmax);
        let Absmax::Double { codes, scales, .. } = &dq else {
            panic!("double quantization returns Absmax::Double");
        };
        assert_eq!((codes.len(), scales.len()), (600, 3));
        // 600 codes + 3 fp32 scales + the fp32 offset.
        assert_eq!(dq.bytes(), 600 + 12 + 4);
        let back = dq.values();
        // Centred values lie in [-0.03, 0.03]; the coarsest step of the dynamic map near ±1 is
        // 0.9/64 ≈ 0.014 of the block's scale, so the error is at most ~0.007 × 0.03 ≈ 2.1e-4.
        for (a, b) in absmax.iter().zip(&back) {
            assert!((a - b).abs() < 2.2e-4, "{a} vs {b}");
        }
        // And it is not lossless: some value must move (8 bits cannot hold 600 distinct values).
        assert!(absmax.iter().zip(&back).any(|(a, b)| a != b));
    }

    #[test]
    fn rejects_sizes_that_are_not_whole_blocks() {
        assert!(Nf4Matrix::quantize(&[0.0; 10], 2, 5, false).is_err());
    }
}
