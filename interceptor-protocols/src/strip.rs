//! Undoes the interceptor's `stream_options.include_usage` injection on the way back, so the client
//! sees exactly the stream it asked for: the extra usage-only chunk (`"choices":[]`) is dropped and
//! the `"usage":null` member OpenAI adds to every other chunk is removed. Everything else passes
//! byte for byte. Events are held only until their blank line; an event larger than the limit
//! turns the filter off for the rest of the stream (it then passes bytes unchanged).

use memchr::memchr2;

use crate::top_level::{container_end, string_end};

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
        let mut cursor = Cursor {
            scan: self.scan,
            line_start: self.line_start,
            dropped: &mut self.dropped_chunks,
        };
        let consumed = if self.pending.is_empty() {
            // The chunk's whole events straight from it; only an unfinished tail is kept.
            let consumed = cursor.filter_events(chunk, out);
            self.pending.extend_from_slice(&chunk[consumed..]);
            consumed
        } else {
            self.pending.extend_from_slice(chunk);
            let consumed = cursor.filter_events(&self.pending, out);
            self.pending.drain(..consumed);
            consumed
        };
        (self.scan, self.line_start) = (cursor.scan - consumed, cursor.line_start - consumed);
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

/// Where line scanning stands in the bytes being filtered.
struct Cursor<'a> {
    /// Where scanning for the next line end resumes.
    scan: usize,
    /// Start of the current line.
    line_start: usize,
    dropped: &'a mut u32,
}

impl Cursor<'_> {
    /// Filters every complete event of `buffer` into `out`; returns where the unfinished rest starts.
    fn filter_events(&mut self, buffer: &[u8], out: &mut Vec<u8>) -> usize {
        let mut event_start = 0;
        while let Some(offset) = memchr2(b'\n', b'\r', &buffer[self.scan..]) {
            let end = self.scan + offset;
            let terminator = match buffer[end..] {
                [b'\r', b'\n', ..] => 2,
                // A CR at the end of the buffer may be the first half of CRLF: wait for more.
                [b'\r'] => break,
                _ => 1,
            };
            let blank = end == self.line_start;
            self.scan = end + terminator;
            self.line_start = self.scan;
            if blank {
                filter_event(&buffer[event_start..self.scan], out, self.dropped);
                event_start = self.scan;
            }
        }
        event_start
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
    let Some(members) = Members::of(json) else {
        out.extend_from_slice(event);
        return;
    };
    if members.empty_choices && members.usage_object {
        // The usage chunk OpenAI appends when asked.
        *dropped += 1;
        return;
    }
    match members.usage_null {
        Some((start, end)) => {
            // Offsets of the JSON inside the event, to splice the rewrite in place.
            let json_start = json.as_ptr() as usize - event.as_ptr() as usize;
            let json_end = json_start + json.len();
            out.extend_from_slice(&event[..json_start]);
            splice_out(json, start, end, out);
            out.extend_from_slice(&event[json_end..]);
        }
        None => out.extend_from_slice(event),
    }
}

/// What the filter needs of a chunk's top-level members, read in one pass that skips strings and
/// nested values in bulk.
#[derive(Debug, Default, PartialEq, Eq)]
struct Members {
    /// `"choices": []`.
    empty_choices: bool,
    /// `"usage": {...}`.
    usage_object: bool,
    /// The first `"usage": null` member: from its name's opening quote to the end of `null`.
    usage_null: Option<(usize, usize)>,
}

impl Members {
    /// The members of `json`, or `None` when it is not a well-formed object at the top level (the
    /// event then passes unchanged). Names are compared as sent (no escapes decoded).
    fn of(json: &[u8]) -> Option<Self> {
        let mut found = Self::default();
        let mut at = skip_ws(json, 0);
        if json.get(at) != Some(&b'{') {
            return None;
        }
        at = skip_ws(json, at + 1);
        if json.get(at) == Some(&b'}') {
            return Some(found);
        }
        loop {
            if json.get(at) != Some(&b'"') {
                return None;
            }
            let name_start = at;
            let name_end = string_end(json, at + 1, &mut false)?;
            let name = &json[name_start + 1..name_end - 1];
            at = skip_ws(json, name_end);
            if json.get(at) != Some(&b':') {
                return None;
            }
            let value_start = skip_ws(json, at + 1);
            let value_end = value_end(json, value_start)?;
            let value = &json[value_start..value_end];
            match name {
                b"usage" if value == b"null" && found.usage_null.is_none() => {
                    found.usage_null = Some((name_start, value_end));
                }
                b"usage" if value.first() == Some(&b'{') => found.usage_object = true,
                b"choices" if value.first() == Some(&b'[') && skip_ws(value, 1) == value.len() - 1 => {
                    found.empty_choices = true;
                }
                _ => {}
            }
            at = skip_ws(json, value_end);
            match json.get(at) {
                Some(b',') => at = skip_ws(json, at + 1),
                Some(b'}') => return Some(found),
                _ => return None,
            }
        }
    }
}

/// Where the value starting at `start` ends (exclusive), or `None` when `json` ends first.
fn value_end(json: &[u8], start: usize) -> Option<usize> {
    match json.get(start)? {
        b'"' => string_end(json, start + 1, &mut false),
        b'{' | b'[' => {
            let (mut depth, mut in_string, mut escaped) = (1, false, false);
            let inner = container_end(&json[start + 1..], &mut depth, &mut in_string, &mut escaped)?;
            Some(start + 1 + inner)
        }
        _ => json[start..]
            .iter()
            .position(|&b| matches!(b, b',' | b'}' | b']') || b.is_ascii_whitespace())
            .map(|length| start + length),
    }
}

/// Appends `json` without `start..end` and one comma next to it (the one before, else the one
/// after) to `out`.
fn splice_out(json: &[u8], start: usize, end: usize, out: &mut Vec<u8>) {
    let before = json[..start].iter().rposition(|b| !b.is_ascii_whitespace());
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
    fn only_top_level_members_count() {
        let members = |json: &[u8]| Members::of(json);
        assert_eq!(
            members(br#"{"id":"a","choices": [ ],"usage" : {"total_tokens":3}}"#),
            Some(Members {
                empty_choices: true,
                usage_object: true,
                usage_null: None
            })
        );
        let json = br#"{"x":{"usage":null,"choices":[]},"s":"\"usage\":null","usage":null}"#;
        let found = members(json).expect("an object");
        assert!(!found.empty_choices && !found.usage_object);
        let (start, end) = found.usage_null.expect("the top-level member");
        assert_eq!(&json[start..end], br#""usage":null"#);
        assert_eq!(members(br#"{"usage":null"#), None, "unterminated");
        assert_eq!(members(b"[1]"), None);
        assert_eq!(members(br#"{"a" 1}"#), None);
        assert_eq!(members(b" { } "), Some(Members::default()));
        // A nested usage chunk shape is not the usage chunk: passed unchanged.
        let stream = b"data: {\"d\":{\"choices\":[],\"usage\":{\"a\":1}}}\n\n";
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
