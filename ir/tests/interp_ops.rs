//! Every op of the interpreter on small hand-computed cases.

use wkvc_ir::graph::{Attr, Attrs, Builder, OpKind, Operand, attrs};
use wkvc_ir::{
    DType, Dim, Error, Interpreter, KvCache, Module, Tensor, TensorType, Weight, WeightStore,
};

fn c(dims: &[usize]) -> Vec<Dim> {
    dims.iter().map(|&d| Dim::Const(d)).collect()
}

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "lengths {a:?} vs {b:?}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol,
            "element {i}: {x} vs {y} (all: {a:?} vs {b:?})"
        );
    }
}

/// One op over f32 inputs named x0, x1, ... of fixed shapes, with params.
fn run_op(
    op: OpKind,
    inputs: &[(&[usize], Vec<f32>)],
    params: &[(&str, &[usize], Vec<f32>)],
    at: Attrs,
    out: &[usize],
) -> Result<Vec<f32>, Error> {
    let mut b = Builder::new("t");
    let mut store = WeightStore::new();
    let mut args = Vec::new();
    let mut feeds = Vec::new();
    let names: Vec<String> = (0..inputs.len()).map(|i| format!("x{i}")).collect();
    for (i, (shape, data)) in inputs.iter().enumerate() {
        let v = b.input(&names[i], TensorType::f32(c(shape)));
        args.push(Operand::Value(v));
        feeds.push((names[i].as_str(), Tensor::f32(shape.to_vec(), data.clone())));
    }
    for (name, shape, data) in params {
        args.push(b.param(name, TensorType::f32(c(shape))));
        store.insert(*name, Weight::from_f32(shape.to_vec(), data.clone()));
    }
    let y = b.push(op, args, at, TensorType::f32(c(out)));
    b.output("y", y);
    let m = Module {
        graph: b.finish(),
        weights: store,
    };
    m.verify()?;
    let it = Interpreter::new(&m, 2)?;
    let mut cache = KvCache::new(64);
    let mut r = it.run(&feeds, &mut cache)?;
    Ok(r.remove("y")
        .and_then(Tensor::into_f32)
        .expect("f32 output"))
}

#[test]
fn embedding_gathers_rows_and_rejects_bad_ids() {
    let mut b = Builder::new("e");
    let ids = b.input("ids", TensorType::new(DType::I32, vec![Dim::sym("seq")]));
    let t = b.param("table", TensorType::f32(c(&[3, 2])));
    let y = b.push(
        OpKind::Embedding,
        vec![Operand::Value(ids), t],
        attrs([]),
        TensorType::f32(vec![Dim::sym("seq"), Dim::Const(2)]),
    );
    b.output("y", y);
    let mut store = WeightStore::new();
    store.insert(
        "table",
        Weight::from_f32(vec![3, 2], vec![1., 2., 3., 4., 5., 6.]),
    );
    let m = Module {
        graph: b.finish(),
        weights: store,
    };
    m.verify().expect("verify");
    let it = Interpreter::new(&m, 1).expect("interp");
    let mut kv = KvCache::new(8);
    let r = it
        .run(&[("ids", Tensor::i32(vec![2], vec![2, 0]))], &mut kv)
        .expect("run");
    assert_eq!(r["y"].as_f32().expect("f32"), &[5., 6., 1., 2.]);
    assert_eq!(r["y"].shape, vec![2, 2]);
    let e = it
        .run(&[("ids", Tensor::i32(vec![1], vec![3]))], &mut kv)
        .expect_err("bad id");
    assert!(
        matches!(e, Error::TokenOutOfRange { id: 3, vocab: 3 }),
        "{e}"
    );
    let e = it
        .run(&[("ids", Tensor::i32(vec![1], vec![-1]))], &mut kv)
        .expect_err("negative id");
    assert!(matches!(e, Error::TokenOutOfRange { id: -1, .. }), "{e}");
}

