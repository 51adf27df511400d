//! A look at the `shapes` data: writes a 4×4 grid of training images (seed 0, indices 0–15) and
//! prints each image's labels.
//!
//! `cargo run --release --example shapes_grid -- [OUT.png]` (default `shapes.png`).

use fewstep::data::shapes::{KINDS, SIZE, render};

fn main() -> fewstep::Result<()> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "shapes.png".into());
    let mut pixels = Vec::new();
    for i in 0..16u64 {
        let (p, l) = render(0, i);
        println!(
            "{i:2}: largest {:8} per kind {:?} per colour {:?}",
            KINDS[l.largest_kind], l.kind_counts, l.colour_counts
        );
        pixels.extend(p);
    }
    fewstep::image_grid::write_grid(std::path::Path::new(&out), &pixels, 16, [3, SIZE, SIZE])?;
    println!("wrote {out}");
    Ok(())
}
