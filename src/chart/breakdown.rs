//! `memplan chart breakdown`: one stacked bar per job (model × method), each segment a
//! component of the estimate at its peak, with the capacity of the chosen GPUs drawn across.
//! A bar's height is the estimate's `device_bytes` (all components, including the allocator
//! reserve and CUDA context), the number `gpu::fit` compares with the GPU's memory.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};

use super::palette::{component_colour, component_order};
use super::render::{
    backed_text, capacity_lines, draw_capacity_labels, gib_label, settings_line, text, Chart,
    CAPACITY_STRIP,
};
use crate::error::Error;
use crate::estimate::{estimate, Estimate};
use crate::gpu::Gpu;
use crate::method::Job;

/// One bar: a job and its estimate.
#[derive(Debug, Clone)]
pub struct Bar {
    /// Two lines under the bar: the model, then the method.
    pub label: [String; 2],
    pub job: Job,
    pub estimate: Estimate,
}

/// The breakdown chart's data.
#[derive(Debug, Clone)]
pub struct BreakdownChart {
    pub title: String,
    /// The job settings the bars share (and those that differ, joined by `/`).
    pub settings: String,
    pub bars: Vec<Bar>,
    pub gpus: Vec<Gpu>,
}

/// Bars one chart may draw (about 5,000 pixels wide).
pub const MAX_BARS: usize = 40;

