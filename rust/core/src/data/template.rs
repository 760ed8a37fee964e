//! Chat templates: Hugging Face Jinja templates rendered with minijinja, with transformers' semantics.
//!
//! transformers renders with `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`, the
//! `loopcontrols` extension, a `tojson` filter that is Python's `json.dumps` (no HTML escaping,
//! `ensure_ascii=False`), and the globals `raise_exception` and `strftime_now`. We set up the same.
//!
//! `{% generation %}...{% endgeneration %}` marks assistant text. minijinja has no custom tags, so the tags are
//! rewritten to a filter block (`{% filter _nibblora_generation %}`), which is a block tag like the original
//! (trim_blocks / lstrip_blocks apply the same way) and wraps its body in two noncharacters. After rendering
//! the markers are removed and their byte positions become the assistant spans.

use std::ops::Range;
use std::sync::LazyLock;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use regex::Regex;

use crate::error::{Error, Result};

/// Opens / closes an assistant (generation) span in the raw render.
pub(crate) const GEN_OPEN: char = '\u{FDD0}';
pub(crate) const GEN_CLOSE: char = '\u{FDD1}';
/// Opens / closes a special-token string that came from message content (to be tokenized as plain text).
pub(crate) const PLAIN_OPEN: char = '\u{FDD2}';
pub(crate) const PLAIN_CLOSE: char = '\u{FDD3}';
/// Every marker; message text holding one of these is refused (it would fake a span).
pub(crate) const MARKERS: [char; 4] = [GEN_OPEN, GEN_CLOSE, PLAIN_OPEN, PLAIN_CLOSE];

const TEMPLATE_NAME: &str = "chat_template";
const RAISED_PREFIX: &str = "the chat template raised an exception: ";

static GENERATION_TAG: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\{%([-+]?)\s*generation\s*([-+]?)%\}").expect("static regex"));
static END_GENERATION_TAG: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\{%([-+]?)\s*endgeneration\s*([-+]?)%\}").expect("static regex"));

/// The named formats, as Jinja sources with generation tags around what the assistant says (its content and
/// end-of-turn token), so masks never depend on guessing.
pub fn named_template(name: &str) -> Option<&'static str> {
    let source = match name.to_ascii_lowercase().replace(['_', '.'], "-").as_str() {
        "chatml" => CHATML,
        "llama-2" | "llama2" => LLAMA2,
        "llama-3" | "llama3" => LLAMA3,
        "mistral" => MISTRAL,
        "alpaca" => ALPACA,
        _ => return None,
    };
    Some(source)
}

/// Names accepted by [`named_template`].
pub const TEMPLATE_NAMES: [&str; 5] = ["chatml", "llama-2", "llama-3", "mistral", "alpaca"];

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}\
{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}\
{{ '\\n' }}{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const LLAMA3: &str = "{{ '<|begin_of_text|>' }}{% for message in messages %}\
{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\
{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}\
{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}\
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

const LLAMA2: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}\
{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}\
{% set system_message = false %}{% endif %}{% for message in loop_messages %}\
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\
{% if loop.index0 == 0 and system_message != false %}\
{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}\
{% else %}{% set content = message['content'] %}{% endif %}\
{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}\
{% elif message['role'] == 'assistant' %}{% generation %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endgeneration %}\
{% endif %}{% endfor %}";

const MISTRAL: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}\
{% set system_message = messages[0]['content'] + '\\n\\n' %}{% else %}{% set loop_messages = messages %}\
{% set system_message = '' %}{% endif %}{{ bos_token }}{% for message in loop_messages %}\
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\
{% if message['role'] == 'user' %}{% if loop.index0 == 0 %}{{ '[INST] ' + system_message + message['content'] + ' [/INST]' }}\
{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}\
{% elif message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}\
{% else %}{{ raise_exception('Only system, user and assistant roles are supported') }}{% endif %}{% endfor %}";

const ALPACA: &str = "{% if messages[0]['role'] != 'system' %}{{ 'Below is an instruction that describes a task. \
Write a response that appropriately completes the request.\\n\\n' }}{% endif %}{% for message in messages %}\
{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}\
{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}\
{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' }}{% generation %}{{ message['content'] + eos_token }}\
{% endgeneration %}{{ '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}";

/// A compiled chat template plus the special-token variables it sees (`bos_token`, `eos_token`, ...).
pub struct ChatTemplate {
    env: Environment<'static>,
    has_generation: bool,
    variables: Vec<(String, String)>,
}

