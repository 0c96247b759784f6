//! Golden-file conformance tests: every case of `tests/fixtures/corpus.yaml` is fed through the
//! response accountant (whole, in small chunks, and where asked split at every byte offset) and
//! must give exactly the expected usage, model, error and cost.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use http::{HeaderMap, HeaderName, HeaderValue};
use interceptor_protocols::{Accounting, Adapter, Limits, PriceTable, ResponseAccountant, classify};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Case {
    file: String,
    adapter: Adapter,
    path: String,
    #[serde(default)]
    query: String,
    #[serde(default = "ok")]
    status: u16,
    content_type: String,
    #[serde(default)]
    headers: HashMap<String, String>,
    encoding: Option<String>,
    #[serde(default)]
    split_every_byte: bool,
    truncate_at: Option<usize>,
    #[serde(default = "yes")]
    complete: bool,
    expect: Expect,
}

fn ok() -> u16 {
    200
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Expect {
    kind: String,
    usage_status: String,
    #[serde(default)]
    stream: bool,
    first_output: Option<bool>,
    model: Option<String>,
    usage: Option<[u64; 5]>,
    error: Option<String>,
    error_code: Option<String>,
    priced_as: Option<String>,
    cost: Option<u128>,
}

struct Run {
    accounting: Accounting,
    first_output: bool,
}

fn run(case: &Case, body: &[u8], chunks: &[&[u8]]) -> Run {
    let route = classify(case.adapter, "POST", &case.path, &case.query);
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_str(&case.content_type).expect("content type"),
    );
    for (name, value) in &case.headers {
        headers.insert(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    if let Some(encoding) = &case.encoding {
        headers.insert(
            http::header::CONTENT_ENCODING,
            HeaderValue::from_str(encoding).expect("encoding"),
        );
    }
    let mut accountant =
        ResponseAccountant::new(case.adapter, &route, case.status, &headers, Limits::default());
    let mut first_output = false;
    let mut fed = 0;
    for chunk in chunks {
        first_output |= accountant.feed(chunk);
        fed += chunk.len();
    }
    assert_eq!(fed, body.len());
    Run {
        accounting: accountant.finish(case.complete),
        first_output,
    }
}

fn encode(case: &Case, plain: Vec<u8>) -> Vec<u8> {
    match case.encoding.as_deref() {
        None => plain,
        Some("gzip") => {
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(&plain).expect("gzip");
            encoder.finish().expect("gzip")
        }
        Some("br") => {
            let mut out = Vec::new();
            {
                let mut encoder = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                encoder.write_all(&plain).expect("brotli");
            }
            out
        }
        Some(other) => panic!("no encoder for {other}"),
    }
}

fn check(case: &Case, run: &Run, how: &str) {
    let label = format!("{} ({}) {how}", case.file, case.path);
    let expect = &case.expect;
    let accounting = &run.accounting;
    let route = classify(case.adapter, "POST", &case.path, &case.query);
    assert_eq!(route.kind.name(), expect.kind, "{label}: kind");
    assert_eq!(
        accounting.status.name(),
        expect.usage_status,
        "{label}: usage status (problem: {:?})",
        accounting.problem
    );
    assert_eq!(accounting.stream, expect.stream, "{label}: stream");
    if let Some(first_output) = expect.first_output {
        assert_eq!(run.first_output, first_output, "{label}: first output");
    }
    assert_eq!(accounting.observation.model, expect.model, "{label}: model");
    let usage = accounting.usage.map(|u| {
        [
            u.input_tokens,
            u.cached_input_tokens,
            u.cache_write_tokens,
            u.output_tokens,
            u.reasoning_tokens,
        ]
    });
    assert_eq!(usage, expect.usage, "{label}: usage");
    assert_eq!(
        accounting.observation.error.as_ref().map(|e| e.kind.as_str()),
        expect.error.as_deref(),
        "{label}: error"
    );
    if expect.error_code.is_some() {
        assert_eq!(
            accounting
                .observation
                .error
                .as_ref()
                .and_then(|e| e.code.as_deref()),
            expect.error_code.as_deref(),
            "{label}: error code"
        );
    }
}

fn check_cost(case: &Case, accounting: &Accounting, table: &PriceTable) {
    let (Some(priced_as), Some(cost)) = (&case.expect.priced_as, case.expect.cost) else {
        return;
    };
    let provider = match case.adapter {
        Adapter::Openai | Adapter::AzureOpenai => "openai",
        Adapter::Anthropic => "anthropic",
        Adapter::Gemini | Adapter::VertexAi => "gemini",
        Adapter::Bedrock => "bedrock",
        Adapter::OpenaiCompatible => "mistral",
    };
    let model = accounting.observation.model.as_deref().expect("model to price");
    let priced = table
        .lookup(provider, model)
        .unwrap_or_else(|| panic!("{}: {model} has no price", case.file));
    assert_eq!(&*priced.priced_as, priced_as.as_str(), "{}: priced as", case.file);
    let usage = accounting.usage.expect("usage to price");
    assert_eq!(priced.cost(&usage).picodollars, cost, "{}: cost", case.file);
}

#[test]
fn corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let manifest = std::fs::read_to_string(root.join("corpus.yaml")).expect("corpus.yaml");
    let cases: Vec<Case> = serde_norway::from_str(&manifest).expect("corpus.yaml parses");
    let table = PriceTable::builtin().expect("price table");
    assert!(cases.len() >= 30, "the corpus only grows");
    for case in &cases {
        let mut plain = std::fs::read(root.join(&case.file)).unwrap_or_else(|e| panic!("{}: {e}", case.file));
        if let Some(at) = case.truncate_at {
            plain.truncate(at);
        }
        let body = encode(case, plain);
        let whole = run(case, &body, &[&body]);
        check(case, &whole, "whole");
        check_cost(case, &whole.accounting, &table);
        for size in [1, 7, 64] {
            let chunks: Vec<&[u8]> = body.chunks(size).collect();
            let chunked = run(case, &body, &chunks);
            check(case, &chunked, &format!("in {size}-byte chunks"));
            assert_eq!(
                chunked.accounting, whole.accounting,
                "{}: chunks of {size}",
                case.file
            );
        }
        if case.split_every_byte {
            for at in 0..=body.len() {
                let split = run(case, &body, &[&body[..at], &body[at..]]);
                assert_eq!(split.accounting, whole.accounting, "{}: split at {at}", case.file);
                assert_eq!(
                    split.first_output, whole.first_output,
                    "{}: split at {at}",
                    case.file
                );
            }
        }
    }
}

/// A body read whole from its first chunk (the quick reader) gives what the member scanner gives
/// when the same bytes come in pieces, also when garbage or white space follows the object.
#[test]
fn a_body_read_whole_ends_as_one_read_in_pieces() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let object = std::fs::read(root.join("openai/chat-reasoning.json")).expect("fixture");
    // The quick reader takes every successful OpenAI body shape of the corpus.
    for file in [
        "chat-reasoning.json",
        "azure-chat.json",
        "completions.json",
        "embeddings.json",
        "responses.json",
        "images.json",
        "transcription.json",
    ] {
        let body = std::fs::read(root.join("openai").join(file)).expect("fixture");
        assert!(
            interceptor_protocols::openai::quick_body(&mut Default::default(), &body),
            "the quick reader reads {file}"
        );
    }
    let route = classify(Adapter::Openai, "POST", "/v1/chat/completions", "");
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let read = |chunks: &[&[u8]]| {
        let mut accountant =
            ResponseAccountant::new(Adapter::Openai, &route, 200, &headers, Limits::default());
        for chunk in chunks {
            accountant.feed(chunk);
        }
        accountant.finish(true)
    };
    for tail in [&b""[..], b"\r\n ", b"{}", b" x"] {
        let whole = read(&[&object, tail]);
        let bytes: Vec<&[u8]> = object.chunks(1).chain(tail.chunks(1)).collect();
        assert_eq!(whole, read(&bytes), "tail {tail:?}");
        let garbage = tail.iter().any(|b| !b.is_ascii_whitespace());
        assert_eq!(
            whole.status,
            if garbage {
                interceptor_protocols::UsageStatus::Malformed
            } else {
                interceptor_protocols::UsageStatus::Reported
            },
            "tail {tail:?}"
        );
    }
}
