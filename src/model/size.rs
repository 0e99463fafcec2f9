//! Bare sizes (`--model 7B`): one model family, so that memory grows with the size.
//!
//! A bare size names the Llama 3 family: `1B`, `8B`, `70B` and `405B` are the published
//! checkpoints (llama-3.2-1b, llama-3.1-8b, llama-3-70b, llama-3.1-405b; "nominal" sizes, as
//! their names are: Llama-3.2-1B has 1.24 B parameters). Any other size is *synthetic*: between
//! two of those anchors every dimension — layers, attention heads, head dimension, MLP width —
//! is interpolated geometrically in the size (`t = ln(N/N_lo) / ln(N_hi/N_lo)`, each dimension
//! `d_lo · (d_hi/d_lo)^t`, rounded to the multiples real configs use); the vocabulary (128,256)
//! and the 8 key/value heads are the family's; embeddings are tied below 8B as in Llama 3.2.
//! Below 1B the 1B widths are kept with fewer layers, above 405B the 405B widths with more.
//!
//! Because every dimension is non-decreasing in the size (the anchors' dimensions are), and every
//! memory component grows with each dimension, the estimate is monotone in the size — which a
//! mapping to the *nearest* preset is not (4B on 3B widths needed more than 5B on 8B widths).
//! The size is parsed as a number, so `7B`, `7.0B` and `7000M` are one model.

use super::presets::{presets, ModelSource};
use super::ModelShape;
use crate::error::Error;

/// The family's published checkpoints, smallest first, with their nominal sizes.
pub const ANCHORS: [(&str, f64); 4] = [
    ("llama-3.2-1b", 1e9),
    ("llama-3.1-8b", 8e9),
    ("llama-3-70b", 70e9),
    ("llama-3.1-405b", 405e9),
];

/// Smallest and largest bare size accepted.
pub const MIN_SIZE: f64 = 1e7;
pub const MAX_SIZE: f64 = 1e14;

/// `7e9` → `7B`, `1.5e9` → `1.5B`, `5e8` → `500M`, `2e12` → `2T`: one spelling per size.
pub fn size_label(params: f64) -> String {
    let (v, unit) = if params >= 1e12 {
        (params / 1e12, "T")
    } else if params >= 1e9 {
        (params / 1e9, "B")
    } else {
        (params / 1e6, "M")
    };
    let text = format!("{v:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}{unit}")
}

fn anchor(name: &str) -> &'static ModelShape {
    &presets()
        .iter()
        .find(|p| p.name == name)
        .expect("the anchor presets exist (tested)")
        .shape
}

/// Rounds to the nearest multiple of `m` (at least `m`).
fn round_to(v: f64, m: u128) -> u128 {
    ((v / m as f64).round() as u128).max(1) * m
}

