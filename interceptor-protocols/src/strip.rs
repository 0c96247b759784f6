//! Undoes the interceptor's `stream_options.include_usage` injection on the way back, so the client
//! sees exactly the stream it asked for: the extra usage-only chunk (`"choices":[]`) is dropped and
//! the `"usage":null` member OpenAI adds to every other chunk is removed. Everything else passes
//! byte for byte. OpenAI's chunks end with that member and name `usage` nowhere else: those are
//! rewritten without reading their members; all others get a read of their top-level members.
//! Events are held only until their blank line; an event larger than the limit turns the filter off
//! for the rest of the stream (it then passes bytes unchanged).

use memchr::memchr2;

use crate::needle::{Needle, needle};
use crate::sse::line_end;
use crate::top_level::{container_end, string_end};

/// The filter's state across chunks.
#[derive(Debug)]
pub struct UsageChunkStripper {
    pending: Vec<u8>,
    /// Where scanning for the next line end resumes in `pending`.
    scan: usize,
    /// Start of the current line in `pending`.
    line_start: usize,
    /// The `data:` lines of the event being read.
    data_lines: DataLines,
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
            data_lines: DataLines::default(),
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
            data_lines: self.data_lines,
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
        self.data_lines = cursor.data_lines;
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
        self.data_lines = DataLines::default();
    }

    /// How many usage-only chunks were removed.
    pub fn dropped_chunks(&self) -> u32 {
        self.dropped_chunks
    }
}

/// The `data:` lines of an event, noted while its lines are found (offsets from the event's start,
/// which stay valid while the event waits for more bytes).
#[derive(Clone, Copy, Debug, Default)]
struct DataLines {
    count: u32,
    /// The first one, without its line end.
    first: (usize, usize),
}

/// Where line scanning stands in the bytes being filtered.
struct Cursor<'a> {
    /// Where scanning for the next line end resumes.
    scan: usize,
    /// Start of the current line.
    line_start: usize,
    data_lines: DataLines,
    dropped: &'a mut u32,
}

impl Cursor<'_> {
    /// Filters every complete event of `buffer` into `out`; returns where the unfinished rest starts.
    fn filter_events(&mut self, buffer: &[u8], out: &mut Vec<u8>) -> usize {
        let mut event_start = 0;
        while let Some(offset) = memchr2(b'\n', b'\r', &buffer[self.scan..]) {
            let end = self.scan + offset;
            // A CR at the end of the buffer may be the first half of CRLF: wait for more.
            let Some(terminator) = line_end(&buffer[end..]) else {
                break;
            };
            let blank = end == self.line_start;
            if !blank && buffer[self.line_start..end].starts_with(b"data:") {
                if self.data_lines.count == 0 {
                    self.data_lines.first = (self.line_start - event_start, end - event_start);
                }
                self.data_lines.count += 1;
            }
            self.scan = end + terminator;
            self.line_start = self.scan;
            if blank {
                let data_lines = std::mem::take(&mut self.data_lines);
                filter_event(&buffer[event_start..self.scan], data_lines, out, self.dropped);
                event_start = self.scan;
            }
        }
        event_start
    }
}

/// The member OpenAI appends last to every chunk of a stream that asked for usage.
const TRAILING_USAGE_NULL: &[u8] = br#","usage":null}"#;
static USAGE_NAME: Needle = needle!(b"\"usage\"");

fn filter_event(event: &[u8], data_lines: DataLines, out: &mut Vec<u8>, dropped: &mut u32) {
    if data_lines.count != 1 {
        out.extend_from_slice(event);
        return;
    }
    let line = &event[data_lines.first.0 + 5..data_lines.first.1];
    let json = line.strip_prefix(b" ").unwrap_or(line);
    // Offsets of the JSON inside the event, to splice the rewrite in place.
    let json_start = json.as_ptr() as usize - event.as_ptr() as usize;
    let json_end = json_start + json.len();
    if let Some(kept) = before_trailing_usage_null(json) {
        out.extend_from_slice(&event[..json_start + kept.len()]);
        out.push(b'}');
        out.extend_from_slice(&event[json_end..]);
        return;
    }
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
            out.extend_from_slice(&event[..json_start]);
            splice_out(json, start, end, out);
            out.extend_from_slice(&event[json_end..]);
        }
        None => out.extend_from_slice(event),
    }
}

/// OpenAI's chunks, without reading their members: `"usage":null` is the last member and `"usage"`
/// appears nowhere else, so in an object it is the top-level member the full read would remove.
/// Returns the JSON before it (without its comma and the closing brace).
fn before_trailing_usage_null(json: &[u8]) -> Option<&[u8]> {
    json.strip_suffix(TRAILING_USAGE_NULL)
        .filter(|kept| kept.starts_with(b"{") && !USAGE_NAME.found_in(kept))
}

