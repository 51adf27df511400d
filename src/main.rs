fn main() {
    // A panic is a bug, never an answer to bad input; should one happen it still ends in one
    // `error:` line (with where it happened) and exit code 101, not a backtrace prompt.
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        let message = message.replace('\n', " ");
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("error: internal error (a bug in fewstep, please report it): {message}{at}");
    }));
    let cli = fewstep::cli::parse();
    if let Err(e) = fewstep::cli::run(cli) {
        // One line whatever the message holds.
        let message = e.to_string().replace('\n', "; ");
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}
