//! The AFL++ harness: `wkvc-fuzz TARGET` runs one target of [`wkvc_fuzz::TARGETS`] in AFL's
//! persistent mode (built and started by `scripts/fuzz.sh`). Outside AFL it runs the target
//! once on standard input.

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some(target) = wkvc_fuzz::target(&name) else {
        eprintln!(
            "usage: wkvc-fuzz TARGET (one of: {})",
            wkvc_fuzz::TARGETS
                .iter()
                .map(|t| t.0)
                .collect::<Vec<_>>()
                .join(", ")
        );
        std::process::exit(2);
    };
    afl::fuzz!(|data: &[u8]| {
        target(data);
    });
}
