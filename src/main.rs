use clap::Parser;

fn main() {
    let cli = fewstep::cli::Cli::parse();
    if let Err(e) = fewstep::cli::run(cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
