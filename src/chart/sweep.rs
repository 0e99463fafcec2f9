//! `memplan chart sweep`: device memory against sequence length or batch size, one line per
//! job (model × method × the other axis's values), with GPU capacity lines. Where a line
//! crosses a capacity is found exactly by [`max_fitting`] and printed in the legend.

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::crossing::{max_fitting, Reach, SweepAxis};
use super::palette::line_colour;
use super::render::{
    capacity_lines, count_label, draw_capacity_labels, text, thousands, Chart, CAPACITY_STRIP,
};
use super::values::MAX_POINTS;
use crate::error::Error;
use crate::estimate::estimate;
use crate::gpu::Gpu;
use crate::method::Job;
use crate::units::Bytes;

/// Estimates one sweep chart may make for its lines (crossings excluded).
pub const MAX_ESTIMATES: usize = 10 * MAX_POINTS;

/// Lines one sweep may draw: beyond this, neither colours nor legend can be told apart (and
/// the legend would make the image as tall as memory allows).
pub const MAX_LINES: usize = 24;

/// GPUs one chart may draw capacity lines for.
pub const MAX_GPUS: usize = 12;

/// Where one line meets one GPU's capacity.
#[derive(Debug, Clone, PartialEq)]
pub struct Crossing {
    pub gpu: String,
    pub reach: Reach,
    /// The estimate at the largest fitting value, for the marker.
    pub at_bytes: Option<Bytes>,
    /// The legend's sentence: "fits up to 11,213 tokens on rtx-4090".
    pub text: String,
}

/// One line of the chart.
#[derive(Debug, Clone)]
pub struct Line {
    pub label: String,
    /// The job, with the swept axis at the first point.
    pub job: Job,
    /// (axis value, device bytes).
    pub points: Vec<(u128, Bytes)>,
    pub crossings: Vec<Crossing>,
}

/// The sweep chart's data.
#[derive(Debug, Clone)]
pub struct SweepChart {
    pub title: String,
    /// The job settings the lines share (and those that differ, joined by `/`).
    pub settings: String,
    pub axis: SweepAxis,
    pub xs: Vec<u128>,
    pub lines: Vec<Line>,
    pub gpus: Vec<Gpu>,
    /// Width of the plot itself in pixels (the report draws a narrower one, so its text stays
    /// legible on the page).
    pub plot_width: u32,
}

/// Default width of a sweep's plot, pixels.
pub const PLOT_WIDTH: u32 = 1000;

/// Builds a sweep: `jobs` (one per model × method) against `seqs` or `batches`, whichever has
/// several values (sequence length when both do; then one line per batch size).
pub fn sweep(
    jobs: &[Job],
    seqs: &[u128],
    batches: &[u128],
    gpus: &[Gpu],
) -> Result<SweepChart, Error> {
    let (axis, xs, others) = match (seqs.len(), batches.len()) {
        (0, _) | (_, 0) => return Err(Error::Unsupported("--seq and --batch need a value".into())),
        (s, _) if s > 1 => (SweepAxis::Seq, seqs, batches),
        (_, b) if b > 1 => (SweepAxis::Batch, batches, seqs),
        _ => {
            return Err(Error::Unsupported(
                "a sweep needs a range: --seq 512..16384 (tokens) or --batch 1..64 (samples)"
                    .into(),
            ))
        }
    };
    if jobs.is_empty() {
        return Err(Error::Unsupported("a sweep needs a --model".into()));
    }
    let line_count = jobs.len() * others.len();
    if line_count > MAX_LINES {
        return Err(Error::Unsupported(format!(
            "{line_count} lines (models × methods × values of the other axis), more than {MAX_LINES}: draw fewer per chart"
        )));
    }
    check_gpus(gpus)?;
    let count = line_count * xs.len();
    if count > MAX_ESTIMATES {
        return Err(Error::Unsupported(format!(
            "{} lines × {} points = {count} estimates, more than {MAX_ESTIMATES}: fewer models, methods or values, or a larger step",
            jobs.len() * others.len(),
            xs.len()
        )));
    }
    let other_axis = match axis {
        SweepAxis::Seq => SweepAxis::Batch,
        SweepAxis::Batch => SweepAxis::Seq,
    };
    let many_models = jobs.iter().any(|j| j.model.name != jobs[0].model.name);
    let (lo, hi) = (xs[0], xs[xs.len() - 1]);
    let mut lines = Vec::new();
    for job in jobs {
        for &other in others {
            let base = axis.at(&other_axis.at(job, other), lo);
            let mut label = job.method.to_string();
            if many_models {
                label = format!("{} {label}", job.model.name);
            }
            if others.len() > 1 {
                label += &match other_axis {
                    SweepAxis::Batch => format!(" batch {other}"),
                    SweepAxis::Seq => format!(" seq {other}"),
                };
            }
            let points = xs
                .iter()
                .map(|&x| Ok((x, estimate(&axis.at(&base, x))?.device_bytes)))
                .collect::<Result<Vec<_>, Error>>()?;
            let crossings = gpus
                .iter()
                .map(|gpu| crossing(&base, axis, lo, hi, gpu))
                .collect::<Result<Vec<_>, Error>>()?;
            lines.push(Line {
                label,
                job: base,
                points,
                crossings,
            });
        }
    }
    let j = &jobs[0];
    let title = match axis {
        SweepAxis::Seq if others.len() == 1 => {
            format!("GPU memory against sequence length, batch {}", others[0])
        }
        SweepAxis::Seq => "GPU memory against sequence length".to_string(),
        SweepAxis::Batch => format!("GPU memory against batch size, {} tokens", others[0]),
    };
    let title = if many_models {
        title
    } else {
        format!("{}: {title}", j.model.name)
    };
    Ok(SweepChart {
        title,
        settings: super::render::settings_line(jobs),
        axis,
        xs: xs.to_vec(),
        lines,
        gpus: gpus.to_vec(),
        plot_width: PLOT_WIDTH,
    })
}

