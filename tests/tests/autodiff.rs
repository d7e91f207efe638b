//! Gradient checks: every vector-Jacobian rule against central finite differences.
//!
//! Smooth ops are checked through `passes::autodiff` on `loss(op(..), target)` (mse) with the
//! loss recomputed in f64 from the op's f32 output for the differences. Quantizing ops use
//! OmniQuant's straight-through estimator, whose gradient is the derivative of the branch the
//! forward pass took (rounding offsets, zero-point, clamp pattern and min/max positions frozen
//! at the point of evaluation); they are checked against that frozen function, written out
//! here in f64.
//!
//! Tolerances: a difference quotient with step h of a loss whose f32 evaluation carries an
//! absolute error e has error about e/h + O(h^2); e is bounded from the output's magnitude
//! (f32 epsilon per element), and the analytic gradient is computed in f32 with relative error
//! about sqrt(n) * eps for n-term sums. Each check allows 1e-3 of the gradient's scale plus
//! the difference quotient's noise bound.

use std::collections::BTreeMap;
use wkvc_ir::KvCache;
use wkvc_ir::graph::{Attr, Graph, Input, Node, OpKind, Operand, Output, ParamDecl, ValueId};
use wkvc_ir::interp::{Interpreter, RunMode, Tensor};
use wkvc_ir::types::{DType, Dim, TensorType};
use wkvc_ir::{Module, Weight, WeightStore};
use wkvc_passes::autodiff::{differentiate, grad_output};
use wkvc_tests::Rng;

enum Arg {
    F(Vec<usize>, Vec<f32>),
    I(Vec<usize>, Vec<i32>),
}

fn tty(shape: &[usize], dt: DType) -> TensorType {
    TensorType::new(dt, shape.iter().map(|&d| Dim::Const(d)).collect())
}

/// Graph: `y = op(p0, p1, .., i.., ..)` with f32 operands as params `p{i}` and i32 operands as
/// inputs `i{i}`; `loss = mse(y, @target)`.
fn op_module(op: OpKind, attrs: &[(&str, Attr)], args: &[Arg], target: &[f32]) -> Module {
    let mut g = Graph::new("op");
    let mut store = WeightStore::default();
    let mut operands = Vec::new();
    let mut types = Vec::new();
    let mut next = 0u32;
    for (i, a) in args.iter().enumerate() {
        match a {
            Arg::F(shape, data) => {
                let name = format!("p{i}");
                g.params.push(ParamDecl {
                    name: name.clone(),
                    ty: tty(shape, DType::F32),
                });
                store.insert(name.clone(), Weight::from_f32(shape.clone(), data.clone()));
                operands.push(Operand::Param(name));
                types.push(tty(shape, DType::F32));
            }
            Arg::I(shape, _) => {
                let v = ValueId(next);
                next += 1;
                g.inputs.push(Input {
                    value: v,
                    name: format!("i{i}"),
                    ty: tty(shape, DType::I32),
                });
                operands.push(Operand::Value(v));
                types.push(tty(shape, DType::I32));
            }
        }
    }
    let mut node = Node {
        out: ValueId(next),
        op,
        args: operands,
        attrs: attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        ty: TensorType::f32(vec![]),
    };
    node.ty = wkvc_ir::verify::infer(&node, &types).expect("op type");
    let y = node.out;
    let yshape: Vec<usize> = node
        .ty
        .shape
        .iter()
        .map(|d| d.as_const().unwrap())
        .collect();
    g.nodes.push(node);
    g.params.push(ParamDecl {
        name: "target".into(),
        ty: tty(&yshape, DType::F32),
    });
    store.insert(
        "target".to_string(),
        Weight::from_f32(yshape, target.to_vec()),
    );
    g.nodes.push(Node {
        out: ValueId(next + 1),
        op: OpKind::Loss,
        args: vec![Operand::Value(y), Operand::Param("target".into())],
        attrs: wkvc_ir::graph::attrs([("kind", Attr::Str("mse".into()))]),
        ty: TensorType::f32(vec![Dim::Const(1)]),
    });
    g.outputs.push(Output {
        name: "y".into(),
        value: y,
    });
    g.outputs.push(Output {
        name: "loss".into(),
        value: ValueId(next + 1),
    });
    Module {
        graph: g,
        weights: store,
    }
}

