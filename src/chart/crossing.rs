//! Where a sweep line crosses a GPU's capacity, to the token or sample: the largest value of
//! the swept axis in a range whose estimate still fits the GPU, found by binary search on the
//! estimator itself (not by interpolating the drawn points).
//!
//! "Fits" is `gpu::fit`'s definition: the estimate's `device_bytes` is at most the GPU's
//! memory. The search assumes what the estimator models: more tokens or samples never need
//! less memory (every buffer that scales with them grows with them); the tests check the
//! answer against the estimator on both sides.

use crate::error::Error;
use crate::estimate::estimate;
use crate::gpu::Gpu;
use crate::method::Job;

/// The axis a sweep varies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepAxis {
    /// Sequence length in tokens.
    Seq,
    /// Micro-batch size in samples.
    Batch,
}

impl SweepAxis {
    /// `job` with the axis set to `value`.
    pub fn at(self, job: &Job, value: u128) -> Job {
        let mut j = job.clone();
        match self {
            SweepAxis::Seq => j.seq = value,
            SweepAxis::Batch => j.batch = value,
        }
        j
    }

    /// The unit, for "fits up to 11,213 tokens".
    pub fn unit(self) -> &'static str {
        match self {
            SweepAxis::Seq => "tokens",
            SweepAxis::Batch => "samples",
        }
    }

    /// The flag that sets the axis.
    pub fn flag(self) -> &'static str {
        match self {
            SweepAxis::Seq => "--seq",
            SweepAxis::Batch => "--batch",
        }
    }
}

/// How a line relates to a GPU's capacity over `lo..=hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Not even `lo` fits.
    None,
    /// The largest value that fits; the next one does not.
    UpTo(u128),
    /// `hi` fits: the line stays under the capacity over the whole range.
    Whole,
}

/// Whether `job` fits `gpu`, the way `gpu::fit` decides.
pub fn fits(job: &Job, gpu: &Gpu) -> Result<bool, Error> {
    Ok(crate::estimate::oom_check(&estimate(job)?, gpu.memory().0).fits)
}

/// The largest value in `lo..=hi` of `axis` at which `job` fits `gpu` (binary search, about
/// log2(hi − lo) estimates).
pub fn max_fitting(
    job: &Job,
    axis: SweepAxis,
    lo: u128,
    hi: u128,
    gpu: &Gpu,
) -> Result<Reach, Error> {
    if !fits(&axis.at(job, lo), gpu)? {
        return Ok(Reach::None);
    }
    if fits(&axis.at(job, hi), gpu)? {
        return Ok(Reach::Whole);
    }
    // Invariant: `good` fits, `bad` does not.
    let (mut good, mut bad) = (lo, hi);
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        if fits(&axis.at(job, mid), gpu)? {
            good = mid;
        } else {
            bad = mid;
        }
    }
    Ok(Reach::UpTo(good))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::resolve_gpu;
    use crate::{resolve_model, Method};

    fn device(job: &Job) -> u128 {
        estimate(job).unwrap().device_bytes.0
    }

    #[test]
    fn the_crossing_is_exact_to_the_token_and_the_sample() {
        let (m, _) = resolve_model("llama-3.1-8b").unwrap();
        let gpu = resolve_gpu("rtx-4090").unwrap();
        let cap = gpu.memory().0;
        for method in [Method::Qlora, Method::Lora] {
            let mut job = Job::new(m.clone(), method);
            job.grad_checkpointing = method == Method::Qlora;
            match max_fitting(&job, SweepAxis::Seq, 1, 1 << 20, &gpu).unwrap() {
                Reach::UpTo(s) => {
                    let mut at = job.clone();
                    at.seq = s;
                    assert!(fits(&at, &gpu).unwrap(), "{method}: {s} tokens should fit");
                    at.seq = s + 1;
                    assert!(
                        !fits(&at, &gpu).unwrap(),
                        "{method}: {} tokens should not",
                        s + 1
                    );
                }
                r => panic!("{method}: expected a crossing, got {r:?}"),
            }
        }
        let mut job = Job::new(m, Method::Qlora);
        job.seq = 1024;
        match max_fitting(&job, SweepAxis::Batch, 1, 4096, &gpu).unwrap() {
            Reach::UpTo(b) => {
                job.batch = b;
                assert!(device(&job) <= cap);
                job.batch = b + 1;
                assert!(device(&job) > cap);
            }
            r => panic!("expected a batch crossing, got {r:?}"),
        }
    }

    /// The search's assumption: device memory never falls as tokens or samples grow.
    #[test]
    fn device_memory_never_falls_with_more_tokens_or_samples() {
        use crate::method::Attention;
        let (m, _) = resolve_model("llama-3.2-1b").unwrap();
        for method in [Method::Full, Method::Lora, Method::Qlora, Method::Inference] {
            for ckpt in [false, true] {
                for attention in [Attention::Sdpa, Attention::Eager] {
                    let mut job = Job::new(m.clone(), method);
                    job.grad_checkpointing = ckpt;
                    job.attention = attention;
                    for axis in [SweepAxis::Seq, SweepAxis::Batch] {
                        let mut prev = (0, 0);
                        for v in (1..=4096).step_by(157) {
                            let e = estimate(&axis.at(&job, v)).unwrap();
                            let rounding = e.component("block_rounding").map_or(0, |c| c.bytes.0);
                            let (a, d) = (e.peak_allocated_bytes.0 - rounding, e.device_bytes.0);
                            // Requested memory never falls. Reserved memory may: which cached
                            // segments a request reuses depends on the sizes before it, as in
                            // PyTorch's allocator (fit and the sweep search for a boundary where
                            // the value fits and the next does not).
                            assert!(a >= prev.0, "{method} {axis:?}={v} ckpt={ckpt} {attention}");
                            assert!(d > 0);
                            prev = (a, d.max(prev.1));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn ranges_that_fit_wholly_or_not_at_all() {
        let (m, _) = resolve_model("llama-3.1-8b").unwrap();
        let full = Job::new(m.clone(), Method::Full);
        let small = resolve_gpu("rtx-4090").unwrap();
        let big = resolve_gpu("h200").unwrap();
        assert_eq!(
            max_fitting(&full, SweepAxis::Seq, 512, 4096, &small).unwrap(),
            Reach::None
        );
        let q = Job::new(m, Method::Qlora);
        assert_eq!(
            max_fitting(&q, SweepAxis::Seq, 128, 1024, &big).unwrap(),
            Reach::Whole
        );
    }
}
