//! `wkvc`: the command-line tool (run, eval, bench, inspect).

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use wkvc_runtime::compile::{self, CalibConfig, CompileOptions};
use wkvc_runtime::{Message, Model, Sampler, StreamDecoder, eval, generate, peak_rss_bytes};

fn spinner() -> ProgressBar {
    let sp = ProgressBar::new_spinner();
    sp.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    sp.enable_steady_tick(std::time::Duration::from_millis(200));
    sp
}

/// A line above the spinner, or on stderr when there is no terminal to draw on.
fn note(sp: &ProgressBar, msg: String) {
    if sp.is_hidden() {
        eprintln!("{msg}");
    } else {
        sp.println(msg);
    }
}

fn compile_options(
    q: &QuantArgs,
    calib: Option<PathBuf>,
    calib_tokens: Option<usize>,
    seed: u64,
    threads: usize,
) -> Result<CompileOptions> {
    let wkv = q.method == "wkvquant";
    let window = q.calib_len.unwrap_or(if wkv { 256 } else { 512 });
    let calib_tokens = if wkv {
        if calib_tokens.is_some() {
            bail!("--method wkvquant takes --calib-samples and --calib-len, not --calib-tokens");
        }
        Some(q.calib_samples.max(1) * window)
    } else {
        calib_tokens
    };
    Ok(CompileOptions {
        wbits: q.wbits,
        wgroup: q.wgroup,
        kvbits: q.kvbits,
        past_only: !q.no_poq,
        smooth: !q.no_smooth,
        method: q.method.clone(),
        calib_cfg: CalibConfig {
            epochs: q.epochs,
            crr_k: q.crr_k,
            loss: compile::parse_loss(&q.loss)?,
            lr_lwc: q.lr_lwc,
            lr_smooth: q.lr_smooth,
            learn_lwc: !q.no_learn_lwc,
            learn_smooth: !q.no_learn_smooth,
            ..CalibConfig::default()
        },
        calib,
        calib_tokens,
        calib_window: window,
        threads,
        seed,
        cpu_act: wkvc_runtime::Act::parse(&q.cpu_act)
            .with_context(|| format!("--cpu-act must be f32 or int8, got {}", q.cpu_act))?,
        f32_params: q.f32_params,
    })
}

/// The standard configurations, compiled in memory and evaluated on the same windows.
fn quality_table(
    fp: &Model,
    ids: &[u32],
    ctx: usize,
    windows: Option<usize>,
    calib: Option<PathBuf>,
    threads: usize,
    (origin, json): (TextOrigin, bool),
) -> Result<()> {
    // (name, wbits, wgroup, kvbits, poq, smooth)
    let configs: [(&str, u32, i64, u32, bool, bool); 12] = [
        ("FP32", 16, 128, 16, false, false),
        ("W4 RTN g128", 4, 128, 16, false, false),
        ("W4 RTN per-channel", 4, -1, 16, false, false),
        ("KV4 without POQ", 16, 128, 4, false, false),
        ("KV4 with POQ", 16, 128, 4, true, false),
        ("KV4 POQ + smoothing init", 16, 128, 4, true, true),
        ("W4KV4 RTN without POQ", 4, 128, 4, false, false),
        ("W4KV4 RTN with POQ", 4, 128, 4, true, false),
        ("W4KV4 RTN POQ + smoothing init", 4, 128, 4, true, true),
        ("KV8 with POQ", 16, 128, 8, true, false),
        ("KV3 with POQ", 16, 128, 3, true, false),
        ("KV2 with POQ", 16, 128, 2, true, false),
    ];
    let base = CompileOptions {
        calib: calib.clone(),
        threads,
        ..Default::default()
    };
    let sp = spinner();
    let mut say = |s: &str| sp.set_message(s.to_string());
    let data = compile::calibration_data(fp, &base, &mut say)?;
    let fpe = fp.engine(threads)?;
    say("FP logits for the KL divergence");
    let nwin = windows.map_or(ids.len() / ctx.max(1), |w| w.min(ids.len() / ctx.max(1)));
    let fp_logits = eval::window_logits(&fpe, ids, ctx, nwin)?;
    let mut rows = Vec::new();
    for (name, wbits, wgroup, kvbits, poq, smooth) in configs {
        let opts = CompileOptions {
            wbits,
            wgroup,
            kvbits,
            past_only: poq,
            smooth,
            ..base.clone()
        };
        let c = compile::quantize(fp, &opts, Some(&data), &mut say)?;
        let m = fp.with_module(c.module, None);
        // the standard W4KV4 row also through the compiled CPU engine, both activation modes
        let mut kinds = vec![(name.to_string(), wkvc_runtime::EngineKind::Interp)];
        if name == "W4KV4 RTN POQ + smoothing init" {
            for (suffix, act) in [
                ("CPU engine, exact", wkvc_runtime::Act::F32),
                ("CPU engine, int8 activations", wkvc_runtime::Act::Int8),
            ] {
                kinds.push((
                    format!("{name} ({suffix})"),
                    wkvc_runtime::EngineKind::Cpu { act },
                ));
            }
        }
        for (name, kind) in kinds {
            let e = m.engine_kind(threads, kind)?;
            say(&format!("evaluating {name}"));
            let r = eval::evaluate_with(
                &e,
                Some(eval::Reference::Logits(&fp_logits)),
                ids,
                ctx,
                windows,
                wkvc_runtime::RunMode::DecodeEquivalent,
                &mut |d, t| sp.set_message(format!("evaluating {name}: window {d}/{t}")),
            )?;
            let mem = compile::memory_plan(&m.module, m.config.max_position_embeddings);
            note(
                &sp,
                format!(
                    "{name}: ppl {:.4}, KLD {:.5}, top-1 {:.2}%",
                    r.perplexity,
                    r.kld.unwrap_or(0.0),
                    100.0 * r.top1.unwrap_or(0.0)
                ),
            );
            rows.push(serde_json::json!({"config": name, "perplexity": r.perplexity, "kld": r.kld, "top1": r.top1, "weight_bytes": mem.weight_bytes, "kv_bytes_per_token": mem.kv_bytes_per_token, "tokens": r.tokens, "windows": r.windows}));
        }
    }
    sp.finish_and_clear();
    let sampled = origin == TextOrigin::Sampled;
    if json {
        println!(
            "{}",
            serde_json::json!({"ctx": ctx, "calibration": data.source, "text_origin": if sampled { "sampled" } else { "corpus" }, "rows": rows})
        );
        return Ok(());
    }
    println!(
        "Calibration for the smoothing rows: {}. Protocol: decode-equivalent, ctx {ctx}.",
        data.source
    );
    let num = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    if sampled {
        println!(
            "The text was sampled from the FP model: KL divergence and top-1 agreement with the \
             FP model measure quality; perplexities are on the model's own samples (low for the \
             FP model by construction) and are not comparable with figures on written text.\n"
        );
        println!(
            "| config | KLD vs FP | top-1 agreement | perplexity on sampled text | weight bytes | \
             KV bytes/token |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        for r in &rows {
            println!(
                "| {} | {:.5} | {:.2}% | {:.3} | {} | {} |",
                r["config"].as_str().unwrap_or(""),
                num(r, "kld"),
                100.0 * num(r, "top1"),
                num(r, "perplexity"),
                r["weight_bytes"],
                r["kv_bytes_per_token"]
            );
        }
    } else {
        println!();
        println!(
            "| config | perplexity | KLD vs FP | top-1 agreement | weight bytes | KV bytes/token |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        for r in &rows {
            println!(
                "| {} | {:.4} | {:.5} | {:.2}% | {} | {} |",
                r["config"].as_str().unwrap_or(""),
                num(r, "perplexity"),
                num(r, "kld"),
                100.0 * num(r, "top1"),
                r["weight_bytes"],
                r["kv_bytes_per_token"]
            );
        }
    }
    Ok(())
}

