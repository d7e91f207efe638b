//! NVRTC through cudarc (dynamic loading): CUDA C to CUBIN for a GPU architecture (with
//! ptxas's register and spill report) and to portable PTX.
//!
//! cudarc (built for CUDA 13.4, falling back to 12.x libraries) looks for `libnvrtc.so.13`
//! and `libnvrtc.so.12` by name only and panics when it cannot load them, so the library is
//! located first ([`locate`]): `WKVC_NVRTC_LIB` (a path to the library), then the pip wheel
//! `nvidia-cuda-nvrtc-cu12` in wkvc's cache (`~/.cache/wkvc/nvrtc`, where `scripts/test.sh`
//! installs it) and the usual CUDA install paths; a library found by path is loaded by
//! absolute path before cudarc's first call, whose `dlopen` then finds it by soname.
//! Nothing here touches the CUDA driver: compiling needs no GPU.

use crate::CodegenError;
use std::ffi::CString;
use std::path::PathBuf;
use std::sync::OnceLock;

/// One entry point's resource use as ptxas reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EntryInfo {
    pub name: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_bytes: u32,
    pub smem_bytes: u32,
}

/// A compiled translation unit.
#[derive(Clone, Debug)]
pub struct Cubin {
    /// e.g. 90 for sm_90
    pub arch: u32,
    pub image: Vec<u8>,
    pub entries: Vec<EntryInfo>,
    pub log: String,
}

static LOADED: OnceLock<Result<String, String>> = OnceLock::new();

/// `WKVC_NVRTC_LIB` when set and not empty.
fn explicit_lib() -> Option<PathBuf> {
    std::env::var_os("WKVC_NVRTC_LIB")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Candidate paths of libnvrtc, most specific first.
fn candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = explicit_lib() {
        v.push(p);
    }
    if let Some(h) = std::env::var_os("HOME") {
        v.push(PathBuf::from(h).join(".cache/wkvc/nvrtc/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"));
    }
    for d in ["/usr/local/cuda/lib64", "/usr/lib/x86_64-linux-gnu"] {
        for so in ["libnvrtc.so.13", "libnvrtc.so.12"] {
            v.push(PathBuf::from(d).join(so));
        }
    }
    v
}

/// Make libnvrtc loadable for cudarc; returns where it was found ("the loader's search path"
/// when only `dlopen` by name finds it).
pub fn locate() -> Result<String, CodegenError> {
    LOADED
        .get_or_init(|| {
            let explicit = explicit_lib().is_some();
            for (n, p) in candidates().into_iter().enumerate() {
                if !p.is_file() {
                    if n == 0 && explicit {
                        return Err(format!("WKVC_NVRTC_LIB={} is not a file", p.display()));
                    }
                    continue;
                }
                // SAFETY: loading NVIDIA's NVRTC library, which has no initialisers with
                // preconditions; the handle is kept for the life of the process.
                match unsafe {
                    libloading::os::unix::Library::open(
                        Some(&p),
                        libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
                    )
                } {
                    Ok(lib) => {
                        std::mem::forget(lib);
                        return Ok(p.display().to_string());
                    }
                    Err(e) => {
                        if n == 0 && explicit {
                            return Err(format!("cannot load {}: {e}", p.display()));
                        }
                    }
                }
            }
            // SAFETY: only dlopen()s the library by its names; no NVRTC call is made.
            if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                Ok("the loader's search path".to_string())
            } else {
                Err(
                    "NVRTC (libnvrtc.so.12 or .so.13) was not found: install it with `scripts/fetch-nvrtc.sh` or `pip install \
                     nvidia-cuda-nvrtc-cu12==12.9.86` and set WKVC_NVRTC_LIB to \
                     <site-packages>/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"
                        .to_string(),
                )
            }
        })
        .clone()
        .map_err(CodegenError::Nvrtc)
}

/// NVRTC's version (major, minor).
pub fn version() -> Result<(i32, i32), CodegenError> {
    locate()?;
    let (mut a, mut b) = (0, 0);
    // SAFETY: two valid out pointers.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut a, &mut b) }
        .result()
        .map_err(|e| CodegenError::Nvrtc(format!("nvrtcVersion: {e}")))?;
    Ok((a, b))
}

struct Program(cudarc::nvrtc::sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by create_program, destroyed once.
        let _ = unsafe { cudarc::nvrtc::result::destroy_program(self.0) };
    }
}

