//! Running a batch on the CPU engine. The items' tokens are taken in rounds of up to `CHUNK`
//! rows (each item contributes a segment of consecutive rows); per round every step of the
//! plan runs once: the row-wise kernels and GEMMs over all rows together (the weights are read
//! once for all sessions), `rope_kv` and `attention` per row against that row's session cache.
//! Each kernel gets its kind's argument struct (`wkvc_ir::kernel::args`).

use super::pool::{Pool, grain};
use super::{Bound, CpuEngine, CpuKv, CpuStep, Workspace, err};
use crate::RuntimeError;
use crate::engine::{Seg, Work, next_round};
use std::time::Instant;
use wkvc_codegen::kernels::{QTILE, prep_f32, prep_int8};
use wkvc_codegen::native::CpuKernel;
use wkvc_ir::kernel::args::{
    AttentionArgs, EmbedArgs, GemmArgs, KernelArgs, LogitsArgs, QGemmArgs, RmsNormArgs, RopeKvArgs,
    SiluMulArgs,
};
use wkvc_ir::{Act, KernelSpec, RunMode};
use wkvc_passes::lower::CHUNK;

/// Call a kernel with its argument struct.
fn call<A: KernelArgs>(f: CpuKernel, a: &A) {
    // SAFETY: `f` was compiled for this step's spec, which reads `A` (the argument struct of
    // its kind) at the fields' offsets; every pointer in `a` addresses memory sized for the
    // rows and columns it describes (the engine's workspace, the sessions' caches sized for
    // their context, the weights).
    unsafe { f.call(a as *const A as *const u64) }
}

/// A raw pointer handed to the pool's workers.
#[derive(Clone, Copy)]
struct SendPtr(*mut u8);
// SAFETY: the workers write disjoint parts (rows, or (row, kv head) items) of what it
// points to, and the call waits for them before the memory is used again.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut u8 {
        self.0
    }
}

/// For the output columns a..b of GEMM parts laid side by side: `f(part, part start, lo, hi)`
/// for each part the range meets.
fn for_parts(parts: &[usize], a: usize, b: usize, f: &mut dyn FnMut(usize, usize, usize, usize)) {
    let mut base = 0;
    for (j, &nj) in parts.iter().enumerate() {
        let (lo, hi) = (a.max(base), b.min(base + nj));
        if lo < hi {
            f(j, base, lo, hi);
        }
        base += nj;
    }
}

/// For the rows a..b of a round: `f(segment index, lo, hi)` for each segment the range meets.
fn for_segs(segs: &[Seg], a: usize, b: usize, f: &mut dyn FnMut(usize, usize, usize)) {
    for (si, s) in segs.iter().enumerate() {
        let (lo, hi) = (a.max(s.at), b.min(s.at + s.rows));
        if lo < hi {
            f(si, lo, hi);
        }
    }
}

/// Row-wise work: inline for a few rows (a decode step: a dispatch would cost more than the
/// work), else in chunks over the pool.
fn rows(pool: &Pool, m: usize, f: &(dyn Fn(usize, usize, usize) + Sync)) {
    if m < 4 {
        f(0, 0, m);
    } else {
        pool.run_chunks(m, grain(m, pool.threads(), 1), f);
    }
}