fn int_inputs(args: &[Arg]) -> Vec<(String, Tensor)> {
    args.iter()
        .enumerate()
        .filter_map(|(i, a)| match a {
            Arg::I(shape, d) => Some((format!("i{i}"), Tensor::i32(shape.clone(), d.clone()))),
            Arg::F(..) => None,
        })
        .collect()
}

fn run(it: &Interpreter, ins: &[(String, Tensor)]) -> BTreeMap<String, Tensor> {
    let ins: Vec<(&str, Tensor)> = ins.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let mut cache = KvCache::new(4096);
    it.run_mode(&ins, &mut cache, RunMode::DecodeEquivalent)
        .expect("run")
}

fn mse64(y: &[f32], t: &[f32]) -> (f64, f64) {
    let n = y.len() as f64;
    let l = y
        .iter()
        .zip(t)
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum::<f64>()
        / n;
    // error bound of l from f32 rounding of y: sum |dl/dy| * eps * |y|
    let e = y
        .iter()
        .zip(t)
        .map(|(&a, &b)| 2.0 * (a as f64 - b as f64).abs() / n * a.abs() as f64)
        .sum::<f64>()
        * f32::EPSILON as f64;
    (l, e)
}

/// Check d loss / d operand for each f32 operand listed in `wrt`, on up to `samples`
/// elements per operand.
fn check_op(op: OpKind, attrs: &[(&str, Attr)], args: Vec<Arg>, wrt: &[usize], seed: u64) {
    let mut rng = Rng(seed);
    let m0 = op_module(op, attrs, &args, &[]);
    let ylen: usize = m0.graph.nodes[0]
        .ty
        .shape
        .iter()
        .map(|d| d.as_const().unwrap())
        .product();
    drop(m0);
    let target = rng.vec(ylen, 1.0);
    let m = op_module(op, attrs, &args, &target);
    let names: Vec<String> = wrt.iter().map(|i| format!("p{i}")).collect();
    let g = differentiate(&m.graph, &["loss"], &names).expect("differentiate");
    let gm = Module {
        graph: g,
        weights: m.weights.clone(),
    };
    let ints = int_inputs(&args);
    let mut it = Interpreter::new(&gm, 2).expect("interpreter");
    let out = run(&it, &ints);
    for (wi, name) in wrt.iter().zip(&names) {
        let grad = out[&grad_output(name)].as_f32().unwrap().to_vec();
        let Arg::F(_, base) = &args[*wi] else {
            panic!("operand {wi} is not f32")
        };
        assert_eq!(
            grad.len(),
            base.len(),
            "{} wrt {wi}: gradient length",
            op.name()
        );
        let scale = grad.iter().fold(0f32, |a, &b| a.max(b.abs())) as f64;
        let picks: Vec<usize> = if base.len() <= 48 {
            (0..base.len()).collect()
        } else {
            (0..48).map(|_| rng.below(base.len())).collect()
        };
        for &e in &picks {
            let h = 1e-2f64 * (1.0 + base[e].abs() as f64).min(4.0) / 4.0;
            let mut eval = |d: f64| {
                let mut p = base.clone();
                p[e] = (base[e] as f64 + d) as f32;
                let actual = p[e] as f64 - base[e] as f64;
                it.set_param(name, p).unwrap();
                let o = run(&it, &ints);
                (mse64(o["y"].as_f32().unwrap(), &target), actual)
            };
            let ((lp, ep), dp) = eval(h);
            let ((lm, em), dm) = eval(-h);
            it.set_param(name, base.clone()).unwrap();
            let fd = (lp - lm) / (dp - dm);
            let noise = (ep + em) / (dp - dm).abs();
            let tol = 1e-3 * scale + 4.0 * noise + 1e-7;
            let ad = grad[e] as f64;
            assert!(
                (ad - fd).abs() <= tol,
                "{} d/d operand {wi}[{e}]: autodiff {ad:.6e} vs finite difference {fd:.6e} (tol {tol:.2e})",
                op.name()
            );
        }
    }
}

