//! The accuracy figures memplan states, in one place: `--explain`, each component's accuracy
//! note, the HTML report and the book all quote these, and `tests/groundtruth.rs` recomputes
//! them from the 75 H200 measurements (`tests/data/h200-pytorch.jsonl`) and fails when they
//! drift.

/// Measured training steps the figures come from.
pub const CASES: usize = 75;
/// |estimate − measured| / measured of `peak_allocated_bytes`, in percent.
pub const ALLOCATED_MEDIAN_PCT: f64 = 0.0;
pub const ALLOCATED_WORST_PCT: f64 = 1.2;
/// The same for `peak_reserved_bytes` (the caching-allocator replay, `crate::alloc`).
pub const RESERVED_MEDIAN_PCT: f64 = 0.1;
pub const RESERVED_WORST_PCT: f64 = 8.0;

/// `median 0.00%, worst 1.2%` (peak allocated).
pub const ALLOCATED_SUMMARY: &str = "median 0.00%, worst 1.2%";
/// `median 0.1%, worst 8%` (peak reserved).
pub const RESERVED_SUMMARY: &str = "median 0.1%, worst 8%";

/// The accuracy note of the `allocator_reserve` component.
pub const RESERVED_ACCURACY: &str =
    "approximate (simulated caching allocator): peak reserved off by a median 0.1%, worst 8% on the H200 measurements";

/// What `--explain` says about accuracy.
pub fn explain_note() -> String {
    format!(
        "Accuracy: peak allocated {ALLOCATED_SUMMARY} against {CASES} measured H200 steps (book: Validation); peak reserved (the caching-allocator replay) {RESERVED_SUMMARY}; the CUDA context was measured on one GPU and driver (calibrate with memplan probe)."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_texts_say_the_numbers() {
        // Each figure at the precision tests/groundtruth.rs checks it to.
        let pct = |v: f64, digits: usize| format!("{v:.digits$}%");
        for (text, median, worst, digits) in [
            (
                ALLOCATED_SUMMARY,
                ALLOCATED_MEDIAN_PCT,
                ALLOCATED_WORST_PCT,
                (2, 1),
            ),
            (
                RESERVED_SUMMARY,
                RESERVED_MEDIAN_PCT,
                RESERVED_WORST_PCT,
                (1, 0),
            ),
        ] {
            assert_eq!(
                text,
                format!(
                    "median {}, worst {}",
                    pct(median, digits.0),
                    pct(worst, digits.1)
                )
            );
        }
        assert!(RESERVED_ACCURACY.contains(&format!("a {RESERVED_SUMMARY}")));
    }

    #[test]
    fn the_book_quotes_the_same_figures() {
        let book = [
            include_str!("../book/src/introduction.md"),
            include_str!("../book/src/components.md"),
            include_str!("../book/src/overhead.md"),
        ];
        assert!(book[0].contains(ALLOCATED_SUMMARY));
        assert!(book[1].contains(RESERVED_SUMMARY));
        assert!(book[2].contains(RESERVED_SUMMARY));
    }
}
