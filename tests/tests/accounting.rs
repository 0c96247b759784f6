//! Privileged end-to-end tests of provider accounting: the official SDKs in a pod, through the
//! interceptor, against the simulated providers. The usage the daemon records must equal what the
//! provider sent, token for token, and the cost must equal the price table's.
//! Run with `--test-threads=1` (they share kernel state); see tests/README.md.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tests::provider::openai::{BROKEN_BODY, REPLY, chat_stream_events};
use tests::provider::{Ledger, Sent};
use tests::scenario::{Scenario, policy};

const CHAT: &str = "https://api.openai.com/v1/chat/completions";

fn scenario(test: &str) -> Option<Scenario> {
    if !tests::privileged_available(test) {
        return None;
    }
    Some(Scenario::start(&policy("open"), &[]).expect("simulated node and daemon start"))
}

/// The price table, read independently of the interceptor's own code.
fn price_rates(provider: &str, family: &str) -> [u128; 5] {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../interceptor-protocols/data/prices.yaml");
    let text = std::fs::read_to_string(&path).expect("price table");
    let table: serde_norway::Value = serde_norway::from_str(&text).expect("price table parses");
    let model = &table["providers"][provider]["models"][family];
    let rate = |field: &str, default: f64| {
        let dollars_per_million = model[field].as_f64().unwrap_or(default);
        (dollars_per_million * 1e6).round() as u128
    };
    let input = model["input"].as_f64().expect("input price");
    let output = model["output"].as_f64().expect("output price");
    [
        rate("input", input),
        rate("cachedInput", input),
        rate("cacheWrite", input),
        rate("output", output),
        rate("reasoning", output),
    ]
}

/// Cost in picodollars: uncached input, cache reads, cache writes, visible output and reasoning,
/// each at its rate.
fn expected_cost(sent: &Sent, rates: [u128; 5]) -> u128 {
    let uncached = sent.input - sent.cached - sent.cache_write;
    let visible = sent.output - sent.reasoning;
    u128::from(uncached) * rates[0]
        + u128::from(sent.cached) * rates[1]
        + u128::from(sent.cache_write) * rates[2]
        + u128::from(visible) * rates[3]
        + u128::from(sent.reasoning) * rates[4]
}

/// The daemon's `request` line for a response the provider identified as `id`.
fn request_line(s: &mut Scenario, id: &str) -> Value {
    s.daemon
        .wait_log(Duration::from_secs(10), |l| {
            l["message"] == "request" && (l["request_id"] == id || l["response_id"] == id)
        })
        .unwrap_or_else(|e| panic!("no request line for {id}: {e:#}"))
}

fn assert_accounted(s: &mut Scenario, sent: &Sent, provider: &str, family: &str) -> Value {
    let line = request_line(s, &sent.id);
    assert_eq!(line["usage_status"], "reported", "{line}");
    assert_eq!(line["model"], sent.model.as_str(), "{line}");
    assert_eq!(line["input_tokens"], sent.input, "{line}");
    assert_eq!(line["cached_input_tokens"], sent.cached, "{line}");
    assert_eq!(line["cache_write_tokens"], sent.cache_write, "{line}");
    assert_eq!(line["output_tokens"], sent.output, "{line}");
    assert_eq!(line["reasoning_tokens"], sent.reasoning, "{line}");
    assert_eq!(line["cost_status"], "priced", "{line}");
    assert_eq!(line["priced_as"], family, "{line}");
    let cost = expected_cost(sent, price_rates(provider, family));
    assert_eq!(
        line["cost_picodollars"].as_u64().map(u128::from),
        Some(cost),
        "{line}"
    );
    line
}

