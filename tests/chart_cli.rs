//! `memplan chart` and `memplan report` end to end: files decode and parse, say what they
//! should, agree with `memplan estimate --format json`, and bad input leaves nothing behind.

use std::collections::HashSet;
use std::path::Path;

mod common;

use common::{json, memplan};
use predicates::str::contains;

fn run_ok(args: &[&str]) {
    memplan()
        .args(args)
        .assert()
        .success()
        .stdout(contains("wrote "));
}

/// Width, height and RGB pixels of a PNG.
fn decode_png(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let dec = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let px = buf[..info.buffer_size()]
        .chunks(3)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    (info.width, info.height, px)
}

fn hex(rgb: [u8; 3]) -> String {
    format!("#{:02x}{:02x}{:02x}", rgb[0], rgb[1], rgb[2])
}

/// Dark pixels (text, axes) in rows `y0..y1`.
fn dark_pixels(w: u32, px: &[[u8; 3]], y0: u32, y1: u32) -> usize {
    px[(y0 * w) as usize..(y1 * w) as usize]
        .iter()
        .filter(|p| p.iter().all(|&c| c < 90))
        .count()
}

/// Every text node of an SVG document, trimmed and joined.
fn svg_text(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let doc = roxmltree::Document::parse(&text).expect("the SVG is well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    doc.descendants()
        .filter(|n| n.is_text())
        .filter_map(|n| n.text())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn breakdown_png_has_its_size_colours_and_text() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mem.png");
    let o = out.to_str().unwrap();
    run_ok(&[
        "chart",
        "breakdown",
        "--model",
        "8B,70B",
        "--method",
        "full,lora,qlora",
        "--gpu",
        "a100-80gb,h100-80gb,rtx-4090",
        "--out",
        o,
    ]);
    let (w, h, px) = decode_png(&out);
    // 6 bars: 160 + 120 × 6 px of plot, a 190 px capacity-label strip, a 250 px legend; 760 px
    // high with the title and settings header.
    assert_eq!((w, h), (160 + 120 * 6 + 190 + 250, 760));
    let colours: HashSet<String> = px.iter().map(|&p| hex(p)).collect();
    assert!(colours.len() > 20, "only {} colours", colours.len());
    // The fixed component colours are painted (weights, activations, optimizer state …).
    for c in ["#332288", "#cc6677", "#999933", "#117733", "#88ccee"] {
        assert!(colours.contains(c), "{c} missing");
    }
    // One colour per GPU line: a100-80gb and h100-80gb (80.00 and 79.65 GiB) are two lines.
    for c in ["#cc3311", "#111111", "#882255"] {
        assert!(colours.contains(c), "capacity colour {c} missing");
    }
    // The title is text in the bundled font: dark pixels in the top band.
    assert!(dark_pixels(w, &px, 0, 34) > 300);
    // Bar labels under the axis.
    assert!(dark_pixels(w, &px, h - 90, h) > 300);
}

#[test]
fn sweep_png_and_svg_show_lines_capacities_and_crossings() {
    let dir = tempfile::tempdir().unwrap();
    let png_out = dir.path().join("seq.png");
    let svg_out = dir.path().join("seq.svg");
    for out in [&png_out, &svg_out] {
        run_ok(&[
            "chart",
            "sweep",
            "--model",
            "8B",
            "--method",
            "lora,qlora",
            "--seq",
            "512..16384",
            "--no-grad-checkpointing",
            "--gpu",
            "rtx-4090,a100-40gb,h100-80gb",
            "--out",
            out.to_str().unwrap(),
        ]);
    }
    let (w, h, px) = decode_png(&png_out);
    assert_eq!((w, h), (1000 + 190 + 400, 620 + 64));
    let colours: HashSet<String> = px.iter().map(|&p| hex(p)).collect();
    for c in ["#0072b2", "#d55e00", "#cc3311"] {
        assert!(colours.contains(c), "{c} missing");
    }
    assert!(dark_pixels(w, &px, 0, 34) > 300);

    let text = svg_text(&svg_out);
    for label in [
        "rtx-4090",
        "a100-40gb",
        "h100-80gb",
        "lora",
        "qlora",
        "log scale",
        "checkpointing off",
        "optimizer adamw",
    ] {
        assert!(text.contains(label), "{label} missing from\n{text}");
    }
    assert_eq!(text.matches("fits up to").count(), 6, "{text}");
}

/// The legend's "fits up to N tokens on G" is exact: N fits G by `memplan estimate`'s own
/// device total, N + 1 does not.
#[test]
fn sweep_crossings_agree_with_the_estimator() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("seq.svg");
    run_ok(&[
        "chart",
        "sweep",
        "--model",
        "8B",
        "--method",
        "qlora",
        "--seq",
        "256..32768",
        "--grad-checkpointing",
        "--gpu",
        "rtx-4090,16GB",
        "--out",
        out.to_str().unwrap(),
    ]);
    let text = svg_text(&out);
    let gpus = json(&["gpus", "--format", "json"]);
    let rtx = gpus
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "rtx-4090")
        .unwrap()["memory_mib"]
        .as_u64()
        .unwrap()
        << 20;
    let mut checked = 0;
    // `16GB` is decimal: 16 × 10^9 bytes.
    for (gpu, capacity) in [("rtx-4090", rtx), ("16GB", 16_000_000_000)] {
        let line = text
            .lines()
            .find(|l| l.starts_with("fits up to") && l.ends_with(&format!(" on {gpu}")))
            .unwrap_or_else(|| panic!("no crossing for {gpu} in\n{text}"));
        let n: u64 = line["fits up to ".len()..]
            .split(' ')
            .next()
            .unwrap()
            .replace(',', "")
            .parse()
            .unwrap();
        // The verdict `estimate --gpu` gives: the step replayed at the card's capacity.
        let _ = capacity;
        let fits = |seq: u64| {
            json(&[
                "estimate",
                "--model",
                "8B",
                "--method",
                "qlora",
                "--grad-checkpointing",
                "--seq",
                &seq.to_string(),
                "--gpu",
                gpu,
                "--format",
                "json",
            ])["fit"]["fits"]
                .as_bool()
                .unwrap()
        };
        assert!(fits(n), "{n} tokens should fit {gpu}");
        assert!(!fits(n + 1), "{} tokens should not fit {gpu}", n + 1);
        checked += 1;
    }
    assert_eq!(checked, 2);
}