#[test]
fn rms_norm_by_hand() {
    // mean square of [3, 4] = 12.5; 1/sqrt(12.5) = 0.28284271
    let y = run_op(
        OpKind::RmsNorm,
        &[(&[1, 2], vec![3., 4.])],
        &[("w", &[2], vec![1., 2.])],
        attrs([("eps", Attr::Float(0.0))]),
        &[1, 2],
    )
    .expect("run");
    close(&y, &[0.848_528_1, 2.262_741_7], 1e-6);
    // eps enters under the root: [1,1] with eps 1 -> 1/sqrt(2)
    let y = run_op(
        OpKind::RmsNorm,
        &[(&[1, 2], vec![1., 1.])],
        &[("w", &[2], vec![1., 1.])],
        attrs([("eps", Attr::Float(1.0))]),
        &[1, 2],
    )
    .expect("run");
    close(&y, &[std::f32::consts::FRAC_1_SQRT_2; 2], 1e-6);
}

#[test]
fn linear_by_hand_with_bias() {
    let y = run_op(
        OpKind::Linear,
        &[(&[2, 2], vec![1., 2., 3., 4.])],
        &[
            ("w", &[3, 2], vec![1., 0., 0., 1., 1., 1.]),
            ("b", &[3], vec![0.5, 0., -1.]),
        ],
        attrs([]),
        &[2, 3],
    )
    .expect("run");
    assert_eq!(y, vec![1.5, 2., 2., 3.5, 4., 6.]);
}

#[test]
fn linear_gemm_path_matches_f64_reference() {
    // m > 4 goes through the gemm crate; compare with an f64 triple loop. f32 accumulation of
    // k products of magnitude <= 1 errs by at most ~k * 2^-24 * sum|x w|; 1e-5 covers k = 100.
    let mut seed = 7u64;
    let mut rnd = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    for &(m, n, k) in &[
        (5, 3, 7),
        (17, 33, 100),
        (64, 65, 31),
        (1, 9, 13),
        (3, 1, 2),
    ] {
        let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
        let y = run_op(
            OpKind::Linear,
            &[(&[m, k], x.clone())],
            &[("w", &[n, k], w.clone())],
            attrs([]),
            &[m, n],
        )
        .expect("run");
        for i in 0..m {
            for j in 0..n {
                let r: f64 = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
                assert!(
                    (y[i * n + j] as f64 - r).abs() < 1e-5 * k as f64,
                    "({m},{n},{k}) [{i},{j}]"
                );
            }
        }
    }
}

#[test]
fn rope_by_hand() {
    // one head of dim 4: pairs (0,2) with inv_freq 1 and (1,3) with inv_freq 10000^-0.5 = 0.01
    let mut b = Builder::new("r");
    let x = b.input("x", TensorType::f32(vec![Dim::sym("seq"), Dim::Const(4)]));
    let p = b.input("p", TensorType::new(DType::I32, vec![Dim::sym("seq")]));
    let at = attrs([
        ("heads", Attr::Int(1)),
        ("head_dim", Attr::Int(4)),
        ("theta", Attr::Float(10000.0)),
    ]);
    let y = b.push(
        OpKind::Rope,
        vec![Operand::Value(x), Operand::Value(p)],
        at,
        TensorType::f32(vec![Dim::sym("seq"), Dim::Const(4)]),
    );
    b.output("y", y);
    let m = Module {
        graph: b.finish(),
        weights: WeightStore::new(),
    };
    m.verify().expect("verify");
    let it = Interpreter::new(&m, 1).expect("interp");
    let mut kv = KvCache::new(8);
    let r = it
        .run(
            &[
                (
                    "x",
                    Tensor::f32(vec![2, 4], vec![1., 2., 3., 4., 1., 2., 3., 4.]),
                ),
                ("p", Tensor::i32(vec![2], vec![0, 1])),
            ],
            &mut kv,
        )
        .expect("run");
    let y = r["y"].as_f32().expect("f32");
    close(&y[..4], &[1., 2., 3., 4.], 0.0);
    let (c1, s1) = (1f32.cos(), 1f32.sin());
    let (c2, s2) = (0.01f32.cos(), 0.01f32.sin());
    close(
        &y[4..],
        &[
            c1 - 3. * s1,
            2. * c2 - 4. * s2,
            3. * c1 + s1,
            4. * c2 + 2. * s2,
        ],
        1e-6,
    );
}

