//! The CUDA C of every kernel kind, over several shape/bits/group configurations, compiles to
//! CUBIN for sm_80 and sm_90 with NVRTC (no GPU needed); ptxas's register and spill report is
//! printed, and the decode kernels use no local memory for spills. Needs libnvrtc (see
//! `wkvc_codegen::nvrtc::locate`); `scripts/test.sh` installs it and sets WKVC_REQUIRE_NVRTC,
//! so there a missing library fails instead of skipping.

use wkvc_codegen::cuda::{self, Launch};
use wkvc_codegen::nvrtc;
use wkvc_ir::{Act, KernelSpec};

fn nvrtc_present() -> bool {
    match nvrtc::locate() {
        Ok(_) => true,
        Err(e) => {
            wkvc_testkit::skip(wkvc_testkit::Group::Nvrtc, &e.to_string());
            false
        }
    }
}

fn qgemm(k: usize, parts: Vec<usize>, bits: u32, group: i64, residual: bool) -> KernelSpec {
    KernelSpec::QGemm {
        k,
        parts,
        bits,
        group,
        residual,
        act: Act::F32,
    }
}

fn rope(h: usize, kv: usize, hd: usize, rd: usize, bits: u32, smooth: bool) -> KernelSpec {
    KernelSpec::RopeKv {
        heads: h,
        kv_heads: kv,
        head_dim: hd,
        rope_dim: rd,
        kv_bits: bits,
        smooth,
        factors: false,
        layer: 0,
        rotate: 0,
        kv_group: 0,
    }
}

/// `spec` (a rope_kv) with the K/V rotation.
fn rotated(mut spec: KernelSpec, block: usize) -> KernelSpec {
    if let KernelSpec::RopeKv { rotate, .. } = &mut spec {
        *rotate = block;
    }
    spec
}

fn attn(h: usize, kv: usize, hd: usize, bits: u32, po: bool, smooth: bool) -> KernelSpec {
    KernelSpec::Attention {
        heads: h,
        kv_heads: kv,
        head_dim: hd,
        kv_bits: bits,
        past_only: po,
        smooth,
        layer: 0,
        kv_group: 0,
    }
}

/// The demo model's kernels plus other shapes: GQA 3, 4 and 8 query heads per kv head, head
/// dims 64 and 128, partial RoPE, 3/4/16-bit caches, groups 32/64/128/per-channel with block
/// and group tails.
fn specs() -> Vec<KernelSpec> {
    vec![
        KernelSpec::Embed {
            vocab: 49152,
            dim: 576,
        },
        KernelSpec::RmsNorm {
            dim: 576,
            eps: 1e-5,
        },
        KernelSpec::RmsNorm { dim: 70, eps: 1e-6 },
        KernelSpec::SiluMul { n: 1536 },
        qgemm(576, vec![576, 192, 192], 4, 128, false),
        qgemm(1536, vec![576], 4, 128, true),
        qgemm(4096, vec![11008], 4, 128, false),
        qgemm(96, vec![7], 4, 64, true),
        qgemm(200, vec![9], 3, 128, false),
        qgemm(40, vec![5], 4, -1, false),
        KernelSpec::Gemm {
            k: 576,
            parts: vec![576],
            residual: true,
        },
        KernelSpec::Gemm {
            k: 70,
            parts: vec![3],
            residual: false,
        },
        KernelSpec::Logits {
            vocab: 49152,
            dim: 576,
            act: Act::Int8,
        },
        rope(9, 3, 64, 64, 4, true),
        rope(32, 8, 128, 128, 16, false),
        rope(8, 2, 64, 32, 3, false),
        rotated(rope(9, 3, 64, 64, 4, true), 64),
        rotated(rope(32, 8, 128, 128, 4, true), 128),
        attn(9, 3, 64, 4, true, true),
        attn(32, 8, 128, 4, true, false),
        attn(32, 4, 128, 4, false, true),
        attn(8, 8, 64, 16, false, false),
        attn(6, 2, 64, 3, true, true),
    ]
}

/// Entry points that run in a decode step (the prefill GEMMs are the exception).
fn is_decode(entry: &str) -> bool {
    !entry.ends_with("_tiled") && !entry.ends_with("_mma")
}