/// Where an evaluation text comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum TextOrigin {
    /// written by people (perplexity is meaningful)
    Corpus,
    /// sampled from the FP model (its perplexity is low by construction: compare by KL
    /// divergence and top-1 agreement)
    Sampled,
}

#[derive(Parser)]
#[command(
    name = "wkvc",
    version,
    about = "A compiler and runtime for quantized LLM inference (WKVQuant)"
)]
struct Cli {
    /// More logging (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone, Debug)]
struct QuantArgs {
    /// The CPU back end's activations that the plan selects: int8 (the fast path, default:
    /// activations quantized per 32 on the fly, int8 head; on the demo model within the noise
    /// of the exact path) or f32 (exact: int4 dequantized in registers).
    #[arg(long, default_value = "int8", value_parser = ["f32", "int8"])]
    cpu_act: String,
    /// Weight bits (2..8); 16 keeps weights in full precision.
    #[arg(long, default_value_t = 4)]
    wbits: u32,
    /// Input channels per weight group; -1 for one group per output channel.
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    wgroup: i64,
    /// KV cache bits (2..8); 16 keeps the cache in full precision.
    #[arg(long, default_value_t = 4)]
    kvbits: u32,
    /// Let every position read quantized K/V of itself too (the "without POQ" baseline).
    #[arg(long)]
    no_poq: bool,
    /// No K/V channel smoothing.
    #[arg(long)]
    no_smooth: bool,
    /// Quantization method: rtn (round to nearest), or wkvquant (learn weight clipping and
    /// K/V smoothing block by block with the cross-block reconstruction loss).
    #[arg(long, default_value = "rtn", value_parser = ["rtn", "wkvquant"])]
    method: String,
    /// wkvquant: calibration samples (windows of --calib-len tokens).
    #[arg(long, default_value_t = 16)]
    calib_samples: usize,
    /// Tokens per calibration window (wkvquant default 256; rtn smoothing statistics 512).
    #[arg(long)]
    calib_len: Option<usize>,
    /// wkvquant: epochs over the samples per block.
    #[arg(long, default_value_t = 4)]
    epochs: usize,
    /// wkvquant: blocks after the learned one in the reconstruction target (k).
    #[arg(long, default_value_t = 5)]
    crr_k: usize,
    /// wkvquant: loss, mae (CRR), mse, or local-mse+crr.
    #[arg(long, default_value = "mae")]
    loss: String,
    /// wkvquant: AdamW learning rate of the clipping logits (OmniQuant's 1e-2 is for its
    /// ~2560 steps per block; this default suits the CPU setting's 64).
    #[arg(long, default_value_t = 1e-1)]
    lr_lwc: f32,
    /// wkvquant: AdamW learning rate of the smoothing shift and scale (OmniQuant: 5e-3).
    #[arg(long, default_value_t = 2e-2)]
    lr_smooth: f32,
    /// wkvquant: keep the RTN clipping (learn only the smoothing).
    #[arg(long)]
    no_learn_lwc: bool,
    /// wkvquant: keep the initial smoothing (learn only the clipping).
    #[arg(long)]
    no_learn_smooth: bool,
    /// Keep scales and zeros in f32 (the reference definition) instead of f16; weights are
    /// then not packed. For comparisons with fake-quant figures.
    #[arg(long)]
    f32_params: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt, streaming tokens as they are produced.
    Run {
        /// A .gguf file or a Hugging Face model directory.
        model: PathBuf,
        /// The prompt text.
        #[arg(short, long)]
        prompt: String,
        /// Maximum new tokens.
        #[arg(short = 'n', long, default_value_t = 64)]
        max_tokens: usize,
        /// Sampling temperature; 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Wrap the prompt in the model's chat template as a user message.
        #[arg(long)]
        chat: bool,
        /// Context length of the session.
        #[arg(long, default_value_t = 2048)]
        ctx: usize,
        /// Never sample end-of-generation tokens: always produce -n tokens.
        #[arg(long)]
        ignore_eos: bool,
        #[command(flatten)]
        eng: EngineArgs,
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Quantize a model (WKVQuant passes) into a self-contained plan file.
    Compile {
        /// A .gguf file or a Hugging Face model directory.
        model: PathBuf,
        /// The plan to write (written atomically).
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        q: QuantArgs,
        /// Calibration text; without it, text is sampled from the FP model (data-free).
        #[arg(long)]
        calib: Option<PathBuf>,
        /// Calibration tokens (default 8192 from --calib, 512 when sampling).
        #[arg(long)]
        calib_tokens: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        threads: Option<usize>,
        /// Back ends to record code for: cpu (the lowered graph and memory plan), or cpu,cuda
        /// (also every kernel's CUDA C and its PTX for compute_80, made with NVRTC).
        #[arg(long, default_value = "cpu")]
        target: String,
    },
    /// Measure perplexity (and KL divergence) on a text file.
    Eval {
        model: PathBuf,
        /// Text file to score (read as UTF-8, tokenized whole, no special tokens).
        #[arg(long)]
        ppl: PathBuf,
        /// Also report the mean KL divergence from this (FP) model's next-token distribution.
        #[arg(long)]
        kld_vs: Option<PathBuf>,
        /// Compile the standard configurations of MODEL in memory and print a Markdown table.
        #[arg(long)]
        table: bool,
        /// Calibration text for --table's smoothing rows (default: sampled from the model).
        #[arg(long)]
        calib: Option<PathBuf>,
        /// Where the --ppl text comes from: a corpus, or sampled from the FP model (then the
        /// KL divergence and top-1 agreement with the FP model lead the report and
        /// perplexities are labelled as on sampled text).
        #[arg(long, value_enum, default_value_t = TextOrigin::Corpus)]
        text_origin: TextOrigin,
        /// KV protocol: decode (decode-equivalent, default) or prefill (own window in FP).
        #[arg(long, default_value = "decode")]
        protocol: String,
        /// Tokens per window.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Score at most this many windows.
        #[arg(long)]
        windows: Option<usize>,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        eng: EngineArgs,
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Measure prefill and decode speed.
    Bench {
        model: PathBuf,
        /// Prompt tokens to prefill.
        #[arg(long, default_value_t = 512)]
        prompt: usize,
        /// Tokens to decode after the prompt (and again from an empty cache, as llama-bench's
        /// tg test does).
        #[arg(long = "gen", default_value_t = 128)]
        gen_tokens: usize,
        /// Timed runs after one warm-up run; the median is reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Also time --gen decode steps after this many tokens of context (0: skip).
        #[arg(long, default_value_t = 2048)]
        long_ctx: usize,
        #[command(flatten)]
        eng: EngineArgs,
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Show a model's architecture, sizes and (with --graph) its graph.
    Inspect {
        model: PathBuf,
        /// Print the graph in text form.
        #[arg(long)]
        graph: bool,
        #[arg(long)]
        json: bool,
        /// Print the memory plan of the compiled CPU engine (and the lowered kernels).
        #[arg(long)]
        memory: bool,
        /// Context the memory plan is computed for (default: the model's maximum).
        #[arg(long)]
        ctx: Option<usize>,
        /// Activation mode the memory plan is for: f32 (exact) or int8 (fast path); default:
        /// the plan's.
        #[arg(long)]
        cpu_act: Option<String>,
    },
    /// Print the generated code of a kernel of the lowered plan (without --kernel: list them).
    Emit {
        model: PathBuf,
        /// A kernel name as listed (e.g. qgemm_k576_b4_g128_f32).
        #[arg(long)]
        kernel: Option<String>,
        /// cpu (Cranelift IR) or cuda (CUDA C).
        #[arg(long, default_value = "cpu")]
        target: String,
        /// Activation mode of the quantized GEMMs: f32 or int8.
        #[arg(long, default_value = "f32")]
        cpu_act: String,
        /// Print the machine code instead: for cpu after register allocation; for cuda the
        /// PTX from NVRTC for compute_ARCH, with ptxas's register/spill report for sm_ARCH
        /// on stderr.
        #[arg(long)]
        asm: bool,
        /// GPU architecture for --target cuda --asm (80: A100, 90: H100/H200).
        #[arg(long, default_value_t = 90)]
        arch: u32,
    },
}

/// Engine selection shared by run, eval and bench.
#[derive(clap::Args, Clone, Debug)]
struct EngineArgs {
    /// auto (compiled CPU engine for plans, interpreter otherwise), cpu, cuda (the CUDA
    /// kernels on an NVIDIA GPU), cuda-emulated (the CUDA engine and kernels on the host's
    /// CPU through the CUDA host emulator: a check without a GPU, very slow), or interp.
    #[arg(long, default_value = "auto")]
    engine: String,
    /// GPU for --engine cuda.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// --engine cuda[-emulated]: prefill's quantized GEMMs on tensor cores (f16 operands, f32
    /// sums).
    #[arg(long)]
    cuda_mma: bool,
    /// Activations of the CPU engine's quantized GEMMs: f32 (exact) or int8 (fast path);
    /// default: what the plan selects.
    #[arg(long)]
    cpu_act: Option<String>,
}

fn make_engine<'m>(m: &'m Model, th: usize, ea: &EngineArgs) -> Result<wkvc_runtime::Engine<'m>> {
    let act = match &ea.cpu_act {
        None => None,
        Some(a) => Some(
            wkvc_runtime::Act::parse(a)
                .with_context(|| format!("--cpu-act must be f32 or int8, got {a}"))?,
        ),
    };
    let plan_act = m
        .plan
        .as_ref()
        .and_then(|p| p.cpu.as_ref())
        .map_or(wkvc_runtime::Act::F32, |c| c.act);
    let e = match (ea.engine.as_str(), act) {
        ("auto", None) => m.engine_auto(th)?,
        ("auto", Some(act)) | ("cpu", Some(act)) => {
            m.engine_kind(th, wkvc_runtime::EngineKind::Cpu { act })?
        }
        ("cpu", None) => m.engine_kind(th, wkvc_runtime::EngineKind::Cpu { act: plan_act })?,
        ("interp", _) => m.engine_kind(th, wkvc_runtime::EngineKind::Interp)?,
        ("cuda", _) => m.engine_kind(
            th,
            wkvc_runtime::EngineKind::Cuda {
                device: ea.device,
                mma: ea.cuda_mma,
            },
        )?,
        ("cuda-emulated", _) => m.engine_kind(
            th,
            wkvc_runtime::EngineKind::CudaEmulated { mma: ea.cuda_mma },
        )?,
        (other, _) => {
            bail!("--engine must be auto, cpu, cuda, cuda-emulated or interp, got {other}")
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
            "CPU engine: {} kernels JIT-compiled in {:.1} ms ({} bytes of code)",
            c.kernels,
            c.jit_ms,
            c.code_bytes
        );
    }
    Ok(e)
}

fn threads(t: Option<usize>) -> usize {
    t.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn open(path: &std::path::Path) -> Result<Model> {
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

fn median_or_zero(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// The median; None for no values (nothing measured).
fn median(mut v: Vec<f64>) -> Option<f64> {
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

fn main() {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = real_main(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run {
            model,
            prompt,
            max_tokens,
            temperature,
            top_p,
            seed,
            chat,
            ctx,
            ignore_eos,
            eng,
            threads: t,
        } => {
            if !(0.0..=1.0).contains(&top_p) || top_p == 0.0 {
                bail!("--top-p must be in (0, 1], got {top_p}");
            }
            if temperature < 0.0 || !temperature.is_finite() {
                bail!("--temperature must be >= 0, got {temperature}");
            }
            let m = open(&model)?;
            let tok = m.tokenizer()?;
            let text = if chat {
                tok.apply_chat_template(&[Message {
                    role: "user".into(),
                    content: prompt.clone(),
                }])?
            } else {
                prompt.clone()
            };
            let ids = tok.encode(&text, true)?;
            let engine = make_engine(&m, threads(t), &eng)?;
            let mut session = engine.session(ctx);
            let mut sampler = Sampler::new(temperature, top_p, seed);
            let mut dec = StreamDecoder::new();
            let mut out = std::io::stdout().lock();
            if !chat {
                write!(out, "{prompt}")?;
                out.flush()?;
            }
            let stats = generate(
                &mut session,
                &ids,
                max_tokens,
                &mut sampler,
                &|id| tok.is_eos(id),
                if ignore_eos { &tok.spec.eos_ids } else { &[] },
                &mut |id| {
                    let piece = dec.push(tok, id)?;
                    write!(out, "{piece}")
                        .and_then(|_| out.flush())
                        .map_err(|e| wkvc_runtime::RuntimeError::Invalid(format!("stdout: {e}")))
                },
            )?;
            writeln!(out)?;
            let jit = engine
                .cpu()
                .map(|c| {
                    format!(
                        "; {}, {} kernels JIT-compiled in {:.0} ms",
                        engine.describe(),
                        c.kernels,
                        c.jit_ms
                    )
                })
                .unwrap_or_else(|| format!("; {}", engine.describe()));
            eprintln!(
                "[{} prompt tokens in {:.2}s, {} new tokens at {:.1} tokens/s{jit}]",
                stats.prompt_tokens,
                stats.prefill_seconds,
                stats.new_tokens,
                stats.new_tokens as f64 / stats.decode_seconds.max(1e-9)
            );
        }
        Cmd::Compile {
            model,
            output,
            q,
            calib,
            calib_tokens,
            seed,
            threads: t,
            target,
        } => {
            let t0 = Instant::now();
            let mut cuda = false;
            for tg in target.split(',').map(str::trim) {
                match tg {
                    "cpu" => {}
                    "cuda" => cuda = true,
                    other => bail!("--target takes cpu and cuda (comma separated), got {other}"),
                }
            }
            if cuda {
                // before any long work: NVRTC must be there
                wkvc_codegen::nvrtc::locate()?;
            }
            wkvc_runtime::plan::check_destination(&output)?;
            let fp = open(&model)?;
            let opts = compile_options(&q, calib, calib_tokens, seed, threads(t))?;
            opts.validate()?;
            if opts.wkvquant() {
                // First Ctrl-C: stop calibration cleanly (no plan is written); second: exit.
                let _ = ctrlc::set_handler(|| {
                    if compile::CANCEL.swap(true, std::sync::atomic::Ordering::SeqCst) {
                        std::process::exit(130);
                    }
                });
            }
            let sp = spinner();
            let mut say = |s: &str| sp.set_message(s.to_string());
            let data = compile::calibration_data(&fp, &opts, &mut say)?;
            if opts.calib.is_none() {
                note(
                    &sp,
                    format!("calibration: no --calib given, using text {}", data.source),
                );
            }
            let c = compile::quantize(&fp, &opts, Some(&data), &mut say)?;
            say("measuring quality on held-out text");
            let qm = fp.with_module(c.module.clone(), None);
            let mut quality = compile::measure_quality(&fp, &qm, &data.held_out, opts.threads)?;
            quality["held_out_text"] = serde_json::json!(if data.held_out_sampled {
                "sampled from the FP model"
            } else {
                "from the calibration file, after the calibration windows"
            });
            say("hashing the source model");
            let sha = if model.is_file() {
                wkvc_runtime::plan::file_sha256(&model)
                    .with_context(|| format!("cannot read {}", model.display()))?
            } else {
                String::new()
            };
            let mut manifest = compile::manifest(&fp, &c, quality.clone(), sha);
            if cuda {
                say("CUDA kernels: CUDA C and PTX (NVRTC)");
                manifest.cuda = Some(compile::cuda_plan(&c.module, opts.cpu_act, 80)?);
            }
            let mem = manifest.memory.clone();
            if compile::CANCEL.load(std::sync::atomic::Ordering::SeqCst) {
                bail!("interrupted (Ctrl-C): nothing was written");
            }
            say("writing the plan");
            let size = wkvc_runtime::plan::write(&output, &c.module, manifest)?;
            sp.finish_and_clear();
            let fp_mem = compile::memory_plan(&fp.module, fp.config.max_position_embeddings);
            println!(
                "wrote {} ({:.1} MiB) in {:.1}s",
                output.display(),
                size as f64 / 1048576.0,
                t0.elapsed().as_secs_f64()
            );
            println!(
                "  quantization  W{} (group {}) KV{} past-only {} smoothing {} method {}",
                opts.wbits,
                opts.wgroup,
                opts.kvbits,
                c.quant.past_only,
                c.quant.smooth,
                opts.method
            );
            println!("  calibration   {}", c.quant.calibration);
            if let Some(info) = &c.quant.calibrate {
                let s = &info["settings"];
                let blocks = info["blocks"].as_array().cloned().unwrap_or_default();
                let first = blocks
                    .first()
                    .map(|b| b["first_loss"].as_f64().unwrap_or(f64::NAN));
                let last = blocks
                    .last()
                    .map(|b| b["last_loss"].as_f64().unwrap_or(f64::NAN));
                println!(
                    "  wkvquant      {} samples x {} tokens, {} epochs, k {}, loss {}, lr {}/{}: {} steps in {:.0}s, peak RSS {:.0} MiB",
                    s["samples"],
                    s["tokens_per_sample"],
                    s["epochs"],
                    s["crr_k"],
                    s["loss"].as_str().unwrap_or("?"),
                    s["lr_lwc"],
                    s["lr_smooth"],
                    info["steps"],
                    info["seconds"].as_f64().unwrap_or(0.0),
                    info["peak_rss_bytes"].as_f64().unwrap_or(0.0) / 1048576.0
                );
                if let (Some(a), Some(b)) = (first, last) {
                    println!(
                        "                block 1 first-epoch loss {a:.5}, last block final loss {b:.5}"
                    );
                }
            }
            println!(
                "  weights       {:.1} MiB -> {:.1} MiB",
                fp_mem.weight_bytes as f64 / 1048576.0,
                mem.weight_bytes as f64 / 1048576.0
            );
            println!(
                "  KV cache      {} -> {} bytes/token ({:.1} MiB at {} tokens)",
                fp_mem.kv_bytes_per_token,
                mem.kv_bytes_per_token,
                mem.kv_bytes_at_max_context as f64 / 1048576.0,
                mem.max_context
            );
            let q = |k: &str| quality[k].as_f64().unwrap_or(f64::NAN);
            println!(
                "  quality       KLD vs FP {:.4}, top-1 agreement {:.1}%, perplexity {:.3} (FP {:.3}){} \
                 ({} held-out tokens {}, decode-equivalent)",
                q("kld_vs_fp"),
                100.0 * q("top1_agreement"),
                q("perplexity"),
                q("perplexity_fp"),
                if data.held_out_sampled {
                    " on sampled text"
                } else {
                    ""
                },
                quality["held_out_tokens"],
                quality["held_out_text"].as_str().unwrap_or("")
            );
        }
        Cmd::Eval {
            model,
            ppl,
            kld_vs,
            table,
            calib,
            text_origin,
            protocol,
            ctx,
            windows,
            json,
            eng,
            threads: t,
        } => {
            let mode = match protocol.as_str() {
                "decode" => wkvc_runtime::RunMode::DecodeEquivalent,
                "prefill" => wkvc_runtime::RunMode::Prefill,
                other => bail!("--protocol must be decode or prefill, got {other}"),
            };
            let text = std::fs::read_to_string(&ppl)
                .with_context(|| format!("cannot read {}", ppl.display()))?;
            let m = open(&model)?;
            let ids = m.tokenizer()?.encode(&text, false)?;
            if table {
                return quality_table(
                    &m,
                    &ids,
                    ctx,
                    windows,
                    calib,
                    threads(t),
                    (text_origin, json),
                );
            }
            let engine = make_engine(&m, threads(t), &eng)?;
            let refm = kld_vs.as_ref().map(|p| open(p)).transpose()?;
            let refe = refm.as_ref().map(|r| r.engine(threads(t))).transpose()?;
            let total = windows.map_or(ids.len() / ctx.max(1), |w| w.min(ids.len() / ctx.max(1)));
            let pb = ProgressBar::new(total as u64);
            pb.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} windows, eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            pb.set_message("perplexity");
            let r = eval::evaluate(
                &engine,
                refe.as_ref(),
                &ids,
                ctx,
                windows,
                mode,
                &mut |d, _| pb.set_position(d as u64),
            )?;
            pb.finish_and_clear();
            if json {
                let mut v = serde_json::to_value(&r)?;
                v["model"] = serde_json::json!(model.display().to_string());
                v["text"] = serde_json::json!(ppl.display().to_string());
                println!("{v}");
            } else {
                let vs = kld_vs
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                let ppl_line = format!(
                    "perplexity {:.4}{} over {} tokens ({} windows of {}, {}), {:.1}s, {:.1} \
                     tokens/s",
                    r.perplexity,
                    if text_origin == TextOrigin::Sampled {
                        " on text sampled from the model"
                    } else {
                        ""
                    },
                    r.tokens,
                    r.windows,
                    r.ctx,
                    r.protocol,
                    r.seconds,
                    r.tokens_per_s
                );
                let kld_line = match (r.kld, r.top1) {
                    (Some(k), Some(t)) => Some(format!(
                        "KL divergence from {vs}: {k:.5}; top-1 agreement {:.2}%",
                        100.0 * t
                    )),
                    _ => None,
                };
                let lines = if text_origin == TextOrigin::Sampled {
                    [kld_line, Some(ppl_line)]
                } else {
                    [Some(ppl_line), kld_line]
                };
                for l in lines.into_iter().flatten() {
                    println!("{l}");
                }
            }
        }
        Cmd::Bench {
            model,
            prompt,
            gen_tokens: ngen,
            runs,
            eng,
            threads: t,
            json,
            long_ctx,
        } => {
            if prompt == 0 {
                bail!("--prompt must be at least 1");
            }
            let m = open(&model)?;
            let th = threads(t);
            let engine = make_engine(&m, th, &eng)?;
            let vocab = engine.vocab_size();
            // A fixed, deterministic prompt of ordinary token ids.
            let ids: Vec<u32> = (0..prompt)
                .map(|i| (1000 + (i * 7919) % 20000) as u32 % vocab as u32)
                .collect();
            let mut pre = Vec::new();
            let mut dec = Vec::new();
            let mut dec0 = Vec::new();
            let load_peak = peak_rss_bytes();
            let mut run_peak = None;
            for r in 0..runs.max(1) + 1 {
                if r == 1 && wkvc_runtime::reset_peak_rss() {
                    run_peak = Some(());
                }
                let mut s = engine.session(prompt + ngen);
                if s.max_ctx() < prompt + ngen {
                    bail!(
                        "--prompt + --gen exceed the model's context of {}",
                        s.max_ctx()
                    );
                }
                let t0 = Instant::now();
                let mut id = wkvc_runtime::sample::argmax(s.step(&ids)?) as u32;
                let tp = t0.elapsed().as_secs_f64();
                let t1 = Instant::now();
                for _ in 0..ngen {
                    id = wkvc_runtime::sample::argmax(s.step(&[id])?) as u32;
                }
                let td = t1.elapsed().as_secs_f64();
                drop(s);
                // decode from an empty cache, one token per step (what llama-bench's tg
                // measures)
                let mut s = engine.session(ngen.max(1));
                let mut id = ids[0];
                let t2 = Instant::now();
                for _ in 0..ngen {
                    id = wkvc_runtime::sample::argmax(s.step(&[id])?) as u32;
                }
                let te = t2.elapsed().as_secs_f64();
                if r > 0 {
                    pre.push(prompt as f64 / tp);
                    if ngen > 0 {
                        dec.push(ngen as f64 / td);
                        dec0.push(ngen as f64 / te);
                    }
                }
                tracing::info!(
                    "run {r}: prefill {:.1} tok/s, decode {:.1} tok/s",
                    prompt as f64 / tp,
                    ngen as f64 / td
                );
            }
            // decode at a long context: fill the cache, then time --gen steps
            let mut long = serde_json::Value::Null;
            if long_ctx > 0 && ngen > 0 {
                let mut s = engine.session(long_ctx + ngen);
                if s.max_ctx() >= long_ctx + ngen {
                    let fill: Vec<u32> = (0..long_ctx)
                        .map(|i| (1000 + (i * 7919) % 20000) as u32 % vocab as u32)
                        .collect();
                    let mut id = 0;
                    for c in fill.chunks(512) {
                        id = wkvc_runtime::sample::argmax(s.step(c)?) as u32;
                    }
                    let t1 = Instant::now();
                    for _ in 0..ngen {
                        id = wkvc_runtime::sample::argmax(s.step(&[id])?) as u32;
                    }
                    long = serde_json::json!(ngen as f64 / t1.elapsed().as_secs_f64());
                }
            }
            let weight_bytes: usize = m
                .module
                .weights
                .iter()
                .map(|(_, w)| w.storage_bytes())
                .sum();
            let out = serde_json::json!({
                "model": model.display().to_string(),
                "engine": engine.describe(),
                "jit_ms": engine.cpu().map(|c| c.jit_ms),
                "cuda_launches_per_decode_step": engine.cuda().map(|c| c.launches(1)),
                "memory_plan_bytes": engine
                    .cpu()
                    .map(|c| c.memory_plan().total_at((long_ctx + ngen).max(prompt + ngen))),
                "long_ctx": (long_ctx > 0).then_some(long_ctx),
                "decode_at_long_ctx_tokens_per_s": long,
                "threads": th,
                "prompt_tokens": prompt,
                "gen_tokens": ngen,
                "runs": runs.max(1),
                "prefill_tokens_per_s": median(pre),
                "decode_tokens_per_s": median(dec),
                "decode_from_empty_tokens_per_s": median(dec0),
                "peak_rss_bytes": load_peak.max(peak_rss_bytes()),
                "peak_rss_running_bytes": run_peak.and_then(|_| peak_rss_bytes()),
                "model_file_bytes": m.source.file_bytes,
                "weight_bytes": weight_bytes,
            });
            if json {
                println!("{out}");
            } else {
                // only what was measured
                let mib = |k: &str| out[k].as_f64().map(|b| b / 1048576.0);
                let mut parts = vec![format!(
                    "prefill {:.1} tokens/s ({prompt} tokens)",
                    median_or_zero(&out["prefill_tokens_per_s"])
                )];
                if ngen > 0 {
                    parts.push(format!(
                        "decode {:.2} tokens/s ({ngen} tokens after the prompt; {:.2} from an \
                         empty cache)",
                        median_or_zero(&out["decode_tokens_per_s"]),
                        median_or_zero(&out["decode_from_empty_tokens_per_s"])
                    ));
                }
                if let Some(l) = out["decode_at_long_ctx_tokens_per_s"].as_f64() {
                    parts.push(format!("decode at {long_ctx} context {l:.2} tokens/s"));
                }
                parts.push(format!("{th} threads"));
                let mut mem = Vec::new();
                if let Some(r) = mib("peak_rss_running_bytes") {
                    mem.push(format!("while running {r:.0} MiB"));
                }
                if let Some(p) = mib("memory_plan_bytes") {
                    mem.push(format!("memory plan {p:.0} MiB"));
                }
                if let Some(p) = mib("peak_rss_bytes") {
                    parts.push(if mem.is_empty() {
                        format!("peak RSS {p:.0} MiB")
                    } else {
                        format!("peak RSS {p:.0} MiB ({})", mem.join(", "))
                    });
                }
                parts.push(format!(
                    "weights {:.0} MiB in memory",
                    weight_bytes as f64 / 1048576.0
                ));
                println!("{}: {}", engine.describe(), parts.join(", "));
            }
        }
        Cmd::Emit {
            model,
            kernel,
            target,
            cpu_act,
            asm,
            arch,
        } => {
            if target != "cpu" && target != "cuda" {
                bail!("--target must be cpu or cuda, got {target}");
            }
            let act = wkvc_runtime::Act::parse(&cpu_act)
                .with_context(|| format!("--cpu-act must be f32 or int8, got {cpu_act}"))?;
            let m = open(&model)?;
            let g = wkvc_passes::lower::lower(
                &m.module.graph,
                wkvc_passes::lower::LowerOptions { act },
            )?;
            let mut specs: std::collections::BTreeMap<String, wkvc_ir::KernelSpec> =
                Default::default();
            for n in &g.nodes {
                let s = wkvc_ir::KernelSpec::from_node(n).map_err(|e| anyhow::anyhow!(e))?;
                specs.entry(s.code_name()).or_insert(s);
            }
            match kernel {
                None => {
                    for name in specs.keys() {
                        println!("{name}");
                    }
                }
                Some(k) => {
                    let spec = specs.get(&k).with_context(|| {
                        format!(
                            "no kernel {k} in this plan; kernels: {}",
                            specs.keys().cloned().collect::<Vec<_>>().join(", ")
                        )
                    })?;
                    if target == "cuda" {
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
                    let mut jit = wkvc_codegen::cpu::CpuJit::host()?;
                    if asm {
                        print!("{}", jit.kernel_asm(spec)?);
                    } else {
                        print!("{}", jit.kernel_ir(spec)?);
                    }
                }
            }
        }
        Cmd::Inspect {
            model,
            graph,
            json,
            memory,
            ctx,
            cpu_act,
        } => {
            let m = open(&model)?;
            if memory {
                // the plan's record unless another context or activation mode is asked for
                let stored = m.plan.as_ref().and_then(|p| p.cpu.clone()).filter(|c| {
                    ctx.is_none() && cpu_act.as_deref().is_none_or(|a| a == c.act.name())
                });
                let cpu_act = cpu_act.unwrap_or_else(|| {
                    m.plan
                        .as_ref()
                        .and_then(|p| p.cpu.as_ref())
                        .map_or("f32", |c| c.act.name())
                        .to_string()
                });
                let act = wkvc_runtime::Act::parse(&cpu_act)
                    .with_context(|| format!("--cpu-act must be f32 or int8, got {cpu_act}"))?;
                let (mp, kernels, whence) = match stored {
                    Some(c) => {
                        let n = c
                            .lowered
                            .lines()
                            .filter(|l| l.contains("= kernel("))
                            .count();
                        (c.memory, n, "stored in the plan")
                    }
                    None => {
                        let g = wkvc_passes::lower::lower(
                            &m.module.graph,
                            wkvc_passes::lower::LowerOptions { act },
                        )?;
                        let ctx = ctx.unwrap_or(m.config.max_position_embeddings);
                        let pb =
                            |p: &str| m.module.weights.get(p).map(|w| w.size()).unwrap_or((0, 0));
                        let mp =
                            wkvc_passes::lower::memplan(&g, wkvc_runtime::cpu::CHUNK, ctx, 1, &pb)?;
                        (mp, g.nodes.len(), "computed now")
                    }
                };
                let ctx = mp.max_ctx;
                if json {
                    println!("{}", serde_json::to_string(&mp)?);
                } else {
                    let mib = |b: usize| b as f64 / 1048576.0;
                    println!(
                        "CPU memory plan ({whence}, {cpu_act} activations): {kernels} kernels"
                    );
                    println!(
                        "weights        {:>12} bytes ({:.1} MiB)",
                        mp.weights_bytes,
                        mib(mp.weights_bytes)
                    );
                    println!(
                        "engine copies  {:>12} bytes ({:.1} MiB: f32 scale/zero, int8 head)",
                        mp.derived_bytes,
                        mib(mp.derived_bytes)
                    );
                    println!(
                        "KV cache       {:>12} bytes per token",
                        mp.kv_bytes_per_token
                    );
                    println!(
                        "KV cache       {:>12} bytes at {} tokens ({:.1} MiB)",
                        mp.kv_bytes,
                        ctx,
                        mib(mp.kv_bytes)
                    );
                    println!(
                        "arena          {:>12} bytes ({} buffers, chunk {} rows)",
                        mp.arena_bytes,
                        mp.buffers.len(),
                        mp.chunk
                    );
                    println!("scratch        {:>12} bytes", mp.scratch_bytes);
                    println!(
                        "total          {:>12} bytes ({:.1} MiB)",
                        mp.total_bytes,
                        mib(mp.total_bytes)
                    );
                }
                return Ok(());
            }
            let c = &m.config;
            let mut groups: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
            for (name, w) in m.module.weights.iter() {
                let g = if name.contains("embed_tokens") {
                    "embedding"
                } else if name.starts_with("lm_head") {
                    "lm_head"
                } else if name.contains("norm") {
                    "norms"
                } else if name.contains("self_attn") {
                    "attention"
                } else if name.contains("mlp") {
                    "mlp"
                } else {
                    "other"
                };
                let e = groups.entry(g).or_default();
                e.0 += w.numel();
                e.1 += w.storage_bytes();
            }
            let params = m.module.weights.total_params();
            if json {
                let v = serde_json::json!({
                    "source": m.source, "config": c, "parameters": params,
                    "plan": m.plan.as_ref().map(|p| serde_json::json!({"quant": p.quant, "memory": p.memory, "quality": p.quality, "passes": p.passes})),
                    "groups": groups.iter().map(|(k, (n, b))| (k.to_string(), serde_json::json!({"parameters": n, "bytes": b}))).collect::<serde_json::Map<_, _>>(),
                    "ops": m.module.graph.op_histogram(),
                });
                println!("{v}");
            } else {
                println!(
                    "model        {} ({} from {})",
                    m.source.name,
                    m.source.format,
                    m.source.path.display()
                );
                println!(
                    "architecture {} : {} layers, hidden {}, ffn {}, vocab {}",
                    c.arch, c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
                );
                println!(
                    "attention    {} heads, {} kv heads, head dim {}, rope theta {}, scaling {:?}",
                    c.num_heads, c.num_kv_heads, c.head_dim, c.rope_theta, c.rope_scaling
                );
                println!(
                    "norm eps     {}, tied lm_head {}, qkv bias {}, max context {}",
                    c.rms_norm_eps, c.tie_word_embeddings, c.qkv_bias, c.max_position_embeddings
                );
                println!("parameters   {params} ({:.1} M)", params as f64 / 1e6);
                println!("file bytes   {}", m.source.file_bytes);
                println!("by group     (parameters, bytes in memory)");
                for (g, (n, b)) in &groups {
                    println!("  {g:<10} {n:>12} {b:>14}");
                }
                let h = m.module.graph.op_histogram();
                println!(
                    "graph        {} nodes: {}",
                    m.module.graph.nodes.len(),
                    h.iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                if let Some(p) = &m.plan {
                    let q = &p.quant;
                    println!(
                        "plan         format {} v{}, wkvc {}",
                        p.format, p.version, p.tool_version
                    );
                    println!(
                        "quantization W{} (group {}) KV{} past-only {} smoothing {} method {}",
                        q.wbits, q.wgroup, q.kvbits, q.past_only, q.smooth, q.method
                    );
                    println!("calibration  {}", q.calibration);
                    println!(
                        "memory       weights {} bytes, KV {} bytes/token, {} bytes at {} tokens",
                        p.memory.weight_bytes,
                        p.memory.kv_bytes_per_token,
                        p.memory.kv_bytes_at_max_context,
                        p.memory.max_context
                    );
                    println!("quality      {}", p.quality);
                    println!(
                        "source       {} (sha256 {})",
                        p.source.path.display(),
                        p.source_sha256
                    );
                }
                match m.tokenizer() {
                    Ok(t) => {
                        println!(
                            "tokenizer    {} tokens, bos {:?}, eos {:?}, chat template {}",
                            t.vocab_size(),
                            t.spec.bos_token,
                            t.spec.eos_ids,
                            if t.spec.chat_template.is_some() {
                                "yes"
                            } else {
                                "no"
                            }
                        );
                    }
                    Err(e) if m.tokenizer_spec.is_some() => println!("tokenizer    {e}"),
                    Err(_) => {}
                }
            }
            if graph {
                print!("{}", wkvc_ir::text::print(&m.module.graph));
            }
        }
    }
    Ok(())
}
