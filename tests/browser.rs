//! The HTML report in a real headless browser at phone width (390 × 844 CSS px, an iPhone 12-14):
//! Chromium renders it and the screenshot shows the title's text. Skips, with a message, where
//! no Chromium is installed, so CI does not depend on one (`apt-get install chromium` for it).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]
    .iter()
    .flat_map(|name| std::env::split_paths(&path).map(move |d| d.join(name)))
    .find(|p| p.is_file())
}

fn screenshot(browser: &Path, page: &Path, out: &Path, size: &str) -> bool {
    let profile = tempfile::tempdir().unwrap();
    Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            &format!("--user-data-dir={}", profile.path().display()),
            &format!("--screenshot={}", out.display()),
            &format!("--window-size={size}"),
            &format!("file://{}", page.display()),
        ])
        .output()
        .is_ok_and(|o| o.status.success())
        && out.is_file()
}

#[test]
fn the_report_renders_at_phone_width() {
    let Some(browser) = chromium() else {
        eprintln!("skipped: no chromium on PATH");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("review.html");
    common::stdout(&[
        "report",
        "--model",
        "8B",
        "--method",
        "qlora",
        "--gpu",
        "rtx-4090,h100-80gb",
        "--out",
        page.to_str().unwrap(),
    ]);
    let shot = dir.path().join("phone.png");
    assert!(
        screenshot(&browser, &page, &shot, "390,844"),
        "chromium failed"
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (390, 844));
    // The title (dark text) in the top 120 px; the page is not blank.
    let channels = info.line_size / info.width as usize;
    let dark = buf[..info.line_size * 120]
        .chunks(channels)
        .filter(|p| p[0] < 80 && p[1] < 80 && p[2] < 80)
        .count();
    assert!(dark > 500, "only {dark} dark pixels at the top of the page");
}
