//! The AFL++ harness: `wkvc-fuzz TARGET` runs one target of [`wkvc_fuzz::TARGETS`] in AFL's
//! persistent mode (built and started by `scripts/fuzz.sh`). Outside AFL it runs the target
//! once on standard input.
//!
//! Leak hunting: with `WKVC_FUZZ_LEAKS=DIR` set, every execution that leaves the process's
//! live heap bytes higher than before it (counted by this binary's allocator) writes its input
//! to `DIR/leak-BYTES-N`, so that growth of a persistent process can be traced to inputs.

#[global_allocator]
static ALLOC: wkvc_fuzz::Counting = wkvc_fuzz::Counting;

/// glibc's `struct mallinfo2` (all `size_t`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[repr(C)]
#[derive(Default)]
struct MallInfo2 {
    arena: usize,
    ordblks: usize,
    smblks: usize,
    hblks: usize,
    hblkhd: usize,
    usmblks: usize,
    fsmblks: usize,
    uordblks: usize,
    fordblks: usize,
    keepcost: usize,
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
unsafe extern "C" {
    fn mallinfo2() -> MallInfo2;
}

/// One line on the heap: executions, live bytes counted here, and glibc's view (heap from
/// `brk`, bytes in use there, free there, free chunks, mmapped).
fn heap_line(n: u64) -> String {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let m = unsafe { mallinfo2() };
        format!(
            "{n} live {} arena {} used {} free {} free-chunks {} mmapped {}\n",
            wkvc_fuzz::live_bytes(),
            m.arena,
            m.uordblks,
            m.fordblks,
            m.ordblks,
            m.hblkhd
        )
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    format!("{n} live {}\n", wkvc_fuzz::live_bytes())
}

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
    let leaks = std::env::var_os("WKVC_FUZZ_LEAKS").map(std::path::PathBuf::from);
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    afl::fuzz!(|data: &[u8]| {
        let before = wkvc_fuzz::live_bytes();
        target(data);
        let grown = wkvc_fuzz::live_bytes() - before;
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if grown > 0
            && let Some(dir) = &leaks
        {
            let _ = std::fs::write(dir.join(format!("leak-{grown}-{n}")), data);
        }
        if (n.is_power_of_two() || n.is_multiple_of(20_000))
            && let Some(dir) = &leaks
        {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(format!("heap-{}.log", std::process::id())))
            {
                let _ = f.write_all(heap_line(n).as_bytes());
            }
        }
    });
}
