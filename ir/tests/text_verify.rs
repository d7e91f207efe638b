//! Text form round trips (randomized graphs and a full model graph) and the verifier's
//! rejections.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wkvc_ir::graph::{Attr, Attrs, Builder, Graph, OpKind, Operand, ValueId, attrs};
use wkvc_ir::import::build_graph;
use wkvc_ir::text::{parse, print};
use wkvc_ir::verify::verify;
use wkvc_ir::{DType, Dim, ModelConfig, RopeScaling, TensorType};

fn seq(n: usize) -> TensorType {
    TensorType::f32(vec![Dim::sym("seq"), Dim::Const(n)])
}

fn random_float(r: &mut StdRng) -> f64 {
    match r.random_range(0..6) {
        0 => 1e-5,
        1 => r.random::<f64>() * 1e6,
        2 => -r.random::<f64>() * 1e-12,
        3 => (r.random::<f64>() - 0.5) * 3.0,
        4 => 100000.0,
        _ => f64::from_bits(r.random::<u64>() & 0x3FEF_FFFF_FFFF_FFFF),
    }
}

fn random_extra_attrs(r: &mut StdRng, a: &mut Attrs) {
    // extra attributes of every kind exercise the printer and parser
    if r.random_bool(0.3) {
        a.insert(
            "note".into(),
            Attr::Str(
                [
                    "plain",
                    "with \"quotes\"",
                    "tab\tand\nnewline",
                    "ünïcode ✓",
                    "",
                ][r.random_range(0..5)]
                .into(),
            ),
        );
    }
    if r.random_bool(0.3) {
        a.insert(
            "xs".into(),
            Attr::Ints(
                (0..r.random_range(0..4))
                    .map(|_| r.random_range(-5..100))
                    .collect(),
            ),
        );
    }
    if r.random_bool(0.3) {
        a.insert("flag".into(), Attr::Bool(r.random()));
    }
    if r.random_bool(0.3) {
        a.insert("f".into(), Attr::Float(random_float(r)));
    }
}

/// A random valid graph of f32[seq, n] values.
fn random_graph(seed: u64) -> Graph {
    let mut r = StdRng::seed_from_u64(seed);
    let mut b = Builder::new(&format!("random-{seed}"));
    let hd = 2 * r.random_range(1..5);
    let heads = r.random_range(1..4);
    let width = heads * hd;
    let ids = b.input("tokens", TensorType::new(DType::I32, vec![Dim::sym("seq")]));
    let pos = b.input(
        "positions",
        TensorType::new(DType::I32, vec![Dim::sym("seq")]),
    );
    let emb = b.param(
        "embed.weight",
        TensorType::f32(vec![Dim::Const(11), Dim::Const(width)]),
    );
    let x0 = b.push(
        OpKind::Embedding,
        vec![Operand::Value(ids), emb],
        attrs([]),
        seq(width),
    );
    let mut vals: Vec<(ValueId, usize)> = vec![(x0, width)];
    let mut layer = 0;
    for i in 0..r.random_range(3..25) {
        let (x, n) = vals[r.random_range(0..vals.len())];
        let mut at = Attrs::new();
        let (op, args, n_out) = match r.random_range(0..9) {
            0 => {
                at.insert("eps".into(), Attr::Float(random_float(&mut r).abs()));
                let w = b.param(
                    &format!("norm{i}.weight"),
                    TensorType::f32(vec![Dim::Const(n)]),
                );
                (OpKind::RmsNorm, vec![Operand::Value(x), w], n)
            }
            1 => {
                let out = r.random_range(1..9);
                let w = b.param(
                    &format!("lin{i}.weight"),
                    TensorType::f32(vec![Dim::Const(out), Dim::Const(n)]),
                );
                let mut args = vec![Operand::Value(x), w];
                if r.random_bool(0.5) {
                    args.push(b.param(
                        &format!("lin{i}.bias"),
                        TensorType::f32(vec![Dim::Const(out)]),
                    ));
                }
                (OpKind::Linear, args, out)
            }
            2 if n == width => {
                at = attrs([
                    ("heads", Attr::Int(heads as i64)),
                    ("head_dim", Attr::Int(hd as i64)),
                    ("theta", Attr::Float(random_float(&mut r).abs() + 1.0)),
                ]);
                if r.random_bool(0.5) {
                    at.insert("scaling".into(), Attr::Str("linear".into()));
                    at.insert("factor".into(), Attr::Float(2.0));
                }
                (
                    OpKind::Rope,
                    vec![Operand::Value(x), Operand::Value(pos)],
                    n,
                )
            }
            3 if n == width => {
                at = attrs([
                    ("heads", Attr::Int(heads as i64)),
                    ("kv_heads", Attr::Int(heads as i64)),
                    ("head_dim", Attr::Int(hd as i64)),
                    ("layer", Attr::Int(layer)),
                    ("causal", Attr::Bool(r.random())),
                ]);
                layer += 1;
                (
                    OpKind::Attention,
                    vec![Operand::Value(x), Operand::Value(x), Operand::Value(x)],
                    n,
                )
            }
            4 => (OpKind::Silu, vec![Operand::Value(x)], n),
            5 => (OpKind::Softmax, vec![Operand::Value(x)], n),
            6 | 7 => {
                let same: Vec<ValueId> = vals.iter().filter(|v| v.1 == n).map(|v| v.0).collect();
                let y = same[r.random_range(0..same.len())];
                (
                    if r.random_bool(0.5) {
                        OpKind::Add
                    } else {
                        OpKind::Mul
                    },
                    vec![Operand::Value(x), Operand::Value(y)],
                    n,
                )
            }
            _ => {
                // reshape to [seq, 1, n], transpose to [1, seq, n], reshape back
                let t3 = TensorType::f32(vec![Dim::sym("seq"), Dim::Const(1), Dim::Const(n)]);
                let a = b.push(OpKind::Reshape, vec![Operand::Value(x)], Attrs::new(), t3);
                let tt = TensorType::f32(vec![Dim::Const(1), Dim::sym("seq"), Dim::Const(n)]);
                let t = b.push(
                    OpKind::Transpose,
                    vec![Operand::Value(a)],
                    attrs([("perm", Attr::Ints(vec![1, 0, 2]))]),
                    tt,
                );
                (OpKind::Reshape, vec![Operand::Value(t)], n)
            }
        };
        random_extra_attrs(&mut r, &mut at);
        let y = b.push(op, args, at, seq(n_out));
        vals.push((y, n_out));
    }
    let (last, _) = vals[vals.len() - 1];
    b.output("out", last);
    if r.random_bool(0.5) {
        b.output("first", x0);
    }
    b.finish()
}