/// Rejects more than [`MAX_GPUS`] capacity lines.
pub fn check_gpus(gpus: &[Gpu]) -> Result<(), Error> {
    if gpus.len() > MAX_GPUS {
        return Err(Error::Unsupported(format!(
            "{} GPUs given to --gpu, more than {MAX_GPUS} capacity lines a chart can label",
            gpus.len()
        )));
    }
    Ok(())
}

fn crossing(job: &Job, axis: SweepAxis, lo: u128, hi: u128, gpu: &Gpu) -> Result<Crossing, Error> {
    let reach = max_fitting(job, axis, lo, hi, gpu)?;
    let unit = axis.unit();
    let (text, at_bytes) = match reach {
        Reach::UpTo(v) => (
            format!(
                "fits up to {} {} on {}",
                thousands(v),
                if v == 1 {
                    unit.trim_end_matches('s')
                } else {
                    unit
                },
                gpu.name
            ),
            Some(estimate(&axis.at(job, v))?.device_bytes),
        ),
        Reach::Whole => (
            format!(
                "fits all {}–{} {unit} on {}",
                thousands(lo),
                thousands(hi),
                gpu.name
            ),
            None,
        ),
        Reach::None => (
            format!(
                "does not fit {} even at {} {}",
                gpu.name,
                thousands(lo),
                if lo == 1 {
                    unit.trim_end_matches('s')
                } else {
                    unit
                }
            ),
            None,
        ),
    };
    Ok(Crossing {
        gpu: gpu.name.clone(),
        reach,
        at_bytes,
        text,
    })
}

const LEGEND_W: u32 = 400;

impl Line {
    /// The drawn path in (axis value, GiB): the points and the crossings, so the line passes
    /// through its markers (between points it is straight, in whatever scale x is drawn).
    pub fn path_gib(&self) -> Vec<(f64, f64)> {
        let mut path: Vec<(u128, Bytes)> = self.points.clone();
        for c in &self.crossings {
            if let (Reach::UpTo(v), Some(b)) = (c.reach, c.at_bytes) {
                path.push((v, b));
            }
        }
        path.sort_unstable();
        path.dedup();
        path.into_iter().map(|(x, b)| (x as f64, b.gib())).collect()
    }
}

impl SweepChart {
    /// Whether the x axis is logarithmic: when the range spans a factor of 16 or more.
    pub fn log_x(&self) -> bool {
        self.xs[self.xs.len() - 1] >= 16 * self.xs[0]
    }

