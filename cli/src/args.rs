//! The command line: subcommands and their options (clap), every enumerated option a
//! `ValueEnum`.

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use wkvc_runtime::{Act, CpuIsa};

#[derive(Parser)]
#[command(
    name = "wkvc",
    version,
    about = "A compiler and runtime for quantized LLM inference (WKVQuant)"
)]
pub struct Cli {
    /// More logging (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// The quantized GEMMs' activations on the CPU back end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CpuAct {
    /// exact: int4 dequantized in registers, f32 multiply-add
    F32,
    /// fast path: activations quantized per 32 columns on the fly, int8 head
    Int8,
}

impl From<CpuAct> for Act {
    fn from(a: CpuAct) -> Act {
        match a {
            CpuAct::F32 => Act::F32,
            CpuAct::Int8 => Act::Int8,
        }
    }
}

/// The CPU engine's kernel variants by instruction set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CpuIsaArg {
    /// the widest this CPU runs
    Auto,
    /// Cranelift's kernels only (128-bit vectors; every x86-64 with SSE4.1)
    Base,
    /// 256-bit AVX2 + FMA native kernels for the int8-activation quantized GEMMs
    Avx2,
    /// the AVX2 kernels with int8 dot products by vpdpbusd (AVX-VNNI or AVX512-VNNI): the
    /// same results
    Avx2Vnni,
    /// avx2-vnni with the int8 GEMMs at 512 bits (AVX512-F/BW/VL + VNNI): the same results
    Avx512,
}

impl CpuIsaArg {
    /// `None` for auto.
    pub fn isa(self) -> Option<CpuIsa> {
        match self {
            CpuIsaArg::Auto => None,
            CpuIsaArg::Base => Some(CpuIsa::Base),
            CpuIsaArg::Avx2 => Some(CpuIsa::Avx2),
            CpuIsaArg::Avx2Vnni => Some(CpuIsa::Avx2Vnni),
            CpuIsaArg::Avx512 => Some(CpuIsa::Avx512),
        }
    }
}

/// How weights are quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// round to nearest
    Rtn,
    /// learn weight clipping and K/V smoothing block by block with the cross-block
    /// reconstruction loss
    Wkvquant,
}

/// The calibration loss of `--method wkvquant`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Loss {
    /// cross-block reconstruction, mean absolute error (the paper's)
    Mae,
    /// cross-block reconstruction, mean squared error
    Mse,
    /// local block MSE plus CRR MAE
    #[value(name = "local-mse+crr")]
    LocalMseCrr,
}

/// The order `--method wkvquant` learns a block's clipping and smoothing in (when both).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Schedule {
    /// together, on the stream with the quantized cache (the paper's)
    Joint,
    /// the clipping first with the cache in full precision (as a weight-only calibration
    /// learns it), then the smoothing with that clipping fixed; twice the steps
    WeightsFirst,
}

/// Which engine runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EngineChoice {
    /// the compiled CPU engine for plans, the interpreter otherwise
    Auto,
    /// the compiled CPU engine (Cranelift JIT)
    Cpu,
    /// the CUDA kernels on an NVIDIA GPU
    Cuda,
    /// the CUDA engine and kernels on the host's CPU through the CUDA host emulator (a check
    /// without a GPU, very slow)
    CudaEmulated,
    /// the reference interpreter
    Interp,
}

/// Where an evaluation text comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TextOrigin {
    /// written by people (perplexity is meaningful)
    Corpus,
    /// sampled from the FP model (its perplexity is the floor by construction: another
    /// model's log-perplexity exceeds it by their KL divergence, in expectation; compare by KL
    /// divergence and top-1 agreement)
    Sampled,
}

/// The KV protocol of an evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// decode-equivalent: every position reads the quantized K/V of all earlier positions
    Decode,
    /// prefill: a window's own K/V in full precision
    Prefill,
}

/// A back end whose code is shown or recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    Cpu,
    Cuda,
}

