//! Planning on top of the estimator: which configurations fit a GPU ([`fit`]) and the engine
//! configuration files for a sharded plan ([`emit`]). Sharding itself lives in the estimator
//! (`estimate::sharding`), since it changes the step's timeline.

pub mod emit;
pub mod fit;

pub use fit::{fit, suggest, FitReport, FitRequest, Plan, Rejected, Suggestion};
