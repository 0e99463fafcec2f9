//! Upper bounds on the `config.json` fields memplan reads, at a few times what real models
//! have, so that a typo or a generated file (`num_hidden_layers: 1e9`) is a one-line error naming
//! the field instead of minutes of work, gigabytes of memory or a product that wraps.
//!
//! The largest value of each field among published checkpoints (their `config.json` on the
//! Hugging Face Hub), and the bound:
//!
//! | field | largest published | model | bound |
//! |---|---:|---|---:|
//! | `vocab_size` | 262,208 | Gemma 3 (`google/gemma-3-27b-pt`, 262,144 + specials) | 2^20 |
//! | `hidden_size` | 16,384 | Llama 3.1 405B (`meta-llama/Llama-3.1-405B`) | 2^16 |
//! | `intermediate_size` | 53,248 | Llama 3.1 405B | 2^18 |
//! | `num_hidden_layers` | 126 | Llama 3.1 405B | 2^10 |
//! | `num_attention_heads` | 128 | Llama 3.1 405B, DeepSeek-V3 | 2^10 |
//! | `num_key_value_heads` | 128 | DeepSeek-V3 (MLA, one per head) | 2^10 |
//! | `head_dim` | 256 | Gemma 2 / Gemma 3 | 2^12 |
//! | `num_local_experts` | 384 | Kimi K2 (`moonshotai/Kimi-K2-Instruct`, `n_routed_experts`) | 2^12 |
//! | `num_experts_per_tok` | 8 | DeepSeek-V3, Qwen3-MoE, Kimi K2 | 2^8 |
//!
//! With every field at its bound, the largest product the estimator forms — eager attention
//! scores, b·heads·s² × layers × 4 bytes with b·s ≤ 2^40 and s ≤ 2^32 ([`crate::Job::validate`])
//! — is 2^40·2^32·2^10·2^10·2^2 = 2^94 bytes, and the largest parameter count
//! (layers × experts × 3·hidden·intermediate) about 2^58: far inside `u128`, so no arithmetic
//! on a bounded shape can overflow.

use crate::error::Error;
use std::path::Path;

/// `(field, bound)`: the largest value memplan accepts for each `config.json` field. The
/// families' other spellings of the same quantity share its bound.
pub const FIELD_BOUNDS: [(&str, u64); 13] = [
    ("vocab_size", 1 << 20),
    ("hidden_size", 1 << 16),
    ("intermediate_size", 1 << 18),
    ("moe_intermediate_size", 1 << 18),
    ("num_hidden_layers", 1 << 10),
    ("num_attention_heads", 1 << 10),
    ("num_key_value_heads", 1 << 10),
    ("head_dim", 1 << 12),
    ("num_local_experts", 1 << 12),
    ("num_experts", 1 << 12),
    ("n_routed_experts", 1 << 12),
    ("num_experts_per_tok", 1 << 8),
    ("n_shared_experts", 1 << 8),
];

/// Bound of the integer fields the table does not name (ranks, window sizes, group counts):
/// 2^20.
pub const OTHER_FIELDS_BOUND: u64 = 1 << 20;

/// The largest value memplan accepts for `field`.
pub fn bound(field: &str) -> u64 {
    FIELD_BOUNDS
        .iter()
        .find(|(f, _)| *f == field)
        .map_or(OTHER_FIELDS_BOUND, |(_, b)| *b)
}

/// Checks one field's value against its bound; `origin` names the file in the error.
pub fn check(field: &str, value: u64, origin: &Path) -> Result<(), Error> {
    let max = bound(field);
    if value > max {
        return Err(Error::ConfigField {
            path: origin.to_path_buf(),
            field: field.to_string(),
            problem: format!(
                "is {value}, beyond the {max} memplan accepts (real models stay far below; see src/model/bounds.rs)"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bound_is_above_the_largest_published_value() {
        // The published maxima of the table above.
        for (field, largest) in [
            ("vocab_size", 262_208),
            ("hidden_size", 16_384),
            ("intermediate_size", 53_248),
            ("num_hidden_layers", 126),
            ("num_attention_heads", 128),
            ("num_key_value_heads", 128),
            ("head_dim", 256),
            ("num_local_experts", 384),
            ("num_experts_per_tok", 8),
        ] {
            assert!(bound(field) >= 2 * largest, "{field}");
            assert!(check(field, largest, Path::new("c.json")).is_ok());
        }
        let e = check("num_hidden_layers", 10_000_000, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`num_hidden_layers` is 10000000, beyond the 1024"),
            "{e}"
        );
        assert_eq!(bound("qk_rope_head_dim"), OTHER_FIELDS_BOUND);
    }
}
