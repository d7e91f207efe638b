//! The stable text form of a graph: printed and parsed back to an equal graph.
//!
//! ```text
//! graph "tiny" {
//!   param @model.norm.weight : f32[64]
//!   input %0 "tokens" : i32[seq]
//!   %2 = rms_norm(%1, @model.norm.weight) {eps=1e-5} : f32[seq,64]
//!   output "logits" %9
//! }
//! ```

use crate::graph::{Attr, Attrs, Graph, Input, Node, OpKind, Operand, Output, ParamDecl, ValueId};
use crate::types::{DType, Dim, TensorType};
use std::fmt::Write;

/// A parse error with its 1-based line number.
#[derive(Debug, thiserror::Error)]
#[error("graph text line {line}: {msg}")]
pub struct ParseError {
    pub line: usize,
    pub msg: String,
}

pub fn print(g: &Graph) -> String {
    let mut s = String::new();
    let name = serde_json::to_string(&g.name).unwrap_or_else(|_| "\"\"".into());
    let _ = writeln!(s, "graph {name} {{");
    for p in &g.params {
        let _ = writeln!(s, "  param @{} : {}", p.name, p.ty);
    }
    for i in &g.inputs {
        let n = serde_json::to_string(&i.name).unwrap_or_default();
        let _ = writeln!(s, "  input {} {} : {}", i.value, n, i.ty);
    }
    for n in &g.nodes {
        s.push_str("  ");
        s.push_str(&print_node(n));
        s.push('\n');
    }
    for o in &g.outputs {
        let n = serde_json::to_string(&o.name).unwrap_or_default();
        let _ = writeln!(s, "  output {} {}", n, o.value);
    }
    s.push_str("}\n");
    s
}

/// One node as a line of text (without indentation or newline).
pub fn print_node(n: &Node) -> String {
    let mut s = format!("{} = {}(", n.out, n.op.name());
    for (i, a) in n.args.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{a}");
    }
    s.push(')');
    if !n.attrs.is_empty() {
        s.push_str(" {");
        for (i, (k, v)) in n.attrs.iter().enumerate() {
            if i > 0 {
                s.push_str(", ");
            }
            let _ = write!(s, "{k}={v}");
        }
        s.push('}');
    }
    let _ = write!(s, " : {}", n.ty);
    s
}

struct Cursor<'a> {
    s: &'a [u8],
    pos: usize,
    line: usize,
}