/// Estimates every job; bars keep the order of `jobs`.
pub fn breakdown(jobs: &[Job], gpus: &[Gpu]) -> Result<BreakdownChart, Error> {
    if jobs.len() > MAX_BARS {
        return Err(Error::Unsupported(format!(
            "{} bars (models × methods), more than {MAX_BARS}: draw fewer per chart",
            jobs.len()
        )));
    }
    super::sweep::check_gpus(gpus)?;
    let bars = jobs
        .iter()
        .map(|job| {
            Ok(Bar {
                label: [job.model.name.clone(), job.method.to_string()],
                job: job.clone(),
                estimate: estimate(job)?,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let title = match jobs.first() {
        Some(j) => format!(
            "GPU memory at the peak of one step, batch {} × {} tokens",
            j.batch, j.seq
        ),
        None => return Err(Error::Unsupported("a breakdown chart needs a job".into())),
    };
    Ok(BreakdownChart {
        title,
        settings: settings_line(jobs),
        bars,
        gpus: gpus.to_vec(),
    })
}

impl BreakdownChart {
    /// Names of the components any bar has, in stacking order.
    pub fn component_names(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = Vec::new();
        for c in self.bars.iter().flat_map(|b| &b.estimate.components) {
            if c.bytes.0 > 0 && !names.contains(&c.name) {
                names.push(c.name);
            }
        }
        names.sort_by_key(|n| component_order(n));
        names
    }
}

const LEGEND_W: u32 = 250;

impl Chart for BreakdownChart {
    fn size(&self) -> (u32, u32) {
        let plot = 160 + 120 * self.bars.len() as u32;
        (plot.max(640) + CAPACITY_STRIP + LEGEND_W, 760)
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
                text(14.0, BLACK).pos(Pos::new(HPos::Left, VPos::Top)),
            ))
            .map_err(|e| e.to_string())?;
        let (plot_area, legend_area) = body.split_horizontally(w - LEGEND_W);
        let top = self
            .bars
            .iter()
            .map(|b| b.estimate.device_bytes.gib())
            .chain(self.gpus.iter().map(|g| g.memory().gib()))
            .fold(1.0, f64::max);
        let bottom = self
            .bars
            .iter()
            .map(|b| b.estimate.device_bytes.gib())
            .fold(f64::MAX, f64::min);
        if top / bottom >= 10.0 {
            // Bars that differ 10× or more: a log axis keeps the small ones readable.
            let floor = (bottom / 8.0).max(0.01);
            self.plot(&plot_area, (floor..top * 1.5).log_scale(), floor, true)?;
        } else {
            self.plot(&plot_area, 0f64..top * 1.12, 0.0, false)?;
        }
        // Legend: top of the stack first, as the bars read.
        let names = self.component_names();
        legend_area
            .draw(&Text::new(
                "component",
                (8, 48),
                text(15.0, BLACK).pos(Pos::new(HPos::Left, VPos::Top)),
            ))
            .map_err(|e| e.to_string())?;
        for (row, name) in names.iter().rev().enumerate() {
            let y = 76 + 24 * row as i32;
            legend_area
                .draw(&Rectangle::new(
                    [(8, y), (26, y + 16)],
                    component_colour(name).plotters().filled(),
                ))
                .map_err(|e| e.to_string())?;
            legend_area
                .draw(&Text::new(
                    name.to_string(),
                    (34, y + 8),
                    text(14.0, BLACK).pos(Pos::new(HPos::Left, VPos::Center)),
                ))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

impl BreakdownChart {
    /// The bars, totals and capacity lines on a y axis `y` (linear from 0, or log from `floor`).
    fn plot<DB: DrawingBackend, Y>(
        &self,
        area: &DrawingArea<DB, Shift>,
        y: Y,
        floor: f64,
        log: bool,
    ) -> Result<(), String>
    where
        Y: AsRangedCoord<Value = f64>,
        Y::CoordDescType: ValueFormatter<f64>,
    {
        let n = self.bars.len() as f64;
        let mut chart = ChartBuilder::on(area)
            .margin(12)
            .margin_right(CAPACITY_STRIP)
            .x_label_area_size(60)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..n, y)
            .map_err(|e| e.to_string())?;
        let y_desc = if log {
            "GiB on the device (nvidia-smi), log scale"
        } else {
            "GiB on the device (nvidia-smi)"
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc(y_desc)
            .y_label_formatter(&|v| {
                if *v >= 1.0 || *v == 0.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                }
            })
            .axis_desc_style(text(15.0, BLACK))
            .label_style(text(15.0, BLACK))
            .draw()
            .map_err(|e| e.to_string())?;

        for (i, bar) in self.bars.iter().enumerate() {
            let x0 = i as f64 + 0.18;
            let x1 = i as f64 + 0.82;
            let mut parts: Vec<_> = bar
                .estimate
                .components
                .iter()
                .filter(|c| c.bytes.0 > 0)
                .collect();
            parts.sort_by_key(|c| component_order(c.name));
            let mut base = 0u128;
            for c in parts {
                let (y0, y1) = (gib(base).max(floor), gib(base + c.bytes.0).max(floor));
                base += c.bytes.0;
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x0, y0), (x1, y1)],
                        component_colour(c.name).plotters().filled(),
                    )))
                    .map_err(|e| e.to_string())?;
            }
            let (px, py) = local(area, chart.backend_coord(&(i as f64 + 0.5, floor)));
            for (line, label) in bar.label.iter().enumerate() {
                area.draw(&Text::new(
                    label.clone(),
                    (px, py + 8 + 18 * line as i32),
                    text(14.0, BLACK).pos(Pos::new(HPos::Center, VPos::Top)),
                ))
                .map_err(|e| e.to_string())?;
            }
        }

        // Capacity lines (one colour and one label per GPU), then the bar totals on white
        // boxes over them, so a line never runs through a number.
        let mut labels = Vec::new();
        for (bytes, label, colour) in capacity_lines(&self.gpus) {
            let y = bytes.gib();
            chart
                .draw_series(DashedLineSeries::new(
                    [(0.0, y), (n, y)],
                    10,
                    6,
                    colour.plotters().stroke_width(2),
                ))
                .map_err(|e| e.to_string())?;
            labels.push((local(area, chart.backend_coord(&(n, y))).1, label, colour));
        }
        for (i, bar) in self.bars.iter().enumerate() {
            let total = bar.estimate.device_bytes;
            let at = local(area, chart.backend_coord(&(i as f64 + 0.5, total.gib())));
            backed_text(
                area,
                &format!("{} GiB", gib_label(total)),
                (at.0, at.1 - 3),
                &text(14.0, BLACK).pos(Pos::new(HPos::Center, VPos::Bottom)),
            )?;
        }
        let strip_x = local(area, chart.backend_coord(&(n, floor))).0 + 8;
        draw_capacity_labels(area, strip_x, &labels)?;
        Ok(())
    }
}

fn gib(bytes: u128) -> f64 {
    crate::units::Bytes(bytes).gib()
}

/// A backend pixel (what `backend_coord` returns) in `area`'s own coordinates.
pub(crate) fn local<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    (x, y): (i32, i32),
) -> (i32, i32) {
    let (ox, oy) = area.get_base_pixel();
    (x - ox, y - oy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{resolve_model, Method};

    #[test]
    fn bars_stack_to_the_device_total() {
        let (m, _) = resolve_model("llama-3.1-8b").unwrap();
        let jobs = [
            Job::new(m.clone(), Method::Full),
            Job::new(m, Method::Qlora),
        ];
        let chart = breakdown(&jobs, &[]).unwrap();
        for bar in &chart.bars {
            let sum: u128 = bar.estimate.components.iter().map(|c| c.bytes.0).sum();
            assert_eq!(sum, bar.estimate.device_bytes.0);
        }
        let names = chart.component_names();
        assert!(names.contains(&"quant_constants") && names.contains(&"gradients"));
        assert_eq!(names[0], "weights");
        let many = vec![jobs[0].clone(); MAX_BARS + 1];
        let e = breakdown(&many, &[]).unwrap_err().to_string();
        assert!(e.contains("41 bars"), "{e}");
    }
}