#[test]
fn breakdown_svg_names_components_and_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mem.svg");
    run_ok(&[
        "chart",
        "breakdown",
        "--model",
        "8B",
        "--method",
        "full,qlora",
        "--gpu",
        "h100-80gb,rtx-4090",
        "--out",
        out.to_str().unwrap(),
    ]);
    let text = svg_text(&out);
    let est = json(&[
        "estimate", "--model", "8B", "--method", "qlora", "--format", "json",
    ]);
    for c in est["components"].as_array().unwrap() {
        if c["bytes"].as_u64().unwrap() > 0 {
            let name = c["name"].as_str().unwrap();
            assert!(text.contains(name), "{name} missing");
        }
    }
    for label in ["gradients", "h100-80gb", "rtx-4090", "full", "qlora", "GiB"] {
        assert!(text.contains(label), "{label} missing");
    }
}

/// The `<td class="num bytes">` cells of the HTML table, by `data-component` / `data-total`.
fn html_bytes(html: &str, attr: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let key = format!("<tr {attr}=\"");
    for part in html.split(&key).skip(1) {
        let name = part.split('"').next().unwrap().to_string();
        let cell = part.split("<td class=\"num bytes\">").nth(1).unwrap();
        let n = cell.split('<').next().unwrap().parse().unwrap();
        out.push((name, n));
    }
    out
}

fn assert_self_contained(html: &str) {
    let lower = html.to_ascii_lowercase();
    for banned in [
        "http://", "https://", "<script", "<link", "url(", "@import", "src=",
    ] {
        assert!(!lower.contains(banned), "page contains {banned}");
    }
}

