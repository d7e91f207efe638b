//! `wkvc-fuzz-replay [--repeat N [--mutate]] TARGET FILE...`: run a fuzz target once (or N
//! times) on each file, without AFL (to reproduce a crash or hang that `scripts/fuzz.sh`
//! saved). Prints each file's time; with `--repeat`, the process's resident set after each
//! pass (a leak shows as growth from pass to pass, as in AFL++'s persistent loop). With
//! `--mutate`, each pass runs every input with one byte changed at a place that depends on
//! the pass (printable bytes stay printable), so that no two executions see the same input,
//! as under AFL: growth then shows memory kept per distinct input (a cache keyed by content),
//! which replaying the same inputs cannot show.

fn rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn main() {
    let usage = || -> ! {
        eprintln!(
            "usage: wkvc-fuzz-replay [--repeat N [--mutate]] TARGET FILE... (scripts/fuzz.sh --list names them)"
        );
        std::process::exit(2);
    };
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut repeat = None;
    if args.first().map(String::as_str) == Some("--repeat") {
        repeat = match args.get(1).and_then(|n| n.parse::<usize>().ok()) {
            Some(n) if n > 0 => Some(n),
            _ => usage(),
        };
        args.drain(..2);
    }
    let mutate = repeat.is_some() && args.first().map(String::as_str) == Some("--mutate");
    if mutate {
        args.remove(0);
    }
    if args.is_empty() {
        usage();
    }
    let name = args.remove(0);
    let Some(target) = wkvc_fuzz::target(&name) else {
        usage();
    };
    let mut inputs = Vec::new();
    for f in args {
        match std::fs::read(&f) {
            Ok(d) => inputs.push((f, d)),
            Err(e) => {
                eprintln!("{f}: {e}");
                std::process::exit(1);
            }
        }
    }
    match repeat {
        None => {
            for (f, data) in &inputs {
                let t = std::time::Instant::now();
                target(data);
                println!("{f}: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
            }
        }
        Some(n) => {
            for pass in 1..=n {
                let t = std::time::Instant::now();
                for (i, (_, data)) in inputs.iter().enumerate() {
                    if mutate && !data.is_empty() {
                        let mut d = data.clone();
                        let h = (pass as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                            ^ (i as u64).wrapping_mul(0xc2b2_ae3d);
                        let at = (h % d.len() as u64) as usize;
                        d[at] = if d[at].is_ascii_graphic() {
                            b'!' + (d[at] - b'!' + 1 + (pass % 90) as u8) % 94
                        } else {
                            d[at].wrapping_add(1 + (pass % 250) as u8)
                        };
                        target(&d);
                    } else {
                        target(data);
                    }
                }
                let rss = rss_kib().map_or("?".into(), |k| format!("{k} KiB"));
                println!(
                    "pass {pass}: {} inputs in {:.2} s, resident {rss}",
                    inputs.len(),
                    t.elapsed().as_secs_f64()
                );
            }
        }
    }
}