fn f(shape: &[usize], rng: &mut Rng, scale: f32) -> Arg {
    let n = shape.iter().product();
    Arg::F(shape.to_vec(), rng.vec(n, scale))
}

#[test]
fn smooth_ops_match_finite_differences() {
    let mut r = Rng(7);
    // linear with odd sizes (gemm tails), with bias
    check_op(
        OpKind::Linear,
        &[],
        vec![
            f(&[5, 7], &mut r, 1.0),
            f(&[3, 7], &mut r, 1.0),
            f(&[3], &mut r, 1.0),
        ],
        &[0, 1, 2],
        1,
    );
    check_op(
        OpKind::Linear,
        &[],
        vec![f(&[9, 16], &mut r, 1.0), f(&[11, 16], &mut r, 0.5)],
        &[0, 1],
        2,
    );
    check_op(
        OpKind::RmsNorm,
        &[("eps", Attr::Float(1e-5))],
        vec![f(&[4, 12], &mut r, 2.0), f(&[12], &mut r, 1.0)],
        &[0, 1],
        3,
    );
    for (silu, seed) in [(OpKind::Silu, 4), (OpKind::Softmax, 5)] {
        check_op(silu, &[], vec![f(&[3, 10], &mut r, 3.0)], &[0], seed);
    }
    check_op(
        OpKind::Mul,
        &[],
        vec![f(&[4, 6], &mut r, 1.0), f(&[4, 6], &mut r, 1.0)],
        &[0, 1],
        6,
    );
    check_op(
        OpKind::Add,
        &[],
        vec![f(&[4, 6], &mut r, 1.0), f(&[4, 6], &mut r, 1.0)],
        &[0, 1],
        7,
    );
    check_op(
        OpKind::Transpose,
        &[("perm", Attr::Ints(vec![2, 0, 1]))],
        vec![f(&[2, 3, 4], &mut r, 1.0)],
        &[0],
        8,
    );
    check_op(
        OpKind::Concat,
        &[("axis", Attr::Int(1))],
        vec![
            f(&[3, 2], &mut r, 1.0),
            f(&[3, 5], &mut r, 1.0),
            f(&[3, 1], &mut r, 1.0),
        ],
        &[0, 1, 2],
        9,
    );
    check_op(
        OpKind::Embedding,
        &[],
        vec![
            Arg::I(vec![5], vec![3, 0, 3, 6, 1]),
            f(&[7, 4], &mut r, 1.0),
        ],
        &[1],
        10,
    );
    // RoPE: 3 heads of 8, positions far apart; partial rotation too; with the K/V rotation
    // (Hadamard blocks of 8 and of 4 after RoPE)
    for (rd, rotate) in [(8i64, 0i64), (4, 0), (8, 8), (4, 4)] {
        check_op(
            OpKind::Rope,
            &[
                ("heads", Attr::Int(3)),
                ("head_dim", Attr::Int(8)),
                ("rope_dim", Attr::Int(rd)),
                ("theta", Attr::Float(10000.0)),
                ("rotate", Attr::Int(rotate)),
            ],
            vec![
                f(&[4, 24], &mut r, 1.0),
                Arg::I(vec![4], vec![0, 1, 7, 300]),
            ],
            &[0],
            11,
        );
    }
}

fn attn_attrs(h: i64, kvh: i64, hd: i64, causal: bool) -> Vec<(&'static str, Attr)> {
    vec![
        ("heads", Attr::Int(h)),
        ("kv_heads", Attr::Int(kvh)),
        ("head_dim", Attr::Int(hd)),
        ("layer", Attr::Int(0)),
        ("causal", Attr::Bool(causal)),
    ]
}

#[test]
fn fp_attention_matches_finite_differences() {
    let mut r = Rng(17);
    for (h, kvh, causal, s) in [(4, 2, true, 6), (2, 2, false, 5), (6, 1, true, 3)] {
        let hd = 4usize;
        check_op(
            OpKind::Attention,
            &attn_attrs(h, kvh, hd as i64, causal),
            vec![
                f(&[s, h as usize * hd], &mut r, 1.5),
                f(&[s, kvh as usize * hd], &mut r, 1.5),
                f(&[s, kvh as usize * hd], &mut r, 1.0),
            ],
            &[0, 1, 2],
            20 + h as u64,
        );
    }
}

