//! What a request body says (model, stream, whether the client asked for stream usage), and the
//! one rewrite the interceptor may make: asking OpenAI-style streams to include usage.

use std::borrow::Cow;

use serde::Deserialize;

use crate::needle::{Needle, needle};
use crate::quick_json::{Reader, first_time};

static STREAM_OPTIONS_KEY: Needle = needle!(b"\"stream_options\"");

/// The facts of a JSON request body the accounting needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFacts {
    pub model: Option<String>,
    pub stream: bool,
    /// `stream_options.include_usage` as the client sent it.
    pub include_usage: bool,
    /// `stream_options` is present (with or without `include_usage`).
    pub has_stream_options: bool,
    /// The most output tokens the request allows: `max_tokens` (OpenAI chat, Anthropic),
    /// `max_completion_tokens` (OpenAI), `max_output_tokens` (Responses API) or Gemini's
    /// `generationConfig.maxOutputTokens`.
    pub max_output_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    #[serde(rename = "generationConfig")]
    generation_config: Option<GenerationConfig>,
}

#[derive(Deserialize)]
struct GenerationConfig {
    #[serde(rename = "maxOutputTokens")]
    max_output_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// Reads the facts of a JSON request body.
pub fn probe(body: &[u8]) -> Result<RequestFacts, serde_json::Error> {
    // serde also reads a struct from a JSON array (`["gpt-4o", true]`): only objects are requests.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(serde::de::Error::custom("a request body is a JSON object"));
    }
    if let Some(facts) = quick_probe(body) {
        return Ok(facts);
    }
    serde_json::from_slice(body).map(Probe::into_facts)
}

impl Probe<'_> {
    fn into_facts(self) -> RequestFacts {
        RequestFacts {
            model: self.model.map(Cow::into_owned),
            stream: self.stream.unwrap_or(false),
            include_usage: self
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            has_stream_options: self.stream_options.is_some(),
            max_output_tokens: self
                .max_completion_tokens
                .or(self.max_tokens)
                .or(self.max_output_tokens)
                .or(self.generation_config.and_then(|g| g.max_output_tokens)),
        }
    }
}

/// `probe` by the quick reader: `None` where it declines, serde then reads the body (so results and
/// errors stay serde's).
fn quick_probe(body: &[u8]) -> Option<RequestFacts> {
    let mut model = None;
    let mut stream = None;
    let mut stream_options = None;
    let mut seen = 0;
    // In `probe`'s order of precedence: max_completion_tokens, max_tokens, max_output_tokens,
    // generationConfig.maxOutputTokens.
    let mut limits = [None; 4];
    Reader::new(body).whole_object(|reader, name| {
        match name {
            b"model" => {
                first_time(&mut seen, 0)?;
                model = reader.str_or_null()?;
            }
            b"stream" => {
                first_time(&mut seen, 1)?;
                stream = reader.bool_or_null()?;
            }
            b"stream_options" => {
                first_time(&mut seen, 2)?;
                stream_options = reader.one_member_or_null(b"include_usage", Reader::bool_or_null)?;
            }
            b"max_completion_tokens" => {
                first_time(&mut seen, 3)?;
                limits[0] = reader.u64_or_null()?;
            }
            b"max_tokens" => {
                first_time(&mut seen, 4)?;
                limits[1] = reader.u64_or_null()?;
            }
            b"max_output_tokens" => {
                first_time(&mut seen, 5)?;
                limits[2] = reader.u64_or_null()?;
            }
            b"generationConfig" => {
                first_time(&mut seen, 6)?;
                limits[3] = reader
                    .one_member_or_null(b"maxOutputTokens", Reader::u64_or_null)?
                    .flatten();
            }
            _ => reader.skip()?,
        }
        Some(())
    })?;
    Some(RequestFacts {
        model: model.map(str::to_owned),
        stream: stream.unwrap_or(false),
        include_usage: stream_options.flatten().unwrap_or(false),
        has_stream_options: stream_options.is_some(),
        max_output_tokens: limits.into_iter().flatten().next(),
    })
}

/// Whether the quick reader, where it reads a body, reads what serde reads (the fuzz target asserts
/// it).
#[doc(hidden)]
pub fn quick_probe_agrees_with_serde(body: &[u8]) -> bool {
    let Some(quick) = quick_probe(body) else {
        return true;
    };
    serde_json::from_slice::<Probe<'_>>(body).is_ok_and(|probe| probe.into_facts() == quick)
}