/// One rendered conversation: the text and, when the template marks them, the assistant spans (byte ranges,
/// sorted, disjoint) and the byte ranges of special-token strings that came from message content.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub assistant_spans: Vec<Range<usize>>,
    pub plain_spans: Vec<Range<usize>>,
}

impl ChatTemplate {
    /// Compile `source` (Jinja). `variables` are passed to every render (transformers passes the tokenizer's
    /// special tokens: bos_token, eos_token, unk_token, pad_token...).
    pub fn new(source: &str, variables: Vec<(String, String)>) -> Result<ChatTemplate> {
        let has_generation = GENERATION_TAG.is_match(source);
        let rewritten = GENERATION_TAG.replace_all(source, "{%${1} filter _nibblora_generation ${2}%}");
        let rewritten = END_GENERATION_TAG.replace_all(&rewritten, "{%${1} endfilter ${2}%}").into_owned();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_filter("_nibblora_generation", |body: String| format!("{GEN_OPEN}{body}{GEN_CLOSE}"));
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("{RAISED_PREFIX}{message}")))
            },
        );
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        env.add_template_owned(TEMPLATE_NAME, rewritten)
            .map_err(|e| Error::Template(format!("chat template does not compile: {}", describe(&e))))?;
        Ok(ChatTemplate { env, has_generation, variables })
    }

    /// Whether the template marks assistant text with `{% generation %}` tags.
    pub fn has_generation_tags(&self) -> bool {
        self.has_generation
    }

    /// Render `messages` (a JSON array of message objects) with markers left in place.
    pub(crate) fn render_raw(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::Template(format!("chat template: {}", describe(&e))))?;
        let mut context: Vec<(String, Value)> =
            self.variables.iter().map(|(k, v)| (k.clone(), Value::from(v.clone()))).collect();
        context.push(("messages".into(), Value::from_serialize(messages)));
        context.push(("add_generation_prompt".into(), Value::from(add_generation_prompt)));
        let context: Value = context.into_iter().collect();
        template.render(context).map_err(|e| {
            let text = describe(&e);
            match text.find(RAISED_PREFIX) {
                Some(at) => Error::Template(text[at..].trim_end_matches(')').to_string()),
                None => Error::Template(format!("rendering the chat template failed: {text}")),
            }
        })
    }

    /// Render `messages`; the spans come from generation tags (empty when the template has none).
    pub fn render(&self, messages: &serde_json::Value, add_generation_prompt: bool) -> Result<Rendered> {
        Ok(strip_markers(&self.render_raw(messages, add_generation_prompt)?))
    }
}

/// Remove the markers from a raw render, turning them into byte spans of the clean text.
pub(crate) fn strip_markers(raw: &str) -> Rendered {
    if !raw.contains(MARKERS) {
        return Rendered { text: raw.to_string(), assistant_spans: vec![], plain_spans: vec![] };
    }
    let mut text = String::with_capacity(raw.len());
    let mut assistant_spans: Vec<Range<usize>> = vec![];
    let mut plain_spans = vec![];
    let (mut gen_depth, mut gen_start, mut plain_start) = (0usize, 0usize, 0usize);
    for c in raw.chars() {
        match c {
            GEN_OPEN => {
                if gen_depth == 0 {
                    gen_start = text.len();
                }
                gen_depth += 1;
            }
            GEN_CLOSE => {
                gen_depth = gen_depth.saturating_sub(1);
                if gen_depth == 0 && text.len() > gen_start {
                    match assistant_spans.last_mut() {
                        Some(last) if last.end == gen_start => last.end = text.len(),
                        _ => assistant_spans.push(gen_start..text.len()),
                    }
                }
            }
            PLAIN_OPEN => plain_start = text.len(),
            PLAIN_CLOSE => plain_spans.push(plain_start..text.len()),
            _ => text.push(c),
        }
    }
    Rendered { text, assistant_spans, plain_spans }
}