/// Whether the shortcut for OpenAI's chunks rewrites `json` as the full read of its members does.
/// They differ only on malformed JSON (the full read passes what it finds malformed unchanged, and
/// does not read past the end of the first object, while the shortcut still removes the trailing
/// member). For the fuzz target and the tests.
#[doc(hidden)]
pub fn shortcut_agrees_with_full_read(json: &[u8]) -> bool {
    let Some(kept) = before_trailing_usage_null(json) else {
        return true;
    };
    let Some((members, object_end)) = Members::read(json) else {
        return true;
    };
    if object_end != json.len() {
        // Something after the object: not one JSON value.
        return true;
    }
    let Some((start, end)) = members
        .usage_null
        .filter(|_| !(members.empty_choices && members.usage_object))
    else {
        return false;
    };
    let mut full = Vec::new();
    splice_out(json, start, end, &mut full);
    full.strip_suffix(b"}") == Some(kept)
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
        Self::read(json).map(|(members, _)| members)
    }

    /// [`Members::of`], and where the object ends (what follows it is not read).
    fn read(json: &[u8]) -> Option<(Self, usize)> {
        let mut found = Self::default();
        let mut at = skip_ws(json, 0);
        if json.get(at) != Some(&b'{') {
            return None;
        }
        at = skip_ws(json, at + 1);
        if json.get(at) == Some(&b'}') {
            return Some((found, at + 1));
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
                Some(b'}') => return Some((found, at + 1)),
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
    fn the_shortcut_for_openai_chunks_rewrites_as_the_full_read() {
        let chunks: [&[u8]; 4] = [
            br#"{"id":"c","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}],"usage":null}"#,
            br#"{"a":[1,{"b":"}"}],"c":"\","usage":null}"#,
            br#"{ "a" : 1 ,"usage":null}"#,
            br#"{"choices":[],"x":{"y":null},"usage":null}"#,
        ];
        for json in chunks {
            assert!(
                before_trailing_usage_null(json).is_some(),
                "{}",
                String::from_utf8_lossy(json)
            );
            assert!(
                shortcut_agrees_with_full_read(json),
                "{}",
                String::from_utf8_lossy(json)
            );
        }
        // Alone, or named elsewhere too (nested, in a string, or twice): the full read decides.
        for json in [
            br#"{"usage":null}"#.as_slice(),
            br#"{"x":{"usage":null},"usage":null}"#,
            br#"{"s":""usage"","usage":null}"#,
            br#"{"choices":[],"usage":{"total_tokens":1},"usage":null}"#,
            br#"{"usage":null,"usage":null}"#,
        ] {
            assert_eq!(
                before_trailing_usage_null(json),
                None,
                "{}",
                String::from_utf8_lossy(json)
            );
        }
        // Where they differ: malformed JSON, which the full read passes unchanged.
        let malformed = br#"{"a" 1,"usage":null}"#;
        assert_eq!(Members::of(malformed), None);
        assert!(shortcut_agrees_with_full_read(malformed));
        assert_eq!(
            run(&[b"data: {\"a\" 1,\"usage\":null}\n\n"]),
            b"data: {\"a\" 1}\n\n"
        );
        // Duplicates go the full way: the first `usage: null` is removed, as before.
        assert_eq!(
            run(&[b"data: {\"usage\":null,\"id\":1,\"usage\":null}\n\n"]),
            b"data: {\"id\":1,\"usage\":null}\n\n"
        );
    }

    #[test]
    fn crlf_streams_and_first_member_removal() {
        let stream = b"data: {\"usage\": null, \"id\":\"x\"}\r\n\r\n";
        assert_eq!(run(&[stream]), b"data: {\"id\":\"x\"}\r\n\r\n");
        let stream = b"data: {\"id\":\"x\",\"usage\":{\"a\":null}}\r\n\r\n: comment\r\n\r\n";
        assert_eq!(run(&[stream]), stream);
        // Data on two lines is not one chunk's JSON: passed unchanged, split anywhere.
        let stream = b"id: 1\ndata: {\"id\":\"x\",\ndata: \"usage\":null}\n\n";
        for at in 0..=stream.len() {
            assert_eq!(run(&[&stream[..at], &stream[at..]]), stream, "split at {at}");
        }
        // The data line is found after other fields, across chunks too.
        let stream = b"event: chunk\nid: 7\ndata: {\"id\":\"x\",\"usage\":null}\n\n";
        for at in 0..=stream.len() {
            assert_eq!(
                run(&[&stream[..at], &stream[at..]]),
                b"event: chunk\nid: 7\ndata: {\"id\":\"x\"}\n\n",
                "split at {at}"
            );
        }
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
