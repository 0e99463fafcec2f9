//! The one colour of each breakdown component, shared by every chart and the HTML table.
//!
//! Colours are Paul Tol's "muted" qualitative scheme (designed to stay distinct under the common
//! colour-vision deficiencies; <https://personal.sron.nl/~pault/#sec:qualitative>) for the memory a
//! method owns, and greys of distinct lightness for runtime overhead, which readers do not need to
//! tell apart by hue. The two buffers of sharded (ZeRO / FSDP) steps take colours from Tol's
//! "light" scheme, since "muted" has no more. Sweep lines use the Okabe–Ito scheme (Okabe & Ito,
//! "Color Universal Design", 2008) without its yellow, which is unreadable on white.

/// An sRGB colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rgb(pub u8, pub u8, pub u8);

impl Rgb {
    /// `#rrggbb`, for HTML and CSS.
    pub fn hex(self) -> String {
        format!("#{:02x}{:02x}{:02x}", self.0, self.1, self.2)
    }

    pub(crate) fn plotters(self) -> plotters::style::RGBColor {
        plotters::style::RGBColor(self.0, self.1, self.2)
    }
}

/// Component name (as in `Estimate::components`) and its colour, in stacking order (bottom
/// first): what the model owns, then what training adds, then runtime overhead.
// ANCHOR: palette
pub const COMPONENT_COLOURS: [(&str, Rgb); 15] = [
    ("weights", Rgb(0x33, 0x22, 0x88)),               // Tol indigo
    ("quant_constants", Rgb(0x88, 0xcc, 0xee)),       // Tol cyan
    ("lora_adapters", Rgb(0x44, 0xaa, 0x99)),         // Tol teal
    ("gradients", Rgb(0x11, 0x77, 0x33)),             // Tol green
    ("optimizer_state", Rgb(0x99, 0x99, 0x33)),       // Tol olive
    ("paged_optimizer_state", Rgb(0xdd, 0xcc, 0x77)), // Tol sand
    ("activations", Rgb(0xcc, 0x66, 0x77)),           // Tol rose
    ("kv_cache", Rgb(0x88, 0x22, 0x55)),              // Tol wine
    ("logits", Rgb(0xaa, 0x44, 0x99)),                // Tol purple
    ("gathered_params", Rgb(0x77, 0xaa, 0xdd)),       // Tol light blue (sharded steps)
    ("comm_buckets", Rgb(0xee, 0x88, 0x66)),          // Tol light orange (sharded steps)
    ("temporaries", Rgb(0x55, 0x55, 0x55)),           // dark grey
    ("cublas_workspace", Rgb(0x33, 0x33, 0x33)),      // near black
    ("allocator_reserve", Rgb(0xbb, 0xbb, 0xbb)),     // light grey
    ("cuda_context", Rgb(0x88, 0x88, 0x88)),          // mid grey
];
// ANCHOR_END: palette

/// Colour of a component not in [`COMPONENT_COLOURS`] (a component added to the estimator
/// later still draws, in Tol's "pale grey").
pub const OTHER_COMPONENT: Rgb = Rgb(0xdd, 0xdd, 0xdd);

/// The colour of a breakdown component.
pub fn component_colour(name: &str) -> Rgb {
    COMPONENT_COLOURS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(OTHER_COMPONENT, |(_, c)| *c)
}

/// Stacking position of a component (unknown ones go on top).
pub fn component_order(name: &str) -> usize {
    COMPONENT_COLOURS
        .iter()
        .position(|(n, _)| *n == name)
        .unwrap_or(COMPONENT_COLOURS.len())
}

/// Okabe–Ito, without yellow: one per sweep line, cycled.
pub const LINE_COLOURS: [Rgb; 7] = [
    Rgb(0x00, 0x72, 0xb2), // blue
    Rgb(0xd5, 0x5e, 0x00), // vermillion
    Rgb(0x00, 0x9e, 0x73), // bluish green
    Rgb(0xcc, 0x79, 0xa7), // reddish purple
    Rgb(0xe6, 0x9f, 0x00), // orange
    Rgb(0x56, 0xb4, 0xe9), // sky blue
    Rgb(0x00, 0x00, 0x00), // black
];

/// GPU capacity lines.
pub const CAPACITY: Rgb = Rgb(0xcc, 0x33, 0x11);

/// One colour per GPU capacity line, drawn dashed so they never read as data (Tol's "bright"
/// red, then dark shades that neither the component nor the line palettes use).
pub const CAPACITY_COLOURS: [Rgb; 6] = [
    CAPACITY,
    Rgb(0x11, 0x11, 0x11), // black
    Rgb(0x88, 0x22, 0x55), // wine
    Rgb(0x00, 0x77, 0xbb), // Tol vibrant blue
    Rgb(0xee, 0x77, 0x33), // Tol vibrant orange
    Rgb(0x00, 0x99, 0x88), // Tol vibrant teal
];

pub fn capacity_colour(index: usize) -> Rgb {
    CAPACITY_COLOURS[index % CAPACITY_COLOURS.len()]
}

pub fn line_colour(index: usize) -> Rgb {
    LINE_COLOURS[index % LINE_COLOURS.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::Category;

    #[test]
    fn every_component_the_estimator_names_has_its_own_colour() {
        let names: Vec<&str> = Category::ALL
            .iter()
            .map(|c| c.name())
            .chain(["allocator_reserve", "paged_optimizer_state", "cuda_context"])
            .collect();
        for n in &names {
            assert!(
                COMPONENT_COLOURS.iter().any(|(c, _)| c == n),
                "{n} has no colour"
            );
        }
        let mut colours: Vec<Rgb> = COMPONENT_COLOURS.iter().map(|(_, c)| *c).collect();
        colours.push(OTHER_COMPONENT);
        colours.push(CAPACITY);
        let n = colours.len();
        colours.sort_by_key(|c| (c.0, c.1, c.2));
        colours.dedup();
        assert_eq!(colours.len(), n, "two components share a colour");
        assert_eq!(component_colour("weights").hex(), "#332288");
        assert_eq!(component_colour("something_new"), OTHER_COMPONENT);
    }
}
