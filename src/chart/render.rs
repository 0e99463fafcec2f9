//! One trait for a chart, and the backends that turn it into bytes: PNG through plotters'
//! bitmap backend and the `png` encoder, SVG through its SVG backend, HTML as a page around
//! the SVG.

use plotters::coord::Shift;
use plotters::prelude::*;

use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::font;
use super::output::OutputFormat;
use crate::error::Error;
use crate::gpu::Gpu;
use crate::units::Bytes;

/// Something drawable at a fixed size.
pub trait Chart {
    /// Width and height in pixels.
    fn size(&self) -> (u32, u32);
    /// The title, also the HTML page's.
    fn title(&self) -> String;
    /// Draws onto `root`, which is `size()` pixels.
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String>;

    /// The chart in `format`.
    fn render(&self, format: OutputFormat) -> Result<Vec<u8>, Error>
    where
        Self: Sized,
    {
        match format {
            OutputFormat::Png => png(self),
            OutputFormat::Svg => svg(self).map(String::into_bytes),
            OutputFormat::Html => {
                let svg = svg(self)?;
                Ok(crate::report::html::chart_page(&self.title(), &svg).into_bytes())
            }
        }
    }
}

fn draw_error(e: impl std::fmt::Display) -> Error {
    Error::Unsupported(format!("cannot draw the chart: {e}"))
}

/// The chart as an SVG document.
pub fn svg(chart: &impl Chart) -> Result<String, Error> {
    font::ensure_registered()?;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, chart.size()).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        chart.draw(&root).map_err(draw_error)?;
        root.present().map_err(draw_error)?;
    }
    Ok(out)
}

/// The chart as a PNG image (8-bit RGB).
pub fn png(chart: &impl Chart) -> Result<Vec<u8>, Error> {
    font::ensure_registered()?;
    let (w, h) = chart.size();
    let mut pixels = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        chart.draw(&root).map_err(draw_error)?;
        root.present().map_err(draw_error)?;
    }
    let mut out = Vec::new();
    {
        let mut enc = ::png::Encoder::new(&mut out, w, h);
        enc.set_color(::png::ColorType::Rgb);
        enc.set_depth(::png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(draw_error)?;
        writer.write_image_data(&pixels).map_err(draw_error)?;
        writer.finish().map_err(draw_error)?;
    }
    Ok(out)
}

/// A text style in the bundled font.
pub(crate) fn text(size: f64, colour: RGBColor) -> TextStyle<'static> {
    TextStyle {
        font: (font::FAMILY, size).into_font(),
        color: colour.to_backend_color(),
        pos: plotters::style::text_anchor::Pos::default(),
    }
}

/// Width of the strip right of a plot where capacity lines are labelled.
pub(crate) const CAPACITY_STRIP: u32 = 190;

/// Capacity lines, one per GPU with its own colour, lowest first: (bytes, "a100-80gb 80.0 GiB",
/// colour). Two GPUs of nearly equal memory (a100-80gb, h100-80gb) are two lines and two labels.
pub(crate) fn capacity_lines(gpus: &[Gpu]) -> Vec<(Bytes, String, super::palette::Rgb)> {
    let mut lines: Vec<(Bytes, String, super::palette::Rgb)> = gpus
        .iter()
        .enumerate()
        .map(|(i, g)| {
            (
                g.memory(),
                format!("{} ({})", g.name, g.memory_text()),
                super::palette::capacity_colour(i),
            )
        })
        .collect();
    lines.sort_by_key(|(b, _, _)| *b);
    lines
}