    /// Tick marks of a log axis: the points themselves when few, else powers of two (every
    /// second, fourth … when those are many).
    fn log_ticks(&self) -> Vec<f64> {
        if self.xs.len() <= 12 {
            return self.xs.iter().map(|&x| x as f64).collect();
        }
        let (lo, hi) = (self.xs[0], self.xs[self.xs.len() - 1]);
        let powers: Vec<u128> = (0..127)
            .map(|p| 1u128 << p)
            .filter(|v| (lo..=hi).contains(v))
            .collect();
        let every = powers.len().div_ceil(10).max(1);
        powers.iter().step_by(every).map(|&v| v as f64).collect()
    }

    fn legend_rows(&self) -> usize {
        self.lines.len() * (1 + self.gpus.len()) + 1
    }

    fn plot<DB: DrawingBackend, X>(&self, area: &DrawingArea<DB, Shift>, x: X) -> Result<(), String>
    where
        X: AsRangedCoord<Value = f64>,
        X::CoordDescType: ValueFormatter<f64>,
    {
        let top = self
            .lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.1.gib()))
            .chain(self.gpus.iter().map(|g| g.memory().gib()))
            .fold(1.0, f64::max)
            * 1.08;
        let (lo, hi) = (self.xs[0] as f64, self.xs[self.xs.len() - 1] as f64);
        let mut chart = ChartBuilder::on(area)
            .margin(12)
            .margin_right(CAPACITY_STRIP)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(x, 0f64..top)
            .map_err(|e| e.to_string())?;
        let x_desc = match self.axis {
            SweepAxis::Seq => "sequence length (tokens)",
            SweepAxis::Batch => "batch size (samples)",
        };
        let x_desc = if self.log_x() {
            format!("{x_desc}, log scale")
        } else {
            x_desc.to_string()
        };
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc("GiB (device memory, as nvidia-smi shows it)")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .x_label_formatter(&|v| count_label(*v))
            .axis_desc_style(text(15.0, BLACK))
            .label_style(text(15.0, BLACK))
            .draw()
            .map_err(|e| e.to_string())?;

        let mut labels = Vec::new();
        for (bytes, label, colour) in capacity_lines(&self.gpus) {
            let y = bytes.gib();
            chart
                .draw_series(DashedLineSeries::new(
                    [(lo, y), (hi, y)],
                    8,
                    5,
                    colour.plotters().stroke_width(2),
                ))
                .map_err(|e| e.to_string())?;
            labels.push((
                super::breakdown::local(area, chart.backend_coord(&(hi, y))).1,
                label,
                colour,
            ));
        }
        let strip_x = super::breakdown::local(area, chart.backend_coord(&(hi, 0.0))).0 + 8;
        draw_capacity_labels(area, strip_x, &labels)?;
        for (i, line) in self.lines.iter().enumerate() {
            let colour = line_colour(i).plotters();
            let pts = line.points.iter().map(|&(x, b)| (x as f64, b.gib()));
            chart
                .draw_series(LineSeries::new(line.path_gib(), colour.stroke_width(3)))
                .map_err(|e| e.to_string())?;
            if line.points.len() <= 64 {
                chart
                    .draw_series(pts.map(|p| Circle::new(p, 3, colour.filled())))
                    .map_err(|e| e.to_string())?;
            }
            for c in &line.crossings {
                if let (Reach::UpTo(v), Some(b)) = (c.reach, c.at_bytes) {
                    let p = (v as f64, b.gib());
                    chart
                        .draw_series([
                            Circle::new(p, 7, colour.filled()),
                            Circle::new(p, 7, BLACK.stroke_width(2)),
                        ])
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        Ok(())
    }

    fn legend<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let mut y = 48;
        area.draw(&Text::new(
            "● largest value that fits, to the token",
            (8, y),
            text(14.0, BLACK).pos(Pos::new(HPos::Left, VPos::Top)),
        ))
        .map_err(|e| e.to_string())?;
        y += 30;
        for (i, line) in self.lines.iter().enumerate() {
            let colour = line_colour(i).plotters();
            area.draw(&PathElement::new(
                [(8, y + 8), (36, y + 8)],
                colour.stroke_width(3),
            ))
            .map_err(|e| e.to_string())?;
            area.draw(&Text::new(
                line.label.clone(),
                (44, y + 8),
                text(16.0, BLACK).pos(Pos::new(HPos::Left, VPos::Center)),
            ))
            .map_err(|e| e.to_string())?;
            y += 22;
            for c in &line.crossings {
                area.draw(&Text::new(
                    c.text.clone(),
                    (44, y + 8),
                    text(15.0, BLACK).pos(Pos::new(HPos::Left, VPos::Center)),
                ))
                .map_err(|e| e.to_string())?;
                y += 21;
            }
            y += 8;
        }
        Ok(())
    }
}

