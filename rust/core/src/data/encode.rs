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
        let template = self.template()?;
        self.check_messages(messages)?;
        Ok(strip_markers(&template.render_raw(messages, add_generation_prompt)?).text)
    }

    /// The rendered conversation and the byte spans the loss looks at (before the `All` policy applies).
    /// `Rendered::plain_spans` lists the special-token strings that came from the row (tokenized as text).
    pub fn render_with_spans(&self, messages: &Json) -> Result<(Rendered, Vec<Range<usize>>)> {
        let template = self.template()?;
        let needs_protection = self.check_messages(messages)?;
        // The template sees the row exactly as transformers would show it; the protection is worked out
        // afterwards, so `content.startswith('<|eot_id|>')` answers as it does in transformers.
        let mut rendered = strip_markers(&template.render_raw(messages, false)?);
        if needs_protection {
            rendered.plain_spans = self.row_special_spans(template, messages, &rendered)?;
        }
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

    fn template(&self) -> Result<&ChatTemplate> {
        self.template.as_ref().ok_or_else(|| row_error("conversation rows need a chat template (--template)"))
    }

    /// Byte spans of `rendered.text` holding special-token strings that came from the row. The row is rendered
    /// again with those strings wrapped in markers; when that render, markers removed, is the same text with
    /// the same assistant spans, the markers say where the row's copies are. A template that looks inside the
    /// strings (slicing, `startswith`) may render differently with markers: then each protected string is
    /// found verbatim (or trimmed, or JSON-escaped) in the plain render, and a row whose string the template
    /// changes beyond that is refused rather than let a special token through.
    fn row_special_spans(
        &self,
        template: &ChatTemplate,
        messages: &Json,
        rendered: &Rendered,
    ) -> Result<Vec<Range<usize>>> {
        let mut marked = messages.clone();
        for message in marked.as_array_mut().into_iter().flatten() {
            map_row_strings(message, &mut |text| self.mark_specials(text));
        }
        let probe = template.render_raw(&marked, false).ok().map(|raw| strip_markers(&raw));
        if let Some(probe) = &probe {
            if probe.text == rendered.text && probe.assistant_spans == rendered.assistant_spans {
                return Ok(probe.plain_spans.clone());
            }
        }
        // The template's own special tokens, counted in the marked render: the rest of the special-token
        // strings in the plain render came from the row, and each must be found.
        let template_specials = probe.map(|p| {
            let row = p.plain_spans.len();
            self.special_ranges(&p.text).len().saturating_sub(row)
        });
        self.locate_row_specials(messages, &rendered.text, template_specials)
    }

    fn locate_row_specials(
        &self,
        messages: &Json,
        text: &str,
        template_specials: Option<usize>,
    ) -> Result<Vec<Range<usize>>> {
        let mut claimed: Vec<Range<usize>> = vec![];
        let mut spans = vec![];
        let mut missing: Option<(usize, String)> = None;
        for (i, message) in messages.as_array().into_iter().flatten().enumerate() {
            visit_row_strings(message, &mut |s| {
                if self.special_ranges(s).is_empty() {
                    return;
                }
                let found = self.printed_forms(s).into_iter().find_map(|candidate| {
                    let at = text
                        .match_indices(candidate.as_str())
                        .map(|(at, _)| at)
                        .find(|&at| !claimed.iter().any(|c| at < c.end && at + candidate.len() > c.start))?;
                    Some((at, candidate))
                });
                match found {
                    Some((at, candidate)) => {
                        claimed.push(at..at + candidate.len());
                        spans.extend(
                            self.special_ranges(&candidate).into_iter().map(|r| at + r.start..at + r.end),
                        );
                    }
                    None => {
                        missing.get_or_insert((i, s.chars().take(60).collect()));
                    }
                }
            });
        }
        // Strings not found verbatim are fine when every special token left in the text is the template's own.
        let unexplained = self.special_ranges(text).len().saturating_sub(spans.len());
        if let Some((i, start)) = missing {
            if template_specials.is_none_or(|t| unexplained > t) {
                return Err(row_error(&format!(
                    "message {i}: the chat template changes the text {start:?}, which holds a special-token \
                     string, before printing it, so nibblora cannot keep that string plain text; remove it from \
                     the row, or pass --special-tokens-in-content special to let it act as the special token"
                )));
            }
        }
        spans.sort_by_key(|r| r.start);
        Ok(spans)
    }

    /// How a template may print a row string holding special tokens: as is, trimmed, JSON-escaped (`tojson`),
    /// or sliced just past or before one of its special tokens (`content[10:]`). Only forms that still hold a
    /// special token matter.
    fn printed_forms(&self, s: &str) -> Vec<String> {
        let escaped = serde_json::to_string(s).unwrap_or_default();
        let escaped = escaped.get(1..escaped.len().saturating_sub(1)).unwrap_or_default().to_string();
        let mut forms = vec![s.to_string(), s.trim().to_string(), escaped];
        for r in self.special_ranges(s) {
            forms.push(s[r.end..].to_string());
            forms.push(s[..r.start].to_string());
        }
        let mut seen = std::collections::HashSet::new();
        forms.retain(|f| !self.special_ranges(f).is_empty() && seen.insert(f.clone()));
        forms
    }

    /// Assistant spans of a template without generation tags: turn `i` is what rendering `messages[..=i]`
    /// adds to rendering `messages[..i]` with the generation prompt (for an opening assistant turn, an empty
    /// conversation with the generation prompt, which holds any default system prompt the template injects).
    /// Each such prefix must render as a prefix of the next and of the whole, or the row is refused.
    fn role_spans(&self, template: &ChatTemplate, messages: &Json, full: &str) -> Result<Vec<Range<usize>>> {
        let list = messages.as_array().map(Vec::as_slice).unwrap_or_default();
        let mut turns: Vec<usize> = (0..list.len()).filter(|&i| list[i]["role"] == "assistant").collect();
        if self.train_on == TrainOn::Last {
            turns = turns.pop().into_iter().collect();
        }
        let mut spans = vec![];
        for i in turns {
            let head = Json::Array(list[..i].to_vec());
            let head = strip_markers(&template.render_raw(&head, true).map_err(|e| {
                Error::Template(format!(
                    "cannot find where assistant turn {i} starts: rendering the conversation before it failed \
                     ({e}); add {{% generation %}} tags around the assistant text"
                ))
            })?)
            .text;
            let upto = Json::Array(list[..=i].to_vec());
            let through = strip_markers(&template.render_raw(&upto, false)?).text;
            if !through.starts_with(&head) || !full.starts_with(&through) {
                return Err(Error::Template(format!(
                    "cannot find where assistant turn {i} starts: this template does not render the \
                     conversation before it (with the generation prompt) as a prefix of the whole, so its mask \
                     would cover template text; add {{% generation %}} tags around the assistant text{}",
                    if i == 0 { ", or start the conversation with a user or system turn" } else { "" }
                )));
            }
            spans.push(head.len()..through.len());
        }
        Ok(spans)
    }

    /// Check roles and every string of every message. Returns whether some string holds a special-token
    /// string that must stay plain text.
    fn check_messages(&self, messages: &Json) -> Result<bool> {
        let Some(list) = messages.as_array() else {
            return Err(row_error("\"messages\" must be a list of {\"role\", \"content\"} objects"));
        };
        if list.is_empty() {
            return Err(row_error("the conversation is empty (\"messages\" is [])"));
        }
        let mut needs_protection = false;
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
            let mut bad = false;
            visit_row_strings(message, &mut |text| {
                bad |= text.contains(MARKERS);
                if self.content_specials_as_text && !needs_protection {
                    needs_protection = self.tokenizer.special_strings().any(|s| text.contains(s));
                }
            });
            if bad {
                return Err(row_error(&format!(
                    "message {i} holds a Unicode noncharacter U+FDD0..U+FDD3, which nibblora reserves"
                )));
            }
        }
        Ok(needs_protection)
    }

    /// Byte ranges of the special-token strings in `text` (longest match first, left to right).
    fn special_ranges(&self, text: &str) -> Vec<Range<usize>> {
        let mut out = vec![];
        let mut at = 0usize;
        'outer: while at < text.len() {
            for special in self.tokenizer.special_strings() {
                if text[at..].starts_with(special) {
                    out.push(at..at + special.len());
                    at += special.len();
                    continue 'outer;
                }
            }
            at += text[at..].chars().next().map_or(1, char::len_utf8);
        }
        out
    }

    fn mark_specials(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len() + 8);
        let mut cursor = 0usize;
        for range in self.special_ranges(text) {
            out.push_str(&text[cursor..range.start]);
            out.push(PLAIN_OPEN);
            out.push_str(&text[range.clone()]);
            out.push(PLAIN_CLOSE);
            cursor = range.end;
        }
        out.push_str(&text[cursor..]);
        out
    }
}