#[test]
fn every_kind_compiles_to_cubin_for_sm80_and_sm90_without_spills_in_decode() {
    if !nvrtc_present() {
        return;
    }
    let (maj, min) = nvrtc::version().expect("nvrtc version");
    let mut report = format!("NVRTC {maj}.{min}\n");
    let mut kinds = std::collections::BTreeSet::new();
    for spec in specs() {
        kinds.insert(spec.kind());
        let k = cuda::emit(&spec).unwrap_or_else(|e| panic!("{}: {e}", spec.code_name()));
        for arch in [80, 90] {
            let c = nvrtc::cubin(&k.source, &spec.code_name(), arch)
                .unwrap_or_else(|e| panic!("{}: {e}", spec.code_name()));
            // an ELF image
            assert_eq!(&c.image[..4], b"\x7fELF", "{}", spec.code_name());
            for e in &k.entries {
                let info = c
                    .entries
                    .iter()
                    .find(|i| &i.name == e)
                    .unwrap_or_else(|| panic!("{e}: no ptxas report in\n{}", c.log));
                report += &format!(
                    "sm_{arch} {e}: {} registers, {} B stack, spills {} B stored / {} B loaded, {} B smem\n",
                    info.registers,
                    info.stack_bytes,
                    info.spill_stores,
                    info.spill_loads,
                    info.smem_bytes
                );
                assert!(info.registers > 0 && info.registers <= 255, "{e}: {info:?}");
                if is_decode(e) {
                    // no local memory at all: no spills and no stack frame (a register array
                    // indexed by a runtime value would land there)
                    assert_eq!(
                        (info.spill_stores, info.spill_loads, info.stack_bytes),
                        (0, 0, 0),
                        "{e} uses local memory on sm_{arch}: {info:?}"
                    );
                }
            }
        }
    }
    eprintln!("{report}");
    // every kind of the lowered graph is covered
    assert_eq!(kinds.len(), 8, "{kinds:?}");
}

#[test]
fn ptx_is_portable_text_with_every_entry() {
    if !nvrtc_present() {
        return;
    }
    let spec = attn(9, 3, 64, 4, true, true);
    let k = cuda::emit(&spec).expect("emits");
    let ptx = nvrtc::ptx(&k.source, "attention", 80).expect("compiles");
    assert!(
        ptx.contains(".target sm_80"),
        "{}",
        &ptx[..200.min(ptx.len())]
    );
    for e in &k.entries {
        assert!(ptx.contains(&format!(".entry {e}(")), "{e}");
    }
    assert_eq!(k.launch, Launch::Attention { splits_max: 64 });
}

#[test]
fn compile_errors_come_back_with_the_nvrtc_log() {
    if !nvrtc_present() {
        return;
    }
    let e = nvrtc::cubin(
        "extern \"C\" __global__ void f(float* x) { x[0] = undefined_name; }",
        "broken",
        90,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("broken") && e.contains("undefined_name"), "{e}");
}

#[test]
fn unsupported_specs_are_refused() {
    for spec in [
        attn(9, 3, 40, 4, true, true),
        qgemm(576, vec![8], 8, 128, false),
    ] {
        let e = cuda::emit(&spec).unwrap_err().to_string();
        assert!(e.contains("does not support"), "{e}");
    }
}

#[test]
fn ptxas_report_parses() {
    let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'k_gemv' for 'sm_90'\n\
ptxas info    : Function properties for k_gemv\n\
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 40 registers, used 1 barriers, 1536 bytes smem, 400 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'k_tiled' for 'sm_90'\n\
ptxas info    : Used 64 registers\n";
    let v = nvrtc::parse_ptxas(log);
    assert_eq!(v.len(), 2);
    assert_eq!(
        (
            v[0].name.as_str(),
            v[0].registers,
            v[0].stack_bytes,
            v[0].spill_stores,
            v[0].spill_loads,
            v[0].smem_bytes
        ),
        ("k_gemv", 40, 8, 4, 12, 1536)
    );
    assert_eq!((v[1].name.as_str(), v[1].registers), ("k_tiled", 64));
}