impl Chart for SweepChart {
    fn size(&self) -> (u32, u32) {
        let legend_h = 90 + 30 * self.legend_rows() as u32;
        (
            self.plot_width + CAPACITY_STRIP + LEGEND_W,
            legend_h.max(620) + 64,
        )
    }

    fn title(&self) -> String {
        format!("{} ({})", self.title, self.settings)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let (w, _) = self.size();
        let (header, body) = root.split_vertically(64);
        header
            .draw(&Text::new(
                self.title.clone(),
                (16, 10),
                text(20.0, BLACK).pos(Pos::new(HPos::Left, VPos::Top)),
            ))
            .map_err(|e| e.to_string())?;
        header
            .draw(&Text::new(
                self.settings.clone(),
                (16, 38),
                text(15.0, BLACK).pos(Pos::new(HPos::Left, VPos::Top)),
            ))
            .map_err(|e| e.to_string())?;
        let (plot, legend) = body.split_horizontally(w - LEGEND_W);
        let (lo, hi) = (self.xs[0] as f64, self.xs[self.xs.len() - 1] as f64);
        // A single point still gets an axis around it.
        let hi = if hi > lo { hi } else { lo + 1.0 };
        if self.log_x() {
            let ticks = self.log_ticks();
            self.plot(&plot, (lo..hi).log_scale().with_key_points(ticks))?;
        } else {
            self.plot(&plot, lo..hi)?;
        }
        self.legend(&legend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::resolve_gpu;
    use crate::{resolve_model, Method};

    #[test]
    fn one_line_per_method_and_batch_with_a_crossing_per_gpu() {
        let (m, _) = resolve_model("llama-3.1-8b").unwrap();
        let jobs = [
            Job::new(m.clone(), Method::Lora),
            Job::new(m, Method::Qlora),
        ];
        let gpus = [
            resolve_gpu("rtx-4090").unwrap(),
            resolve_gpu("h100").unwrap(),
        ];
        let chart = sweep(&jobs, &[512, 1024, 2048, 4096], &[1, 2], &gpus).unwrap();
        assert_eq!(chart.axis, SweepAxis::Seq);
        assert_eq!(chart.lines.len(), 4);
        assert_eq!(chart.lines[3].label, "qlora batch 2");
        assert!(!chart.log_x());
        for line in &chart.lines {
            assert_eq!(line.points.len(), 4);
            assert!(line.points.windows(2).all(|w| w[0].1 < w[1].1));
            assert_eq!(line.crossings.len(), 2);
        }
        // 8B LoRA keeps 16 GiB of bf16 weights: over 24 GiB only at long sequences.
        let c = &chart.lines[0].crossings[0];
        match c.reach {
            Reach::UpTo(v) => {
                assert!((512..4096).contains(&v));
                assert_eq!(
                    c.text,
                    format!("fits up to {} tokens on rtx-4090", thousands(v))
                );
            }
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn a_sweep_needs_a_range_and_a_bounded_size() {
        let (m, _) = resolve_model("1B").unwrap();
        let jobs = [Job::new(m, Method::Qlora)];
        let e = sweep(&jobs, &[2048], &[1], &[]).unwrap_err().to_string();
        assert!(e.contains("needs a range"), "{e}");
        let seqs: Vec<u128> = (1..=MAX_POINTS as u128).collect();
        let e = sweep(&jobs, &seqs, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("110000 estimates, more than 100000"), "{e}");
        let batches: Vec<u128> = (1..=25).collect();
        let e = sweep(&jobs, &[1, 2], &batches, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("25 lines"), "{e}");
        let gpus = vec![crate::gpu::resolve_gpu("h100").unwrap(); 13];
        let e = sweep(&jobs, &[1, 2], &[1], &gpus).unwrap_err().to_string();
        assert!(e.contains("13 GPUs"), "{e}");
        let c = sweep(&jobs, &[1], &[1, 64], &[]).unwrap();
        assert_eq!(c.axis, SweepAxis::Batch);
        assert!(c.log_x());
    }
}