#[test]
fn report_is_self_contained_with_the_json_estimates_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("review.html");
    run_ok(&[
        "report",
        "--model",
        "70B",
        "--method",
        "qlora",
        "--gpu",
        "h100-80gb,rtx-4090",
        "--out",
        out.to_str().unwrap(),
    ]);
    let html = std::fs::read_to_string(&out).unwrap();
    assert_self_contained(&html);
    assert_eq!(html.matches("<svg").count(), 2, "both charts inline");
    assert!(html.contains("id=\"breakdown-chart\"") && html.contains("id=\"sweep-chart\""));

    let est = json(&[
        "estimate", "--model", "70B", "--method", "qlora", "--format", "json",
    ]);
    let expected: Vec<(String, u64)> = est["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(html_bytes(&html, "data-component"), expected);
    let totals = html_bytes(&html, "data-total");
    for (key, n) in &totals {
        assert_eq!(est[key.as_str()].as_u64().unwrap(), *n, "{key}");
    }
    assert_eq!(totals.len(), 3);
    // Every component's formula text, the verdicts, version and accuracy.
    for c in est["components"].as_array().unwrap() {
        let explain = c["explain"]
            .as_str()
            .unwrap()
            .replace('&', "&amp;")
            .replace('\'', "&#39;");
        assert!(html.contains(&explain), "explain of {} missing", c["name"]);
    }
    assert!(html.contains("does not fit") && html.contains("h100-80gb"));
    assert!(html.contains(&format!("memplan {}", env!("CARGO_PKG_VERSION"))));
    // The accuracy figures every output quotes (memplan::accuracy).
    assert!(html.contains(memplan::accuracy::ALLOCATED_SUMMARY));
    assert!(html.contains(memplan::accuracy::RESERVED_SUMMARY));
}

#[test]
fn chart_html_wraps_the_svg() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("seq.html");
    run_ok(&[
        "chart",
        "sweep",
        "--model",
        "1B",
        "--method",
        "full",
        "--batch",
        "1..64",
        "--gpu",
        "rtx-4090",
        "--out",
        out.to_str().unwrap(),
    ]);
    let html = std::fs::read_to_string(&out).unwrap();
    assert_self_contained(&html);
    assert_eq!(html.matches("<svg").count(), 1);
    assert!(html.contains("batch size (samples)") && html.contains("samples on rtx-4090"));
}

/// Each bad input: exit 1, one line of error naming the problem, no file in the folder.
#[test]
fn bad_input_is_one_clear_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let cases: [(Vec<String>, &str); 7] = [
        (
            vec![
                "breakdown".into(),
                "--model".into(),
                "8B".into(),
                "--out".into(),
                format!("{d}/x.jpg"),
            ],
            "expected a file name ending in .png, .svg or .html",
        ),
        (
            vec![
                "breakdown".into(),
                "--model".into(),
                "8B".into(),
                "--out".into(),
                format!("{d}/no/such/dir/x.png"),
            ],
            "cannot write",
        ),
        (
            vec![
                "sweep".into(),
                "--model".into(),
                "8B".into(),
                "--seq".into(),
                "4096..512".into(),
                "--out".into(),
                format!("{d}/x.png"),
            ],
            "--seq 4096..512 is empty",
        ),
        (
            vec![
                "sweep".into(),
                "--model".into(),
                "8B".into(),
                "--seq".into(),
                "1..20000:1".into(),
                "--out".into(),
                format!("{d}/x.svg"),
            ],
            "more than 10000",
        ),
        (
            vec![
                "sweep".into(),
                "--model".into(),
                "8B".into(),
                "--out".into(),
                format!("{d}/x.svg"),
            ],
            "needs a range",
        ),
        (
            vec![
                "breakdown".into(),
                "--model".into(),
                "8B".into(),
                "--gpu".into(),
                "rtx-4080".into(),
                "--out".into(),
                format!("{d}/x.svg"),
            ],
            "unknown GPU 'rtx-4080'",
        ),
        (
            vec![
                "breakdown".into(),
                "--model".into(),
                "8B,".into(),
                "--out".into(),
                format!("{d}/x.svg"),
            ],
            "--model",
        ),
    ];
    for (args, message) in cases {
        let out = memplan().arg("chart").args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    }
    memplan()
        .args(["report", "--model", "8B", "--out", &format!("{d}/r.png")])
        .assert()
        .code(1)
        .stderr(contains("HTML"));
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}
