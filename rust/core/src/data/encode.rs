//! One input row to one training example: render, tokenize once, mask.

use std::ops::Range;

use serde_json::Value as Json;

use super::mask::build_loss_mask;
use super::template::{strip_markers, ChatTemplate, Rendered, MARKERS, PLAIN_CLOSE, PLAIN_OPEN};
use super::tokenize::TextTokenizer;
use crate::error::{Error, Result};

/// Which tokens the loss looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainOn {
    /// Every assistant turn (its content and end-of-turn token).
    Assistant,
    /// Every token.
    All,
    /// Only the last assistant turn.
    Last,
}

impl TrainOn {
    pub fn from_name(name: &str) -> Result<TrainOn> {
        match name {
            "assistant" => Ok(TrainOn::Assistant),
            "all" => Ok(TrainOn::All),
            "last" => Ok(TrainOn::Last),
            other => Err(Error::InvalidArgument(format!(
                "train-on policy {other:?} is not known: use assistant, all or last"
            ))),
        }
    }
}

/// Roles a message may have; anything else is refused as a likely typo.
pub const KNOWN_ROLES: [&str; 7] =
    ["system", "user", "assistant", "tool", "developer", "function", "ipython"];

/// A tokenized training example: token ids and a 0/1 loss mask of the same length.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub mask: Vec<u8>,
}

impl Example {
    pub fn supervised(&self) -> usize {
        self.mask.iter().filter(|&&m| m != 0).count()
    }
}

/// Renders and tokenizes rows. Shared by all threads (read-only).
pub struct Encoder {
    template: Option<ChatTemplate>,
    tokenizer: TextTokenizer,
    train_on: TrainOn,
    /// Special-token strings inside message content are tokenized as plain text (default true).
    content_specials_as_text: bool,
    /// Appended to plain-text rows (continued pretraining), when the tokenizer knows an EOS.
    eos_id: Option<u32>,
}

