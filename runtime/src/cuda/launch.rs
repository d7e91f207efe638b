//! Running a batch on the CUDA engine: rounds of up to `CHUNK` rows as on the CPU (each item
//! a segment of consecutive rows); the row-wise kernels and GEMMs over all rows at once,
//! `rope_kv` and attention per segment against its session's cache; the logits of the rows
//! wanted gathered and computed in one GEMM. One session's one-token step replays its
//! captured graph.

use super::device::{Gpu, f32_bytes};
use super::{Bound, Captured, CudaEngine, CudaKv, CudaStep, SPLITS_MAX, Workspace, err};
use crate::RuntimeError;
use crate::engine::{Seg, Work, next_round};
use std::time::Instant;
use wkvc_codegen::cuda::{self as cg, GEMV_MAX_M, GEMV_ROWS, TILE_M, TILE_N};
use wkvc_ir::kernel::args::{
    AttentionArgs, EmbedArgs, GemmArgs, LogitsArgs, QGemmArgs, RmsNormArgs, RopeKvArgs,
    SiluMulArgs, f32_word,
};
use wkvc_ir::{KernelSpec, RunMode};
use wkvc_passes::lower::CHUNK;

/// A round's view of its sessions' caches: per segment, the pointers of the layer at hand.
struct Round<'a> {
    segs: &'a [Seg],
    /// rows whose logits are computed, in order (rows of the round)
    picked: Vec<usize>,
    splits: usize,
    /// per segment: its item's first round in this call (its window's rows come from the
    /// cache's tail, later rounds' from the tail the earlier ones staged)
    first: Vec<bool>,
}

