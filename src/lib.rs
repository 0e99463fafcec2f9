//! memplan: how much GPU memory a fine-tuning step needs, and why.
//!
//! ```
//! use memplan::{estimate, Job, Method, resolve_model};
//!
//! let (model, _) = resolve_model("llama-3.1-8b").unwrap();
//! let mut job = Job::new(model, Method::Qlora);
//! job.batch = 4;
//! job.grad_checkpointing = true;
//! let est = estimate(&job).unwrap();
//! assert!(est.peak_allocated_bytes.gib() > 10.0 && est.peak_allocated_bytes.gib() < 30.0);
//! ```

pub mod accuracy;
pub mod alloc;
pub mod arch;
pub mod chart;
pub mod cost;
pub mod dtype;
pub mod error;
pub mod estimate;
pub mod files;
pub mod gpu;
pub mod hub;
pub mod jobfile;
pub mod method;
pub mod model;
pub mod plan;
pub mod probe;
pub mod report;
pub mod seed;
pub mod units;

pub use dtype::Precision;
pub use error::Error;
pub use estimate::{estimate, Component, Estimate};
pub use method::{Attention, Job, LoraSettings, Loss, Method, Optimizer};
pub use model::{resolve_model, ModelShape};
pub use units::Bytes;
