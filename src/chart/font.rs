//! The font text is drawn with: DejaVu Sans, bundled in `assets/fonts/` (Bitstream Vera
//! licence, `assets/fonts/LICENSE-DejaVu.txt`) and registered with plotters' `ab_glyph`
//! backend, so PNG text renders on a machine without system fonts. plotters looks fonts up by
//! family name; the font is registered as `sans-serif`, which is also what SVG output names,
//! so a browser uses its own sans-serif face there.

use std::sync::OnceLock;

use plotters::style::{register_font, FontStyle};

use crate::error::Error;

const DEJAVU_SANS: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// The family name charts ask for.
pub const FAMILY: &str = "sans-serif";

/// Registers the bundled font once per process.
pub fn ensure_registered() -> Result<(), Error> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        register_font(FAMILY, FontStyle::Normal, DEJAVU_SANS).is_ok()
            && register_font(FAMILY, FontStyle::Bold, DEJAVU_SANS).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Unsupported(
            "the bundled font assets/fonts/DejaVuSans.ttf could not be parsed".into(),
        ))
    }
}
