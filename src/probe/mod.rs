//! `memplan probe`: read the local GPU through NVML and measure a real NF4 + LoRA training step.
//!
//! ```text
//! NVML inventory ─► estimate the step (candle runtime model, expected.rs) ─► refuse if > 80% of
//! free memory ─► build the model (NF4 base, LoRA adapters) ─► N steps: forward, loss, backward,
//! AdamW, peak memory of each ─► compare measured with estimated
//! ```
//!
//! On the CPU the peak comes from a counting global allocator (installed by the `memplan` binary);
//! on CUDA from NVML used memory sampled on a background thread.

pub mod alloc;
pub mod device;
pub mod expected;
pub mod graph;
pub mod lora;
pub mod model;
pub mod nf4;
pub mod nf4_linear;
pub mod nvml;
pub mod plan;
pub mod rng;
pub mod run;
pub mod train;

pub use plan::PlanRequest;
pub use run::{probe, Backend, DeviceSummary, ProbeError, ProbeOptions, ProbeReport, RunReport};
