//! What the commands share: opening a model, choosing its engine, progress display, medians.

use crate::args::{EngineArgs, EngineChoice};
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::time::Instant;
use wkvc_runtime::{Engine, EngineKind, EngineOptions, Model};

pub fn spinner() -> ProgressBar {
    let sp = ProgressBar::new_spinner();
    sp.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    sp.enable_steady_tick(std::time::Duration::from_millis(200));
    sp
}

/// A line above the spinner, or on stderr when there is no terminal to draw on.
pub fn note(sp: &ProgressBar, msg: String) {
    if sp.is_hidden() {
        eprintln!("{msg}");
    } else {
        sp.println(msg);
    }
}

/// Workers: the option, else every core.
pub fn threads(t: Option<usize>) -> usize {
    t.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

pub fn open(path: &std::path::Path) -> Result<Model> {
    let t0 = Instant::now();
    // the errors of opening name the file they concern (the model's, or a file inside it)
    let m = Model::open(path).context("cannot open model")?;
    tracing::info!(
        "opened {} in {:.2}s",
        path.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(m)
}

/// The engine the options ask for.
pub fn make_engine(m: &Model, ea: &EngineArgs) -> Result<Engine> {
    let opts = EngineOptions {
        threads: threads(ea.threads),
        profile: ea.profile,
        cpu_isa: ea.cpu_isa.isa(),
    };
    let act = ea.cpu_act.map(wkvc_runtime::Act::from);
    let e = match (ea.engine, act) {
        (EngineChoice::Auto, None) => m.engine_auto_with(opts)?,
        (EngineChoice::Auto | EngineChoice::Cpu, Some(act)) => {
            m.engine_with(EngineKind::Cpu { act }, opts)?
        }
        (EngineChoice::Cpu, None) => m.engine_with(EngineKind::Cpu { act: m.plan_act() }, opts)?,
        (EngineChoice::Interp, _) => m.engine_with(EngineKind::Interp, opts)?,
        (EngineChoice::Cuda, _) => m.engine_with(
            EngineKind::Cuda {
                device: ea.device,
                mma: ea.cuda_mma,
            },
            opts,
        )?,
        (EngineChoice::CudaEmulated, _) => {
            m.engine_with(EngineKind::CudaEmulated { mma: ea.cuda_mma }, opts)?
        }
    };
    if let Some(c) = e.cuda().filter(|c| c.is_emulated()) {
        tracing::info!(
            "CUDA engine on the host emulator: {} kernel modules built by the C++ compiler and \
             weights loaded in {:.0} ms (a check, not a back end: every CUDA thread is a fiber)",
            c.kernels,
            c.load_ms
        );
    } else if let Some(c) = e.cuda() {
        tracing::info!(
            "CUDA engine on {} (sm_{}): {} kernel modules ({}) and weights loaded in {:.0} ms",
            c.device_name,
            c.arch,
            c.kernels,
            c.code,
            c.load_ms
        );
    }
    if let Some(c) = e.cpu() {
        tracing::info!(
            "CPU engine ({}): {} kernels JIT-compiled and {} native, in {:.1} ms ({} bytes of \
             generated code)",
            c.isa.name(),
            c.kernels,
            c.native_kernels,
            c.jit_ms,
            c.code_bytes
        );
    }
    Ok(e)
}

/// The median; None for no values (nothing measured).
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    if n == 0 {
        None
    } else if n % 2 == 1 {
        Some(v[n / 2])
    } else {
        Some((v[n / 2 - 1] + v[n / 2]) / 2.0)
    }
}