#[derive(clap::Args, Clone, Debug)]
pub struct QuantArgs {
    /// The CPU back end's activations that the plan selects (int8: on the demo model within
    /// the noise of the exact path; see the README).
    #[arg(long, value_enum, default_value_t = CpuAct::Int8)]
    pub cpu_act: CpuAct,
    /// Weight bits (2..8); 16 keeps weights in full precision.
    #[arg(long, default_value_t = 4)]
    pub wbits: u32,
    /// Input channels per weight group; -1 for one group per output channel.
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    pub wgroup: i64,
    /// KV cache bits (2..8); 16 keeps the cache in full precision.
    #[arg(long, default_value_t = 4)]
    pub kvbits: u32,
    /// Let every position read quantized K/V of itself too (the "without POQ" baseline).
    #[arg(long)]
    pub no_poq: bool,
    /// No K/V channel smoothing.
    #[arg(long)]
    pub no_smooth: bool,
    /// K/V rotation before quantization: hadamard multiplies each head's K (after RoPE, q
    /// alike) and V by an orthonormal Hadamard matrix (V's folded into v_proj and o_proj),
    /// spreading outlier channels over the quantization group; smoothing is then fitted in
    /// the rotated basis.
    #[arg(long, value_enum, default_value_t = KvRotateArg::None)]
    pub kv_rotate: KvRotateArg,
    /// Hadamard block of --kv-rotate hadamard: a power of two dividing the head dim (default:
    /// the head dim).
    #[arg(long)]
    pub kv_rotate_block: Option<usize>,
    /// Channels per (scale, zero) group of the quantized K/V cache: a multiple of 32 dividing
    /// the head dim (default: one group a kv head). Smaller groups: less error, one more
    /// pair of parameters a group in the cache.
    #[arg(long)]
    pub kv_group: Option<usize>,
    /// Past-only attention's recent window: each position reads the K/V of the last R
    /// positions (itself included) in full precision and older ones from the quantized cache
    /// (default 1: its own only). The window's R - 1 earlier positions are kept in full
    /// precision beside the cache.
    #[arg(long, default_value_t = 1)]
    pub kv_window: usize,
    /// Bits of each layer's KV cache: a list, one a layer (4,4,3,...; 16 keeps that layer's
    /// cache in full precision), or auto:B, an average of B bits a cache element chosen by a
    /// sensitivity scan (each layer's KL divergence from the FP model on calibration text with
    /// only its cache at --kvbits and at one bit less; the layers that lose least get the
    /// lower width). The plan records the bits and the scan.
    #[arg(long)]
    pub kv_bits_per_layer: Option<String>,
    /// Calibration tokens the sensitivity scan of --kv-bits-per-layer auto:B runs on.
    #[arg(long, default_value_t = 256)]
    pub kv_scan_tokens: usize,
    /// Quantization method.
    #[arg(long, value_enum, default_value_t = Method::Rtn)]
    pub method: Method,
    /// wkvquant: calibration samples (windows of --calib-len tokens).
    #[arg(long, default_value_t = 16)]
    pub calib_samples: usize,
    /// Tokens per calibration window (wkvquant default 256; rtn smoothing statistics 512).
    #[arg(long)]
    pub calib_len: Option<usize>,
    /// wkvquant: epochs over the samples per block.
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    /// wkvquant: blocks after the learned one in the reconstruction target (k).
    #[arg(long, default_value_t = 5)]
    pub crr_k: usize,
    /// wkvquant: the calibration loss.
    #[arg(long, value_enum, default_value_t = Loss::Mae)]
    pub loss: Loss,
    /// wkvquant: AdamW learning rate of the clipping logits (OmniQuant's 1e-2 is for its
    /// ~2560 steps per block; this default suits the CPU setting's 64).
    #[arg(long, default_value_t = 1e-1)]
    pub lr_lwc: f32,
    /// wkvquant: AdamW learning rate of the smoothing shift and scale (OmniQuant: 5e-3).
    #[arg(long, default_value_t = 2e-2)]
    pub lr_smooth: f32,
    /// wkvquant: keep the RTN clipping (learn only the smoothing).
    #[arg(long)]
    pub no_learn_lwc: bool,
    /// wkvquant: keep the initial smoothing (learn only the clipping).
    #[arg(long)]
    pub no_learn_smooth: bool,
    /// wkvquant: the order clipping and smoothing are learned in when both are (weights and
    /// cache quantized).
    #[arg(long, value_enum, default_value_t = Schedule::Joint)]
    pub calib_schedule: Schedule,
    /// Keep scales and zeros in f32 (the reference definition) instead of f16; weights are
    /// then not packed. For comparisons with fake-quant figures.
    #[arg(long)]
    pub f32_params: bool,
}

