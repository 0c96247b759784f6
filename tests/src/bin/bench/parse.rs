//! `interceptor-bench parse`: usage-extraction throughput for a large streaming response per
//! provider, and the added latency per chunk, against a baseline measured in the same run (a
//! memchr line scan over the same bytes: the least any parser has to do).

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use http::{HeaderMap, HeaderValue};
use interceptor_protocols::eventstream::encode_message;
use interceptor_protocols::sse::SseParser;
use interceptor_protocols::strip::UsageChunkStripper;
use interceptor_protocols::{Adapter, Limits, ResponseAccountant, classify};

/// A large response body and how a client would receive it.
struct Workload {
    name: &'static str,
    adapter: Adapter,
    path: &'static str,
    query: &'static str,
    content_type: &'static str,
    /// The body, one provider event (or JSON piece) per element.
    chunks: Vec<Vec<u8>>,
}

impl Workload {
    fn bytes(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }

    fn joined(&self) -> Vec<u8> {
        self.chunks.concat()
    }
}

const TEXT: &str = "The quick brown fox jumps over the lazy dog, again and again, token by token.";

fn workloads(target_bytes: usize) -> Vec<Workload> {
    let mut out = Vec::new();
    let repeat = |one: &[u8], head: Vec<Vec<u8>>, tail: Vec<Vec<u8>>| {
        let mut chunks = head;
        let count = target_bytes / one.len().max(1);
        chunks.extend(std::iter::repeat_n(one.to_vec(), count));
        chunks.extend(tail);
        chunks
    };
    let openai_chunk = format!(
        "data: {{\"id\":\"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG\",\"object\":\"chat.completion.chunk\",\"created\":1741570283,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_eb9dce56a8\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{TEXT}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
    );
    out.push(Workload {
        name: "openai chat (SSE)",
        adapter: Adapter::Openai,
        path: "/v1/chat/completions",
        query: "",
        content_type: "text/event-stream",
        chunks: repeat(
            openai_chunk.as_bytes(),
            vec![],
            vec![
                b"data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":20,\"total_tokens\":30}}\n\n".to_vec(),
                b"data: [DONE]\n\n".to_vec(),
            ],
        ),
    });
    let responses_delta = format!(
        "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"sequence_number\":4,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"{TEXT}\"}}\n\n"
    );
    out.push(Workload {
        name: "openai responses (SSE)",
        adapter: Adapter::Openai,
        path: "/v1/responses",
        query: "",
        content_type: "text/event-stream",
        chunks: repeat(
            responses_delta.as_bytes(),
            vec![b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"model\":\"gpt-4.1\",\"usage\":null}}\n\n".to_vec()],
            vec![b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"model\":\"gpt-4.1\",\"usage\":{\"input_tokens\":37,\"output_tokens\":11,\"total_tokens\":48}}}\n\n".to_vec()],
        ),
    });
    let anthropic_delta = format!(
        "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{TEXT}\"}}}}\n\n"
    );
    out.push(Workload {
        name: "anthropic messages (SSE)",
        adapter: Adapter::Anthropic,
        path: "/v1/messages",
        query: "",
        content_type: "text/event-stream",
        chunks: repeat(
            anthropic_delta.as_bytes(),
            vec![b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n".to_vec()],
            vec![b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n".to_vec()],
        ),
    });
    let gemini_chunk = format!(
        "data: {{\"candidates\": [{{\"content\": {{\"parts\": [{{\"text\": \"{TEXT}\"}}],\"role\": \"model\"}},\"index\": 0}}],\"usageMetadata\": {{\"promptTokenCount\": 9,\"candidatesTokenCount\": 4,\"totalTokenCount\": 13}},\"modelVersion\": \"gemini-2.5-flash\",\"responseId\": \"3ZGtaO7TKKaVz7IP6NeB8QQ\"}}\r\n\r\n"
    );
    out.push(Workload {
        name: "gemini generate (SSE)",
        adapter: Adapter::Gemini,
        path: "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        query: "alt=sse",
        content_type: "text/event-stream",
        chunks: repeat(gemini_chunk.as_bytes(), vec![], vec![]),
    });
    let headers = [
        (":event-type", "contentBlockDelta"),
        (":content-type", "application/json"),
        (":message-type", "event"),
    ];
    let bedrock_delta = encode_message(
        &headers,
        format!("{{\"contentBlockIndex\":0,\"delta\":{{\"text\":\"{TEXT}\"}},\"p\":\"abcdefgh\"}}")
            .as_bytes(),
    );
    out.push(Workload {
        name: "bedrock converse-stream",
        adapter: Adapter::Bedrock,
        path: "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse-stream",
        query: "",
        content_type: "application/vnd.amazon.eventstream",
        chunks: repeat(
            &bedrock_delta,
            vec![],
            vec![encode_message(
                &[(":event-type", "metadata"), (":message-type", "event")],
                b"{\"usage\":{\"inputTokens\":25,\"outputTokens\":12,\"totalTokens\":37}}",
            )],
        ),
    });
    let embedding = format!(
        "{{\"object\":\"embedding\",\"index\":0,\"embedding\":[{}]}},",
        vec!["-0.0028842222"; 64].join(",")
    );
    out.push(Workload {
        name: "openai embeddings (JSON)",
        adapter: Adapter::Openai,
        path: "/v1/embeddings",
        query: "",
        content_type: "application/json",
        chunks: repeat(
            embedding.as_bytes(),
            vec![b"{\"object\":\"list\",\"data\":[".to_vec()],
            vec![b"{\"object\":\"embedding\",\"index\":1,\"embedding\":[0.1]}],\"model\":\"text-embedding-3-small\",\"usage\":{\"prompt_tokens\":8,\"total_tokens\":8}}".to_vec()],
        ),
    });
    out
}

/// Best of `rounds` timings of `f` (the least disturbed run).
fn best(rounds: u32, mut f: impl FnMut()) -> Duration {
    (0..rounds)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .min()
        .unwrap_or_default()
}

/// The baseline: a memchr scan for line ends over the same chunks (the least any parser does).
fn line_scan_baseline(network: &[&[u8]]) -> Duration {
    best(5, || {
        let lines: usize = network
            .iter()
            .map(|c| memchr::memchr_iter(b'\n', c).count())
            .sum();
        black_box(lines);
    })
}

fn mb_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)
}

