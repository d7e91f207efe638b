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

/// One chat message.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Tokenizer {
    pub fn from_spec(spec: TokenizerSpec) -> Result<Self, RuntimeError> {
        let inner = tokenizers::Tokenizer::from_str(&spec.json)
            .map_err(|e| RuntimeError::Tokenizer(format!("cannot load tokenizer: {e}")))?;
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
        let mut env = minijinja::Environment::new();
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
        env.add_template("chat", tpl)
            .map_err(|e| RuntimeError::Template(format!("bad chat template: {e}")))?;
        let t = env
            .get_template("chat")
            .map_err(|e| RuntimeError::Template(e.to_string()))?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.spec.bos_token.clone().unwrap_or_default(),
            eos_token => self.spec.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| RuntimeError::Template(format!("cannot render chat template: {e}")))
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
