fn main() {
    let n = 36;
    let data: Vec<f32> = (0..n).flat_map(|i| fewstep::data::shapes::render(0, i).0).collect();
    fewstep::image_grid::write_grid(std::path::Path::new("/tmp/shapes.png"), &data, n as usize, [3, 32, 32]).unwrap();
}
