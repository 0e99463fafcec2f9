//! `memplan probe`: read the local GPU through NVML and measure a real NF4 + LoRA training step.
pub mod nf4;
pub mod nf4_linear;