impl<'a> Cursor<'a> {
    fn err<T>(&self, msg: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError {
            line: self.line,
            msg: format!(
                "{} (at column {}: `{}`)",
                msg.into(),
                self.pos + 1,
                String::from_utf8_lossy(&self.s[self.pos.min(self.s.len())..])
            ),
        })
    }

    fn ws(&mut self) {
        while self.pos < self.s.len() && (self.s[self.pos] == b' ' || self.s[self.pos] == b'\t') {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.pos).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), ParseError> {
        if self.eat(c) {
            Ok(())
        } else {
            self.err(format!("expected `{}`", c as char))
        }
    }

    fn expect_word(&mut self, w: &str) -> Result<(), ParseError> {
        let got = self.word();
        if got == w {
            Ok(())
        } else {
            self.err(format!("expected `{w}`, found `{got}`"))
        }
    }

    fn take_while(&mut self, f: impl Fn(u8) -> bool) -> &'a str {
        self.ws();
        let start = self.pos;
        while self.pos < self.s.len() && f(self.s[self.pos]) {
            self.pos += 1;
        }
        // The input came from a &str and we only split at ASCII bytes.
        std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("")
    }

    fn word(&mut self) -> &'a str {
        self.take_while(|c| c.is_ascii_alphanumeric() || c == b'_')
    }

    fn end(&mut self) -> Result<(), ParseError> {
        if self.peek().is_some() {
            return self.err("unexpected trailing text");
        }
        Ok(())
    }

    fn value(&mut self) -> Result<ValueId, ParseError> {
        self.expect(b'%')?;
        let d = self.take_while(|c| c.is_ascii_digit());
        match d.parse::<u32>() {
            Ok(v) => Ok(ValueId(v)),
            Err(_) => self.err("expected a value number after `%`"),
        }
    }

    fn param_name(&mut self) -> Result<String, ParseError> {
        self.expect(b'@')?;
        let n = self.take_while(|c| {
            c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-' || c == b'/'
        });
        if n.is_empty() {
            return self.err("empty parameter name");
        }
        Ok(n.to_string())
    }

    fn string(&mut self) -> Result<String, ParseError> {
        if self.peek() != Some(b'"') {
            return self.err("expected a string");
        }
        let start = self.pos;
        self.pos += 1;
        while self.pos < self.s.len() {
            match self.s[self.pos] {
                b'\\' => self.pos += 2,
                b'"' => {
                    self.pos += 1;
                    let raw = std::str::from_utf8(&self.s[start..self.pos.min(self.s.len())])
                        .unwrap_or("");
                    return match serde_json::from_str::<String>(raw) {
                        Ok(s) => Ok(s),
                        Err(e) => self.err(format!("bad string: {e}")),
                    };
                }
                _ => self.pos += 1,
            }
        }
        self.err("unterminated string")
    }

    fn ty(&mut self) -> Result<TensorType, ParseError> {
        let d = self.word();
        let Some(dtype) = DType::from_name(d) else {
            return self.err(format!("unknown dtype `{d}`"));
        };
        self.expect(b'[')?;
        let mut shape = Vec::new();
        if !self.eat(b']') {
            loop {
                let w = self.word();
                if w.is_empty() {
                    return self.err("expected a dimension");
                }
                if w.as_bytes()[0].is_ascii_digit() {
                    match w.parse::<usize>() {
                        Ok(n) => shape.push(Dim::Const(n)),
                        Err(_) => return self.err(format!("bad dimension `{w}`")),
                    }
                } else {
                    shape.push(Dim::Sym(w.to_string()));
                }
                if self.eat(b']') {
                    break;
                }
                self.expect(b',')?;
            }
        }
        Ok(TensorType::new(dtype, shape))
    }

    fn number(&mut self) -> Result<Attr, ParseError> {
        let t =
            self.take_while(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-' || c == b'+');
        let is_float = t.contains('.') || t.contains("inf") || t.contains("NaN") || {
            // exponent without a dot, e.g. 1e-5
            t.bytes().any(|c| c == b'e' || c == b'E')
        };
        if is_float {
            match t.parse::<f64>() {
                Ok(v) => Ok(Attr::Float(v)),
                Err(_) => self.err(format!("bad float `{t}`")),
            }
        } else {
            match t.parse::<i64>() {
                Ok(v) => Ok(Attr::Int(v)),
                Err(_) => self.err(format!("bad integer `{t}`")),
            }
        }
    }

    fn attr_value(&mut self) -> Result<Attr, ParseError> {
        match self.peek() {
            Some(b'"') => Ok(Attr::Str(self.string()?)),
            Some(b'[') => {
                self.pos += 1;
                let mut v = Vec::new();
                if !self.eat(b']') {
                    loop {
                        match self.number()? {
                            Attr::Int(x) => v.push(x),
                            _ => return self.err("integer lists hold integers only"),
                        }
                        if self.eat(b']') {
                            break;
                        }
                        self.expect(b',')?;
                    }
                }
                Ok(Attr::Ints(v))
            }
            Some(b't') | Some(b'f') => {
                let w = self.word();
                match w {
                    "true" => Ok(Attr::Bool(true)),
                    "false" => Ok(Attr::Bool(false)),
                    _ => self.err(format!("bad attribute value `{w}`")),
                }
            }
            _ => self.number(),
        }
    }
}

