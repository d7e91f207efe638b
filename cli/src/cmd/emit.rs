//! `wkvc emit`: the generated code of the plan's kernels (Cranelift IR or machine code, CUDA
//! C or PTX).

use crate::args::{EmitArgs, Target};
use crate::common::open;
use anyhow::{Context, Result};
use wkvc_codegen::native::{self, CpuIsa};
use wkvc_runtime::Act;

pub fn run(a: EmitArgs) -> Result<()> {
    let EmitArgs {
        model,
        kernel,
        target,
        cpu_act,
        cpu_isa,
        asm,
        arch,
    } = a;
    let isa = cpu_isa.isa().unwrap_or_else(CpuIsa::detect);
    if target == Target::Cpu {
        isa.check().map_err(anyhow::Error::msg)?;
    }
    let m = open(&model)?;
    let act = cpu_act.map_or_else(|| m.plan_act(), Act::from);
    let lowered = m.lowered(act)?;
    let specs: std::collections::BTreeMap<String, &wkvc_ir::KernelSpec> = lowered
        .kernels()
        .into_iter()
        .map(|s| (s.code_name(), s))
        .collect();
    match kernel {
        None => {
            for (name, spec) in &specs {
                match native::kernel(spec, isa).and_then(|k| k.native_name()) {
                    Some(n) if target == Target::Cpu => {
                        println!("{name}  (native {}: {n})", isa.name())
                    }
                    _ => println!("{name}"),
                }
            }
        }
        Some(k) => {
            let spec = specs.get(&k).with_context(|| {
                format!(
                    "no kernel {k} in this plan; kernels: {}",
                    specs.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            })?;
            if target == Target::Cuda {
                let k = wkvc_codegen::cuda::emit(spec)?;
                if asm {
                    let c = wkvc_codegen::nvrtc::cubin(&k.source, &k.entries[0], arch)?;
                    for e in &c.entries {
                        eprintln!(
                            "sm_{arch} {}: {} registers, {} bytes stack, spill stores {} B, spill loads {} B, {} B shared memory",
                            e.name,
                            e.registers,
                            e.stack_bytes,
                            e.spill_stores,
                            e.spill_loads,
                            e.smem_bytes
                        );
                    }
                    print!(
                        "{}",
                        wkvc_codegen::nvrtc::ptx(&k.source, &k.entries[0], arch)?
                    );
                } else {
                    print!("{}", k.source);
                }
                return Ok(());
            }
            if let Some(d) = native::describe(spec, isa) {
                // a native kernel is Rust compiled with wkvc: its description, then (for
                // comparison) the generated kernel that --cpu-isa base runs
                print!("{d}");
                println!("; the generated kernel (--cpu-isa base) follows");
            }
            let mut jit = wkvc_codegen::cpu::CpuJit::host()?;
            if asm {
                print!("{}", jit.kernel_asm(spec)?);
            } else {
                print!("{}", jit.kernel_ir(spec)?);
            }
        }
    }
    Ok(())
}
