//! wkvc-testkit: how a test says that a group of checks cannot run on this machine (no demo
//! model, no reference figures, no NVRTC, no GPU).
//!
//! A skipped group is never silent. Where the environment requires the group
//! (`WKVC_REQUIRE_DEMO`, `WKVC_REQUIRE_REFERENCE`, `WKVC_REQUIRE_NVRTC`, `WKVC_REQUIRE_GPU`,
//! `WKVC_REQUIRE_PYTHON`, as `scripts/test.sh` sets them) it is a failure. Otherwise one line per group and test
//! process goes straight to the terminal (past the test harness's output capture), and a line
//! to the file named by `WKVC_SKIP_LOG`, which `scripts/test.sh` reads for its summary.

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::Mutex;

/// A group of checks that needs something a machine may lack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    /// the demo model (scripts/fetch-demo-model.sh)
    DemoModel,
    /// the independent reference figures and texts in ../shared
    Reference,
    /// libnvrtc (scripts/fetch-nvrtc.sh)
    Nvrtc,
    /// an NVIDIA driver and GPU
    Gpu,
    /// a Python with the official `openai` package (`$WKVC_PYTHON`, set by scripts/test.sh)
    PythonClient,
}

impl Group {
    /// The variable that makes a skip of this group a failure.
    pub fn require_var(self) -> &'static str {
        match self {
            Group::DemoModel => "WKVC_REQUIRE_DEMO",
            Group::Reference => "WKVC_REQUIRE_REFERENCE",
            Group::Nvrtc => "WKVC_REQUIRE_NVRTC",
            Group::Gpu => "WKVC_REQUIRE_GPU",
            Group::PythonClient => "WKVC_REQUIRE_PYTHON",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Group::DemoModel => "demo-model checks",
            Group::Reference => "reference-figure checks",
            Group::Nvrtc => "NVRTC checks",
            Group::Gpu => "GPU checks",
            Group::PythonClient => "OpenAI-client checks",
        }
    }

    /// Is this group required here?
    pub fn required(self) -> bool {
        std::env::var_os(self.require_var()).is_some()
    }
}

static SAID: Mutex<BTreeSet<Group>> = Mutex::new(BTreeSet::new());

/// `group` cannot run here because of `reason`: panics where the group is required, else
/// reports the skip (module docs). The caller then returns without checking.
pub fn skip(group: Group, reason: &str) {
    if group.required() {
        panic!(
            "{} is set, but {}: {reason}",
            group.require_var(),
            group.name()
        );
    }
    let first = SAID.lock().map(|mut s| s.insert(group)).unwrap_or(true);
    if !first {
        return;
    }
    let line = format!(
        "SKIPPED {} ({}): {reason} (set {} to make this a failure)\n",
        group.name(),
        std::env::args()
            .next()
            .as_deref()
            .and_then(|p| p.rsplit('/').next())
            .unwrap_or("tests"),
        group.require_var()
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(path) = std::env::var_os("WKVC_SKIP_LOG")
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}