/// Engine selection shared by run, eval and bench.
#[derive(clap::Args, Clone, Debug)]
pub struct EngineArgs {
    /// The engine.
    #[arg(long, value_enum, default_value_t = EngineChoice::Auto)]
    pub engine: EngineChoice,
    /// GPU for --engine cuda.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// --engine cuda[-emulated]: prefill's quantized GEMMs on tensor cores (f16 operands, f32
    /// sums).
    #[arg(long)]
    pub cuda_mma: bool,
    /// Activations of the CPU engine's quantized GEMMs (default: what the plan selects).
    #[arg(long, value_enum)]
    pub cpu_act: Option<CpuAct>,
    /// Instruction set of the CPU engine's kernels (for comparisons; default: the widest this
    /// CPU runs).
    #[arg(long, value_enum, default_value_t = CpuIsaArg::Auto)]
    pub cpu_isa: CpuIsaArg,
    /// CPU workers (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Time every kernel and call (logged with -v).
    #[arg(long)]
    pub profile: bool,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Generate text from a prompt, streaming tokens as they are produced.
    Run(RunArgs),
    /// Compile a model into a plan: quantize (WKVQuant), lower, plan memory, write.
    Compile(CompileArgs),
    /// Measure perplexity (and KL divergence) on a text file.
    Eval(EvalArgs),
    /// Measure prefill and decode speed.
    Bench(BenchArgs),
    /// Show a model's architecture, sizes and (with --graph) its graph.
    Inspect(InspectArgs),
    /// Print the generated code of a kernel of the lowered plan (without --kernel: list them).
    Emit(EmitArgs),
    /// Serve a model over HTTP: OpenAI-compatible completions and chat, continuous batching.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// A plan (.wkv), a .gguf file or a Hugging Face model directory.
    pub model: PathBuf,
    /// The prompt text.
    #[arg(short, long)]
    pub prompt: String,
    /// Maximum new tokens.
    #[arg(short = 'n', long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    /// Context length of the session.
    #[arg(long, default_value_t = 2048)]
    pub ctx: usize,
    /// Never sample end-of-generation tokens: always produce -n tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    #[command(flatten)]
    pub eng: EngineArgs,
}

#[derive(clap::Args)]
pub struct CompileArgs {
    /// A .gguf file or a Hugging Face model directory.
    pub model: PathBuf,
    /// The plan to write (written atomically).
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub q: QuantArgs,
    /// Calibration text; without it, text is sampled from the FP model (data-free).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Calibration tokens (default 8192 from --calib, 512 when sampling).
    #[arg(long)]
    pub calib_tokens: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub threads: Option<usize>,
    /// Back ends to record code for: cpu (the lowered graph and memory plan), or cpu,cuda
    /// (also every kernel's CUDA C and its PTX for compute_80, made with NVRTC).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "cpu")]
    pub target: Vec<Target>,
    /// The held-out check after compiling (KLD, top-1 agreement and perplexity against the FP
    /// model, recorded in the plan): quick (128 tokens), full (one calibration window) or none.
    #[arg(long, value_enum, default_value_t = QualityCheckArg::Quick)]
    pub quality_check: QualityCheckArg,
    /// Largest model (its weights in f32, MiB) run whole on the f32 interpreter to sample
    /// calibration or held-out text; bigger ones sample from an RTN W4 copy on the CPU
    /// engine (or, for held-out text only, from the compiled model).
    #[arg(long, default_value_t = 2048)]
    pub interp_limit_mib: usize,
    /// Quality gate: fail the compile (no plan written) when the held-out check's mean KL
    /// divergence from the FP model exceeds this (nats a token).
    #[arg(long, value_name = "KLD")]
    pub max_kld: Option<f64>,
    /// Quality gate: fail the compile (no plan written) when the held-out perplexity exceeds
    /// the FP model's by more than this factor (1.05: at most 5% worse).
    #[arg(long, value_name = "RATIO")]
    pub max_ppl_ratio: Option<f64>,
}

/// `--kv-rotate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KvRotateArg {
    None,
    Hadamard,
}

/// `wkvc eval --score`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScoreArg {
    Wkvc,
    Llama,
}