impl CpuEngine {
    /// Advance every item by its tokens (checked by the caller).
    pub(crate) fn run(&self, work: &mut [Work<'_, CpuKv>]) -> Result<(), RuntimeError> {
        let mut ws = self
            .work
            .lock()
            .map_err(|_| err("the engine's workspace is poisoned by an earlier panic"))?;
        let t0 = Instant::now();
        let mut done = vec![0usize; work.len()];
        for w in work.iter_mut() {
            if let Some(a) = w.all_logits.as_deref_mut() {
                a.reserve(w.tokens.len() * self.vocab);
            }
        }
        let mut segs = Vec::with_capacity(work.len());
        // the recent windows' tails advance round by round as staged copies: committed when
        // every round has run, dropped when one fails
        while next_round(work, &done, &mut segs) {
            if let Err(e) = self.round(&mut ws, work, &segs, &done) {
                for w in work.iter_mut() {
                    w.kv.drop_staged_tails();
                }
                return Err(e);
            }
            for s in &segs {
                done[s.item] += s.rows;
            }
        }
        for w in work.iter_mut() {
            w.kv.commit_tails();
        }
        if self.profile {
            tracing::info!(
                target: "wkvc::profile",
                "call of {} items, {} tokens: {:.3} ms, waiting for workers {:.3} ms",
                work.len(),
                done.iter().sum::<usize>(),
                t0.elapsed().as_secs_f64() * 1e3,
                ws.pool.take_wait_ns() as f64 * 1e-6
            );
        }
        Ok(())
    }

    /// One round: `segs` rows of the items (their tokens from `done[item]` on).
    fn round(
        &self,
        ws: &mut Workspace,
        work: &mut [Work<'_, CpuKv>],
        segs: &[Seg],
        done: &[usize],
    ) -> Result<(), RuntimeError> {
        let m: usize = segs.iter().map(|s| s.rows).sum();
        for s in segs {
            let toks = &work[s.item].tokens[done[s.item]..][..s.rows];
            for (r, &t) in toks.iter().enumerate() {
                ws.tok[s.at + r] = t as i32;
                ws.pos[s.at + r] = (s.past + r) as i32;
            }
        }
        // rope tables for every inverse-frequency set
        let per_set = ws.cos.len() / self.rope_sets.len().max(1);
        for (si, inv) in self.rope_sets.iter().enumerate() {
            let half = inv.len();
            let base = si * per_set;
            for i in 0..m {
                let p = ws.pos[i] as f32;
                for (j, &f) in inv.iter().enumerate() {
                    let a = (p * f) as f64;
                    ws.cos[base + i * half + j] = a.cos() as f32;
                    ws.sin[base + i * half + j] = a.sin() as f32;
                }
            }
        }
        for st in &self.steps {
            let tk = Instant::now();
            self.launch(ws, work, segs, st, m)?;
            if self.profile {
                tracing::info!(
                    target: "wkvc::profile",
                    "{} ({} rows): {:.3} ms",
                    st.spec.code_name(),
                    m,
                    tk.elapsed().as_secs_f64() * 1e3
                );
            }
        }
        Ok(())
    }

    /// One step of a round of `m` rows.
    fn launch(
        &self,
        ws: &mut Workspace,
        work: &mut [Work<'_, CpuKv>],
        segs: &[Seg],
        st: &CpuStep,
        m: usize,
    ) -> Result<(), RuntimeError> {
        let threads = self.threads;
        let arena = ws.arena.as_mut_ptr() as u64;
        let (tok, pos) = (ws.tok.as_ptr() as u64, ws.pos.as_ptr() as u64);
        let p = |i: usize| -> u64 {
            match st.operands.get(i) {
                Some(Bound::Buf(o)) => arena + *o as u64,
                Some(Bound::Tokens) => tok,
                Some(Bound::Positions) => pos,
                Some(Bound::Param(q)) => q.word(),
                None => 0,
            }
        };
        let y = arena + st.out as u64;
        let f = st.f;
        let pool = &ws.pool;
        match &st.spec {
            KernelSpec::Embed { dim, .. } => {
                // in batches of 2 rows: once copied to the arena, a row's pages (and the 64 KiB
                // around each that fault-around maps with it) are released again when nothing
                // else reads the table; batches of 16 left up to 4 MiB of the table resident
                // at a time during a prefill
                const AROUND: usize = 64 << 10;
                const BATCH: usize = 2;
                for r0 in (0..m).step_by(BATCH) {
                    let r1 = (r0 + BATCH).min(m);
                    call(
                        f,
                        &EmbedArgs {
                            ids: p(0) + 4 * r0 as u64,
                            table: p(1),
                            y: y + (r0 * dim * 4) as u64,
                            m: (r1 - r0) as u64,
                        },
                    );
                    if let Some(w) = &st.release {
                        for &t in &ws.tok[r0..r1] {
                            let a = (t as usize * dim * 4).saturating_sub(AROUND);
                            w.release_range(a, 2 * AROUND + dim * 4);
                        }
                    }
                }
            }
            KernelSpec::RmsNorm { dim, .. } => {
                let (x, w, dim) = (p(0), p(1), *dim as u64);
                rows(pool, m, &|_, a, b| {
                    call(
                        f,
                        &RmsNormArgs {
                            x: x + a as u64 * dim * 4,
                            w,
                            y: y + a as u64 * dim * 4,
                            m: (b - a) as u64,
                        },
                    )
                });
            }
            KernelSpec::SiluMul { n } => {
                let (x, n) = (p(0), *n as u64);
                rows(pool, m, &|_, a, b| {
                    call(
                        f,
                        &SiluMulArgs {
                            x: x + a as u64 * 2 * n * 4,
                            y: y + a as u64 * n * 4,
                            m: (b - a) as u64,
                        },
                    )
                });
            }
            KernelSpec::QGemm {
                k,
                parts,
                group,
                residual,
                act,
                ..
            } => {
                let k = *k;
                let gl = wkvc_ir::quant::group_len(k, *group);
                let ng = k.div_ceil(gl);
                let nb = (k / gl) * (gl / 32) + (k % gl) / 32;
                let x = p(0);
                // prep: permuted / quantized rows, block scales, group sums
                let (xpb, rest) = ws.xp.split_at_mut((m * k).max(1));
                let (gsb, dxb) = rest.split_at_mut((m * ng).max(1));
                // SAFETY: operand 0 is an arena buffer of at least m rows of k floats.
                let xs = unsafe { std::slice::from_raw_parts(x as *const f32, m * k) };
                let act = *act;
                // rows over the pool (a prefill chunk's prep is ~10% of its GEMM time)
                let (xpw, gsw) = (
                    SendPtr(xpb.as_mut_ptr() as *mut u8),
                    SendPtr(gsb.as_mut_ptr() as *mut u8),
                );
                let (dxw, xqw) = (
                    SendPtr(dxb.as_mut_ptr() as *mut u8),
                    SendPtr(ws.xq.as_mut_ptr() as *mut u8),
                );
                rows(pool, m, &|_, a, b| {
                    for i in a..b {
                        // SAFETY: row i's slices of the prep buffers (sized for m rows in
                        // `Workspace::new`); the workers take disjoint rows.
                        let (gs, xr) = unsafe {
                            (
                                std::slice::from_raw_parts_mut(
                                    (gsw.get() as *mut f32).add(i * ng),
                                    ng,
                                ),
                                &xs[i * k..][..k],
                            )
                        };
                        match act {
                            Act::F32 => prep_f32(
                                xr,
                                k,
                                gl,
                                // SAFETY: as above
                                unsafe {
                                    std::slice::from_raw_parts_mut(
                                        (xpw.get() as *mut f32).add(i * k),
                                        k,
                                    )
                                },
                                gs,
                            ),
                            // SAFETY: as above
                            Act::Int8 => unsafe {
                                prep_int8(
                                    xr,
                                    k,
                                    gl,
                                    std::slice::from_raw_parts_mut(
                                        (xqw.get() as *mut i8).add(i * k),
                                        k,
                                    ),
                                    std::slice::from_raw_parts_mut(
                                        (dxw.get() as *mut f32).add(i * nb),
                                        nb,
                                    ),
                                    gs,
                                )
                            },
                        }
                    }
                });
                let xp = match act {
                    Act::F32 => xpb.as_ptr() as u64,
                    Act::Int8 => ws.xq.as_ptr() as u64,
                };
                let (gsum, dx) = (gsb.as_ptr() as u64, dxb.as_ptr() as u64);
                let ntot: usize = parts.iter().sum();
                let r = if *residual { p(1 + 3 * parts.len()) } else { 0 };
                // whole weight tiles per chunk
                pool.run_chunks(ntot, grain(ntot, threads, QTILE), &|_, a, b| {
                    for_parts(parts, a, b, &mut |j, base, lo, hi| {
                        call(
                            f,
                            &QGemmArgs {
                                x,
                                xp,
                                gsum,
                                dx,
                                m: m as u64,
                                w: p(1 + 3 * j),
                                s: p(2 + 3 * j),
                                z: p(3 + 3 * j),
                                y: y + base as u64 * 4,
                                ldy: ntot as u64,
                                n0: (lo - base) as u64,
                                n1: (hi - base) as u64,
                                r: if r != 0 { r + base as u64 * 4 } else { 0 },
                                ldr: ntot as u64,
                                ..Default::default()
                            },
                        )
                    });
                });
            }
            KernelSpec::Gemm {
                parts, residual, ..
            } => {
                let x = p(0);
                let ntot: usize = parts.iter().sum();
                let r = if *residual { p(1 + parts.len()) } else { 0 };
                pool.run_chunks(ntot, grain(ntot, threads, 4), &|_, a, b| {
                    for_parts(parts, a, b, &mut |j, base, lo, hi| {
                        call(
                            f,
                            &GemmArgs {
                                x,
                                m: m as u64,
                                w: p(1 + j),
                                y: y + base as u64 * 4,
                                ldy: ntot as u64,
                                n0: (lo - base) as u64,
                                n1: (hi - base) as u64,
                                r: if r != 0 { r + base as u64 * 4 } else { 0 },
                                ldr: ntot as u64,
                                ..Default::default()
                            },
                        )
                    });
                });
            }
            KernelSpec::Logits { vocab, dim, .. } => {
                self.logits(ws, work, segs, st, p(0), p(1), (*vocab, *dim))?;
            }
            KernelSpec::RopeKv {
                rope_dim,
                layer,
                smooth,
                ..
            } => {
                let half = (rope_dim / 2) as u64;
                let per_set = ws.cos.len() / self.rope_sets.len().max(1);
                let c = ws.cos[st.rope * per_set..].as_ptr() as u64;
                let s = ws.sin[st.rope * per_set..].as_ptr() as u64;
                bind_caches(&mut ws.segkv, work, segs, *layer)?;
                let kv = &ws.segkv;
                let n = st.operands.len();
                let sm = if *smooth {
                    [p(n - 4), p(n - 3), p(n - 2), p(n - 1)]
                } else {
                    [0; 4]
                };
                let (x, width) = (p(0), st.spec.out_cols() as u64);
                rows(pool, m, &|_, a, b| {
                    for_segs(segs, a, b, &mut |si, lo, hi| {
                        let sg = &segs[si];
                        let [kc, kp, vc, vp] = kv[si];
                        call(
                            f,
                            &RopeKvArgs {
                                x: x + lo as u64 * width * 4,
                                m: (hi - lo) as u64,
                                cos: c + lo as u64 * half * 4,
                                sin: s + lo as u64 * half * 4,
                                kc,
                                kp,
                                vc,
                                vp,
                                row0: (sg.past + lo - sg.at) as u64,
                                ksh: sm[0],
                                ksc: sm[1],
                                vsh: sm[2],
                                vsc: sm[3],
                                ..Default::default()
                            },
                        )
                    });
                });
            }
            KernelSpec::Attention {
                heads,
                kv_heads,
                head_dim,
                kv_bits,
                past_only,
                smooth,
                layer,
                ..
            } => {
                let (h, kvh, hd) = (*heads, *kv_heads, *head_dim);
                let width = (h + 2 * kvh) * hd;
                let x = p(0);
                bind_caches(&mut ws.segkv, work, segs, *layer)?;
                let kv = &ws.segkv;
                let q16 = *kv_bits == 16;
                let sm = if *smooth {
                    [p(1), p(2), p(3), p(4)]
                } else {
                    [0; 4]
                };
                let per = ws.attn.len() / threads;
                let scr = SendPtr(ws.attn.as_mut_ptr() as *mut u8);
                let po = *past_only;
                // a recent window: per segment, its tail and its rows' K and V in full
                // precision, one row each (K then V), the source the rows' window reads
                let kvw = kvh * hd;
                let window = if po && !q16 { st.window } else { 1 };
                if window > 1 {
                    if ws.fpsrc.len() < segs.len() {
                        ws.fpsrc.resize_with(segs.len(), Vec::new);
                    }
                    for (sg, b) in segs.iter().zip(ws.fpsrc.iter_mut()) {
                        b.clear();
                        let tail = work[sg.item]
                            .kv
                            .layers
                            .get(layer)
                            .map_or(&[][..], |l| l.current_tail());
                        if tail.len() != (window - 1).min(sg.past) * 2 * kvw {
                            return Err(err(format!(
                                "layer {layer}: the recent window's tail holds {} rows after {} \
                                 tokens",
                                tail.len() / (2 * kvw),
                                sg.past
                            )));
                        }
                        b.extend_from_slice(tail);
                        for r in sg.at..sg.at + sg.rows {
                            // SAFETY: rows of the round's qkv output, `width` floats each
                            let row = unsafe {
                                std::slice::from_raw_parts(
                                    (x + (r * width * 4) as u64) as *const f32,
                                    width,
                                )
                            };
                            b.extend_from_slice(&row[h * hd..(h + 2 * kvh) * hd]);
                        }
                    }
                }
                let fpsrc = &ws.fpsrc;
                // (kv head, row) items, kv head first: consecutive items read one kv head's
                // FP rows (a 512-token chunk's K and V of one head stay in L2; of all heads,
                // they would not); a row's segment gives its cache and past
                pool.run_chunks(m * kvh, 1, &|t, a, b| {
                    // SAFETY: each worker uses its own `per` floats of the scratch.
                    let scratch = unsafe { (scr.get() as *mut f32).add(t * per) } as u64;
                    for item in a..b {
                        let (g, r) = (item / m, item % m);
                        for_segs(segs, r, r + 1, &mut |si, lo, hi| {
                            let sg = &segs[si];
                            let [kc, kp, vc, vp] = kv[si];
                            // the FP rows of this segment: its chunk's K and V columns
                            let seg0 = x + (sg.at * width * 4) as u64;
                            let (kf, vf) = (
                                seg0 + (h * hd * 4) as u64,
                                seg0 + ((h + kvh) * hd * 4) as u64,
                            );
                            for row in lo..hi {
                                let i = row - sg.at;
                                let past = sg.past;
                                let (nq, kf, vf, ldf, f0, f1) = if q16 {
                                    (0, kp, vp, (kvh * hd) as u64, 0, (past + i + 1) as u64)
                                } else if !po {
                                    (past + i + 1, 0, 0, 0, 0, 0)
                                } else if window > 1 {
                                    // full precision from position a to the row's own (p);
                                    // the source's first row is position past - t
                                    let p = past + i;
                                    let a = wkvc_ir::kvcache::window_start(
                                        p,
                                        window,
                                        past,
                                        sg.mode == RunMode::Prefill,
                                    );
                                    let t = (window - 1).min(past);
                                    let b0 = fpsrc[si].as_ptr() as u64;
                                    (
                                        a,
                                        b0,
                                        b0 + (kvw * 4) as u64,
                                        (2 * kvw) as u64,
                                        (a + t - past) as u64,
                                        (p + t - past + 1) as u64,
                                    )
                                } else if sg.mode == RunMode::Prefill {
                                    (past, kf, vf, width as u64, 0, (i + 1) as u64)
                                } else {
                                    (past + i, kf, vf, width as u64, i as u64, (i + 1) as u64)
                                };
                                call(
                                    f,
                                    &AttentionArgs {
                                        q: x + (row * width * 4) as u64,
                                        kc,
                                        kp,
                                        vc,
                                        vp,
                                        nq: nq as u64,
                                        kf,
                                        vf,
                                        ldf,
                                        f0,
                                        f1,
                                        g: g as u64,
                                        out: y + (row * h * hd * 4) as u64,
                                        scratch,
                                        ksh: sm[0],
                                        ksc: sm[1],
                                        vsh: sm[2],
                                        vsc: sm[3],
                                        ..Default::default()
                                    },
                                );
                            }
                        });
                    }
                });
                // the tails after these rows: the last window - 1 rows of each source
                if window > 1 {
                    for (sg, src) in segs.iter().zip(fpsrc) {
                        if let Some(lc) = work[sg.item].kv.layers.get_mut(layer) {
                            lc.stage_tail(src, (window - 1).min(sg.past + sg.rows));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The logits step: rows of items that want all their logits straight into the caller's
    /// vectors; the last rows of the others gathered and run together (the table is read
    /// once for all of them), each then copied to its session.
    #[allow(clippy::too_many_arguments)]
    fn logits(
        &self,
        ws: &mut Workspace,
        work: &mut [Work<'_, CpuKv>],
        segs: &[Seg],
        st: &CpuStep,
        x: u64,
        w: u64,
        (vocab, dim): (usize, usize),
    ) -> Result<(), RuntimeError> {
        let gathered: Vec<usize> = segs
            .iter()
            .filter(|s| s.last && !s.all)
            .map(|s| s.at + s.rows - 1)
            .collect();
        for s in segs.iter().filter(|s| s.all) {
            let out = work[s.item]
                .all_logits
                .as_deref_mut()
                .ok_or_else(|| err("logits of all rows asked for without a vector"))?;
            let start = out.len();
            out.resize(start + s.rows * vocab, 0.0);
            let dst = out[start..].as_mut_ptr() as u64;
            self.logit_rows(
                ws,
                st,
                x + (s.at * dim * 4) as u64,
                s.rows,
                dst,
                (vocab, dim),
                w,
            );
            if s.last {
                let last = &out[start + (s.rows - 1) * vocab..];
                work[s.item].logits.copy_from_slice(last);
            }
        }
        if gathered.is_empty() {
            return Ok(());
        }
        let n = gathered.len();
        // SAFETY: operand 0 is an arena buffer of the round's rows of `dim` floats.
        let xs = unsafe { std::slice::from_raw_parts(x as *const f32, (segs_rows(segs)) * dim) };
        ws.lx.resize(n * dim, 0.0);
        for (j, &r) in gathered.iter().enumerate() {
            ws.lx[j * dim..][..dim].copy_from_slice(&xs[r * dim..][..dim]);
        }
        ws.lout.resize(n * vocab, 0.0);
        let (lx, lout) = (ws.lx.as_ptr() as u64, ws.lout.as_mut_ptr() as u64);
        self.logit_rows(ws, st, lx, n, lout, (vocab, dim), w);
        for (j, s) in segs.iter().filter(|s| s.last && !s.all).enumerate() {
            work[s.item]
                .logits
                .copy_from_slice(&ws.lout[j * vocab..][..vocab]);
        }
        Ok(())
    }

    /// `rows` rows of `dim` floats at `x` times the table, into `rows x vocab` floats at `y`.
    #[allow(clippy::too_many_arguments)]
    fn logit_rows(
        &self,
        ws: &mut Workspace,
        st: &CpuStep,
        x: u64,
        rows: usize,
        y: u64,
        (vocab, dim): (usize, usize),
        w: u64,
    ) {
        let f = st.f;
        let grain_ = grain(vocab, self.threads, 4);
        let Some((wq, wsc)) = st.head else {
            ws.pool.run_chunks(vocab, grain_, &|_, a, b| {
                call(
                    f,
                    &LogitsArgs {
                        x,
                        m: rows as u64,
                        w,
                        y,
                        ldy: vocab as u64,
                        n0: a as u64,
                        n1: b as u64,
                        ..Default::default()
                    },
                )
            });
            return;
        };
        // int8 rows of the input (one group: the whole row), in chunks of CHUNK rows
        let nb = dim / 32;
        for r0 in (0..rows).step_by(CHUNK) {
            let rn = (rows - r0).min(CHUNK);
            // SAFETY: x holds `rows` rows of `dim` floats.
            let xs =
                unsafe { std::slice::from_raw_parts((x as *const f32).add(r0 * dim), rn * dim) };
            let mut gs = [0f32; 1];
            for r in 0..rn {
                prep_int8(
                    &xs[r * dim..][..dim],
                    dim,
                    dim,
                    &mut ws.hq[r * dim..][..dim],
                    &mut ws.hdx[r * nb..][..nb],
                    &mut gs,
                );
            }
            let (xq, dx) = (ws.hq.as_ptr() as u64, ws.hdx.as_ptr() as u64);
            let yr = y + (r0 * vocab * 4) as u64;
            ws.pool.run_chunks(vocab, grain_, &|_, a, b| {
                call(
                    f,
                    &LogitsArgs {
                        xq,
                        dx,
                        m: rn as u64,
                        wq: wq.word(),
                        ws: wsc.word(),
                        y: yr,
                        ldy: vocab as u64,
                        n0: a as u64,
                        n1: b as u64,
                        ..Default::default()
                    },
                )
            });
        }
    }
}

fn segs_rows(segs: &[Seg]) -> usize {
    segs.iter().map(|s| s.rows).sum()
}

/// The cache pointers of layer `layer` of each segment's session, into `out`.
fn bind_caches(
    out: &mut Vec<[u64; 4]>,
    work: &mut [Work<'_, CpuKv>],
    segs: &[Seg],
    layer: i64,
) -> Result<(), RuntimeError> {
    out.clear();
    for s in segs {
        let lc = work[s.item]
            .kv
            .layers
            .get_mut(&layer)
            .ok_or_else(|| err(format!("no cache for layer {layer}")))?;
        out.push(lc.words());
    }
    Ok(())
}
