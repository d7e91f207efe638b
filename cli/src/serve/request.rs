//! From a request body to a checked generation request: everything the endpoints do before
//! the scheduler, as functions of the body, the tokenizer and the context length (no server
//! state), so that tests and the fuzz targets (`fuzz/`) reach all of it.

use super::api::{
    self, ApiError, ChatRequest, CompletionRequest, DetokenizeRequest, Sampling, TokenizeRequest,
};
use wkvc_runtime::scheduler::GenRequest;
use wkvc_runtime::{CancelToken, Message, Tokenizer};

/// `POST /v1/completions`: the generation request and the sampling settings it came with.
pub fn completion(
    body: &[u8],
    tok: &Tokenizer,
    ctx: usize,
) -> Result<(GenRequest, Sampling), ApiError> {
    let req: CompletionRequest = api::parse(body)?;
    let text = match &req.prompt {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(v) if v.len() == 1 && v[0].is_string() => {
            v[0].as_str().unwrap_or_default().to_string()
        }
        _ => {
            return Err(ApiError::bad_request(
                "prompt must be a string (or a list of one string)",
                None,
            ));
        }
    };
    let ids = tok
        .encode(&text, true)
        .map_err(|e| ApiError::bad_request(e.to_string(), None))?;
    let g = gen_request(ctx, ids, &req.sampling, 16)?;
    Ok((g, req.sampling))
}

/// `POST /v1/chat/completions`: the messages rendered with the model's chat template.
pub fn chat(body: &[u8], tok: &Tokenizer, ctx: usize) -> Result<(GenRequest, Sampling), ApiError> {
    let req: ChatRequest = api::parse(body)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty", None));
    }
    let mut msgs = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer"
        ) {
            return Err(ApiError::bad_request(
                format!("unknown message role `{}`", m.role),
                None,
            ));
        }
        msgs.push(Message {
            role: if m.role == "developer" {
                "system".into()
            } else {
                m.role.clone()
            },
            content: api::content_text(&m.content)?,
        });
    }
    let text = tok
        .apply_chat_template(&msgs)
        .map_err(|e| ApiError::bad_request(e.to_string(), None))?;
    let ids = tok
        .encode(&text, true)
        .map_err(|e| ApiError::bad_request(e.to_string(), None))?;
    let g = gen_request(ctx, ids, &req.sampling, ctx)?;
    Ok((g, req.sampling))
}

/// `POST /tokenize`: the token ids of the content.
pub fn tokenize(body: &[u8], tok: &Tokenizer) -> Result<Vec<u32>, ApiError> {
    let req: TokenizeRequest = api::parse(body)?;
    tok.encode(&req.content, req.add_special)
        .map_err(|e| ApiError::bad_request(e.to_string(), None))
}

/// `POST /detokenize`: the text of the ids, each checked against the vocabulary first.
pub fn detokenize(body: &[u8], tok: &Tokenizer, vocab: usize) -> Result<String, ApiError> {
    let req: DetokenizeRequest = api::parse(body)?;
    if let Some(t) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::bad_request(
            format!("token {t} is not in the vocabulary of {vocab}"),
            None,
        ));
    }
    tok.decode(&req.tokens, false)
        .map_err(|e| ApiError::bad_request(e.to_string(), None))
}

/// Checked sampling settings and the request to submit.
pub fn gen_request(
    ctx: usize,
    prompt: Vec<u32>,
    s: &Sampling,
    default_max: usize,
) -> Result<GenRequest, ApiError> {
    if s.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request(
            "only n = 1 is supported",
            Some("unsupported_value"),
        ));
    }
    let temperature = s.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(
            format!("temperature must be in [0, 2], got {temperature}"),
            Some("invalid_value"),
        ));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request(
            format!("top_p must be in (0, 1], got {top_p}"),
            Some("invalid_value"),
        ));
    }
    if prompt.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty", None));
    }
    let max_tokens = s
        .max_tokens
        .unwrap_or(default_max.min(ctx.saturating_sub(prompt.len())));
    if max_tokens == 0 {
        return Err(ApiError::bad_request(
            "max_tokens must be at least 1",
            Some("invalid_value"),
        ));
    }
    if prompt.len().saturating_add(max_tokens) > ctx {
        return Err(ApiError::bad_request(
            format!(
                "the prompt ({} tokens) plus max_tokens ({max_tokens}) exceed the context of {} \
                 tokens",
                prompt.len(),
                ctx
            ),
            Some("context_length_exceeded"),
        ));
    }
    let stop = s.stop.as_ref().map(api::Stop::list).unwrap_or_default();
    if stop.len() > 4 {
        return Err(ApiError::bad_request("at most 4 stop sequences", None));
    }
    Ok(GenRequest {
        prompt,
        max_tokens,
        temperature,
        top_p,
        seed: s.seed.unwrap_or(0),
        stop,
        ignore_eos: s.ignore_eos.unwrap_or(false),
        cancel: CancelToken::new(),
    })
}
