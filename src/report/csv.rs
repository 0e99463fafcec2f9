//! CSV (RFC 4180 quoting); titles and notes are left out so the output loads as data.

use super::{Renderer, Sheet};

pub struct CsvRenderer;

fn field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

impl Renderer for CsvRenderer {
    fn render(&self, s: &Sheet) -> String {
        std::iter::once(&s.headers)
            .chain(&s.rows)
            .map(|r| r.iter().map(|c| field(c)).collect::<Vec<_>>().join(",") + "\n")
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_when_needed() {
        let s = Sheet {
            headers: vec!["a".into(), "b".into()],
            rows: vec![vec!["x,y".into(), "say \"hi\"".into()]],
            ..Sheet::default()
        };
        assert_eq!(CsvRenderer.render(&s), "a,b\n\"x,y\",\"say \"\"hi\"\"\"\n");
    }
}