/// Resolves a bare size of `params` (nominal) parameters.
pub fn bare_size(arg: &str, params: f64) -> Result<(ModelShape, ModelSource), Error> {
    if !(MIN_SIZE..=MAX_SIZE).contains(&params) {
        return Err(Error::InvalidValue {
            flag: "--model",
            value: arg.to_string(),
            expected: "a size between 10M and 100T parameters",
        });
    }
    let label = size_label(params);
    let same = |a: f64| ((params - a) / a).abs() < 1e-9;
    if let Some((name, _)) = ANCHORS.iter().find(|(_, n)| same(*n)) {
        let p = presets().iter().find(|p| p.name == *name).expect("anchor");
        let detail = format!("{label} = {} ({})", p.name, p.source);
        return Ok((p.shape.clone(), ModelSource::Synthetic(detail)));
    }
    let (first, last) = (ANCHORS[0], ANCHORS[ANCHORS.len() - 1]);
    let (mut shape, how) = if params < first.1 {
        let s = anchor(first.0);
        let layers = round_to(s.layers as f64 * params / first.1, 1);
        (
            s.with_layers(layers),
            format!("{} widths with fewer layers", first.0),
        )
    } else if params > last.1 {
        let s = anchor(last.0);
        let layers = round_to(s.layers as f64 * params / last.1, 1);
        (
            s.with_layers(layers),
            format!("{} widths with more layers", last.0),
        )
    } else {
        let i = ANCHORS
            .windows(2)
            .position(|w| params < w[1].1)
            .expect("params lies between two anchors");
        let ((lo_name, lo_n), (hi_name, hi_n)) = (ANCHORS[i], ANCHORS[i + 1]);
        let (lo, hi) = (anchor(lo_name), anchor(hi_name));
        let t = (params / lo_n).ln() / (hi_n / lo_n).ln();
        let geo = |a: u128, b: u128| (a as f64) * (b as f64 / a as f64).powf(t);
        let heads = round_to(geo(lo.heads, hi.heads), lo.kv_heads);
        let head_dim = round_to(geo(lo.head_dim, hi.head_dim), 8);
        // The Llama 3 config.json fields of the interpolated model, resolved like a user's file.
        let config = serde_json::json!({
            "model_type": "llama",
            "vocab_size": lo.vocab as u64,
            "hidden_size": (heads * head_dim) as u64,
            "intermediate_size": round_to(geo(lo.intermediate, hi.intermediate), 256) as u64,
            "num_hidden_layers": round_to(geo(lo.layers, hi.layers), 1) as u64,
            "num_attention_heads": heads as u64,
            "num_key_value_heads": lo.kv_heads as u64,
            "head_dim": head_dim as u64,
            "tie_word_embeddings": lo.tie_embeddings,
        });
        let shape = super::HfConfig::from_value(config).resolve(
            &format!("synthetic-{label}"),
            std::path::Path::new("src/model/size.rs"),
        )?;
        (
            shape,
            format!("interpolated between {lo_name} and {hi_name}"),
        )
    };
    shape.name = format!("synthetic-{label}");
    let detail = format!(
        "{label}: Llama 3 family {how}: {} layers, hidden {}, {} heads of {}, MLP {} ({} params); no such checkpoint exists",
        shape.layers,
        shape.hidden,
        shape.heads,
        shape.head_dim,
        shape.intermediate,
        shape.param_counts().total
    );
    Ok((shape, ModelSource::Synthetic(detail)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::resolve_model;

    #[test]
    fn labels_are_canonical() {
        assert_eq!(size_label(7e9), "7B");
        assert_eq!(size_label(7000e6), "7B");
        assert_eq!(size_label(1.5e9), "1.5B");
        assert_eq!(size_label(5e8), "500M");
        assert_eq!(size_label(2.5e12), "2.5T");
    }

    #[test]
    fn spellings_of_one_size_are_one_model() {
        let a = resolve_model("7B").unwrap().0;
        assert_eq!(resolve_model("7.0B").unwrap().0, a);
        assert_eq!(resolve_model("7000M").unwrap().0, a);
        assert_eq!(a.name, "synthetic-7B");
        assert_eq!(resolve_model("8.0B").unwrap().0.name, "llama-3.1-8b");
        assert!(resolve_model("100T").is_ok());
        assert!(resolve_model("1.5T").is_ok());
        assert!(resolve_model("101T").is_err());
    }

    #[test]
    fn anchors_map_to_their_checkpoints_and_dimensions_grow() {
        for (name, n) in ANCHORS {
            assert_eq!(resolve_model(&size_label(n)).unwrap().0.name, name);
        }
        // Between 1B and 8B: 32 heads throughout, head_dim 64 → 128 (llama-3.2-1b, llama-3.1-8b).
        let s = resolve_model("2.83B").unwrap().0; // t = ln 2.83 / ln 8 ≈ 0.5
        assert_eq!((s.heads, s.head_dim, s.layers), (32, 88, 23));
        let mut prev = resolve_model("10M").unwrap().0;
        for n in (0..200).map(|k| 1e7 * 1.07f64.powi(k)) {
            let s = resolve_model(&size_label(n)).unwrap().0;
            for (a, b) in [
                (prev.layers, s.layers),
                (prev.heads * prev.head_dim, s.heads * s.head_dim),
                (prev.intermediate, s.intermediate),
                (prev.param_counts().total, s.param_counts().total),
            ] {
                assert!(a <= b, "{} → {}", prev.name, s.name);
            }
            prev = s;
        }
    }
}