/// Compile `source` with `options`; the program and its log (the log also on failure, as the
/// error).
fn compile(
    source: &str,
    name: &str,
    options: &[String],
) -> Result<(Program, String), CodegenError> {
    locate()?;
    let src = CString::new(source)
        .map_err(|_| CodegenError::Nvrtc(format!("{name}: the source contains a NUL byte")))?;
    let prog = cudarc::nvrtc::result::create_program(&src, None)
        .map_err(|e| CodegenError::Nvrtc(format!("{name}: nvrtcCreateProgram: {e}")))?;
    let prog = Program(prog);
    // SAFETY: a live program and plain option strings.
    let res = unsafe { cudarc::nvrtc::result::compile_program(prog.0, options) };
    // SAFETY: the program is live and was compiled.
    let log = unsafe { cudarc::nvrtc::result::get_program_log(prog.0) }
        .map(|v| {
            let b: Vec<u8> = v
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as u8)
                .collect();
            String::from_utf8_lossy(&b).into_owned()
        })
        .unwrap_or_default();
    if let Err(e) = res {
        return Err(CodegenError::Nvrtc(format!(
            "{name}: NVRTC failed to compile ({e}) with {options:?}:\n{log}"
        )));
    }
    Ok((prog, log))
}

/// CUBIN for `sm_{arch}`, with ptxas's report per entry point.
pub fn cubin(source: &str, name: &str, arch: u32) -> Result<Cubin, CodegenError> {
    let opts = vec![
        format!("--gpu-architecture=sm_{arch}"),
        "-Xptxas=-v".to_string(),
        "--std=c++17".to_string(),
    ];
    let (prog, log) = compile(source, name, &opts)?;
    let mut size = 0usize;
    // SAFETY: a compiled program; the out pointer is valid.
    unsafe { cudarc::nvrtc::sys::nvrtcGetCUBINSize(prog.0, &mut size) }
        .result()
        .map_err(|e| CodegenError::Nvrtc(format!("{name}: nvrtcGetCUBINSize: {e}")))?;
    let mut image = vec![0u8; size];
    // SAFETY: the buffer holds `size` bytes, as NVRTC asked.
    unsafe { cudarc::nvrtc::sys::nvrtcGetCUBIN(prog.0, image.as_mut_ptr() as *mut _) }
        .result()
        .map_err(|e| CodegenError::Nvrtc(format!("{name}: nvrtcGetCUBIN: {e}")))?;
    Ok(Cubin {
        arch,
        image,
        entries: parse_ptxas(&log),
        log,
    })
}

/// PTX for `compute_{arch}` (any later GPU can JIT it).
pub fn ptx(source: &str, name: &str, arch: u32) -> Result<String, CodegenError> {
    let opts = vec![
        format!("--gpu-architecture=compute_{arch}"),
        "--std=c++17".to_string(),
    ];
    let (prog, _) = compile(source, name, &opts)?;
    // SAFETY: a compiled program.
    let v = unsafe { cudarc::nvrtc::result::get_ptx(prog.0) }
        .map_err(|e| CodegenError::Nvrtc(format!("{name}: nvrtcGetPTX: {e}")))?;
    let b: Vec<u8> = v
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&b).into_owned())
}

/// Per entry point: "Compiling entry function 'NAME' for 'sm_90'", then "N bytes stack frame,
/// N bytes spill stores, N bytes spill loads" and "Used N registers, ... N bytes smem".
pub fn parse_ptxas(log: &str) -> Vec<EntryInfo> {
    let num_before = |l: &str, key: &str| -> Option<u32> {
        let i = l.find(key)?;
        l[..i].split_whitespace().last()?.parse().ok()
    };
    let mut out: Vec<EntryInfo> = Vec::new();
    for l in log.lines() {
        if let Some(i) = l.find("entry function '") {
            let rest = &l[i + 16..];
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(EntryInfo {
                name,
                ..Default::default()
            });
        } else if let Some(e) = out.last_mut() {
            if let Some(v) = num_before(l, "bytes stack frame") {
                e.stack_bytes = v;
            }
            if let Some(v) = num_before(l, "bytes spill stores") {
                e.spill_stores = v;
            }
            if let Some(v) = num_before(l, "bytes spill loads") {
                e.spill_loads = v;
            }
            if let Some(v) = num_before(l, "registers") {
                e.registers = v;
            }
            if let Some(v) = num_before(l, "bytes smem") {
                e.smem_bytes = v;
            }
        }
    }
    out
}