impl CudaEngine {
    /// Advance every item by its tokens (checked by the caller).
    pub(crate) fn run(&self, work: &mut [Work<'_, CudaKv>]) -> Result<(), RuntimeError> {
        let mut ws = self
            .work
            .lock()
            .map_err(|_| err("the engine's workspace is poisoned by an earlier panic"))?;
        let t0 = Instant::now();
        let mut done = vec![0usize; work.len()];
        let mut segs = Vec::with_capacity(work.len());
        while next_round(work, &done, &mut segs) {
            self.round(&mut ws, work, &segs, &done)?;
            for s in &segs {
                done[s.item] += s.rows;
            }
        }
        // the recent windows' staged tails become the caches' (a failed call never gets
        // here: its sessions keep the tails they had)
        for w in work.iter() {
            w.kv.commit_tails()?;
        }
        if self.profile {
            tracing::info!(
                target: "wkvc::profile",
                "CUDA call of {} items: {:.3} ms",
                work.len(),
                t0.elapsed().as_secs_f64() * 1e3
            );
        }
        Ok(())
    }

    fn round(
        &self,
        ws: &mut Workspace,
        work: &mut [Work<'_, CudaKv>],
        segs: &[Seg],
        done: &[usize],
    ) -> Result<(), RuntimeError> {
        let gpu = &*self.gpu;
        let m: usize = segs.iter().map(|s| s.rows).sum();
        let mut tok = Vec::with_capacity(4 * m);
        let mut pos = Vec::with_capacity(4 * m);
        let mut state = Vec::with_capacity(4 * segs.len());
        for s in segs {
            for (r, &t) in work[s.item].tokens[done[s.item]..][..s.rows]
                .iter()
                .enumerate()
            {
                tok.extend((t as i32).to_le_bytes());
                pos.extend(((s.past + r) as i32).to_le_bytes());
            }
            state.extend((s.past as i32).to_le_bytes());
        }
        gpu.htod(&tok, &mut ws.ids)?;
        gpu.htod(&pos, &mut ws.pos)?;
        gpu.htod(&state, &mut ws.state)?;
        let picked: Vec<usize> = segs
            .iter()
            .flat_map(|s| {
                let from = if s.all { s.at } else { s.at + s.rows - 1 };
                (from..s.at + s.rows).filter(move |_| s.all || s.last)
            })
            .collect();
        // attention splits: the sessions' own, as many as the partials buffer holds
        let splits = segs
            .iter()
            .map(|s| work[s.item].kv.splits)
            .max()
            .unwrap_or(1)
            .min((4 * CHUNK / m).max(1))
            .clamp(1, SPLITS_MAX);
        let round = Round {
            segs,
            picked,
            splits,
            first: segs.iter().map(|s| done[s.item] == 0).collect(),
        };
        // device memory of the sessions first (never inside a graph capture)
        for s in segs {
            work[s.item].kv.layers()?;
        }
        // the first round of its call: a recent window's rows come from the cache's tail,
        // which the graph's arguments name (a later round reads the staged tail instead)
        let one_step = segs.len() == 1 && m == 1 && !segs[0].all && round.first[0];
        if one_step {
            // one session, one token: its captured graph (the same launches every step; for
            // one row the prefill and decode-equivalent protocols see the same tokens)
            let kv = &mut *work[segs[0].item].kv;
            if kv.graph.is_none() {
                let g = gpu.capture(|| self.launch_all(ws, &mut [&mut *kv], &round))?;
                kv.graph = g.map(Captured);
            }
            match &kv.graph {
                Some(Captured(g)) => gpu.replay(g)?,
                None => self.launch_all(ws, &mut [&mut *kv], &round)?,
            }
        } else {
            let mut kvs: Vec<&mut CudaKv> = Vec::with_capacity(segs.len());
            // each segment's item, in segment order (items are distinct)
            let mut by_item: Vec<Option<&mut CudaKv>> =
                work.iter_mut().map(|w| Some(&mut *w.kv)).collect();
            for s in segs {
                kvs.push(
                    by_item[s.item]
                        .take()
                        .ok_or_else(|| err("an item twice in a round"))?,
                );
            }
            self.launch_all(ws, &mut kvs, &round)?;
        }
        // the logits rows computed, to their items
        let v = self.vocab;
        let n = round.picked.len();
        if n == 0 {
            return Ok(());
        }
        ws.host.resize(n * v, 0.0);
        gpu.dtoh(&ws.logits, f32_bytes(&mut ws.host[..n * v]))?;
        let mut j = 0;
        for s in segs.iter().filter(|s| s.all || s.last) {
            let rows = if s.all { s.rows } else { 1 };
            let got = &ws.host[j * v..(j + rows) * v];
            let w = &mut work[s.item];
            if let Some(all) = w.all_logits.as_deref_mut() {
                all.extend_from_slice(got);
            }
            if s.last {
                w.logits.copy_from_slice(&got[(rows - 1) * v..]);
            }
            j += rows;
        }
        Ok(())
    }

    /// Does step `si` (a norm or SiLU-mul) run inside the GEMV after it, in a round whose
    /// GEMMs take `m` rows and whose logits take `nl`?
    fn fused_away(&self, si: usize, m: usize, nl: usize) -> bool {
        self.steps[si].fuse_next
            && self
                .steps
                .get(si + 1)
                .is_some_and(|b| runs_gemv(&b.spec, m, nl))
    }

    /// Kernel launches of a call of `m` rows (logits of the last row): the lowered graph's
    /// kernels, two for attention (split and merge), less the norms and SiLU-muls fused into
    /// the GEMVs after them.
    pub fn launches(&self, m: usize) -> usize {
        (0..self.steps.len())
            .filter(|&si| !self.fused_away(si, m, 1))
            .map(|si| match self.steps[si].spec {
                // split and merge, and a recent window's source and tail
                KernelSpec::Attention { layer, .. } => {
                    if self
                        .kv_shapes
                        .iter()
                        .any(|k| k.layer == layer && k.window > 1)
                    {
                        4
                    } else {
                        2
                    }
                }
                _ => 1,
            })
            .sum()
    }

    /// Every kernel of the plan for the round (the sessions' caches in segment order).
    fn launch_all(
        &self,
        ws: &Workspace,
        kvs: &mut [&mut CudaKv],
        round: &Round<'_>,
    ) -> Result<(), RuntimeError> {
        let gpu = &*self.gpu;
        let segs = round.segs;
        let m: usize = segs.iter().map(|s| s.rows).sum();
        let nl = round.picked.len();
        let arena = ws.arena.ptr;
        let buf = |o: usize| arena + o as u64;
        let ptr = |st: &CudaStep, i: usize| -> u64 {
            match st.operands.get(i) {
                Some(Bound::Buf(o)) => buf(*o),
                Some(Bound::Tokens) => ws.ids.ptr,
                Some(Bound::Positions) => ws.pos.ptr,
                Some(Bound::Param(d)) => *d,
                None => 0,
            }
        };
        for (si, st) in self.steps.iter().enumerate() {
            if self.fused_away(si, m, nl) {
                continue;
            }
            let tk = Instant::now();
            let p = |i: usize| ptr(st, i);
            // this GEMV does the step before it: its input replaces x, plus its arguments
            let rows_here = match st.spec {
                KernelSpec::Logits { .. } => nl,
                _ => m,
            };
            let pro = si
                .checked_sub(1)
                .map(|j| &self.steps[j])
                .filter(|a| a.fuse_next && rows_here as u32 <= GEMV_MAX_M && is_gemm(&st.spec))
                .map(|a| match a.spec {
                    KernelSpec::RmsNorm { eps, .. } => Prologue::Rms {
                        x: ptr(a, 0),
                        w: ptr(a, 1),
                        eps: eps as f32,
                    },
                    _ => Prologue::Silu { x: ptr(a, 0) },
                });
            let x0 = pro.as_ref().map_or(p(0), Prologue::input);
            let y = buf(st.out);
            let f = &st.f;
            match &st.spec {
                KernelSpec::Embed { .. } => gpu.launch(
                    &f[0],
                    (m as u32, 1, 1),
                    128,
                    &EmbedArgs {
                        ids: p(0),
                        table: p(1),
                        y,
                        m: m as u64,
                    },
                )?,
                KernelSpec::RmsNorm { .. } => gpu.launch(
                    &f[0],
                    (m as u32, 1, 1),
                    cg::BLOCK,
                    &RmsNormArgs {
                        x: p(0),
                        w: p(1),
                        y,
                        m: m as u64,
                    },
                )?,
                KernelSpec::SiluMul { n } => gpu.launch(
                    &f[0],
                    (((m * n) as u32).div_ceil(256), 1, 1),
                    256,
                    &SiluMulArgs {
                        x: p(0),
                        y,
                        m: m as u64,
                    },
                )?,
                KernelSpec::QGemm {
                    parts, residual, ..
                } => {
                    // all parts in one launch: their rows are side by side in st.wcat
                    let n: usize = parts.iter().sum();
                    let mut a = QGemmArgs {
                        x: x0,
                        m: m as u64,
                        w: st.wcat[0],
                        s: st.wcat[1],
                        z: st.wcat[2],
                        y,
                        ldy: n as u64,
                        n1: n as u64,
                        r: if *residual { p(1 + 3 * parts.len()) } else { 0 },
                        ldr: n as u64,
                        ..Default::default()
                    };
                    (a.nw, a.eps) = pro.as_ref().map_or((0, 0), Prologue::norm);
                    self.gemm(st, m, n, &a, pro.as_ref())?;
                }
                KernelSpec::Gemm {
                    parts, residual, ..
                } => {
                    let n: usize = parts.iter().sum();
                    let mut a = GemmArgs {
                        x: x0,
                        m: m as u64,
                        w: st.wcat[0],
                        y,
                        ldy: n as u64,
                        n1: n as u64,
                        r: if *residual { p(1 + parts.len()) } else { 0 },
                        ldr: n as u64,
                        ..Default::default()
                    };
                    (a.nw, a.eps) = pro.as_ref().map_or((0, 0), Prologue::norm);
                    self.gemm(st, m, n, &a, pro.as_ref())?;
                }
                KernelSpec::Logits { vocab, dim, .. } => {
                    if nl == 0 {
                        continue;
                    }
                    // the rows wanted, gathered unless they are all the rows in order
                    let x = if nl == m {
                        x0
                    } else {
                        for (j, &r) in round.picked.iter().enumerate() {
                            gpu.dtod(
                                x0 + (4 * r * dim) as u64,
                                ws.gather.ptr + (4 * j * dim) as u64,
                                4 * dim,
                            )?;
                        }
                        ws.gather.ptr
                    };
                    let mut a = LogitsArgs {
                        x,
                        m: nl as u64,
                        w: p(1),
                        y: ws.logits.ptr,
                        ldy: *vocab as u64,
                        n1: *vocab as u64,
                        ..Default::default()
                    };
                    (a.nw, a.eps) = pro.as_ref().map_or((0, 0), Prologue::norm);
                    self.gemm(st, nl, *vocab, &a, pro.as_ref())?;
                }
                KernelSpec::RopeKv { layer, smooth, .. } => {
                    let no = st.operands.len();
                    let sm = if *smooth {
                        [p(no - 4), p(no - 3), p(no - 2), p(no - 1)]
                    } else {
                        [0; 4]
                    };
                    let width = st.spec.out_cols();
                    for (si, s) in segs.iter().enumerate() {
                        let [kc, kp, vc, vp] = kvs[si].words(*layer)?;
                        gpu.launch(
                            &f[0],
                            (s.rows as u32, 1, 1),
                            128,
                            &RopeKvArgs {
                                x: p(0) + (4 * s.at * width) as u64,
                                m: s.rows as u64,
                                pos: ws.pos.ptr + 4 * s.at as u64,
                                inv_freq: st.inv,
                                kc,
                                kp,
                                vc,
                                vp,
                                state: ws.state.ptr + 4 * si as u64,
                                ksh: sm[0],
                                ksc: sm[1],
                                vsh: sm[2],
                                vsc: sm[3],
                                ..Default::default()
                            },
                        )?;
                    }
                }
                KernelSpec::Attention {
                    heads,
                    kv_heads,
                    head_dim,
                    smooth,
                    layer,
                    ..
                } => {
                    let sm = if *smooth {
                        [p(1), p(2), p(3), p(4)]
                    } else {
                        [0; 4]
                    };
                    let width = (heads + 2 * kv_heads) * head_dim;
                    let splits = round.splits as u64;
                    for (si, s) in segs.iter().enumerate() {
                        let [kc, kp, vc, vp] = kvs[si].words(*layer)?;
                        let win = kvs[si].window(*layer)?;
                        let mut a = AttentionArgs {
                            q: p(0) + (4 * s.at * width) as u64,
                            m: s.rows as u64,
                            kc,
                            kp,
                            vc,
                            vp,
                            state: ws.state.ptr + 4 * si as u64,
                            decode: u64::from(s.mode == RunMode::DecodeEquivalent),
                            part: ws.part.ptr,
                            splits,
                            out: y + (4 * s.at * heads * head_dim) as u64,
                            ksh: sm[0],
                            ksc: sm[1],
                            vsh: sm[2],
                            vsc: sm[3],
                            ..Default::default()
                        };
                        // a recent window: its full-precision source from the tail and the
                        // rows (`_wput`), the next tail from the source after (`_wkeep`)
                        let entry = |suffix: &str| {
                            st.entry(suffix).ok_or_else(|| {
                                err(format!("{}: no entry point *{suffix}", st.spec.code_name()))
                            })
                        };
                        if let Some(w) = win {
                            a.win = w.win as u64;
                            a.wsrc = w.src;
                            a.wbuf = if round.first[si] { w.tail } else { w.next };
                            gpu.launch(
                                entry("_wput")?,
                                ((w.win - 1 + s.rows) as u32, 1, 1),
                                128,
                                &a,
                            )?;
                        }
                        gpu.launch(
                            &f[0],
                            (splits as u32, *kv_heads as u32, s.rows as u32),
                            cg::ATTN_TILE,
                            &a,
                        )?;
                        gpu.launch(
                            &f[1],
                            (*heads as u32, s.rows as u32, 1),
                            *head_dim as u32,
                            &a,
                        )?;
                        if let Some(w) = win {
                            a.wbuf = w.next;
                            gpu.launch(entry("_wkeep")?, ((w.win - 1) as u32, 1, 1), 128, &a)?;
                        }
                    }
                }
            }
            if self.profile && !matches!(*self.gpu, Gpu::Cuda { .. }) {
                tracing::info!(
                    target: "wkvc::profile",
                    "{} ({m} rows): {:.3} ms",
                    st.spec.code_name(),
                    tk.elapsed().as_secs_f64() * 1e3
                );
            }
        }
        Ok(())
    }

    /// A GEMM of `m` rows and `n` outputs: the GEMV kernel for a few rows (with the step
    /// before it fused when `pro`), else the tiled one (or the tensor-core one, where the
    /// engine asks for it and the kernel has it).
    fn gemm<A: wkvc_ir::kernel::args::KernelArgs>(
        &self,
        st: &CudaStep,
        m: usize,
        n: usize,
        args: &A,
        pro: Option<&Prologue>,
    ) -> Result<(), RuntimeError> {
        let entry = |suffix: &str| {
            st.entry(suffix)
                .ok_or_else(|| err(format!("{}: no entry point *{suffix}", st.spec.code_name())))
        };
        let gpu = &*self.gpu;
        if m as u32 <= GEMV_MAX_M {
            let suffix = match pro {
                None => "_gemv",
                Some(Prologue::Rms { .. }) => "_gemv_rms",
                Some(Prologue::Silu { .. }) => "_gemv_silu",
            };
            gpu.launch(
                entry(suffix)?,
                ((n as u32).div_ceil(GEMV_ROWS), 1, 1),
                32 * GEMV_ROWS,
                args,
            )
        } else if let Some(f) = st.entry("_mma").filter(|_| self.mma) {
            gpu.launch(
                f,
                (
                    (n as u32).div_ceil(cg::MMA_N),
                    (m as u32).div_ceil(cg::MMA_M),
                    1,
                ),
                128,
                args,
            )
        } else {
            gpu.launch(
                entry("_tiled")?,
                ((n as u32).div_ceil(TILE_N), (m as u32).div_ceil(TILE_M), 1),
                256,
                args,
            )
        }
    }
}

/// The step a GEMV does before its product.
enum Prologue {
    /// the RMSNorm of `x` with weight `w`
    Rms { x: u64, w: u64, eps: f32 },
    /// the SiLU-mul of `x` = [g | u]
    Silu { x: u64 },
}

impl Prologue {
    fn input(&self) -> u64 {
        match self {
            Prologue::Rms { x, .. } | Prologue::Silu { x } => *x,
        }
    }

    /// The norm's weight and eps words (0 without a norm).
    fn norm(&self) -> (u64, u64) {
        match self {
            Prologue::Rms { w, eps, .. } => (*w, f32_word(*eps)),
            Prologue::Silu { .. } => (0, 0),
        }
    }
}

fn is_gemm(spec: &KernelSpec) -> bool {
    matches!(
        spec,
        KernelSpec::QGemm { .. } | KernelSpec::Gemm { .. } | KernelSpec::Logits { .. }
    )
}

/// Does a GEMM step run as a GEMV in a round whose GEMMs take `m` rows and logits `nl`?
/// (Other kinds: no.)
fn runs_gemv(spec: &KernelSpec, m: usize, nl: usize) -> bool {
    let rows = match spec {
        KernelSpec::QGemm { .. } | KernelSpec::Gemm { .. } => m,
        KernelSpec::Logits { .. } => nl,
        _ => return false,
    };
    rows >= 1 && rows <= GEMV_MAX_M as usize
}