fn account(w: &Workload, chunks: &[&[u8]]) -> bool {
    let route = classify(w.adapter, "POST", w.path, w.query);
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(w.content_type),
    );
    let mut accountant = ResponseAccountant::new(w.adapter, &route, 200, &headers, Limits::default());
    for chunk in chunks {
        black_box(accountant.feed(chunk));
    }
    accountant.finish(true).usage.is_some()
}

pub fn run(megabytes: u32) -> anyhow::Result<()> {
    let target = megabytes as usize * 1_000_000;
    println!("Usage-extraction benchmark: {megabytes} MB per provider stream, best of 5 runs.");
    println!("Baseline: a memchr scan for line ends over the same bytes, in the same 16 KiB chunks.\n");
    println!(
        "| stream | baseline MB/s | SSE/frame scan MB/s | full accounting MB/s | accounting / baseline | per event (ns) |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let mut sse_worst = f64::INFINITY;
    let workloads = workloads(target);
    for workload in &workloads {
        let joined = workload.joined();
        let bytes = workload.bytes();
        let network: Vec<&[u8]> = joined.chunks(16 * 1024).collect();
        anyhow::ensure!(
            account(workload, &network),
            "{}: no usage extracted",
            workload.name
        );
        let baseline = line_scan_baseline(&network);
        let scan = if workload.content_type == "text/event-stream" {
            let elapsed = best(5, || {
                let mut parser = SseParser::new(Limits::default().max_event_bytes);
                let mut events = 0u64;
                for chunk in &network {
                    parser.feed(chunk, |_| events += 1);
                }
                black_box(events);
            });
            let rate = mb_per_s(bytes, elapsed);
            sse_worst = sse_worst.min(rate);
            format!("{rate:.0}")
        } else {
            "–".to_owned()
        };
        let full = best(5, || {
            black_box(account(workload, &network));
        });
        // Streaming as clients see it: one event per chunk.
        let events: Vec<&[u8]> = workload.chunks.iter().map(Vec::as_slice).collect();
        let per_event = best(5, || {
            black_box(account(workload, &events));
        });
        let baseline_rate = mb_per_s(bytes, baseline);
        let full_rate = mb_per_s(bytes, full);
        println!(
            "| {} | {:.0} | {} | {:.0} | ×{:.2} | {:.0} |",
            workload.name,
            baseline_rate,
            scan,
            full_rate,
            full_rate / baseline_rate,
            per_event.as_nanos() as f64 / events.len() as f64,
        );
    }
    println!(
        "\nSSE scanning, slowest stream: {sse_worst:.0} MB/s (target ≥ 500 MB/s: {})",
        if sse_worst >= 500.0 { "met" } else { "NOT met" }
    );
    let openai_chat = workloads
        .iter()
        .find(|w| w.name == "openai chat (SSE)")
        .context("the OpenAI chat workload")?;
    usage_chunk_stripper(openai_chat)?;
    whole_bodies()
}

/// The usage-chunk stripper (a stream whose `include_usage` the interceptor injected, shown to the
/// client without it), against the same memchr baseline.
fn usage_chunk_stripper(workload: &Workload) -> anyhow::Result<()> {
    let joined = workload.joined();
    let network: Vec<&[u8]> = joined.chunks(16 * 1024).collect();
    let events: Vec<&[u8]> = workload.chunks.iter().map(Vec::as_slice).collect();
    let strip = |chunks: &[&[u8]]| {
        let mut stripper = UsageChunkStripper::new(Limits::default().max_event_bytes);
        let mut out = Vec::with_capacity(32 * 1024);
        let mut kept = 0;
        for chunk in chunks {
            out.clear();
            stripper.push(chunk, &mut out);
            kept += out.len();
        }
        out.clear();
        stripper.finish(&mut out);
        (kept + out.len(), stripper.dropped_chunks())
    };
    let (kept, dropped) = strip(&network);
    let removed = joined.len() - kept;
    let expected = (events.len() - 2) * r#","usage":null"#.len() + events[events.len() - 2].len();
    anyhow::ensure!(
        dropped == 1 && removed == expected,
        "stripper: removed {removed} bytes and {dropped} chunks, expected {expected} bytes and the usage chunk"
    );
    let baseline = line_scan_baseline(&network);
    let whole = best(5, || {
        black_box(strip(&network));
    });
    let per_event = best(5, || {
        black_box(strip(&events));
    });
    println!(
        "\nUsage-chunk stripper (an `include_usage` the interceptor injected, removed again), same baseline.\n"
    );
    println!("| stream | baseline MB/s | stripper MB/s | stripper / baseline | per event (ns) |");
    println!("|---|---:|---:|---:|---:|");
    let (baseline_rate, rate) = (mb_per_s(joined.len(), baseline), mb_per_s(joined.len(), whole));
    println!(
        "| {} | {baseline_rate:.0} | {rate:.0} | ×{:.2} | {:.0} |",
        workload.name,
        rate / baseline_rate,
        per_event.as_nanos() as f64 / events.len() as f64,
    );
    Ok(())
}

/// A non-streamed chat completion as OpenAI sends it (the bench proxy provider's body).
const CHAT_COMPLETION: &str = r#"{"choices":[{"finish_reason":"stop","index":0,"logprobs":null,"message":{"annotations":[],"content":"Hello from the simulated provider.","refusal":null,"role":"assistant"}}],"created":1732400000,"id":"chatcmpl-sim1","model":"gpt-4o-mini-2024-07-18","object":"chat.completion","service_tier":"default","system_fingerprint":"fp_sim","usage":{"completion_tokens":9,"completion_tokens_details":{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":0,"rejected_prediction_tokens":0},"prompt_tokens":120,"prompt_tokens_details":{"audio_tokens":0,"cached_tokens":0},"total_tokens":129}}"#;

/// Accounting of one whole body that came in one chunk (a non-streamed response, the common case
/// on the proxy path): time per body against serde_json checking the same bytes (`IgnoredAny`, the
/// least a validating parse does), in the same run.
fn whole_bodies() -> anyhow::Result<()> {
    const BODIES: u32 = 100_000;
    let workload = Workload {
        name: "openai chat completion (JSON, one chunk)",
        adapter: Adapter::Openai,
        path: "/v1/chat/completions",
        query: "",
        content_type: "application/json",
        chunks: vec![CHAT_COMPLETION.as_bytes().to_vec()],
    };
    let body = CHAT_COMPLETION.as_bytes();
    anyhow::ensure!(
        account(&workload, &[body]),
        "{}: no usage extracted",
        workload.name
    );
    let baseline = best(5, || {
        for _ in 0..BODIES {
            let checked = serde_json::from_slice::<serde::de::IgnoredAny>(black_box(body));
            black_box(checked.is_ok());
        }
    });
    let full = best(5, || {
        for _ in 0..BODIES {
            black_box(account(&workload, &[black_box(body)]));
        }
    });
    let per_body = |elapsed: Duration| elapsed.as_nanos() as f64 / f64::from(BODIES);
    println!(
        "\nOne whole body per response, {BODIES} bodies, best of 5 runs; baseline: serde_json checking the same bytes.\n"
    );
    println!("| body | bytes | baseline ns/body | full accounting ns/body | accounting / baseline |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {:.0} | {:.0} | ×{:.2} |",
        workload.name,
        body.len(),
        per_body(baseline),
        per_body(full),
        full.as_secs_f64() / baseline.as_secs_f64().max(1e-12),
    );
    Ok(())
}