#[test]
fn rope_linear_scaling_divides_positions() {
    // linear scaling by 2 at position 2 equals no scaling at position 1
    let base = attrs([
        ("heads", Attr::Int(1)),
        ("head_dim", Attr::Int(4)),
        ("theta", Attr::Float(10000.0)),
    ]);
    let mut scaled = base.clone();
    scaled.insert("scaling".into(), Attr::Str("linear".into()));
    scaled.insert("factor".into(), Attr::Float(2.0));
    let run = |at: Attrs, pos: i32| {
        let mut b = Builder::new("r");
        let x = b.input("x", TensorType::f32(c(&[1, 4])));
        let p = b.input("p", TensorType::new(DType::I32, c(&[1])));
        let y = b.push(
            OpKind::Rope,
            vec![Operand::Value(x), Operand::Value(p)],
            at,
            TensorType::f32(c(&[1, 4])),
        );
        b.output("y", y);
        let m = Module {
            graph: b.finish(),
            weights: WeightStore::new(),
        };
        m.verify().expect("verify");
        let it = Interpreter::new(&m, 1).expect("interp");
        let r = it
            .run(
                &[
                    ("x", Tensor::f32(vec![1, 4], vec![1., 2., 3., 4.])),
                    ("p", Tensor::i32(vec![1], vec![pos])),
                ],
                &mut KvCache::new(4),
            )
            .expect("run");
        r["y"].as_f32().expect("f32").to_vec()
    };
    close(&run(scaled, 2), &run(base, 1), 1e-6);
}

fn attention_module(heads: i64, kv_heads: i64, hd: usize, causal: bool) -> Module {
    let mut b = Builder::new("a");
    let s = Dim::sym("seq");
    let q = b.input(
        "q",
        TensorType::f32(vec![s.clone(), Dim::Const(heads as usize * hd)]),
    );
    let k = b.input(
        "k",
        TensorType::f32(vec![s.clone(), Dim::Const(kv_heads as usize * hd)]),
    );
    let v = b.input(
        "v",
        TensorType::f32(vec![s.clone(), Dim::Const(kv_heads as usize * hd)]),
    );
    let at = attrs([
        ("heads", Attr::Int(heads)),
        ("kv_heads", Attr::Int(kv_heads)),
        ("head_dim", Attr::Int(hd as i64)),
        ("layer", Attr::Int(0)),
        ("causal", Attr::Bool(causal)),
    ]);
    let y = b.push(
        OpKind::Attention,
        vec![Operand::Value(q), Operand::Value(k), Operand::Value(v)],
        at,
        TensorType::f32(vec![s, Dim::Const(heads as usize * hd)]),
    );
    b.output("y", y);
    let m = Module {
        graph: b.finish(),
        weights: WeightStore::new(),
    };
    m.verify().expect("verify");
    m
}

fn att(it: &Interpreter, kv: &mut KvCache, s: usize, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
    let (qw, kw) = (q.len() / s, k.len() / s);
    let r = it
        .run(
            &[
                ("q", Tensor::f32(vec![s, qw], q.to_vec())),
                ("k", Tensor::f32(vec![s, kw], k.to_vec())),
                ("v", Tensor::f32(vec![s, kw], v.to_vec())),
            ],
            kv,
        )
        .expect("run");
    r["y"].as_f32().expect("f32").to_vec()
}

#[test]
fn attention_by_hand_causal() {
    // head dim 2, scale 1/sqrt(2). Row 0 sees only itself -> v0.
    // Row 1: scores (q1.k0, q1.k1)/sqrt2 = (0, 2/sqrt2) -> p = softmax(0, 1.41421356)
    let m = attention_module(1, 1, 2, true);
    let it = Interpreter::new(&m, 1).expect("interp");
    let q = [1., 0., 1., 1.];
    let k = [0., 0., 1., 1.];
    let v = [10., 20., 30., 40.];
    let y = att(&it, &mut KvCache::new(8), 2, &q, &k, &v);
    let e = (2f32 / 2f32.sqrt()).exp();
    let (p0, p1) = (1. / (1. + e), e / (1. + e));
    close(
        &y,
        &[10., 20., p0 * 10. + p1 * 30., p0 * 20. + p1 * 40.],
        1e-5,
    );
    // non-causal: row 0 also sees k1: scores (0, 1/sqrt2)
    let m = attention_module(1, 1, 2, false);
    let it = Interpreter::new(&m, 1).expect("interp");
    let y = att(&it, &mut KvCache::new(8), 2, &q, &k, &v);
    let e0 = (1f32 / 2f32.sqrt()).exp();
    let (a0, a1) = (1. / (1. + e0), e0 / (1. + e0));
    close(&y[..2], &[a0 * 10. + a1 * 30., a0 * 20. + a1 * 40.], 1e-5);
}