#[test]
fn random_graphs_round_trip_and_verify() {
    for seed in 0..300 {
        let g = random_graph(seed);
        verify(&g)
            .unwrap_or_else(|e| panic!("seed {seed}: generated graph invalid: {e}\n{}", print(&g)));
        let text = print(&g);
        let back = parse(&text).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{text}"));
        assert_eq!(back, g, "seed {seed}:\n{text}");
        assert_eq!(print(&back), text);
    }
}

fn smollm_like() -> ModelConfig {
    ModelConfig {
        arch: "llama".into(),
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_layers: 30,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 100000.0,
        rope_scaling: RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        },
        rope_freq_factors: false,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        qkv_bias: true,
    }
}

#[test]
fn whole_model_graph_round_trips() {
    let g = build_graph(&smollm_like(), "smollm2-like");
    verify(&g).expect("verifies");
    // per layer: 2 norms, 7 linears, 2 ropes, attention, 2 adds, silu, mul
    assert_eq!(g.nodes.len(), 1 + 30 * 16 + 2);
    let text = print(&g);
    assert!(
        text.contains(
            "%3 = rms_norm(%2, @model.layers.0.input_layernorm.weight) {eps=1e-5} : f32[seq,576]"
        ),
        "{}",
        &text[..600]
    );
    let back = parse(&text).expect("parse");
    assert_eq!(back, g);
}

fn tiny() -> Graph {
    parse(
        "graph \"t\" {\n  param @w : f32[4,3]\n  input %0 \"x\" : f32[seq,3]\n  %1 = linear(%0, @w) : f32[seq,4]\n  %2 = silu(%1) : f32[seq,4]\n  output \"y\" %2\n}\n",
    )
    .expect("parse")
}

