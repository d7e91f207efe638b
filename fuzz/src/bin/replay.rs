//! `wkvc-fuzz-replay TARGET FILE...`: run a fuzz target once on each file, without AFL (to
//! reproduce a crash or hang that `scripts/fuzz.sh` saved). Prints each file's time.

fn main() {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_default();
    let Some(target) = wkvc_fuzz::target(&name) else {
        eprintln!("usage: wkvc-fuzz-replay TARGET FILE... (scripts/fuzz.sh --list names them)");
        std::process::exit(2);
    };
    for f in args {
        let data = match std::fs::read(&f) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("{f}: {e}");
                std::process::exit(1);
            }
        };
        let t = std::time::Instant::now();
        target(&data);
        println!("{f}: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    }
}