#[test]
fn attention_gqa_shares_kv_heads_and_incremental_equals_full() {
    // 4 query heads over 2 kv heads: heads 0,1 read kv head 0; heads 2,3 read kv head 1.
    let (h, kvh, hd, s) = (4i64, 2i64, 4usize, 5usize);
    let m = attention_module(h, kvh, hd, true);
    let it = Interpreter::new(&m, 2).expect("interp");
    let mut x = 1u32;
    let mut r = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(1664525).wrapping_add(1013904223);
                (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    };
    let (qw, kw) = (h as usize * hd, kvh as usize * hd);
    let (q, k, v) = (r(s * qw), r(s * kw), r(s * kw));
    let full = att(&it, &mut KvCache::new(16), s, &q, &k, &v);
    // head 1 equals head 0 when their queries are equal: check grouping via a query copy
    let mut q2 = q.clone();
    for t in 0..s {
        let (a, b) = q2.split_at_mut(t * qw + hd);
        b[..hd].copy_from_slice(&a[t * qw..t * qw + hd]);
    }
    let y2 = att(&it, &mut KvCache::new(16), s, &q2, &k, &v);
    for t in 0..s {
        close(
            &y2[t * qw..t * qw + hd],
            &y2[t * qw + hd..t * qw + 2 * hd],
            0.0,
        );
    }
    // incremental: 2 tokens, then 1, then 2
    let mut kv = KvCache::new(16);
    let mut inc = Vec::new();
    for (a, b) in [(0, 2), (2, 3), (3, 5)] {
        inc.extend(att(
            &it,
            &mut kv,
            b - a,
            &q[a * qw..b * qw],
            &k[a * kw..b * kw],
            &v[a * kw..b * kw],
        ));
    }
    assert_eq!(kv.len(), 5);
    close(&inc, &full, 1e-6);
}

#[test]
fn context_overflow_is_an_error_and_leaves_the_cache() {
    let m = attention_module(1, 1, 2, true);
    let it = Interpreter::new(&m, 1).expect("interp");
    let mut kv = KvCache::new(3);
    att(&it, &mut kv, 2, &[1.; 4], &[1.; 4], &[1.; 4]);
    let e = it
        .run(
            &[
                ("q", Tensor::f32(vec![2, 2], vec![0.; 4])),
                ("k", Tensor::f32(vec![2, 2], vec![0.; 4])),
                ("v", Tensor::f32(vec![2, 2], vec![0.; 4])),
            ],
            &mut kv,
        )
        .expect_err("overflow");
    assert!(
        matches!(
            e,
            Error::ContextOverflow {
                have: 2,
                adding: 2,
                max: 3
            }
        ),
        "{e}"
    );
    assert_eq!(kv.len(), 2);
    assert_eq!(kv.bytes(), 2 * 2 * 2 * 4);
}

