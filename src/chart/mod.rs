//! Capacity-review charts: a stacked breakdown per job and memory-against-length sweeps, as
//! PNG, SVG or an HTML page; see `book/src/charts.md`.
//!
//! Data first, drawing second: [`breakdown`] and [`sweep`] run the estimator and return the
//! numbers a chart shows; [`Chart::render`] turns them into bytes; [`write_atomic`] is the one
//! place that writes a file. Colours live in [`palette`], the bundled font in `font`.

pub mod breakdown;
pub mod crossing;
mod font;
pub mod output;
pub mod palette;
pub(crate) mod render;
pub mod sweep;
pub mod values;

pub use breakdown::{breakdown, BreakdownChart};
pub use crossing::{max_fitting, Reach, SweepAxis};
pub use output::{write_atomic, OutputFormat};
pub use render::{png, svg, Chart};
pub use sweep::{sweep, SweepChart};
pub use values::parse_values;
