//! Undoes the interceptor's `stream_options.include_usage` injection on the way back, so the client
//! sees exactly the stream it asked for: the extra usage-only chunk (`"choices":[]`) is dropped and
//! the `"usage":null` member OpenAI adds to every other chunk is removed. Everything else passes
//! byte for byte. Events are held only until their blank line; an event larger than the limit
//! turns the filter off for the rest of the stream (it then passes bytes unchanged).

use memchr::memchr2;

use crate::needle::{Needle, needle};

static EMPTY_CHOICES: [Needle; 2] = [needle!(br#""choices":[]"#), needle!(br#""choices": []"#)];
static USAGE_OBJECT: [Needle; 2] = [needle!(br#""usage":{"#), needle!(br#""usage": {"#)];

/// The filter's state across chunks.
#[derive(Debug)]
pub struct UsageChunkStripper {
    pending: Vec<u8>,
    /// Where scanning for the next line end resumes in `pending`.
    scan: usize,
    /// Start of the current line in `pending`.
    line_start: usize,
    max_event_bytes: usize,
    disabled: bool,
    dropped_chunks: u32,
}

impl UsageChunkStripper {
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            pending: Vec::new(),
            scan: 0,
            line_start: 0,
            max_event_bytes,
            disabled: false,
            dropped_chunks: 0,
        }
    }

    /// Filters a chunk, appending what the client should receive to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        if self.disabled {
            out.extend_from_slice(chunk);
            return;
        }
        self.pending.extend_from_slice(chunk);
        let mut event_start = 0;
        while let Some(offset) = memchr2(b'\n', b'\r', &self.pending[self.scan..]) {
            let end = self.scan + offset;
            let terminator = match self.pending[end..] {
                [b'\r', b'\n', ..] => 2,
                // A CR at the end of the buffer may be the first half of CRLF: wait for more.
                [b'\r'] => break,
                _ => 1,
            };
            let blank = end == self.line_start;
            self.scan = end + terminator;
            self.line_start = self.scan;
            if blank {
                let event_end = self.scan;
                let event = &self.pending[event_start..event_end];
                filter_event(event, out, &mut self.dropped_chunks);
                event_start = event_end;
            }
        }
        self.pending.drain(..event_start);
        self.scan -= event_start;
        self.line_start -= event_start;
        if self.pending.len() > self.max_event_bytes {
            out.append(&mut self.pending);
            self.disabled = true;
        }
    }

    /// Ends the stream: an unterminated last event is passed on as it is.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.pending);
        self.scan = 0;
        self.line_start = 0;
    }

    /// How many usage-only chunks were removed.
    pub fn dropped_chunks(&self) -> u32 {
        self.dropped_chunks
    }
}

fn filter_event(event: &[u8], out: &mut Vec<u8>, dropped: &mut u32) {
    let mut data_lines = event
        .split(|&b| b == b'\n' || b == b'\r')
        .filter(|line| line.starts_with(b"data:"));
    let (Some(line), None) = (data_lines.next(), data_lines.next()) else {
        out.extend_from_slice(event);
        return;
    };
    let json = line[5..].strip_prefix(b" ").unwrap_or(&line[5..]);
    if is_usage_only_chunk(json) {
        *dropped += 1;
        return;
    }
    match remove_null_member(json, b"usage") {
        Some(rewritten) => {
            // Offsets of the JSON inside the event, to splice the rewrite in place.
            let json_start = json.as_ptr() as usize - event.as_ptr() as usize;
            let json_end = json_start + json.len();
            out.extend_from_slice(&event[..json_start]);
            out.extend_from_slice(&rewritten);
            out.extend_from_slice(&event[json_end..]);
        }
        None => out.extend_from_slice(event),
    }
}

/// The usage chunk OpenAI appends when asked: `"choices":[]` and a `usage` object.
fn is_usage_only_chunk(json: &[u8]) -> bool {
    EMPTY_CHOICES.iter().any(|n| n.found_in(json)) && USAGE_OBJECT.iter().any(|n| n.found_in(json))
}

/// Removes the top-level member `"name": null` from a JSON object, with one adjacent comma.
fn remove_null_member(json: &[u8], name: &[u8]) -> Option<Vec<u8>> {
    let mut depth = 0u32;
    let mut in_string = false;
    let mut escaped = false;
    let mut string_start = 0;
    let mut i = 0;
    while i < json.len() {
        let byte = json[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
                let key = &json[string_start + 1..i];
                if depth == 1 && key == name {
                    let after_key = skip_ws(json, i + 1);
                    if json.get(after_key) == Some(&b':') {
                        let value = skip_ws(json, after_key + 1);
                        if json.get(value..value + 4) == Some(b"null") {
                            return Some(splice_out(json, string_start, value + 4));
                        }
                    }
                }
            }
            i += 1;
            continue;
        }
        match byte {
            b'"' => {
                in_string = true;
                string_start = i;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    None
}

/// `json` without `start..end` and one comma next to it (the one before, else the one after).
fn splice_out(json: &[u8], start: usize, end: usize) -> Vec<u8> {
    let before = json[..start].iter().rposition(|b| !b.is_ascii_whitespace());
    let mut out = Vec::with_capacity(json.len());
    if let Some(comma) = before.filter(|&p| json[p] == b',') {
        out.extend_from_slice(&json[..comma]);
        out.extend_from_slice(&json[end..]);
    } else {
        let after = skip_ws(json, end);
        let resume = if json.get(after) == Some(&b',') {
            skip_ws(json, after + 1)
        } else {
            end
        };
        out.extend_from_slice(&json[..start]);
        out.extend_from_slice(&json[resume..]);
    }
    out
}

fn skip_ws(json: &[u8], mut at: usize) -> usize {
    while json.get(at).is_some_and(|b| b.is_ascii_whitespace()) {
        at += 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITH_USAGE: &[u8] = b"data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\\\"usage\\\":null\"}}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n\
data: [DONE]\n\n";
    const WITHOUT_USAGE: &[u8] = b"data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\\\"usage\\\":null\"}}]}\n\n\
data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
data: [DONE]\n\n";

    fn run(chunks: &[&[u8]]) -> Vec<u8> {
        let mut stripper = UsageChunkStripper::new(1 << 20);
        let mut out = Vec::new();
        for chunk in chunks {
            stripper.push(chunk, &mut out);
        }
        stripper.finish(&mut out);
        out
    }

    #[test]
    fn the_client_sees_the_stream_without_usage_at_every_split() {
        for a in 0..=WITH_USAGE.len() {
            let out = run(&[&WITH_USAGE[..a], &WITH_USAGE[a..]]);
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(WITHOUT_USAGE),
                "split at {a}"
            );
        }
    }

    #[test]
    fn crlf_streams_and_first_member_removal() {
        let stream = b"data: {\"usage\": null, \"id\":\"x\"}\r\n\r\n";
        assert_eq!(run(&[stream]), b"data: {\"id\":\"x\"}\r\n\r\n");
        let stream = b"data: {\"id\":\"x\",\"usage\":{\"a\":null}}\r\n\r\n: comment\r\n\r\n";
        assert_eq!(run(&[stream]), stream);
    }

    #[test]
    fn oversized_events_pass_unchanged() {
        let mut stripper = UsageChunkStripper::new(16);
        let mut out = Vec::new();
        let stream = b"data: {\"id\":\"long-long-long\",\"usage\":null}\n\ndata: {\"usage\":null}\n\n";
        for chunk in stream.chunks(4) {
            stripper.push(chunk, &mut out);
        }
        stripper.finish(&mut out);
        assert_eq!(out, stream);
    }
}
