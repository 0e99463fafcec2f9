//! GitHub-flavoured Markdown table.

use super::{Renderer, Sheet};

pub struct MarkdownRenderer;

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

impl Renderer for MarkdownRenderer {
    fn render(&self, s: &Sheet) -> String {
        let mut out = String::new();
        for line in &s.title {
            out.push_str(&format!("**{}**\n\n", cell(line)));
        }
        let row = |r: &[String]| {
            format!(
                "| {} |\n",
                r.iter().map(|c| cell(c)).collect::<Vec<_>>().join(" | ")
            )
        };
        out.push_str(&row(&s.headers));
        let align: Vec<String> = (0..s.headers.len())
            .map(|i| {
                if s.numeric.contains(&i) {
                    "---:".into()
                } else {
                    "---".into()
                }
            })
            .collect();
        out.push_str(&row(&align));
        for r in &s.rows {
            out.push_str(&row(r));
        }
        if !s.notes.is_empty() {
            out.push('\n');
            for n in &s.notes {
                out.push_str(&format!("{}\n\n", cell(n)));
            }
        }
        out
    }
}