/// Labels capacity lines in the strip starting at pixel `x`; `at` holds each label's pixel
/// height and colour, and labels closer than a line of text are pushed apart upwards.
pub(crate) fn draw_capacity_labels<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    x: i32,
    at: &[(i32, String, super::palette::Rgb)],
) -> Result<(), String> {
    let mut sorted: Vec<&(i32, String, super::palette::Rgb)> = at.iter().collect();
    sorted.sort_by_key(|(y, _, _)| std::cmp::Reverse(*y));
    let mut prev = i32::MAX;
    for (y, label, colour) in sorted {
        let y = (*y).min(prev.saturating_sub(17));
        prev = y;
        area.draw(&Text::new(
            label.clone(),
            (x, y),
            text(15.0, colour.plotters()).pos(Pos::new(HPos::Left, VPos::Center)),
        ))
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Text on a white box, so no line drawn before it runs through it.
pub(crate) fn backed_text<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    label: &str,
    (x, y): (i32, i32),
    style: &TextStyle,
) -> Result<(), String> {
    let (w, h) = area
        .estimate_text_size(label, style)
        .map_err(|e| e.to_string())?;
    let (w, h) = (w as i32, h as i32);
    let left = match style.pos.h_pos {
        HPos::Left => x,
        HPos::Center => x - w / 2,
        HPos::Right => x - w,
    };
    let top = match style.pos.v_pos {
        VPos::Top => y,
        VPos::Center => y - h / 2,
        VPos::Bottom => y - h,
    };
    area.draw(&Rectangle::new(
        [(left - 3, top - 2), (left + w + 3, top + h + 2)],
        WHITE.filled(),
    ))
    .map_err(|e| e.to_string())?;
    area.draw(&Text::new(label.to_string(), (x, y), style.clone()))
        .map_err(|e| e.to_string())
}

/// The settings every job of a chart shares, and those that differ joined by `/`:
/// `batch 1 × 2048 tokens · weights bf16/nf4 · sdpa · adamw · checkpointing on · LoRA r16`.
pub fn settings_line(jobs: &[crate::method::Job]) -> String {
    fn each<T: PartialEq + std::fmt::Display>(
        jobs: &[crate::method::Job],
        f: impl Fn(&crate::method::Job) -> T,
    ) -> String {
        let mut seen: Vec<T> = Vec::new();
        for j in jobs {
            let v = f(j);
            if !seen.contains(&v) {
                seen.push(v);
            }
        }
        seen.iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("/")
    }
    use crate::method::Method;
    let training: Vec<crate::method::Job> = jobs
        .iter()
        .filter(|j| j.method != Method::Inference)
        .cloned()
        .collect();
    let mut parts = vec![
        format!("weights {}", each(jobs, |j| j.weights)),
        format!("compute {}", each(jobs, |j| j.compute)),
        format!("{} attention", each(jobs, |j| j.attention)),
    ];
    if !training.is_empty() {
        parts.push(format!("optimizer {}", each(&training, |j| j.optimizer)));
        parts.push(format!(
            "checkpointing {}",
            each(&training, |j| if j.grad_checkpointing {
                "on"
            } else {
                "off"
            })
        ));
    }
    let lora: Vec<crate::method::Job> = jobs.iter().filter(|j| j.lora.is_some()).cloned().collect();
    if !lora.is_empty() {
        parts.push(format!(
            "LoRA r{}",
            each(&lora, |j| j.lora.as_ref().map_or(0, |l| l.rank))
        ));
    }
    parts.join(" · ")
}

/// `12.3` GiB for labels.
pub(crate) fn gib_label(bytes: Bytes) -> String {
    let g = bytes.gib();
    if g >= 100.0 {
        format!("{g:.0}")
    } else {
        format!("{g:.1}")
    }
}

/// Axis numbers: 512, 2k, 11.2k, 1.5M; multiples of 1024 in binary thousands, as sequence
/// lengths are spoken (4096 is "4k").
pub(crate) fn count_label(v: f64) -> String {
    if (1024.0..1e6).contains(&v) && v % 1024.0 == 0.0 {
        format!("{}k", v / 1024.0)
    } else if v >= 1e6 {
        trim(format!("{:.1}", v / 1e6)) + "M"
    } else if v >= 1e3 {
        trim(format!("{:.1}", v / 1e3)) + "k"
    } else {
        format!("{v:.0}")
    }
}

fn trim(s: String) -> String {
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

/// `11,213`.
pub(crate) fn thousands(v: u128) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_as_people_write_them() {
        assert_eq!(thousands(11213), "11,213");
        assert_eq!(thousands(512), "512");
        assert_eq!(thousands(1_000_000), "1,000,000");
        assert_eq!(count_label(2048.0), "2k");
        assert_eq!(count_label(16384.0), "16k");
        assert_eq!(count_label(3000.0), "3k");
        assert_eq!(count_label(11_213.0), "11.2k");
        assert_eq!(count_label(512.0), "512");
        let rtx = crate::gpu::resolve_gpu("rtx-4090").unwrap();
        let same = format!("{}MiB", rtx.memory_mib);
        let gpus: Vec<Gpu> = ["h100", "rtx-4090", &same]
            .iter()
            .map(|g| crate::gpu::resolve_gpu(g).unwrap())
            .collect();
        let lines = capacity_lines(&gpus);
        // One line, label and colour per GPU, even for equal memory.
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].1, "rtx-4090 (23.99 GiB)");
        assert_eq!(lines[1].1, format!("{same} (23.99 GiB)"));
        assert_ne!(lines[0].2, lines[1].2);
        assert_eq!(lines[2].0, gpus[0].memory());
        assert_eq!(gib_label(Bytes(3 << 29)), "1.5");
    }
}
