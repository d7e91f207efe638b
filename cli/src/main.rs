//! `wkvc`: the command-line tool (its modules are the `wkvc` library, `src/lib.rs`).

use clap::Parser;
use wkvc_cli::args::{Cli, Cmd};
use wkvc_cli::{cmd, serve};

fn main() {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let r = match cli.cmd {
        Cmd::Run(a) => cmd::run::run(a),
        Cmd::Compile(a) => cmd::compile::run(a),
        Cmd::Eval(a) => cmd::eval::run(a),
        Cmd::Bench(a) => cmd::bench::run(a),
        Cmd::Inspect(a) => cmd::inspect::run(a),
        Cmd::Emit(a) => cmd::emit::run(a),
        Cmd::Serve(a) => serve::run(a),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