#[test]
fn loss_gradients() {
    let mut r = Rng(3);
    let p = r.vec(20, 1.0);
    let t = r.vec(20, 1.0);
    for kind in ["mae", "mse"] {
        let g = wkvc_ir::grad::loss_vjp(kind, &p, &t, 0);
        let gt = wkvc_ir::grad::loss_vjp(kind, &p, &t, 1);
        for e in 0..20 {
            let h = 1e-3f32;
            let mut a = p.clone();
            a[e] += h;
            let mut b = p.clone();
            b[e] -= h;
            let fd = (wkvc_ir::math::loss_value(kind, &a, &t) as f64
                - wkvc_ir::math::loss_value(kind, &b, &t) as f64)
                / (2.0 * h as f64);
            assert!(
                (fd - g[e] as f64).abs() < 1e-4,
                "{kind}[{e}]: {fd} vs {}",
                g[e]
            );
            assert_eq!(gt[e], -g[e]);
        }
    }
}

// ---- quantizers: the straight-through function, frozen at the evaluation point, in f64 ----

#[derive(Clone)]
struct Frozen {
    imn: usize,
    imx: usize,
    z: f64,
    /// round(t) - t per element
    off: Vec<f64>,
    /// clamp bound per element when clamped
    clamped: Vec<Option<f64>>,
}

/// One group's quantize-dequantize with f32 scale/zero semantics (no f16 rounding).
fn fq_group(
    x: &[f64],
    bits: u32,
    gamma: f64,
    beta: f64,
    fr: Option<&Frozen>,
) -> (Vec<f64>, Frozen) {
    let qmax = ((1u32 << bits) - 1) as f64;
    let (imn, imx) = match fr {
        Some(f) => (f.imn, f.imx),
        None => {
            let (mut a, mut b) = (0, 0);
            for i in 0..x.len() {
                if x[i] < x[a] {
                    a = i;
                }
                if x[i] > x[b] {
                    b = i;
                }
            }
            (a, b)
        }
    };
    let (mn, mx) = (x[imn], x[imx]);
    let h = ((gamma * mx - beta * mn) / qmax).max(1e-8);
    let z = fr.map_or_else(|| (-beta * mn / h).round_ties_even(), |f| f.z);
    let mut off = Vec::with_capacity(x.len());
    let mut clamped = Vec::with_capacity(x.len());
    let mut y = Vec::with_capacity(x.len());
    for (i, &v) in x.iter().enumerate() {
        let t = v / h;
        let o = fr.map_or_else(|| t.round_ties_even() - t, |f| f.off[i]);
        let c = t + o + z;
        let cl = match fr {
            Some(f) => f.clamped[i],
            None if (0.0..=qmax).contains(&c) => None,
            None => Some(c.clamp(0.0, qmax)),
        };
        y.push(match cl {
            None => (t + o) * h,
            Some(b) => (b - z) * h,
        });
        off.push(o);
        clamped.push(cl);
    }
    (
        y,
        Frozen {
            imn,
            imx,
            z,
            off,
            clamped,
        },
    )
}

