//! Model-space images ([-1, 1], NCHW f32) to PNG grids.

use std::path::Path;

use crate::error::{Error, Result};

/// Maps [-1, 1] to 0..=255 (clamped), as diffusers' `(x / 2 + 0.5).clamp(0, 1)` then ×255.
pub fn to_u8(v: f32) -> u8 {
    ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Writes `n` images of shape [C, H, W] (C = 1 or 3; more channels show the first three) as a
/// near-square grid PNG with a 2-pixel gap.
pub fn write_grid(path: &Path, data: &[f32], n: usize, shape: [usize; 3]) -> Result<()> {
    let png = grid_png(path, data, n, shape)?;
    crate::io::write_atomic(path, &png)
}

/// The PNG bytes of [`write_grid`]'s grid, made before anything is written (`path` names the
/// output in errors), so that a command can refuse an impossible grid before its other outputs.
pub fn grid_png(path: &Path, data: &[f32], n: usize, [c, h, w]: [usize; 3]) -> Result<Vec<u8>> {
    let per = c * h * w;
    if n == 0 || c == 0 || data.len() < n * per {
        return Err(Error::file(
            path,
            format!(
                "cannot draw a grid of {n} images of shape [{c}, {h}, {w}] from {} values",
                data.len()
            ),
        ));
    }
    let cols = (n as f64).sqrt().ceil() as usize;
    let rows = n.div_ceil(cols);
    let gap = 2;
    let (gw, gh) = (cols * (w + gap) - gap, rows * (h + gap) - gap);
    if gw > 1 << 16 || gh > 1 << 16 {
        return Err(Error::file(
            path,
            format!(
                "a grid of {n} images of {h}×{w} would be {gw}×{gh} pixels: too large for a PNG; ask for fewer images"
            ),
        ));
    }
    let mut img = image::RgbImage::from_pixel(gw as u32, gh as u32, image::Rgb([255, 255, 255]));
    for i in 0..n {
        let (r0, c0) = ((i / cols) * (h + gap), (i % cols) * (w + gap));
        let x = &data[i * per..(i + 1) * per];
        for y in 0..h {
            for xx in 0..w {
                let ch = |k: usize| to_u8(x[k.min(c - 1) * h * w + y * w + xx]);
                let px = if c >= 3 {
                    [ch(0), ch(1), ch(2)]
                } else {
                    [ch(0); 3]
                };
                img.put_pixel((c0 + xx) as u32, (r0 + y) as u32, image::Rgb(px));
            }
        }
    }
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::file(path, format!("cannot encode PNG: {e}")))?;
    Ok(bytes)
}
