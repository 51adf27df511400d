//! Re-save a diffusers pipeline folder through fewstep: load `IN` (weights in f32, f16 or bf16)
//! and write `OUT` with f32 weights and fully resolved configs. The model fixture script uses it
//! to prove that what fewstep writes loads in diffusers' `from_pretrained` with the same outputs.
//!
//!     cargo run --release --example export_pipeline -- IN OUT

use std::path::PathBuf;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        eprintln!("error: usage: export_pipeline IN_DIR OUT_DIR");
        std::process::exit(2);
    };
    let device = fewstep::backend::cpu_device().expect("a CPU backend is compiled in");
    let result = fewstep::pipeline::Pipeline::load(&PathBuf::from(input), &device).and_then(|p| {
        let (algorithm, _) = p.scheduler.algorithm();
        p.save(&PathBuf::from(output), algorithm)
    });
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    println!("wrote {output}");
}
