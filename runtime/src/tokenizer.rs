//! Tokenizer (Hugging Face `tokenizers`) and chat template (minijinja).

use crate::RuntimeError;
use std::str::FromStr;
use wkvc_ir::import::TokenizerSpec;

/// A loaded tokenizer plus what generation needs (special ids, chat template).
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub spec: TokenizerSpec,
}

/// The same tokenizer with its BPE model's word cache disabled.
///
/// The `tokenizers` crate (0.23) keeps BPE word caches in a thread-local map keyed by a
/// per-model id and never removes a dropped model's entries: every tokenizer that is loaded,
/// used and dropped leaves its cache (up to 10 000 words) in each thread that encoded with
/// it. A process that loads plans repeatedly (a server reloading, a library user opening
/// sessions, the fuzzer's persistent loop, which found it) grows without bound
/// (`tests/tests/tokenizer_memory.rs` measures both). Without the cache nothing is left
/// behind; the cost is the merge loop on every word: the demo tokenizer encodes 200 kB of
/// WikiText in ~0.2 s against ~0.15 s with a cold cache, small beside a forward pass.
fn without_bpe_cache(tok: tokenizers::Tokenizer) -> Result<tokenizers::Tokenizer, String> {
    use tokenizers::models::ModelWrapper;
    use tokenizers::models::bpe::{BPE, Vocab};
    let ModelWrapper::BPE(bpe) = tok.get_model() else {
        return Ok(tok);
    };
    // The model's own serialization is canonical: vocab as a map, merges as pairs.
    #[derive(serde::Deserialize)]
    struct Canonical {
        vocab: std::collections::HashMap<String, u32>,
        merges: Vec<(String, String)>,
    }
    let value = serde_json::to_value(bpe).map_err(|e| format!("re-reading its BPE model: {e}"))?;
    let c: Canonical =
        serde_json::from_value(value).map_err(|e| format!("re-reading its BPE model: {e}"))?;
    let vocab: Vocab = c.vocab.into_iter().collect();
    let mut b = BPE::builder()
        .vocab_and_merges(vocab, c.merges)
        .cache_capacity(0)
        .fuse_unk(bpe.fuse_unk)
        .byte_fallback(bpe.byte_fallback)
        .ignore_merges(bpe.ignore_merges);
    if let Some(d) = bpe.dropout {
        b = b.dropout(d);
    }
    if let Some(u) = &bpe.unk_token {
        b = b.unk_token(u.clone());
    }
    if let Some(p) = &bpe.continuing_subword_prefix {
        b = b.continuing_subword_prefix(p.clone());
    }
    if let Some(s) = &bpe.end_of_word_suffix {
        b = b.end_of_word_suffix(s.clone());
    }
    let bpe = b
        .build()
        .map_err(|e| format!("rebuilding its BPE model: {e}"))?;
    let mut tok = tok;
    tok.with_model(bpe);
    Ok(tok)
}

/// The model's token ids must be nearly dense: the `tokenizers` crate walks every id from 0 to
/// the largest when it writes a vocabulary out (and lists the holes), so one id of 133
/// million in a vocabulary of 254 cost a second and 500 MB (found by fuzzing, target `hf`).
/// Real vocabularies number their tokens from 0 with at most a few holes.
fn check_dense_ids(tok: &tokenizers::Tokenizer) -> Result<(), String> {
    use tokenizers::Model;
    let vocab = tok.get_model().get_vocab();
    let n = vocab.len();
    let limit = 2 * n + 65_536;
    match vocab.iter().max_by_key(|(_, id)| **id) {
        Some((token, &id)) if id as usize >= limit => Err(format!(
            "tokenizer.json: model.vocab gives `{}` the id {id}, but the vocabulary has {n} \
             tokens (ids must be below {limit}: numbered from 0, with few holes)",
            token.chars().take(40).collect::<String>()
        )),
        _ => Ok(()),
    }
}