fn describe(err: &minijinja::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        text.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    text
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => Some(" ".repeat(i64::try_from(v.clone()).unwrap_or(0).max(0) as usize)),
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(seps) if !seps.is_none() && !seps.is_undefined() => {
            let a = seps.get_item_by_index(0)?.as_str().unwrap_or(",").to_string();
            let b = seps.get_item_by_index(1)?.as_str().unwrap_or(":").to_string();
            (a, b)
        }
        _ => ((if indent.is_some() { "," } else { ", " }).to_string(), ": ".to_string()),
    };
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(&json, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl JsonStyle {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    }

    fn write(&self, value: &serde_json::Value, level: usize, out: &mut String) {
        use serde_json::Value as J;
        match value {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => out.push_str(&i.to_string()),
                (_, Some(u), _) => out.push_str(&u.to_string()),
                (_, _, Some(f)) => out.push_str(&python_float_repr(f)),
                _ => out.push_str(&n.to_string()),
            },
            J::String(s) => self.write_string(s, out),
            J::Array(items) => {
                if items.is_empty() {
                    out.push_str("[]");
                    return;
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(item, level + 1, out);
                }
                self.newline(level, out);
                out.push(']');
            }
            J::Object(map) => {
                if map.is_empty() {
                    out.push_str("{}");
                    return;
                }
                let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (key, item)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write_string(key, out);
                    out.push_str(&self.key_sep);
                    self.write(item, level + 1, out);
                }
                self.newline(level, out);
                out.push('}');
            }
        }
    }

    fn write_string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form below 1e-4 and from 1e16.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    let sci = format!("{f:e}"); // e.g. "1.5e-7"
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if (-4..16).contains(&exponent) {
        let plain = format!("{f}");
        if plain.contains('.') {
            plain
        } else {
            format!("{plain}.0")
        }
    } else {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.abs())
    }
}

/// `strftime_now(format)`: the current local time, as transformers' `datetime.now().strftime(format)`.
fn strftime_now(format: &str) -> std::result::Result<String, minijinja::Error> {
    format_time(&chrono::Local::now(), format)
}

/// `strftime` through chrono; a format chrono cannot read is a template error (never a panic).
pub(crate) fn format_time<Tz: chrono::TimeZone>(
    time: &chrono::DateTime<Tz>,
    format: &str,
) -> std::result::Result<String, minijinja::Error>
where
    Tz::Offset: std::fmt::Display,
{
    use chrono::format::{Item, StrftimeItems};
    use std::fmt::Write;
    let items: Vec<Item<'_>> = StrftimeItems::new(format).collect();
    if items.contains(&Item::Error) {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: {format:?} is not a strftime format chrono understands"),
        ));
    }
    let mut out = String::new();
    write!(out, "{}", time.format_with_items(items.into_iter())).map_err(|_| {
        minijinja::Error::new(ErrorKind::InvalidOperation, format!("strftime_now: cannot format {format:?}"))
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chatml_marks_assistant_content_and_end_of_turn() {
        let t = ChatTemplate::new(named_template("chatml").unwrap(), vec![]).unwrap();
        let msgs = json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]);
        let r = t.render(&msgs, false).unwrap();
        assert_eq!(r.text, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n");
        assert_eq!(r.assistant_spans.len(), 1);
        assert_eq!(&r.text[r.assistant_spans[0].clone()], "yo<|im_end|>");
    }

    #[test]
    fn raise_exception_message_is_surfaced() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", vec![]).unwrap();
        let err = t.render(&json!([]), false).unwrap_err().to_string();
        assert!(err.contains("the chat template raised an exception: roles must alternate"), "{err}");
    }

    #[test]
    fn syntax_error_is_a_template_error() {
        let err = ChatTemplate::new("{% for m in messages %}", vec![]).err().unwrap();
        assert!(matches!(err, Error::Template(_)));
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t =
            ChatTemplate::new("{{ messages | tojson }}|{{ messages | tojson(indent=2) }}", vec![]).unwrap();
        let r =
            t.render(&json!([{"a": 1.5, "b": "é<\"x\">\n", "c": [true, null], "d": 1e-7}]), false).unwrap();
        assert_eq!(
            r.text,
            "[{\"a\": 1.5, \"b\": \"é<\\\"x\\\">\\n\", \"c\": [true, null], \"d\": 1e-07}]|[\n  {\n    \"a\": 1.5,\n    \
             \"b\": \"é<\\\"x\\\">\\n\",\n    \"c\": [\n      true,\n      null\n    ],\n    \"d\": 1e-07\n  }\n]"
        );
    }

    #[test]
    fn strftime_formats_a_known_date() {
        let utc = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        assert_eq!(format_time(&utc, "%d %b %Y %H:%M:%S %A").unwrap(), "14 Nov 2023 22:13:20 Tuesday");
        assert!(format_time(&utc, "%Q %").is_err(), "an unknown directive is an error, not a panic");
    }

    #[test]
    fn strftime_now_uses_local_time() {
        let t = ChatTemplate::new("{{ strftime_now('%Y-%m-%d %H') }}", vec![]).unwrap();
        let before = chrono::Local::now().format("%Y-%m-%d %H").to_string();
        let text = t.render(&json!([]), false).unwrap().text;
        let after = chrono::Local::now().format("%Y-%m-%d %H").to_string();
        assert!(text == before || text == after, "{text} vs {before}");
    }
}