fn sig(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[test]
fn fake_quant_vjp_matches_the_straight_through_function() {
    let mut r = Rng(99);
    for (rows, cols, group, bits, lwc) in [
        (3usize, 16usize, 8i64, 4u32, true),
        (2, 13, 5, 3, false),
        (4, 10, -1, 4, true),
    ] {
        let ng = if group < 0 {
            1
        } else {
            cols.div_ceil(group as usize)
        };
        let gl = if group < 0 { cols } else { group as usize };
        let w = r.vec(rows * cols, 1.0);
        let (gam, bet): (Vec<f32>, Vec<f32>) = if lwc {
            (
                (0..rows * ng).map(|_| 1.0 + r.uniform()).collect(),
                (0..rows * ng).map(|_| 1.5 + r.uniform()).collect(),
            )
        } else {
            (
                (0..rows * ng).map(|_| 0.85 + 0.1 * r.uniform()).collect(),
                (0..rows * ng).map(|_| 0.9 + 0.05 * r.uniform()).collect(),
            )
        };
        let dy = r.vec(rows * cols, 1.0);
        let act = |u: f64| if lwc { sig(u) } else { u };
        // f64 objective sum(dy * fq(w)) with everything discrete frozen at the base point
        let objective = |w: &[f64], g: &[f64], b: &[f64], fr: Option<&Vec<Frozen>>| {
            let mut total = 0.0;
            let mut frs = Vec::new();
            for row in 0..rows {
                for gi in 0..ng {
                    let (a, e) = (gi * gl, ((gi + 1) * gl).min(cols));
                    let x = &w[row * cols + a..row * cols + e];
                    let k = row * ng + gi;
                    let (y, f) = fq_group(x, bits, act(g[k]), act(b[k]), fr.map(|v| &v[k]));
                    total += y
                        .iter()
                        .zip(&dy[row * cols + a..row * cols + e])
                        .map(|(p, &q)| p * q as f64)
                        .sum::<f64>();
                    frs.push(f);
                }
            }
            (total, frs)
        };
        let w64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        let g64: Vec<f64> = gam.iter().map(|&v| v as f64).collect();
        let b64: Vec<f64> = bet.iter().map(|&v| v as f64).collect();
        let (_, frozen) = objective(&w64, &g64, &b64, None);
        for wrt in 0..3 {
            let ad = wkvc_ir::grad::fake_quant_vjp(
                &w,
                cols,
                bits,
                group,
                &gam,
                &bet,
                wkvc_ir::quant::ParamDtype::F32,
                lwc,
                &dy,
                wrt,
            );
            let n = [w.len(), gam.len(), bet.len()][wrt];
            assert_eq!(ad.len(), n);
            let scale = ad.iter().fold(0f32, |a, &b| a.max(b.abs())) as f64;
            for e in 0..n {
                let h = 1e-5;
                let mut v = [w64.clone(), g64.clone(), b64.clone()];
                v[wrt][e] += h;
                let (lp, _) = objective(&v[0], &v[1], &v[2], Some(&frozen));
                v[wrt][e] -= 2.0 * h;
                let (lm, _) = objective(&v[0], &v[1], &v[2], Some(&frozen));
                let fd = (lp - lm) / (2.0 * h);
                let tol = 2e-3 * scale.max(1e-3);
                assert!(
                    (ad[e] as f64 - fd).abs() <= tol,
                    "fake_quant {rows}x{cols} g{group} b{bits} lwc={lwc} wrt {wrt}[{e}]: {} vs {fd} (tol {tol:.1e})",
                    ad[e]
                );
            }
            if wrt > 0 {
                assert!(scale > 0.0, "clipping gradient is identically zero");
            }
        }
    }
}

/// Attention of a fresh sequence under the decode-equivalent protocol in f64, with the K/V
/// round trip frozen (per (token, group of `gl` channels)) as in `fq_group`.
#[allow(clippy::too_many_arguments)]
fn attention_ref(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    sm: &[Vec<f64>; 4],
    (h, kvh, hd, gl): (usize, usize, usize, usize),
    window: usize,
    bits: u32,
    fr: Option<&(Vec<Frozen>, Vec<Frozen>)>,
) -> (Vec<f64>, (Vec<Frozen>, Vec<Frozen>)) {
    let kvw = kvh * hd;
    let s = q.len() / (h * hd);
    let rt = |x: &[f64], sh: &[f64], sc: &[f64], frz: Option<&Vec<Frozen>>| {
        let mut out = vec![0.0; x.len()];
        let mut frs = Vec::new();
        let ng = kvw / gl;
        for row in 0..s {
            for grp in 0..ng {
                let (base, o) = (row * kvw + grp * gl, grp * gl);
                let xs: Vec<f64> = (0..gl)
                    .map(|c| (x[base + c] - sh[o + c]) / sc[o + c])
                    .collect();
                let (y, f) = fq_group(&xs, bits, 1.0, 1.0, frz.map(|v| &v[row * ng + grp]));
                for c in 0..gl {
                    out[base + c] = y[c] * sc[o + c] + sh[o + c];
                }
                frs.push(f);
            }
        }
        (out, frs)
    };
    let (kh, fk) = rt(k, &sm[0], &sm[1], fr.map(|f| &f.0));
    let (vh, fv) = rt(v, &sm[2], &sm[3], fr.map(|f| &f.1));
    let mut out = vec![0.0; q.len()];
    let scale = 1.0 / (hd as f64).sqrt();
    for i in 0..s {
        for head in 0..h {
            let off = (head / (h / kvh)) * hd;
            let qi = &q[i * h * hd + head * hd..][..hd];
            let pick = |m: &[f64], mh: &[f64], j: usize| -> Vec<f64> {
                // past-only (window >= 1): the last `window` positions in full precision
                let src = if i - j < window { m } else { mh };
                src[j * kvw + off..][..hd].to_vec()
            };
            let sc: Vec<f64> = (0..=i)
                .map(|j| {
                    let kj = pick(k, &kh, j);
                    qi.iter().zip(&kj).map(|(a, b)| a * b).sum::<f64>() * scale
                })
                .collect();
            let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for (j, ej) in e.iter().enumerate() {
                let vj = pick(v, &vh, j);
                for (c, vc) in vj.iter().enumerate() {
                    out[i * h * hd + head * hd + c] += ej / z * vc;
                }
            }
        }
    }
    (out, (fk, fv))
}

#[test]
fn quantized_attention_vjp_matches_the_straight_through_function() {
    let mut r = Rng(5);
    // window: 0 without past-only, else the positions read in full precision; the third: two
    // (scale, zero) groups a head (`kv_group`); the last: a recent window of 3
    for (h, kvh, hd, s, window, bits, gl) in [
        (4usize, 2usize, 4usize, 5usize, 1usize, 4u32, 4usize),
        (2, 1, 6, 4, 0, 3, 6),
        (2, 1, 8, 4, 1, 3, 4),
        (2, 1, 8, 6, 3, 3, 4),
    ] {
        let past_only = window > 0;
        let kvw = kvh * hd;
        let q = r.vec(s * h * hd, 1.5);
        let k: Vec<f32> = r.vec(s * kvw, 1.5).iter().map(|x| x + 0.3).collect();
        let v = r.vec(s * kvw, 1.0);
        let sm: [Vec<f32>; 4] = [
            r.vec(kvw, 0.2),
            (0..kvw).map(|_| 1.0 + 0.5 * r.uniform()).collect(),
            r.vec(kvw, 0.2),
            (0..kvw).map(|_| 1.0 + 0.5 * r.uniform()).collect(),
        ];
        let dout = r.vec(s * h * hd, 1.0);
        let spec = wkvc_ir::grad::AttnSpec {
            heads: h,
            kv_heads: kvh,
            head_dim: hd,
            causal: true,
            kv_bits: Some(bits),
            kv_group: if gl == hd { 0 } else { gl },
            past_only,
            window: window.max(1),
            pd: wkvc_ir::quant::ParamDtype::F32,
        };
        let to64 = |x: &[f32]| x.iter().map(|&a| a as f64).collect::<Vec<f64>>();
        let mut ops: Vec<Vec<f64>> = vec![to64(&q), to64(&k), to64(&v)];
        for x in &sm {
            ops.push(to64(x));
        }
        let obj = |ops: &[Vec<f64>], fr: Option<&(Vec<Frozen>, Vec<Frozen>)>| {
            let smv = [
                ops[3].clone(),
                ops[4].clone(),
                ops[5].clone(),
                ops[6].clone(),
            ];
            let (o, f) = attention_ref(
                &ops[0],
                &ops[1],
                &ops[2],
                &smv,
                (h, kvh, hd, gl),
                window,
                bits,
                fr,
            );
            (
                o.iter().zip(&dout).map(|(a, &b)| a * b as f64).sum::<f64>(),
                f,
            )
        };
        let (_, frozen) = obj(&ops, None);
        // The interpreter's forward attention (decode-equivalent, real quantizer) is the
        // function this reference freezes.
        let mut attrs = attn_attrs(h as i64, kvh as i64, hd as i64, true);
        attrs.push(("kv_bits", Attr::Int(bits as i64)));
        attrs.push(("past_only", Attr::Bool(past_only)));
        if window > 1 {
            attrs.push(("kv_window", Attr::Int(window as i64)));
        }
        attrs.push(("kv_param_dtype", Attr::Str("f32".into())));
        if gl != hd {
            attrs.push(("kv_group", Attr::Int(gl as i64)));
        }
        let args = vec![
            Arg::F(vec![s, h * hd], q.clone()),
            Arg::F(vec![s, kvw], k.clone()),
            Arg::F(vec![s, kvw], v.clone()),
            Arg::F(vec![kvw], sm[0].clone()),
            Arg::F(vec![kvw], sm[1].clone()),
            Arg::F(vec![kvw], sm[2].clone()),
            Arg::F(vec![kvw], sm[3].clone()),
        ];
        let m = op_module(OpKind::Attention, &attrs, &args, &vec![0.0; s * h * hd]);
        let it = Interpreter::new(&m, 1).unwrap();
        let y = run(&it, &[])["y"].as_f32().unwrap().to_vec();
        let smv = [
            ops[3].clone(),
            ops[4].clone(),
            ops[5].clone(),
            ops[6].clone(),
        ];
        let (yr, _) = attention_ref(
            &ops[0],
            &ops[1],
            &ops[2],
            &smv,
            (h, kvh, hd, gl),
            window,
            bits,
            None,
        );
        for (a, b) in y.iter().zip(&yr) {
            assert!(
                (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                "forward {a} vs {b}"
            );
        }
        for wrt in 0..7 {
            let ad = wkvc_ir::grad::attention_vjp(
                spec,
                &q,
                &k,
                &v,
                Some([&sm[0], &sm[1], &sm[2], &sm[3]]),
                &dout,
                wrt,
            );
            assert_eq!(ad.len(), ops[wrt].len());
            let scale = ad.iter().fold(0f32, |a, &b| a.max(b.abs())) as f64;
            assert!(scale > 0.0, "operand {wrt}: gradient identically zero");
            for e in 0..ops[wrt].len() {
                let hstep = 1e-5;
                let mut p = ops.clone();
                p[wrt][e] += hstep;
                let (lp, _) = obj(&p, Some(&frozen));
                p[wrt][e] -= 2.0 * hstep;
                let (lm, _) = obj(&p, Some(&frozen));
                let fd = (lp - lm) / (2.0 * hstep);
                let tol = 2e-3 * scale;
                assert!(
                    (ad[e] as f64 - fd).abs() <= tol,
                    "attention h{h} kvh{kvh} window={window} wrt {wrt}[{e}]: {} vs {fd} (tol {tol:.1e})",
                    ad[e]
                );
            }
        }
    }
}

#[test]
fn vjp_nodes_print_parse_and_verify() {
    let mut r = Rng(1);
    let m = op_module(
        OpKind::RmsNorm,
        &[("eps", Attr::Float(1e-5))],
        &[f(&[2, 4], &mut r, 1.0), f(&[4], &mut r, 1.0)],
        &r.vec(8, 1.0),
    );
    let g = differentiate(&m.graph, &["loss"], &["p0".into(), "p1".into()]).unwrap();
    let text = wkvc_ir::text::print(&g);
    assert!(text.contains("vjp("), "{text}");
    let back = wkvc_ir::text::parse(&text).expect("parse");
    assert_eq!(back, g);
    // a param that does not reach the loss is an error, not a zero gradient
    let err = differentiate(&m.graph, &["loss"], &["target".into(), "nope".into()]);
    assert!(err.is_err());
    let err = differentiate(&m.graph, &["y"], &["p0".into()]).unwrap_err();
    assert!(err.to_string().contains("not a `loss` node"), "{err}");
}

#[test]
fn qlinear_vjp_equals_linear_on_the_dequantized_weights() {
    use wkvc_ir::quant::{pack_u4, quantize_rows};
    let mut r = Rng(12);
    let (m, n, k, group) = (5usize, 6usize, 20usize, 8i64);
    let w = r.vec(n * k, 1.0);
    let ng = k.div_ceil(group as usize);
    let ones = vec![1.0f32; n * ng];
    let (codes, scales, zeros) = quantize_rows(&w, k, 4, group, &ones, &ones);
    let codes_f: Vec<f32> = codes.iter().map(|&c| c as f32).collect();
    let sf: Vec<f32> = scales.iter().map(|v| v.to_f32()).collect();
    let zf: Vec<f32> = zeros.iter().map(|v| v.to_f32()).collect();
    let deq = wkvc_ir::quant::dequantize_rows(&codes_f, k, group, &sf, &zf);
    let x = r.vec(m * k, 1.0);
    let dy = r.vec(m * n, 1.0);
    let text = format!(
        "graph \"q\" {{
  param @codes : u4[{n},{k}]
  param @scales : f16[{n},{ng}]
  param @zeros : f16[{n},{ng}]
  param @w : f32[{n},{k}]
  input %0 \"x\" : f32[seq,{k}]
  input %1 \"dy\" : f32[seq,{n}]
  %2 = vjp(%0, @codes, @scales, @zeros, %1) {{bits=4, group={group}, vjp_of=\"qlinear\", wrt=0}} : f32[seq,{k}]
  %3 = vjp(%0, @w, %1) {{vjp_of=\"linear\", wrt=0}} : f32[seq,{k}]
  output \"dq\" %2
  output \"dl\" %3
}}
"
    );
    let g = wkvc_ir::text::parse(&text).expect("parse");
    wkvc_ir::verify::verify(&g).expect("verify");
    let mut store = WeightStore::default();
    let f16b = |v: &[half::f16]| v.iter().flat_map(|h| h.to_le_bytes()).collect::<Vec<u8>>();
    store.insert(
        "codes".to_string(),
        Weight::from_bytes(vec![n, k], DType::U4, pack_u4(&codes, k)),
    );
    store.insert(
        "scales".to_string(),
        Weight::from_bytes(vec![n, ng], DType::F16, f16b(&scales)),
    );
    store.insert(
        "zeros".to_string(),
        Weight::from_bytes(vec![n, ng], DType::F16, f16b(&zeros)),
    );
    store.insert("w".to_string(), Weight::from_f32(vec![n, k], deq));
    let module = Module {
        graph: g,
        weights: store,
    };
    module.verify().expect("store types");
    let it = Interpreter::new(&module, 1).unwrap();
    let out = run(
        &it,
        &[
            ("x".to_string(), Tensor::f32(vec![m, k], x)),
            ("dy".to_string(), Tensor::f32(vec![m, n], dy)),
        ],
    );
    assert_eq!(out["dq"].as_f32().unwrap(), out["dl"].as_f32().unwrap());
}

#[test]
fn reshape_vjp_passes_the_cotangent_through() {
    let text = "graph \"r\" {
  param @p0 : f32[2,6]
  param @t : f32[3,4]
  %0 = reshape(@p0) : f32[3,4]
  %1 = loss(%0, @t) {kind=\"mse\"} : f32[1]
  output \"loss\" %1
}
";
    let g = wkvc_ir::text::parse(text).expect("parse");
    let dg = differentiate(&g, &["loss"], &["p0".into()]).expect("differentiate");
    let mut r = Rng(2);
    let (p, t) = (r.vec(12, 1.0), r.vec(12, 1.0));
    let mut store = WeightStore::default();
    store.insert("p0".to_string(), Weight::from_f32(vec![2, 6], p.clone()));
    store.insert("t".to_string(), Weight::from_f32(vec![3, 4], t.clone()));
    let m = Module {
        graph: dg,
        weights: store,
    };
    let it = Interpreter::new(&m, 1).unwrap();
    let out = run(&it, &[]);
    let got = out[&grad_output("p0")].as_f32().unwrap().to_vec();
    assert_eq!(got, wkvc_ir::grad::loss_vjp("mse", &p, &t, 0));
    assert_eq!(out[&grad_output("p0")].shape, vec![2, 6]);
}
