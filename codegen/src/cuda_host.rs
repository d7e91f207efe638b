//! The CUDA host emulator: the CUDA C of [`crate::cuda`] compiled by the host's C++ compiler
//! with a header that gives CUDA's execution model on a CPU (`cuda_host.h`: one fiber per
//! CUDA thread, barriers, warp shuffles, f16 conversions and PTX's mma fragment layout). It
//! checks the kernels and the CUDA engine without a GPU: the same source, constants and
//! launch geometry, run on the host's memory. It is a verification tool, slow (every thread
//! switch is a context switch), not a back end.
//!
//! The compiler is `$WKVC_CXX`, else `c++`; a missing compiler is an error naming it. Built
//! modules are kept in `$WKVC_CUDA_HOST_CACHE` (else a folder in the temporary directory),
//! keyed by a hash of the header and the source.

use crate::CodegenError;
use crate::cuda::CudaKernel;
use std::collections::hash_map::DefaultHasher;
use std::ffi::c_void;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::process::Command;

/// The header that emulates CUDA on the host (prepended to a kernel's source).
pub const HEADER: &str = include_str!("cuda_host.h");

fn err(msg: impl Into<String>) -> CodegenError {
    CodegenError::HostEmulator(msg.into())
}

type LaunchFn = unsafe extern "C" fn(*const u32, *const u32, *const *mut c_void) -> i32;

/// A kernel module built for the host emulator.
pub struct HostModule {
    // the entry points are only valid while the library is loaded
    _lib: libloading::Library,
    entries: Vec<(String, LaunchFn)>,
}

impl std::fmt::Debug for HostModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostModule")
            .field(
                "entries",
                &self.entries.iter().map(|e| &e.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The full C++ translation unit for a kernel: the header, the source, and a launcher per
/// entry point (`wk_launch_{entry}`).
pub fn translation_unit(k: &CudaKernel) -> String {
    let mut s = String::with_capacity(HEADER.len() + k.source.len() + 256);
    s.push_str(HEADER);
    s.push_str("#define WKVC_HOST_EMULATION 1\n");
    s.push_str(&k.source);
    for e in &k.entries {
        s.push_str(&format!(
            "extern \"C\" int wk_launch_{e}(const unsigned* g, const unsigned* b, void** a) \
             {{ return wk_launch({e}, g, b, a); }}\n"
        ));
    }
    s
}

fn cache_dir() -> PathBuf {
    match std::env::var_os("WKVC_CUDA_HOST_CACHE").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => std::env::temp_dir().join("wkvc-cuda-host"),
    }
}

/// The C++ compiler the emulator uses: `$WKVC_CXX`, else `c++`.
pub fn compiler() -> String {
    std::env::var("WKVC_CXX")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "c++".into())
}

/// Build (or reuse from the cache) the host module of a kernel with [`compiler`].
pub fn build(k: &CudaKernel) -> Result<HostModule, CodegenError> {
    build_with(k, &compiler())
}

/// Build (or reuse from the cache) the host module of a kernel with the C++ compiler `cxx`.
pub fn build_with(k: &CudaKernel, cxx: &str) -> Result<HostModule, CodegenError> {
    let tu = translation_unit(k);
    let mut h = DefaultHasher::new();
    tu.hash(&mut h);
    cxx.hash(&mut h);
    let key = format!("{:016x}", h.finish());
    let dir = cache_dir();
    std::fs::create_dir_all(&dir)
        .map_err(|e| err(format!("creating the cache folder {}: {e}", dir.display())))?;
    let so = dir.join(format!("{key}.so"));
    if !so.exists() {
        // a private name, then a rename: concurrent builds of one kernel never see half a file
        let uniq = format!(
            "{key}.{}.{:?}",
            std::process::id(),
            std::thread::current().id()
        )
        .replace(|c: char| !c.is_ascii_alphanumeric() && c != '.', "");
        let src = dir.join(format!("{uniq}.cc"));
        let tmp = dir.join(format!("{uniq}.so"));
        std::fs::write(&src, &tu).map_err(|e| err(format!("writing {}: {e}", src.display())))?;
        let out = Command::new(cxx)
            // no CET marking: the fibers' stack switch returns where no call was made, which a
            // shadow stack would refuse
            .args(["-std=c++17", "-O1", "-shared", "-fPIC", "-w", "-x", "c++"])
            .args(if cfg!(target_arch = "x86_64") {
                &["-fcf-protection=none"][..]
            } else {
                &[]
            })
            .arg(&src)
            .arg("-o")
            .arg(&tmp)
            .output();
        let _ = std::fs::remove_file(&src);
        let out = out.map_err(|e| {
            err(format!(
                "running the C++ compiler \"{cxx}\" (set WKVC_CXX to one): {e}"
            ))
        })?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&tmp);
            return Err(err(format!(
                "{cxx} failed on {}:\n{}",
                k.entries.first().map(String::as_str).unwrap_or("a kernel"),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        std::fs::rename(&tmp, &so)
            .map_err(|e| err(format!("moving the module to {}: {e}", so.display())))?;
    }
    // SAFETY: the library is wkvc's own translation unit: no initialisers with side effects.
    let lib = unsafe { libloading::Library::new(&so) }
        .map_err(|e| err(format!("loading {}: {e}", so.display())))?;
    let mut entries = Vec::new();
    for e in &k.entries {
        let sym = format!("wk_launch_{e}");
        // SAFETY: every launcher has the LaunchFn signature (translation_unit).
        let f: LaunchFn = unsafe {
            *lib.get::<LaunchFn>(sym.as_bytes())
                .map_err(|x| err(format!("{sym}: {x}")))?
        };
        entries.push((e.clone(), f));
    }
    Ok(HostModule { _lib: lib, entries })
}

impl HostModule {
    pub fn entries(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.0.as_str())
    }

    /// Run entry `entry` on a grid of `grid` blocks of `block` threads, on the calling thread,
    /// with `args`, the words of the kernel's argument struct (`wkvc_ir::kernel::args`).
    ///
    /// # Safety
    /// `args` must be the argument struct of the kernel's kind, and every pointer in it must
    /// address host memory that holds what the kernel reads and writes.
    pub unsafe fn launch(
        &self,
        entry: usize,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        args: &[u64],
    ) -> Result<(), CodegenError> {
        let (name, f) = self
            .entries
            .get(entry)
            .ok_or_else(|| err(format!("no entry point {entry}")))?;
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Err(err(format!("{name}: an empty grid {grid:?}")));
        }
        // cuLaunchKernel's kernelParams: a pointer to the one (struct) argument
        let ptrs: [*mut c_void; 1] = [args.as_ptr() as *mut c_void];
        let g = [grid.0, grid.1, grid.2];
        let b = [block.0, block.1, block.2];
        // SAFETY: the caller vouches for the argument struct; the kernel reads it by value
        // through the pointer.
        let rc = unsafe { f(g.as_ptr(), b.as_ptr(), ptrs.as_ptr()) };
        match rc {
            0 => Ok(()),
            1 => Err(err(format!(
                "{name}: the block's threads deadlocked on barriers (a barrier not reached by \
                 every thread)"
            ))),
            2 => Err(err(format!(
                "{name}: a block of {block:?} threads is not launchable"
            ))),
            _ => Err(err(format!("{name}: out of memory for the fibers"))),
        }
    }
}