#[test]
fn verifier_rejects_broken_graphs() {
    verify(&tiny()).expect("the base graph is valid");
    type Mutation = Box<dyn Fn(&mut Graph)>;
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "declared type f32[seq,5] but the op gives f32[seq,4]",
            Box::new(|g| g.nodes[0].ty = seq(5)),
        ),
        (
            "used before it is defined",
            Box::new(|g| g.nodes[0].args[0] = Operand::Value(ValueId(2))),
        ),
        (
            "param @nope is not declared",
            Box::new(|g| g.nodes[0].args[1] = Operand::Param("nope".into())),
        ),
        ("defined twice", Box::new(|g| g.nodes[1].out = ValueId(1))),
        (
            "x last dim vs weight columns",
            Box::new(|g| g.params[0].ty = TensorType::f32(vec![Dim::Const(4), Dim::Const(2)])),
        ),
        (
            "names undefined %9",
            Box::new(|g| g.outputs[0].value = ValueId(9)),
        ),
        (
            "takes 1 operands",
            Box::new(|g| g.nodes[1].args.push(Operand::Value(ValueId(0)))),
        ),
        (
            "must be f32",
            Box::new(|g| g.inputs[0].ty.dtype = DType::I32),
        ),
    ];
    for (want, mutate) in cases {
        let mut g = tiny();
        mutate(&mut g);
        let e = verify(&g).expect_err(want).to_string();
        assert!(e.contains(want), "expected `{want}` in `{e}`");
    }
}

#[test]
fn verifier_checks_params_against_the_store() {
    let g = tiny();
    let st = |n: &str| (n == "w").then(|| TensorType::f32(vec![Dim::Const(4), Dim::Const(2)]));
    let e = wkvc_ir::verify::verify_with(&g, Some(&st))
        .expect_err("shape")
        .to_string();
    assert!(
        e.contains("param @w is declared f32[4,3] but the weight store holds f32[4,2]"),
        "{e}"
    );
    let none = |_: &str| None;
    let e = wkvc_ir::verify::verify_with(&g, Some(&none))
        .expect_err("missing")
        .to_string();
    assert!(e.contains("param @w is not in the weight store"), "{e}");
}

#[test]
fn parse_errors_name_the_line() {
    let cases = [
        (
            "graph \"t\" {\n  %1 = frobnicate(%0) : f32[4]\n}\n",
            2,
            "unknown op `frobnicate`",
        ),
        (
            "graph \"t\" {\n  input %0 \"x\" : f32[4]\n  %1 = silu(%0) : q7[4]\n}\n",
            3,
            "unknown dtype `q7`",
        ),
        (
            "graph \"t\" {\n  input %0 \"x\" : f32[4]\n  %1 = silu(%0) {a=1, a=2} : f32[4]\n}\n",
            3,
            "given twice",
        ),
        (
            "graph \"t\" {\n  input %0 \"x\" : f32[4]\n",
            2,
            "missing closing",
        ),
        ("nonsense\n", 1, "expected `graph`"),
        ("graph \"t\" {\n  output \"y\" %\n}\n", 2, "value number"),
        (
            "graph \"t\" {\n  %1 = silu(%0) : f32[4] extra\n}\n",
            2,
            "trailing",
        ),
        ("graph \"t\" {\n}\nmore\n", 3, "after the closing"),
    ];
    for (text, line, want) in cases {
        let e = parse(text).expect_err(want);
        assert_eq!(e.line, line, "{e}");
        assert!(e.to_string().contains(want), "expected `{want}` in `{e}`");
    }
}

#[test]
fn parse_never_panics_on_mangled_text() {
    let text = print(&random_graph(3));
    let bytes = text.as_bytes();
    for cut in 0..bytes.len() {
        let _ = parse(&String::from_utf8_lossy(&bytes[..cut]));
    }
    let mut r = StdRng::seed_from_u64(9);
    for _ in 0..2000 {
        let mut b = bytes.to_vec();
        let i = r.random_range(0..b.len());
        let alphabet = b" %@{}[](),=:\"\\x0-9.e";
        b[i] = alphabet[r.random_range(0..alphabet.len())];
        let _ = parse(&String::from_utf8_lossy(&b)).map(|g| verify(&g));
    }
}

/// Fuzzing (target `ir_text`) found a value numbered `%1111111111` making the verifier
/// allocate a table of 71 GB: the parser refuses ids far beyond the values defined.
#[test]
fn sparse_value_ids_are_rejected_not_allocated() {
    let text = "graph \"g\" {\n  input %0 \"x\" : f32[4]\n  %1111111111 = add(%0, %0) : f32[4]\n  output \"y\" %1111111111\n}\n";
    let e = parse(text).expect_err("rejected");
    assert!(e.to_string().contains("numbered too sparsely"), "{e}");
    // dense numbering with gaps (as the passes leave) parses and verifies
    let text = "graph \"g\" {\n  input %0 \"x\" : f32[4]\n  %40 = add(%0, %0) : f32[4]\n  output \"y\" %40\n}\n";
    let g = parse(text).expect("parses");
    verify(&g).expect("verifies");
}
