use burn::module::Module;
fn main() {
    let d = burn::prelude::Device::flex();
    for n in ["tiny", "shapes32", "bench32"] {
        let c = fewstep::models::UNetConfig::preset(n).unwrap();
        println!("{n}: {}", c.init(&d).num_params());
    }
}