fn row_error(message: &str) -> Error {
    Error::Input { location: String::new(), message: message.to_string() }
}

/// Call `f` on every string a message carries (values at any depth and object keys), except its role.
fn visit_row_strings(message: &Json, f: &mut dyn FnMut(&str)) {
    fn walk(value: &Json, f: &mut dyn FnMut(&str)) {
        match value {
            Json::String(s) => f(s),
            Json::Array(items) => items.iter().for_each(|v| walk(v, f)),
            Json::Object(map) => {
                for (k, v) in map {
                    f(k);
                    walk(v, f);
                }
            }
            _ => {}
        }
    }
    match message.as_object() {
        Some(map) => {
            for (k, v) in map.iter().filter(|(k, _)| k.as_str() != "role") {
                f(k);
                walk(v, f);
            }
        }
        None => walk(message, f),
    }
}

/// Replace every string a message carries (as [`visit_row_strings`] visits them) by `f(string)`.
fn map_row_strings(message: &mut Json, f: &mut dyn FnMut(&str) -> String) {
    fn walk(value: &mut Json, f: &mut dyn FnMut(&str) -> String, top: bool) {
        match value {
            Json::String(s) => *s = f(s),
            Json::Array(items) => items.iter_mut().for_each(|v| walk(v, f, false)),
            Json::Object(map) => {
                for (k, mut v) in std::mem::take(map) {
                    if top && k == "role" {
                        map.insert(k, v);
                        continue;
                    }
                    walk(&mut v, f, false);
                    map.insert(f(&k), v);
                }
            }
            _ => {}
        }
    }
    walk(message, f, true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A character-level tokenizer: one token per character, and the ChatML / Llama-3 special tokens.
    fn char_tokenizer() -> TextTokenizer {
        let specials = ["<|im_start|>", "<|im_end|>", "<|eot_id|>"];
        let added: Vec<Json> = specials
            .iter()
            .enumerate()
            .map(|(i, s)| {
                json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": true})
            })
            .collect();
        let mut vocab = serde_json::Map::new();
        for (i, s) in specials.iter().enumerate() {
            vocab.insert(s.to_string(), json!(i));
        }
        for (i, c) in (32u8..127).map(char::from).chain(['\n']).enumerate() {
            vocab.insert(c.to_string(), json!(specials.len() + i));
        }
        vocab.insert("?unk".into(), json!(vocab.len()));
        let tokenizer = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": false},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "?unk"}
        });
        TextTokenizer::from_bytes(tokenizer.to_string().as_bytes()).unwrap()
    }

    fn encoder(source: &str, train_on: TrainOn) -> Encoder {
        let template = ChatTemplate::new(source, vec![]).unwrap();
        Encoder::new(Some(template), char_tokenizer(), train_on, true, None)
    }

    const IM_END: u32 = 1;
    const EOT: u32 = 2;

    #[test]
    fn special_token_strings_in_any_row_field_are_plain_text() {
        let source = "{% for m in messages %}<|im_start|>{{ m.role }}{% if m.name %} {{ m.name }}{% endif %}\n\
            {{ m.content }}{% for c in m.tool_calls or [] %}{{ c.function.name }}({{ c.function.arguments | tojson }})\
            {% endfor %}<|im_end|>\n{% endfor %}";
        let e = encoder(source, TrainOn::All);
        let row = json!({"messages": [
            {"role": "user", "content": "hi", "name": "bob<|im_end|>"},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {
                "name": "lookup<|im_end|>", "arguments": {"q<|im_end|>": "x<|eot_id|>"}}}]},
        ]});
        let example = e.encode_row(&row).unwrap();
        // Only the template's own two <|im_end|> are special tokens; the row's four copies are characters.
        assert_eq!(example.ids.iter().filter(|&&id| id == IM_END).count(), 2, "{:?}", example.ids);
        assert!(!example.ids.contains(&EOT));
    }

    #[test]
    fn protection_does_not_change_what_the_template_sees() {
        let source = "{% for m in messages %}{% if m.content.startswith('<|eot_id|>') %}yes{% else %}no\
            {% endif %}{{ m.content[10:] }}{% endfor %}";
        let e = encoder(source, TrainOn::All);
        let messages = json!([{"role": "user", "content": "<|eot_id|>abc"}]);
        let (rendered, _) = e.render_with_spans(&messages).unwrap();
        assert_eq!(rendered.text, "yesabc", "the template sees the content as transformers shows it");
        let row = json!({"messages": [{"role": "user", "content": "<|eot_id|> <|eot_id|>"}]});
        // The template prints only part of the string: the copy it prints is still found and kept plain text.
        let source =
            "{% for m in messages %}{{ m.content }}|{{ m.content.startswith('<|eot_id|>') }}{% endfor %}";
        let example = encoder(source, TrainOn::All).encode_row(&row).unwrap();
        assert!(!example.ids.contains(&EOT), "{:?}", example.ids);
    }

    #[test]
    fn a_string_the_template_rewrites_around_a_special_token_is_refused() {
        let source =
            "{% for m in messages %}{{ m.content[:10] }}{% if m.content.startswith('<') %}!{% endif %}\
            {% endfor %}";
        let err = encoder(source, TrainOn::All)
            .encode_row(&json!({"messages": [{"role": "user", "content": "<|eot_id|>x"}]}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot keep that string plain text"), "{err}");
    }

    #[test]
    fn an_opening_assistant_turn_does_not_train_an_injected_system_prompt() {
        // ChatML without generation tags and a default system prompt when none is given.
        let source = "{% if not messages or messages[0]['role'] != 'system' %}<|im_start|>system\nBe nice.<|im_end|>\n\
            {% endif %}\
            {% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
            {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let e = encoder(source, TrainOn::Assistant);
        let messages = json!([
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "ok"},
        ]);
        let (rendered, spans) = e.render_with_spans(&messages).unwrap();
        let texts: Vec<&str> = spans.iter().map(|s| &rendered.text[s.clone()]).collect();
        assert_eq!(texts, ["Hello<|im_end|>\n", "ok<|im_end|>\n"]);
        // SmolLM2's own template injects the system prompt only inside its loop, so an empty conversation
        // renders without it: the opening turn's start cannot be found, and the row is refused.
        let smollm2 = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}\
            {{ '<|im_start|>system\nYou are SmolLM.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] \
            + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}\
            {% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let err = encoder(smollm2, TrainOn::Assistant).render_with_spans(&messages).unwrap_err().to_string();
        assert!(err.contains("cannot find where assistant turn 0 starts"), "{err}");
        let from_user = json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]);
        let (rendered, spans) = encoder(smollm2, TrainOn::Assistant).render_with_spans(&from_user).unwrap();
        assert_eq!(&rendered.text[spans[0].clone()], "ok<|im_end|>\n");
    }

    #[test]
    fn a_template_whose_prefix_does_not_line_up_is_refused() {
        // The generation prompt differs from how an assistant turn opens: no honest span exists.
        let source = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}\
            {% if add_generation_prompt %}[bot]{% endif %}";
        let e = encoder(source, TrainOn::Assistant);
        let err =
            e.render_with_spans(&json!([{"role": "assistant", "content": "x"}])).unwrap_err().to_string();
        assert!(err.contains("cannot find where assistant turn 0 starts"), "{err}");
        assert!(err.contains("start the conversation with a user or system turn"), "{err}");
    }
}
