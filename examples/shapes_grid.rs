//! Writes a grid of `shapes` training images with their labels: `cargo run --release --example shapes_grid -- OUT.png`.
fn main() {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "shapes.png".into());
    let mut pixels = Vec::new();
    for i in 0..16u64 {
        let (p, l) = fewstep::data::shapes::render(0, i);
        println!(
            "{i}: largest {} kinds {:?} colours {:?}",
            fewstep::data::shapes::KINDS[l.largest_kind],
            l.kind_counts,
            l.colour_counts
        );
        pixels.extend(p);
    }
    fewstep::image_grid::write_grid(std::path::Path::new(&out), &pixels, 16, [3, 32, 32]).unwrap();
}
