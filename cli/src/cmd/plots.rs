//! `wkvc inspect PLAN --plots DIR`: SVG charts of a plan's K/V cache (the `plotters` crate).
//!
//! - `kv-layer-L.svg` per chosen layer: the range (min to max over the probed tokens) of every
//!   K and V channel as the cache receives it, three ways: before smoothing and rotation, as
//!   the plan quantizes it (its smoothing, after its rotation when it rotates), and rotated by
//!   Hadamard blocks of the head dim alone. The outlier channels the paper's figures show are
//!   the tall bars of the first row.
//! - `kv-sensitivity.svg`, for a plan compiled with `--kv-bits-per-layer auto:B`: per layer,
//!   the KL divergence from the FP model with only that layer's cache quantized, at both
//!   widths of the scan, and the width each layer got.
//!
//! Files are written whole (a temp file renamed), never half.

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use wkvc_runtime::compile::KvScan;
use wkvc_runtime::kvprobe::{KvChannels, channel_ranges};

/// Write `svg` to `path` atomically.
fn write_atomic(path: &Path, svg: &str) -> Result<()> {
    let tmp = path.with_extension("svg.tmp");
    std::fs::write(&tmp, svg).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}", path.display())
    })
}

/// How spread the channels are: the largest channel range over the median one.
fn outlier_ratio(r: &[(f32, f32)]) -> f32 {
    let mut w: Vec<f32> = r.iter().map(|(a, b)| b - a).collect();
    w.sort_by(f32::total_cmp);
    let med = w[w.len() / 2].max(f32::MIN_POSITIVE);
    w[w.len() - 1] / med
}

fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    r: &[(f32, f32)],
    head_dim: usize,
    color: RGBColor,
) -> Result<()> {
    let lo = r.iter().map(|x| x.0).fold(f32::INFINITY, f32::min);
    let hi = r.iter().map(|x| x.1).fold(f32::NEG_INFINITY, f32::max);
    let pad = ((hi - lo) * 0.05).max(1e-6);
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{title}  (max/median range {:.1})", outlier_ratio(r)),
            ("sans-serif", 15),
        )
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(48)
        .build_cartesian_2d(0f32..r.len() as f32, (lo - pad)..(hi + pad))
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("channel")
        .x_labels(r.len() / head_dim.max(1) + 1)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    // head boundaries
    chart
        .draw_series((1..r.len() / head_dim.max(1)).map(|h| {
            let x = (h * head_dim) as f32;
            PathElement::new(vec![(x, lo - pad), (x, hi + pad)], BLACK.mix(0.25))
        }))
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(r.iter().enumerate().map(|(c, &(a, b))| {
            Rectangle::new([(c as f32 + 0.1, a), (c as f32 + 0.9, b)], color.filled())
        }))
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// The channel-range chart of one layer; returns its path.
pub fn layer_chart(dir: &Path, ch: &KvChannels, tokens_from: &str) -> Result<PathBuf> {
    let path = dir.join(format!("kv-layer-{}.svg", ch.layer));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1400, 1000)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let root = root
            .titled(
                &format!(
                    "layer {}: K (after RoPE) and V channel ranges over {} tokens ({tokens_from})",
                    ch.layer,
                    ch.k.len() / ch.width
                ),
                ("sans-serif", 20),
            )
            .map_err(|e| anyhow!("{e}"))?;
        let rows = root.split_evenly((3, 2));
        let block = ch.head_dim;
        for (col, v) in [(0, false), (1, true)] {
            let name = if v { "V" } else { "K" };
            let raw = if v { &ch.v } else { &ch.k };
            let before = channel_ranges(raw, ch.width);
            panel(
                &rows[col],
                &format!("{name}: before smoothing and rotation"),
                &before,
                ch.head_dim,
                RGBColor(200, 60, 40),
            )?;
            match ch.smoothed(v) {
                Some(s) => panel(
                    &rows[2 + col],
                    &if ch.rotate > 0 {
                        format!("{name}: the plan's (rotated by {}, smoothed)", ch.rotate)
                    } else {
                        format!("{name}: the plan's (smoothed)")
                    },
                    &channel_ranges(&s, ch.width),
                    ch.head_dim,
                    RGBColor(40, 110, 190),
                )?,
                None => {
                    rows[2 + col]
                        .titled(
                            &format!("{name}: the plan does not smooth"),
                            ("sans-serif", 15),
                        )
                        .map_err(|e| anyhow!("{e}"))?;
                }
            }
            panel(
                &rows[4 + col],
                &format!("{name}: rotated (Hadamard blocks of {block}), not smoothed"),
                &channel_ranges(&ch.rotated(v, block), ch.width),
                ch.head_dim,
                RGBColor(60, 150, 70),
            )?;
        }
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    write_atomic(&path, &svg)?;
    Ok(path)
}

/// The sensitivity scan's chart; returns its path.
pub fn sensitivity_chart(dir: &Path, scan: &KvScan, bits: Option<&[u32]>) -> Result<PathBuf> {
    let path = dir.join("kv-sensitivity.svg");
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1200, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let n = scan.kld.len();
        let hi = scan
            .kld
            .iter()
            .flat_map(|k| k.iter().copied())
            .fold(0f64, f64::max)
            .max(1e-12);
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "KL divergence from FP with one layer's cache quantized ({} tokens): \
                     {} bits (red), {} bits (blue); filled: the width the plan gave the layer",
                    scan.tokens, scan.bits[0], scan.bits[1]
                ),
                ("sans-serif", 16),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0f64..hi * 1.05)
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("layer")
            .y_desc("mean KL divergence")
            .x_labels(n.min(32))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (i, color) in [(0, RGBColor(200, 60, 40)), (1, RGBColor(40, 110, 190))] {
            chart
                .draw_series(scan.kld.iter().enumerate().map(|(l, k)| {
                    let x0 = l as f64 - 0.4 + 0.4 * i as f64;
                    let chosen = bits.is_some_and(|b| b.get(l) == Some(&scan.bits[i]));
                    let style = if chosen {
                        color.filled()
                    } else {
                        color.stroke_width(1)
                    };
                    Rectangle::new([(x0, 0.0), (x0 + 0.4, k[i])], style)
                }))
                .map_err(|e| anyhow!("{e}"))?;
        }
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    write_atomic(&path, &svg)?;
    Ok(path)
}
