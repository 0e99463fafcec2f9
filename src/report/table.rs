//! Terminal table (comfy-table).

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{CellAlignment, ContentArrangement, Table};

use super::{Renderer, Sheet};

pub struct TableRenderer;

impl Renderer for TableRenderer {
    fn render(&self, s: &Sheet) -> String {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED)
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_header(&s.headers);
        if s.headers.len() > 4 {
            t.set_width(160);
        }
        for row in &s.rows {
            t.add_row(row);
        }
        for &i in &s.numeric {
            if let Some(col) = t.column_mut(i) {
                col.set_cell_alignment(CellAlignment::Right);
            }
        }
        let mut out = String::new();
        for line in &s.title {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str(&t.to_string());
        out.push('\n');
        for n in &s.notes {
            out.push_str(n);
            out.push('\n');
        }
        out
    }
}