impl Encoder {
    pub fn new(
        template: Option<ChatTemplate>,
        tokenizer: TextTokenizer,
        train_on: TrainOn,
        content_specials_as_text: bool,
        eos_token: Option<&str>,
    ) -> Encoder {
        let eos_id = eos_token.and_then(|t| tokenizer.token_to_id(t));
        Encoder { template, tokenizer, train_on, content_specials_as_text, eos_id }
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Any input row: `{"messages": [...]}`, `{"prompt", "completion"}` or `{"text"}`.
    pub fn encode_row(&self, row: &Json) -> Result<Example> {
        let Some(object) = row.as_object() else {
            return Err(row_error("a row must be a JSON object"));
        };
        if let Some(messages) = object.get("messages") {
            return self.encode_messages(messages);
        }
        match (object.get("prompt"), object.get("completion")) {
            (Some(Json::String(prompt)), Some(Json::String(completion))) => {
                let messages = serde_json::json!([
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": completion},
                ]);
                return self.encode_messages(&messages);
            }
            (Some(Json::Array(prompt)), Some(Json::Array(completion))) => {
                let messages = Json::Array(prompt.iter().chain(completion).cloned().collect());
                return self.encode_messages(&messages);
            }
            (Some(_), Some(_)) => {
                return Err(row_error("prompt and completion must both be strings or both lists of messages"))
            }
            _ => {}
        }
        if let Some(text) = object.get("text") {
            let Some(text) = text.as_str() else { return Err(row_error("\"text\" must be a string")) };
            return self.encode_text(text);
        }
        Err(row_error("a row needs \"messages\", \"prompt\" + \"completion\", or \"text\""))
    }

    /// Plain text: tokenized as the tokenizer's own post-processor does (BOS if it adds one), EOS appended;
    /// every token is trained.
    pub fn encode_text(&self, text: &str) -> Result<Example> {
        let mut ids = self.tokenizer.encode(text, true)?.ids;
        if let Some(eos) = self.eos_id {
            if ids.last() != Some(&eos) {
                ids.push(eos);
            }
        }
        let mut mask = vec![1u8; ids.len()];
        if let Some(first) = mask.first_mut() {
            *first = 0; // nothing precedes the first token, so nothing predicts it
        }
        Ok(Example { ids, mask })
    }

    /// Render a conversation, tokenize it and mask it.
    pub fn encode_messages(&self, messages: &Json) -> Result<Example> {
        let (rendered, spans) = self.render_with_spans(messages)?;
        let encoded = self.tokenizer.encode_rendered(&rendered.text, &rendered.plain_spans)?;
        let mut mask = match self.train_on {
            TrainOn::All => vec![1u8; encoded.ids.len()],
            _ => build_loss_mask(&encoded.offsets, &spans),
        };
        if let Some(first) = mask.first_mut() {
            *first = 0;
        }
        Ok(Example { ids: encoded.ids, mask })
    }

    /// The rendered text alone (e.g. a prompt with `add_generation_prompt`), as transformers renders it.
    pub fn render_plain(&self, messages: &Json, add_generation_prompt: bool) -> Result<String> {
        let Some(template) = &self.template else {
            return Err(row_error("conversation rows need a chat template (--template)"));
        };
        let escaped = self.check_messages(messages)?;
        Ok(strip_markers(&template.render_raw(escaped.as_ref().unwrap_or(messages), add_generation_prompt)?)
            .text)
    }

    /// The rendered conversation and the byte spans the loss looks at (before the `All` policy applies).
    pub fn render_with_spans(&self, messages: &Json) -> Result<(Rendered, Vec<Range<usize>>)> {
        let Some(template) = &self.template else {
            return Err(row_error("conversation rows need a chat template (--template)"));
        };
        let escaped = self.check_messages(messages)?;
        let messages = escaped.as_ref().unwrap_or(messages);
        let rendered = strip_markers(&template.render_raw(messages, false)?);
        if self.train_on == TrainOn::All {
            return Ok((rendered, vec![]));
        }
        let mut spans = if template.has_generation_tags() {
            rendered.assistant_spans.clone()
        } else {
            self.role_spans(template, messages, &rendered.text)?
        };
        if self.train_on == TrainOn::Last {
            spans = spans.pop().into_iter().collect();
        }
        Ok((rendered, spans))
    }

    /// Assistant spans of a template without generation tags: turn `i` is what rendering `messages[..=i]`
    /// adds to rendering `messages[..i]` with the generation prompt. The template must render each prefix
    /// as a prefix of the whole (all common templates do).
    fn role_spans(&self, template: &ChatTemplate, messages: &Json, full: &str) -> Result<Vec<Range<usize>>> {
        let list = messages.as_array().map(Vec::as_slice).unwrap_or_default();
        let mut turns: Vec<usize> = (0..list.len()).filter(|&i| list[i]["role"] == "assistant").collect();
        if self.train_on == TrainOn::Last {
            turns = turns.pop().into_iter().collect();
        }
        let mut spans = vec![];
        for i in turns {
            let start = if i == 0 {
                0
            } else {
                let head = Json::Array(list[..i].to_vec());
                strip_markers(&template.render_raw(&head, true)?).text.len()
            };
            let upto = Json::Array(list[..=i].to_vec());
            let through = strip_markers(&template.render_raw(&upto, false)?).text;
            if !full.starts_with(&through) || start > through.len() {
                return Err(Error::Template(
                    "cannot find the assistant turns: this template does not render a conversation's start as \
                     a prefix of the whole; add {% generation %} tags around the assistant text"
                        .into(),
                ));
            }
            spans.push(start..through.len());
        }
        Ok(spans)
    }

    /// Check roles and contents. Returns a copy with content special-token strings marked as plain text,
    /// when any were found.
    fn check_messages(&self, messages: &Json) -> Result<Option<Json>> {
        let Some(list) = messages.as_array() else {
            return Err(row_error("\"messages\" must be a list of {\"role\", \"content\"} objects"));
        };
        if list.is_empty() {
            return Err(row_error("the conversation is empty (\"messages\" is [])"));
        }
        let mut needs_escape = false;
        for (i, message) in list.iter().enumerate() {
            let role = message.get("role").and_then(Json::as_str);
            let Some(role) = role else {
                return Err(row_error(&format!("message {i} has no \"role\" string")));
            };
            if !KNOWN_ROLES.contains(&role) {
                return Err(row_error(&format!(
                    "message {i} has unknown role {role:?}: use one of {}",
                    KNOWN_ROLES.join(", ")
                )));
            }
            let mut bad = None;
            visit_texts(message.get("content").unwrap_or(&Json::Null), &mut |text| {
                if text.contains(MARKERS) {
                    bad = Some("holds a Unicode noncharacter U+FDD0..U+FDD3, which nibblora reserves");
                }
                if self.content_specials_as_text && self.tokenizer.special_strings().any(|s| text.contains(s))
                {
                    needs_escape = true;
                }
            });
            if let Some(why) = bad {
                return Err(row_error(&format!("message {i} {why}")));
            }
        }
        if !needs_escape {
            return Ok(None);
        }
        let mut copy = messages.clone();
        for message in copy.as_array_mut().into_iter().flatten() {
            if let Some(content) = message.get_mut("content") {
                map_texts(content, &mut |text| self.mark_specials(text));
            }
        }
        Ok(Some(copy))
    }

    fn mark_specials(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len() + 8);
        let mut rest = text;
        'outer: while !rest.is_empty() {
            for special in self.tokenizer.special_strings() {
                if let Some(tail) = rest.strip_prefix(special) {
                    out.push(PLAIN_OPEN);
                    out.push_str(special);
                    out.push(PLAIN_CLOSE);
                    rest = tail;
                    continue 'outer;
                }
            }
            let c = rest.chars().next().unwrap_or_default();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
        out
    }
}

fn row_error(message: &str) -> Error {
    Error::Input { location: String::new(), message: message.to_string() }
}

/// Call `f` on the text of a content value: a string, or the "text" of each part in a list of parts.
fn visit_texts(content: &Json, f: &mut dyn FnMut(&str)) {
    match content {
        Json::String(s) => f(s),
        Json::Array(parts) => {
            for part in parts {
                if let Some(Json::String(s)) = part.get("text") {
                    f(s);
                }
            }
        }
        _ => {}
    }
}

fn map_texts(content: &mut Json, f: &mut dyn FnMut(&str) -> String) {
    match content {
        Json::String(s) => *s = f(s),
        Json::Array(parts) => {
            for part in parts {
                if let Some(Json::String(s)) = part.get_mut("text") {
                    *s = f(s);
                }
            }
        }
        _ => {}
    }
}
