//! Runtime overheads outside the model's tensors, as measured for PyTorch on CUDA.
//!
//! - cuBLAS workspace: PyTorch keeps one workspace per (handle, stream); the forward runs on the
//!   main thread and the backward on autograd's device thread, so a step holds two. On Hopper
//!   each is 32 MiB (`CUBLAS_WORKSPACE_CONFIG` default `:4096:8`): `base_alloc` = 64 MiB in
//!   `../shared/groundtruth` (inside `max_memory_allocated`).
//! - CUDA context: 648,871,936 B on the H200 with driver 580 / CUDA 13 (NVML used memory before
//!   and after `torch.cuda.init()`, groundtruth `meta.context`); outside the allocator. It varies
//!   with GPU, driver and loaded kernels (typically 0.3–0.9 GiB); `--calibration` overrides it.
//! - Allocator reserve: the caching allocator rounds blocks (≥1 MiB requests to 2 MiB multiples,
//!   large ones into 20 MiB segments) and cannot reuse fragmented cached blocks, so
//!   `max_memory_reserved` exceeds `max_memory_allocated`. Measured on the groundtruth steps, the
//!   excess is 4–25% of the transient bytes (activations, logits, temporaries); memplan uses
//!   [`RESERVE_FRACTION`] of those plus a fixed 2% of resident bytes. Approximate: ±10% of the
//!   reserved total.

use serde::Serialize;

use crate::units::MIB;

/// A framework's fixed costs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RuntimeProfile {
    pub name: &'static str,
    pub workspace_bytes: u128,
    pub cuda_context_bytes: u128,
}

/// PyTorch 2.11 on an H200 (`../shared/groundtruth/h200-pytorch.jsonl`, `meta`).
pub const PYTORCH_CUDA: RuntimeProfile = RuntimeProfile {
    name: "pytorch-cuda",
    workspace_bytes: 64 * MIB,
    cuda_context_bytes: 648_871_936,
};

/// Fraction of the step's transient bytes the caching allocator holds back as fragmentation.
pub const RESERVE_FRACTION: f64 = 0.15;
/// Fraction of resident bytes lost to block rounding.
pub const RESIDENT_ROUNDING: f64 = 0.02;