/// `--quality-check`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum QualityCheckArg {
    None,
    Quick,
    Full,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    pub model: PathBuf,
    /// Text file to score (read as UTF-8, tokenized whole, no special tokens).
    #[arg(long)]
    pub ppl: PathBuf,
    /// Also report the mean KL divergence from this (FP) model's next-token distribution.
    #[arg(long)]
    pub kld_vs: Option<PathBuf>,
    /// Compile the standard configurations of MODEL in memory and print a Markdown table.
    #[arg(long)]
    pub table: bool,
    /// Calibration text for --table's smoothing rows (default: sampled from the model).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Where the --ppl text comes from (sampled: the KL divergence and top-1 agreement with
    /// the FP model lead the report and perplexities are labelled as on sampled text).
    #[arg(long, value_enum, default_value_t = TextOrigin::Corpus)]
    pub text_origin: TextOrigin,
    /// KV protocol.
    #[arg(long, value_enum, default_value_t = Protocol::Decode)]
    pub protocol: Protocol,
    /// Which predictions count: wkvc (every window from an empty cache, all its predictions,
    /// no BOS) or llama (llama.cpp's llama-perplexity: BOS policy of the model, chunks of
    /// --ctx, the second half of each scored; comparable with its figures at the same -c).
    #[arg(long, value_enum, default_value_t = ScoreArg::Wkvc)]
    pub score: ScoreArg,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Score at most this many windows.
    #[arg(long)]
    pub windows: Option<usize>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub eng: EngineArgs,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    pub model: PathBuf,
    /// Prompt tokens to prefill.
    #[arg(long, default_value_t = 512)]
    pub prompt: usize,
    /// Tokens to decode after the prompt (and again from an empty cache, as llama-bench's tg
    /// test does).
    #[arg(long = "gen", default_value_t = 128)]
    pub gen_tokens: usize,
    /// Timed runs after one warm-up run; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Also time --gen decode steps after this many tokens of context (0: skip).
    #[arg(long, default_value_t = 2048)]
    pub long_ctx: usize,
    /// Aggregate decode speed of this many sequences advanced together in batched steps
    /// (comma separated, e.g. 1,4,8,16), each after a short prompt of its own.
    #[arg(long, value_delimiter = ',')]
    pub batch: Vec<usize>,
    #[command(flatten)]
    pub eng: EngineArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct InspectArgs {
    pub model: PathBuf,
    /// Print the graph in text form.
    #[arg(long)]
    pub graph: bool,
    #[arg(long)]
    pub json: bool,
    /// Print the memory plan of the compiled CPU engine (and the lowered kernels).
    #[arg(long)]
    pub memory: bool,
    /// Context the memory plan is computed for (default: the model's maximum).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Activation mode the memory plan is for (default: the plan's).
    #[arg(long, value_enum)]
    pub cpu_act: Option<CpuAct>,
    /// Write SVG charts of the K/V cache to this folder: per layer, every K and V channel's
    /// range before smoothing and rotation, as the plan quantizes it, and rotated; and the
    /// per-layer KL divergence of the plan's sensitivity scan (--kv-bits-per-layer auto:B).
    #[arg(long)]
    pub plots: Option<PathBuf>,
    /// Layers charted by --plots (default: the first, the middle and the last).
    #[arg(long, value_delimiter = ',')]
    pub plot_layers: Vec<i64>,
    /// Text the K/V of --plots come from (default: tokens sampled from the model itself).
    #[arg(long)]
    pub plot_text: Option<PathBuf>,
    /// Tokens --plots runs through the model.
    #[arg(long, default_value_t = 256)]
    pub plot_tokens: usize,
    /// Workers (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(clap::Args)]
pub struct EmitArgs {
    pub model: PathBuf,
    /// A kernel name as listed (e.g. qgemm_k576_b4_g128_f32).
    #[arg(long)]
    pub kernel: Option<String>,
    /// cpu (Cranelift IR) or cuda (CUDA C).
    #[arg(long, value_enum, default_value_t = Target::Cpu)]
    pub target: Target,
    /// Activation mode of the quantized GEMMs (default: the plan's).
    #[arg(long, value_enum)]
    pub cpu_act: Option<CpuAct>,
    /// Instruction set of the CPU kernels (default: the widest this CPU runs): a kernel with a
    /// native variant for it is shown as that variant.
    #[arg(long, value_enum, default_value_t = CpuIsaArg::Auto)]
    pub cpu_isa: CpuIsaArg,
    /// Print the machine code instead: for cpu after register allocation; for cuda the PTX
    /// from NVRTC for compute_ARCH, with ptxas's register/spill report for sm_ARCH on stderr.
    #[arg(long)]
    pub asm: bool,
    /// GPU architecture for --target cuda --asm (80: A100, 90: H100/H200).
    #[arg(long, default_value_t = 90)]
    pub arch: u32,
}

#[derive(clap::Args, Clone)]
pub struct ServeArgs {
    /// A plan (.wkv), a .gguf file or a Hugging Face model directory.
    pub model: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences generated together at most (continuous batching).
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Context of each sequence: prompt plus generated tokens (at most the model's).
    #[arg(long, default_value_t = 2048)]
    pub ctx: usize,
    /// Requests that may wait for a free sequence; more get 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Require `Authorization: Bearer KEY` on the API endpoints.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Read the API key from a file (first line).
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// The model's name in responses and /v1/models (default: the file's stem).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Seconds running requests may take to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 10)]
    pub grace: u64,
    #[command(flatten)]
    pub eng: EngineArgs,
}