#[test]
fn elementwise_and_softmax_by_hand() {
    let y = run_op(
        OpKind::Silu,
        &[(&[1, 3], vec![0., 1., -1.])],
        &[],
        attrs([]),
        &[1, 3],
    )
    .expect("silu");
    close(&y, &[0., 0.731_058_6, -0.268_941_43], 1e-6);
    let y = run_op(
        OpKind::Softmax,
        &[(&[1, 3], vec![1., 2., 3.])],
        &[],
        attrs([]),
        &[1, 3],
    )
    .expect("softmax");
    close(&y, &[0.090_030_57, 0.244_728_47, 0.665_240_96], 1e-6);
    // large values do not overflow
    let y = run_op(
        OpKind::Softmax,
        &[(&[1, 2], vec![1000., 1000.])],
        &[],
        attrs([]),
        &[1, 2],
    )
    .expect("softmax");
    close(&y, &[0.5, 0.5], 1e-6);
    let y = run_op(
        OpKind::Mul,
        &[(&[2], vec![2., 3.]), (&[2], vec![4., -1.])],
        &[],
        attrs([]),
        &[2],
    )
    .expect("mul");
    assert_eq!(y, vec![8., -3.]);
    let y = run_op(
        OpKind::Add,
        &[(&[2], vec![2., 3.]), (&[2], vec![4., -1.])],
        &[],
        attrs([]),
        &[2],
    )
    .expect("add");
    assert_eq!(y, vec![6., 2.]);
}

#[test]
fn reshape_transpose_concat_by_hand() {
    let x = vec![1., 2., 3., 4., 5., 6.];
    let y = run_op(
        OpKind::Reshape,
        &[(&[2, 3], x.clone())],
        &[],
        attrs([]),
        &[3, 2],
    )
    .expect("reshape");
    assert_eq!(y, x);
    let y = run_op(
        OpKind::Transpose,
        &[(&[2, 3], x.clone())],
        &[],
        attrs([("perm", Attr::Ints(vec![1, 0]))]),
        &[3, 2],
    )
    .expect("transpose");
    assert_eq!(y, vec![1., 4., 2., 5., 3., 6.]);
    let y = run_op(
        OpKind::Transpose,
        &[(&[1, 2, 3], x.clone())],
        &[],
        attrs([("perm", Attr::Ints(vec![2, 0, 1]))]),
        &[3, 1, 2],
    )
    .expect("transpose3");
    assert_eq!(y, vec![1., 4., 2., 5., 3., 6.]);
    let y = run_op(
        OpKind::Concat,
        &[(&[2, 1], vec![9., 8.]), (&[2, 3], x.clone())],
        &[],
        attrs([("axis", Attr::Int(1))]),
        &[2, 4],
    )
    .expect("concat");
    assert_eq!(y, vec![9., 1., 2., 3., 8., 4., 5., 6.]);
    let y = run_op(
        OpKind::Concat,
        &[(&[2, 3], x.clone()), (&[1, 3], vec![7., 8., 9.])],
        &[],
        attrs([("axis", Attr::Int(0))]),
        &[3, 3],
    )
    .expect("concat0");
    assert_eq!(y, vec![1., 2., 3., 4., 5., 6., 7., 8., 9.]);
}

#[test]
fn wrong_input_shape_is_an_error() {
    let m = attention_module(1, 1, 2, true);
    let it = Interpreter::new(&m, 1).expect("interp");
    let e = it
        .run(
            &[
                ("q", Tensor::f32(vec![2, 3], vec![0.; 6])),
                ("k", Tensor::f32(vec![2, 2], vec![0.; 4])),
                ("v", Tensor::f32(vec![2, 2], vec![0.; 4])),
            ],
            &mut KvCache::new(4),
        )
        .expect_err("bad shape");
    assert!(e.to_string().contains("input \"q\""), "{e}");
    let e = it
        .run(&[], &mut KvCache::new(4))
        .expect_err("missing input");
    assert!(e.to_string().contains("was not given"), "{e}");
}

#[test]
fn linear_rows_do_not_depend_on_the_batch() {
    // Decoding one token must give exactly the numbers of the same row in a batch.
    let (m, n, k) = (13usize, 70usize, 300usize);
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 104729) % 997) as f32 / 498.5 - 1.0)
        .collect();
    let mut full = vec![0f32; m * n];
    wkvc_ir::interp::linear(&x, &w, &mut full, m, n, k, 2);
    for r in 0..m {
        let mut one = vec![0f32; n];
        wkvc_ir::interp::linear(&x[r * k..(r + 1) * k], &w, &mut one, 1, n, k, 2);
        assert_eq!(one, full[r * n..(r + 1) * n].to_vec(), "row {r}");
    }
}