/// Parse the text form. Structure only: run the verifier for types and SSA.
pub fn parse(text: &str) -> Result<Graph, ParseError> {
    let mut g = Graph::default();
    let mut in_graph = false;
    let mut closed = false;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut c = Cursor {
            s: line.as_bytes(),
            pos: 0,
            line: i + 1,
        };
        if closed {
            return c.err("text after the closing `}`");
        }
        if !in_graph {
            c.expect_word("graph")?;
            g.name = c.string()?;
            c.expect(b'{')?;
            c.end()?;
            in_graph = true;
            continue;
        }
        if line == "}" {
            closed = true;
            continue;
        }
        match c.peek() {
            Some(b'%') => {
                let out = c.value()?;
                c.expect(b'=')?;
                let opname = c.word();
                let Some(op) = OpKind::from_name(opname) else {
                    return c.err(format!("unknown op `{opname}`"));
                };
                c.expect(b'(')?;
                let mut args = Vec::new();
                if !c.eat(b')') {
                    loop {
                        match c.peek() {
                            Some(b'%') => args.push(Operand::Value(c.value()?)),
                            Some(b'@') => args.push(Operand::Param(c.param_name()?)),
                            _ => return c.err("expected an operand (%N or @name)"),
                        }
                        if c.eat(b')') {
                            break;
                        }
                        c.expect(b',')?;
                    }
                }
                let mut attrs = Attrs::new();
                if c.eat(b'{') && !c.eat(b'}') {
                    loop {
                        let k = c.word();
                        if k.is_empty() {
                            return c.err("expected an attribute name");
                        }
                        c.expect(b'=')?;
                        let v = c.attr_value()?;
                        if attrs.insert(k.to_string(), v).is_some() {
                            return c.err(format!("attribute `{k}` given twice"));
                        }
                        if c.eat(b'}') {
                            break;
                        }
                        c.expect(b',')?;
                    }
                }
                c.expect(b':')?;
                let ty = c.ty()?;
                c.end()?;
                g.nodes.push(Node {
                    out,
                    op,
                    args,
                    attrs,
                    ty,
                });
            }
            _ => {
                let kw = c.word();
                match kw {
                    "param" => {
                        let name = c.param_name()?;
                        c.expect(b':')?;
                        let ty = c.ty()?;
                        c.end()?;
                        g.params.push(ParamDecl { name, ty });
                    }
                    "input" => {
                        let value = c.value()?;
                        let name = c.string()?;
                        c.expect(b':')?;
                        let ty = c.ty()?;
                        c.end()?;
                        g.inputs.push(Input { value, name, ty });
                    }
                    "output" => {
                        let name = c.string()?;
                        let value = c.value()?;
                        c.end()?;
                        g.outputs.push(Output { name, value });
                    }
                    _ => return c.err(format!("unknown statement `{kw}`")),
                }
            }
        }
    }
    if !in_graph {
        return Err(ParseError {
            line: 1,
            msg: "no `graph \"name\" {` header".into(),
        });
    }
    if !closed {
        return Err(ParseError {
            line: text.lines().count(),
            msg: "missing closing `}`".into(),
        });
    }
    // Value ids index dense tables (verifier, interpreter, lowering): ids far beyond the
    // number of values are a corrupt or hostile text, not a graph (fuzzing found
    // `%1111111111` making the verifier allocate 71 GB).
    let defined = g.inputs.len() + g.nodes.len();
    let bound = g.value_bound() as usize;
    if bound > MAX_ID_SPREAD * defined + 1024 {
        return Err(ParseError {
            line: text.lines().count(),
            msg: format!(
                "value ids run up to %{} for {defined} defined values: numbered too sparsely",
                bound - 1
            ),
        });
    }
    Ok(g)
}

/// How sparse value numbering may be: ids below this many times the defined values (plus a
/// margin). The passes leave gaps where they replace nodes, far fewer than this.
const MAX_ID_SPREAD: usize = 16;