/// The body with `stream_options.include_usage` set to true. Without `stream_options` the member
/// is inserted after the opening brace, leaving every other byte as the client sent it.
pub fn inject_include_usage(body: &[u8], facts: &RequestFacts) -> Result<Vec<u8>, serde_json::Error> {
    const MEMBER: &[u8] = br#""stream_options":{"include_usage":true},"#;
    // A `"stream_options"` anywhere (even `null`, or a nested key) takes the parse-and-rewrite path.
    if !facts.has_stream_options
        && !STREAM_OPTIONS_KEY.found_in(body)
        && let Some(brace) = body.iter().position(|b| !b.is_ascii_whitespace())
        && body[brace] == b'{'
    {
        let mut out = Vec::with_capacity(body.len() + MEMBER.len());
        out.extend_from_slice(&body[..=brace]);
        out.extend_from_slice(MEMBER);
        out.extend_from_slice(&body[brace + 1..]);
        return Ok(out);
    }
    let mut value: serde_json::Value = serde_json::from_slice(body)?;
    let Some(object) = value.as_object_mut() else {
        return Err(serde::de::Error::custom("a request body is a JSON object"));
    };
    let options = object
        .entry("stream_options")
        .or_insert_with(|| serde_json::Value::Object(Default::default()));
    if !options.is_object() {
        *options = serde_json::Value::Object(Default::default());
    }
    if let Some(options) = options.as_object_mut() {
        options.insert("include_usage".into(), serde_json::Value::Bool(true));
    }
    serde_json::to_vec(&value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_model_stream_and_options() {
        let facts = probe(br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream":true}"#)
            .expect("probe");
        assert_eq!(facts.model.as_deref(), Some("gpt-4o"));
        assert!(facts.stream && !facts.include_usage && !facts.has_stream_options);
        let facts =
            probe(br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#).expect("probe");
        assert!(facts.include_usage);
        assert!(probe(b"{\"model\": 3}").is_err());
        assert!(probe(b"not json").is_err());
        // Found by the fuzzer: serde reads structs from arrays too.
        assert!(probe(b"[\t\"t\",true\t,{}]\n").is_err());
    }

    #[test]
    fn the_quick_reader_probes_as_serde_does_and_leaves_it_the_rest() {
        let read = [
            &br#"{"model":"gpt-4o","messages":[{"role":"user","content":"a\nb \u00e9"}],"stream":true}"#[..],
            br#" {"model":null,"stream":null,"stream_options":null,"max_tokens":null} "#,
            br#"{"stream_options":{"include_usage":false,"x":[1,{"y":2}]},"stream":false}"#,
            br#"{"stream_options":{},"max_output_tokens":7,"max_tokens":9}"#,
            br#"{"contents":[],"generationConfig":{"temperature":0.5,"maxOutputTokens":30}}"#,
            r#"{"generationConfig":null,"unknown":{"model":"nested"},"model":"mé"}"#.as_bytes(),
        ];
        for body in read {
            assert!(quick_probe(body).is_some(), "{}", String::from_utf8_lossy(body));
            assert!(
                quick_probe_agrees_with_serde(body),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let declined = [
            &br#"{"model":"a","model":"b"}"#[..],
            br#"{"m\u006fdel":"m"}"#,
            br#"{"model":"gpt\u002d4o"}"#,
            br#"{"stream":1}"#,
            br#"{"stream_options":{"include_usage":true,"include_usage":true}}"#,
            br#"{"max_tokens":1.5}"#,
            br#"{"max_tokens":-1}"#,
            br#"["gpt-4o",true]"#,
            br#"{"model":"m"} x"#,
            br#"{"model":"m",}"#,
            b"{\"model\":\"\x01\"}",
        ];
        for body in declined {
            assert!(quick_probe(body).is_none(), "{}", String::from_utf8_lossy(body));
        }
        // What serde makes of a declined body stands.
        let escaped = probe(br#"{"model":"gpt\u002d4o","stream":true}"#).expect("serde reads it");
        assert_eq!(escaped.model.as_deref(), Some("gpt-4o"));
        assert!(probe(br#"{"model":"a","model":"b"}"#).is_err());
    }

    #[test]
    fn probes_the_output_limit_of_each_api() {
        let limit = |body: &[u8]| probe(body).expect("probe").max_output_tokens;
        assert_eq!(limit(br#"{"model":"m","max_tokens":100}"#), Some(100));
        assert_eq!(
            limit(br#"{"model":"m","max_tokens":100,"max_completion_tokens":50}"#),
            Some(50)
        );
        assert_eq!(limit(br#"{"model":"m","max_output_tokens":70}"#), Some(70));
        assert_eq!(
            limit(br#"{"contents":[],"generationConfig":{"maxOutputTokens":30}}"#),
            Some(30)
        );
        assert_eq!(limit(br#"{"model":"m"}"#), None);
        assert!(probe(br#"{"model":"m","max_tokens":-1}"#).is_err());
    }

    #[test]
    fn injection_keeps_the_rest_byte_for_byte() {
        let body = br#"  {"model":"gpt-4o","stream":true}"#;
        let facts = probe(body).expect("probe");
        let out = inject_include_usage(body, &facts).expect("inject");
        assert_eq!(
            out,
            br#"  {"stream_options":{"include_usage":true},"model":"gpt-4o","stream":true}"#
        );
        let again = probe(&out).expect("probe");
        assert!(again.include_usage && again.stream);
    }

    #[test]
    fn injection_overrides_an_explicit_false() {
        let body = br#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"x":1}}"#;
        let facts = probe(body).expect("probe");
        let out = inject_include_usage(body, &facts).expect("inject");
        let value: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(value["stream_options"]["include_usage"], true);
        assert_eq!(value["stream_options"]["x"], 1);
        assert_eq!(value["model"], "m");
        let body = br#"{"model":"m","stream":true,"stream_options":null}"#;
        let out = inject_include_usage(body, &probe(body).expect("probe")).expect("inject");
        assert!(probe(&out).expect("probe").include_usage);
    }
}