/// One chat message.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Tokenizer {
    /// Load the tokenizer a model file carries (untrusted input): its JSON is checked for
    /// well-formedness first, because the `tokenizers` crate panics on some malformed JSON
    /// (found by fuzzing: a syntax error inside `decoder`), and any panic left in the
    /// crate's loader is caught and reported as an error.
    pub fn from_spec(spec: TokenizerSpec) -> Result<Self, RuntimeError> {
        let bad = |e: String| RuntimeError::Tokenizer(format!("cannot load tokenizer: {e}"));
        serde_json::from_str::<serde::de::IgnoredAny>(&spec.json)
            .map_err(|e| bad(format!("tokenizer.json is not valid JSON: {e}")))?;
        let inner = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_str(&spec.json))
            .map_err(|_| bad("the tokenizers crate panicked on it".into()))?
            .map_err(|e| bad(e.to_string()))?;
        check_dense_ids(&inner).map_err(bad)?;
        let inner = without_bpe_cache(inner).map_err(bad)?;
        Ok(Tokenizer { inner, spec })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`; with `add_special` the BOS token is prepended when the model
    /// asks for it.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, RuntimeError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| RuntimeError::Tokenizer(format!("cannot encode text: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special
            && self.spec.add_bos
            && let Some(b) = self.spec.bos_id
        {
            ids.push(b);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, RuntimeError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| RuntimeError::Tokenizer(format!("cannot decode ids: {e}")))
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.spec.eos_ids.contains(&id)
    }

    /// Render the model's chat template for `messages`, ending with the assistant prompt.
    pub fn apply_chat_template(&self, messages: &[Message]) -> Result<String, RuntimeError> {
        let tpl = self.spec.chat_template.as_deref().ok_or_else(|| {
            RuntimeError::Template("this model has no chat template; run without --chat".into())
        })?;
        render_chat_template(
            tpl,
            messages,
            self.spec.bos_token.as_deref().unwrap_or_default(),
            self.spec.eos_token.as_deref().unwrap_or_default(),
        )
    }
}

/// Render a chat template (Jinja, as Hugging Face's `apply_chat_template` runs it) for
/// `messages`, ending with the assistant prompt. The template comes from the model file, so
/// it is untrusted input.
pub fn render_chat_template(
    tpl: &str,
    messages: &[Message],
    bos_token: &str,
    eos_token: &str,
) -> Result<String, RuntimeError> {
    let mut env = minijinja::Environment::new();
    // bounded work and output (a template is a program from the model file): fuel counts
    // the template's instructions
    let text_bytes: usize = messages
        .iter()
        .map(|m| m.content.len() + m.role.len())
        .sum();
    env.set_fuel(Some(
        TEMPLATE_FUEL_BASE + TEMPLATE_FUEL_PER_MESSAGE * messages.len() as u64,
    ));
    let max_out = TEMPLATE_OUTPUT_BASE + 4 * text_bytes;
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    check_template(tpl)?;
    env.add_template("chat", tpl)
        .map_err(|e| RuntimeError::Template(format!("bad chat template: {e}")))?;
    let t = env
        .get_template("chat")
        .map_err(|e| RuntimeError::Template(e.to_string()))?;
    let mut out = Limited {
        buf: Vec::new(),
        max: max_out,
    };
    let ctx = minijinja::context! {
        messages => messages,
        add_generation_prompt => true,
        bos_token => bos_token,
        eos_token => eos_token,
    };
    match t.render_captured_to(ctx, &mut out) {
        Ok(_) => String::from_utf8(out.buf)
            .map_err(|_| RuntimeError::Template("the chat template's output is not UTF-8".into())),
        Err(_) if out.buf.len() > out.max => Err(RuntimeError::Template(format!(
            "the chat template's output exceeds {} bytes for {} messages of {text_bytes} bytes",
            out.max,
            messages.len()
        ))),
        Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => {
            Err(RuntimeError::Template(format!(
                "the chat template runs too long (over {} steps for {} messages)",
                TEMPLATE_FUEL_BASE + TEMPLATE_FUEL_PER_MESSAGE * messages.len() as u64,
                messages.len()
            )))
        }
        Err(e) => Err(RuntimeError::Template(format!(
            "cannot render chat template: {e}"
        ))),
    }
}

/// Refuse a chat template that multiplies anything but a literal by a small integer
/// literal (`'-' * 20`). In minijinja `seq * n` is a lazy repetition of any length and
/// `str * n` may reach 100 MB: one operation on such a value (a comparison, a join, a
/// concatenation) runs unmetered by fuel, so one `{{ x * 10000000 }}` in a template from a
/// model file would hang every request (found by fuzzing, target `chat_template`). Chat
/// templates do not multiply (none of the common families' templates has a `*`).
///
/// Also refused: templates over [`MAX_TEMPLATE_BYTES`] and runs of more than
/// [`MAX_SIGN_RUN`] signs (`- - - 'x'`), which minijinja compiles in time that grows with
/// the cube of the run (found by fuzzing: 3700 signs took 0.3 s, 8000 several seconds).
fn check_template(tpl: &str) -> Result<(), RuntimeError> {
    if tpl.len() > MAX_TEMPLATE_BYTES {
        return Err(RuntimeError::Template(format!(
            "the chat template has {} bytes: more than the {MAX_TEMPLATE_BYTES} wkvc accepts",
            tpl.len()
        )));
    }
    let b = tpl.as_bytes();
    let (mut i, mut in_expr) = (0, false);
    let mut signs = 0usize;
    // what the last token of the expression was: a literal (string or integer) or not
    let mut last_literal = false;
    while i < b.len() {
        if !in_expr {
            if b[i] == b'{' && matches!(b.get(i + 1), Some(b'{') | Some(b'%')) {
                in_expr = true;
                last_literal = false;
                i += 2;
            } else if b[i] == b'{' && b.get(i + 1) == Some(&b'#') {
                i = tpl[i..].find("#}").map_or(b.len(), |j| i + j + 2);
            } else {
                i += 1;
            }
            continue;
        }
        if matches!(b[i], b'-' | b'+') {
            signs += 1;
            if signs > MAX_SIGN_RUN {
                return Err(RuntimeError::Template(format!(
                    "the chat template has a run of over {MAX_SIGN_RUN} signs at byte {i}"
                )));
            }
        } else if !b[i].is_ascii_whitespace() {
            signs = 0;
        }
        match b[i] {
            b'}' | b'%' if b.get(i + 1) == Some(&b'}') => {
                in_expr = false;
                i += 2;
            }
            q @ (b'\'' | b'"') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                last_literal = true;
            }
            b'*' if b.get(i + 1) == Some(&b'*') => {
                // `**`: powers of numbers overflow into an error, never grow a value
                i += 2;
                last_literal = false;
            }
            b'*' => {
                let rest = tpl[i + 1..].trim_start();
                let digits: &str = &rest[..rest
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(rest.len())];
                let small = !digits.is_empty() && digits.len() <= 4;
                let next = rest[digits.len()..].chars().next();
                let ends = !next.is_some_and(|c| {
                    c.is_alphanumeric() || c == '_' || c == '.' || c == '(' || c == '['
                });
                if !(last_literal && small && ends) {
                    return Err(RuntimeError::Template(format!(
                        "the chat template multiplies at byte {i} (`{}`): wkvc runs no `*` but \
                         a literal times a literal integer below 10000 (repetition in a \
                         template is unbounded work)",
                        around(tpl, i)
                            .chars()
                            .filter(|c| !c.is_control())
                            .collect::<String>()
                    )));
                }
                i += 1;
                last_literal = false;
            }
            c if c.is_ascii_whitespace() => i += 1,
            c if c.is_ascii_digit() => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'.')
                {
                    i += 1;
                }
                last_literal = true;
            }
            _ => {
                last_literal = false;
                i += 1;
            }
        }
    }
    Ok(())
}

/// Up to 20 bytes either side of byte `i` of `s`, cut at character boundaries.
fn around(s: &str, i: usize) -> &str {
    let mut a = i.saturating_sub(20);
    while !s.is_char_boundary(a) {
        a -= 1;
    }
    let mut b = (i + 20).min(s.len());
    while !s.is_char_boundary(b) {
        b += 1;
    }
    &s[a..b]
}

/// The largest chat template accepted (real ones are a few KiB).
const MAX_TEMPLATE_BYTES: usize = 256 << 10;
/// The longest run of `+`/`-` signs in a template expression.
const MAX_SIGN_RUN: usize = 32;

/// A chat template's budget: instructions (minijinja fuel) and output bytes, a base plus a
/// share per message (real templates spend tens of instructions a message: a 1000-message
/// conversation renders, `template_tests`).
const TEMPLATE_FUEL_BASE: u64 = 100_000;
const TEMPLATE_FUEL_PER_MESSAGE: u64 = 10_000;
const TEMPLATE_OUTPUT_BASE: usize = 1 << 20;

/// A writer that refuses to grow past `max` bytes (the render then stops with an error).
struct Limited {
    buf: Vec<u8>,
    max: usize,
}

impl std::io::Write for Limited {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > self.max {
            self.buf
                .extend_from_slice(&b[..(self.max + 1 - self.buf.len()).min(b.len())]);
            return Err(std::io::Error::other("output limit"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Turns generated ids into text pieces as they arrive, holding back incomplete UTF-8. Each
/// step decodes only the ids since the last complete piece (with the ids before it as
/// context for the tokenizer's decoder), so a step costs the same however long the text
/// grows (the algorithm of the `tokenizers` crate's `DecodeStream`, which borrows its
/// tokenizer and so cannot live in a session beside it).
pub struct StreamDecoder {
    /// ids from the start of the current window
    ids: Vec<u32>,
    /// how many of them are context (already emitted), and their text
    prefix_ids: usize,
    prefix: String,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDecoder {
    pub fn new() -> Self {
        StreamDecoder {
            ids: Vec::new(),
            prefix_ids: 0,
            prefix: String::new(),
        }
    }

    /// Add one id; returns the new text that is now complete.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, RuntimeError> {
        self.ids.push(id);
        let text = tok.decode(&self.ids, true)?;
        if text.len() <= self.prefix.len() || text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let piece = match text.strip_prefix(self.prefix.as_str()) {
            Some(p) => p.to_string(),
            // the decoder changed the context's text (a merge across the boundary): send
            // what is new after its length
            None => text.get(self.prefix.len()..).unwrap_or("").to_string(),
        };
        // the window restarts at the ids just emitted (context for the next step)
        self.ids.drain(..self.prefix_ids);
        self.prefix = tok.decode(&self.ids, true)?;
        self.prefix_ids = self.ids.len();
        Ok(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> TokenizerSpec {
        TokenizerSpec {
            json: json.into(),
            chat_template: None,
            bos_token: None,
            eos_token: None,
            bos_id: None,
            eos_ids: Vec::new(),
            add_bos: false,
        }
    }

    /// Fuzzing (target `hf`) found a vocabulary with one id of 133 million costing a second
    /// and 500 MB in the crate's vocabulary writer: ids far past the vocabulary's size are an
    /// error naming the field; a vocabulary with a few holes loads.
    #[test]
    fn sparse_vocab_ids_are_an_error() {
        let json = |far: u32| {
            format!(
                r#"{{"version":"1.0","model":{{"type":"BPE","vocab":{{"a":0,"b":1,"ab":{far}}},"merges":[["a","b"]]}}}}"#
            )
        };
        let e = Tokenizer::from_spec(spec(&json(133_333_309)))
            .err()
            .expect("an error");
        assert!(
            e.to_string()
                .contains("model.vocab gives `ab` the id 133333309"),
            "{e}"
        );
        let t = Tokenizer::from_spec(spec(&json(9))).expect("a few holes load");
        assert_eq!(t.encode("ab", false).expect("encode"), vec![9]);
    }

    /// Fuzzing (target `manifest`) found the `tokenizers` crate panicking ("Helper") on a
    /// syntax error inside `decoder`: an error here, never a panic.
    #[test]
    fn malformed_decoder_json_is_an_error_not_a_panic() {
        let json = r#"{"version":"1.0","decoder":{"type":"ByteLevel","add_prefix_space" true}}"#;
        let direct = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_str(json));
        let e = Tokenizer::from_spec(spec(json)).err().expect("an error");
        assert!(e.to_string().contains("not valid JSON"), "{e}");
        // the input does reach the crate's panic (else this test would guard nothing)
        assert!(
            direct.is_err(),
            "the tokenizers crate no longer panics here"
        );
    }
}

#[cfg(test)]
mod template_tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    fn msgs(n: usize, text: &str) -> Vec<Message> {
        (0..n)
            .map(|i| Message {
                role: if i % 2 == 0 { "user" } else { "assistant" }.into(),
                content: text.into(),
            })
            .collect()
    }

    fn render(tpl: &str, n: usize, text: &str) -> Result<String, RuntimeError> {
        render_chat_template(tpl, &msgs(n, text), "<s>", "</s>")
    }

    /// A real template renders long conversations whole: the budgets grow with the messages.
    #[test]
    fn long_conversations_fit_the_budget() {
        for n in [1, 10, 1000] {
            let out = render(CHATML, n, &"word ".repeat(200)).expect("renders");
            assert_eq!(out.matches("<|im_start|>").count(), n + 1);
        }
    }

    /// Hostile templates (from a model file) stop with an error naming the limit: nested
    /// loops of 10^8 steps, output of 10^9 bytes; recursion and Jinja's own limits hold.
    #[test]
    fn hostile_templates_are_bounded() {
        let e = render(
            "{% for a in range(10000) %}{% for b in range(10000) %}x{% endfor %}{% endfor %}",
            2,
            "hi",
        )
        .expect_err("out of fuel");
        assert!(e.to_string().contains("runs too long"), "{e}");
        let e = render(
            "{% for a in range(1000) %}{% for m in messages %}{{ m.content }}{% endfor %}{% endfor %}",
            2,
            &"x".repeat(100_000),
        )
        .expect_err("output limit");
        assert!(e.to_string().contains("output exceeds"), "{e}");
        let e = render("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", 2, "hi")
            .expect_err("recursion");
        assert!(!e.to_string().is_empty());
        // repetition: a lazy sequence of 10^7 copies compared in one (unmetered) operation
        let e = render("{{[1~10110101*['']==''%1].y()}}", 1, "hi").expect_err("repetition");
        assert!(e.to_string().contains("multiplies"), "{e}");
        for bad in [
            "{{ messages * 3 }}",
            "{{ 'x' * n }}",
            "{{ 'x' * 100000 }}",
            "{{ 2 * x }}",
            // (fuzzing) the message quotes the template around the `*`, cut at character
            // boundaries
            "f \u{17}qtz-\u{1} 0 %}{{ g*z - 1) }}{{ n }}{%\u{68c}}",
            "{{ '\u{68c}\u{68c}\u{68c}\u{68c}\u{68c}\u{68c}\u{68c}\u{68c}\u{68c}' * x }}",
        ] {
            render(bad, 1, "hi").expect_err(bad);
        }
        for ok in [
            "{{ '-' * 20 }}",
            "{{ 3 ** 2 }}{# a * b #}",
            "{{ 'a*b' }}{{ \"*\" }}",
        ] {
            render(ok, 1, "hi").unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        // a long run of signs: compile time grows with its cube
        let signs = format!("{{{{{} 'x' }}}}", "-".repeat(4000));
        let e = render(&signs, 1, "hi").expect_err("signs");
        assert!(e.to_string().contains("run of over"), "{e}");
        let e = render(&"x".repeat(300 << 10), 1, "hi").expect_err("size");
        assert!(e.to_string().contains("bytes"), "{e}");
        let e = render("{{ raise_exception('no') }}", 1, "hi").expect_err("raised");
        assert!(e.to_string().contains("no"), "{e}");
    }
}