fn sent(ledger: &Ledger, id: &Value) -> Sent {
    let id = id.as_str().unwrap_or_else(|| panic!("the SDK saw an id: {id}"));
    ledger
        .find(id)
        .unwrap_or_else(|| panic!("the provider recorded {id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_sdks_are_accounted_token_for_token_and_priced_from_the_table() {
    let Some(mut s) = scenario("official_sdks_are_accounted_token_for_token_and_priced_from_the_table")
    else {
        return;
    };
    let results = s.pod_python_json("accounting_sdks.py").expect("SDK script");
    let reply = REPLY.concat();
    for call in [
        "openai_chat",
        "openai_stream_plain",
        "openai_responses_stream",
        "openai_responses",
        "anthropic_message",
        "anthropic_stream",
        "gemini_generate",
        "gemini_stream",
    ] {
        assert_eq!(results[call]["text"], reply.as_str(), "{call}: {results}");
    }
    // The stream whose client did not ask for usage looks exactly as if nothing was injected.
    assert_eq!(results["openai_stream_plain"]["saw_usage"], false, "{results}");
    assert_eq!(
        results["openai_stream_plain"]["saw_empty_choices"], false,
        "{results}"
    );

    let ledger = s.provider.ledger.clone();
    // The SDKs saw what the provider sent (the interceptor changed nothing they read).
    let chat = sent(&ledger, &results["openai_chat"]["id"]);
    assert_eq!(
        results["openai_chat"]["usage"],
        serde_json::json!([chat.input, chat.cached, chat.output])
    );
    let anthropic = sent(&ledger, &results["anthropic_stream"]["id"]);
    assert_eq!(
        results["anthropic_stream"]["usage"],
        serde_json::json!([
            anthropic.input - anthropic.cached - anthropic.cache_write,
            anthropic.cache_write,
            anthropic.cached,
            anthropic.output
        ])
    );
    let gemini = sent(&ledger, &results["gemini_stream"]["id"]);
    assert_eq!(
        results["gemini_stream"]["usage"],
        serde_json::json!([
            gemini.input,
            gemini.cached,
            gemini.output - gemini.reasoning,
            gemini.reasoning
        ])
    );

    // The daemon recorded exactly what each response carried, and priced it from the table.
    let expectations = [
        ("openai_chat", "openai", "gpt-4o-mini", "chat", false),
        ("openai_stream_plain", "openai", "gpt-4o-mini", "chat", true),
        ("openai_stream_usage", "openai", "gpt-4o-mini", "chat", true),
        ("openai_responses_stream", "openai", "gpt-4.1", "responses", true),
        ("openai_responses", "openai", "gpt-4.1", "responses", false),
        (
            "openai_embeddings",
            "openai",
            "text-embedding-3-small",
            "embeddings",
            false,
        ),
        (
            "anthropic_message",
            "anthropic",
            "claude-sonnet-4-5",
            "chat",
            false,
        ),
        ("anthropic_stream", "anthropic", "claude-sonnet-4-5", "chat", true),
        ("gemini_generate", "gemini", "gemini-2.5-flash", "chat", false),
        ("gemini_stream", "gemini", "gemini-2.5-flash", "chat", true),
    ];
    for (call, provider, family, kind, stream) in expectations {
        let sent = sent(&ledger, &results[call]["id"]);
        let line = assert_accounted(&mut s, &sent, provider, family);
        assert_eq!(line["provider"], provider, "{call}: {line}");
        assert_eq!(line["kind"], kind, "{call}: {line}");
        assert_eq!(line["stream"], stream, "{call}: {line}");
        assert_eq!(
            line["usage_injected"],
            call == "openai_stream_plain",
            "{call}: {line}"
        );
        if stream && kind != "embeddings" {
            assert!(
                line["ttft_ms"].as_f64().is_some_and(|t| t > 0.0),
                "{call}: {line}"
            );
        }
    }
    assert_eq!(ledger.all().len(), expectations.len(), "{:#?}", ledger.all());
    let metric = |series: &str| s.daemon.metric(series).expect("scrape");
    assert_eq!(
        metric("interceptor_usage_results_total{provider=\"openai\",result=\"reported\"}"),
        6.0
    );
    assert_eq!(
        metric("interceptor_usage_results_total{provider=\"anthropic\",result=\"reported\"}"),
        2.0
    );
    assert_eq!(
        metric("interceptor_usage_results_total{provider=\"gemini\",result=\"reported\"}"),
        2.0
    );
    assert_eq!(metric("interceptor_stream_usage_injected_total"), 1.0);
    let anthropic_input: u64 = ledger
        .all()
        .iter()
        .filter(|s| s.model.starts_with("claude"))
        .map(|s| s.input)
        .sum();
    assert_eq!(
        s.daemon
            .metric_sum(
                "interceptor_tokens_total",
                &[
                    ("model", "claude-sonnet-4-5"),
                    ("provider", "anthropic"),
                    ("type", "input"),
                    ("estimated", "false")
                ]
            )
            .expect("scrape"),
        anthropic_input as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_stream_reaches_the_client_byte_for_byte() {
    let Some(mut s) = scenario("an_injected_stream_reaches_the_client_byte_for_byte") else {
        return;
    };
    let body = r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let curl = s.pod_post_json(CHAT, body, &["-N"]).expect("curl");
    assert!(curl.success(), "{}", curl.describe());
    let expected = chat_stream_events("gpt-4o-mini-2024-07-18", false, &Value::Null).concat();
    assert_eq!(curl.stdout(), expected, "the client sees the stream it asked for");
    let line = s
        .daemon
        .wait_log(Duration::from_secs(10), |l| l["message"] == "request")
        .expect("request line");
    assert_eq!(line["usage_injected"], true, "{line}");
    assert_eq!(line["usage_status"], "reported", "{line}");
    let sent = s.provider.ledger.all();
    assert_eq!(sent.len(), 1, "the provider was asked for usage: {sent:#?}");
    assert_eq!(line["output_tokens"], sent[0].output, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_errors_unknown_paths_and_malformed_bodies_are_recorded() {
    let Some(mut s) = scenario("provider_errors_unknown_paths_and_malformed_bodies_are_recorded") else {
        return;
    };
    let limited = r#"{"model":"rate-limited","messages":[{"role":"user","content":"hi"}]}"#;
    let curl = s
        .pod_post_json(CHAT, limited, &["-w", "\n%{http_code}"])
        .expect("curl");
    assert!(curl.stdout().ends_with("\n429"), "{}", curl.describe());
    let line = s
        .daemon
        .wait_log(Duration::from_secs(10), |l| {
            l["message"] == "request" && l["status"] == 429
        })
        .expect("429 line");
    assert_eq!(line["provider_error"], "requests", "{line}");
    assert_eq!(line["provider_error_code"], "rate_limit_exceeded", "{line}");
    assert_eq!(line["retry_after"], "20", "{line}");
    assert_eq!(line["ratelimit_remaining_requests"], "0", "{line}");
    assert_eq!(line["ratelimit_remaining_tokens"], "1500", "{line}");
    assert_eq!(line["usage_status"], "none", "{line}");
    assert_eq!(line["requested_model"], "rate-limited", "{line}");

    // An unknown path on a provider domain is a request of kind `other`, never an error.
    let curl = s
        .pod_curl_trusting("https://api.openai.com/v1/models", &[])
        .expect("curl");
    assert!(curl.success(), "{}", curl.describe());
    let line = s
        .daemon
        .wait_log(Duration::from_secs(10), |l| {
            l["message"] == "request" && l["path"] == "/v1/models"
        })
        .expect("models line");
    assert_eq!(line["kind"], "other", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert!(
        line["error"].is_null() && line["accounting_problem"].is_null(),
        "{line}"
    );

    // A body cut short is passed on as it is and counted as malformed usage.
    let broken = r#"{"model":"broken-body","messages":[]}"#;
    let curl = s.pod_post_json(CHAT, broken, &[]).expect("curl");
    assert_eq!(curl.stdout(), BROKEN_BODY, "{}", curl.describe());
    let line = s
        .daemon
        .wait_log(Duration::from_secs(10), |l| {
            l["message"] == "request" && l["requested_model"] == "broken-body"
        })
        .expect("broken line");
    assert_eq!(line["kind"], "chat", "{line}");
    assert_eq!(line["usage_status"], "malformed", "{line}");
    assert!(line["accounting_problem"].is_string(), "{line}");
    assert_eq!(line["cost_status"], "no_usage", "{line}");
    let metric = |series: &str| s.daemon.metric(series).expect("scrape");
    assert_eq!(
        metric("interceptor_provider_errors_total{provider=\"openai\",status=\"429\",type=\"requests\"}"),
        1.0
    );
    assert_eq!(
        s.daemon
            .metric_sum(
                "interceptor_provider_requests_total",
                &[
                    ("kind", "other"),
                    ("provider", "openai"),
                    ("stream", "false"),
                    ("status_class", "2xx")
                ]
            )
            .expect("scrape"),
        1.0
    );
    assert_eq!(
        metric("interceptor_usage_results_total{provider=\"openai\",result=\"malformed\"}"),
        1.0
    );
}

/// The prompt tokens of one user message by OpenAI's cookbook rule, with o200k_base.
fn prompt_tokens(content: &str) -> u64 {
    let bpe = tiktoken_rs::o200k_base_singleton();
    let count = |text: &str| bpe.encode_ordinary(text).len() as u64;
    3 + count("user") + count(content) + 3
}

fn output_tokens(text: &str) -> u64 {
    tiktoken_rs::o200k_base_singleton().encode_ordinary(text).len() as u64
}

/// The delta text of the chat chunks a client received.
fn delivered_text(sse: &str) -> String {
    sse.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .filter_map(|chunk| {
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estimate_mode_counts_streams_with_the_tokenizer() {
    if !tests::privileged_available("estimate_mode_counts_streams_with_the_tokenizer") {
        return;
    }
    let policy = format!("{}accounting:\n  streamUsage: estimate\n", policy("open"));
    let mut s = Scenario::start(&policy, &[]).expect("simulated node and daemon start");
    let content = "Count these words, please.";
    let body = format!(
        r#"{{"model":"gpt-4o-mini","stream":true,"messages":[{{"role":"user","content":"{content}"}}]}}"#
    );
    let curl = s.pod_post_json(CHAT, &body, &["-N"]).expect("curl");
    assert!(curl.success(), "{}", curl.describe());
    assert_eq!(delivered_text(&curl.stdout()), REPLY.concat());
    let line = s
        .daemon
        .wait_log(Duration::from_secs(10), |l| l["message"] == "request")
        .expect("request line");
    assert_eq!(line["usage_injected"], false, "{line}");
    assert!(
        s.provider.ledger.all().is_empty(),
        "the request went out unchanged"
    );
    assert_eq!(line["usage_status"], "estimated", "{line}");
    assert_eq!(line["estimated_with"], "o200k_base", "{line}");
    assert_eq!(line["input_tokens"], prompt_tokens(content), "{line}");
    assert_eq!(line["output_tokens"], output_tokens(&REPLY.concat()), "{line}");
    assert_eq!(line["cost_status"], "priced", "{line}");
    assert_eq!(
        s.daemon
            .metric("interceptor_usage_results_total{provider=\"openai\",result=\"estimated\"}")
            .expect("scrape"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_client_cancels_is_accounted_for_what_was_delivered() {
    let Some(mut s) = scenario("a_stream_the_client_cancels_is_accounted_for_what_was_delivered") else {
        return;
    };
    let content = "Tell me a long story.";
    let body = format!(
        r#"{{"model":"slow-stream","stream":true,"messages":[{{"role":"user","content":"{content}"}}]}}"#
    );
    // Chunks come 400 ms apart: the client gives up after about two of them.
    let curl = s
        .pod_post_json(CHAT, &body, &["-N", "--max-time", "1"])
        .expect("curl");
    assert_eq!(
        curl.output.status.code(),
        Some(28),
        "curl timed out: {}",
        curl.describe()
    );
    let received = delivered_text(&curl.stdout());
    assert!(
        !received.is_empty() && received != REPLY.concat(),
        "{}",
        curl.describe()
    );
    let line = s
        .daemon
        .wait_log(Duration::from_secs(10), |l| l["message"] == "request")
        .expect("request line");
    assert_eq!(line["usage_injected"], true, "{line}");
    assert_eq!(line["usage_status"], "estimated", "{line}");
    assert_eq!(line["input_tokens"], prompt_tokens(content), "{line}");
    // What reached the client, or at most the one chunk in flight when it went away.
    let delivered = output_tokens(&received);
    let next = REPLY
        .iter()
        .scan(String::new(), |text, piece| {
            text.push_str(piece);
            Some(text.clone())
        })
        .find(|text| text.len() > received.len())
        .map_or(delivered, |text| output_tokens(&text));
    let counted = line["output_tokens"].as_u64().expect("output tokens");
    assert!(
        (delivered..=next).contains(&counted),
        "counted {counted}, delivered {delivered} ({received:?}), next {next}: {line}"
    );
}
