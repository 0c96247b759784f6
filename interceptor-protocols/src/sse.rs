//! Incremental Server-Sent Events parser (the WHATWG `text/event-stream` rules) that accepts chunks
//! split at any byte and keeps at most one event in memory.
//!
//! Lines end with CRLF, LF or CR; `event:` names the event, `data:` lines are joined with `\n`, a
//! blank line dispatches, lines starting with `:` are comments. An event whose data would exceed the
//! configured limit is dropped (and counted) instead of growing the buffer.

use memchr::memchr2;

/// One dispatched event. `event` is `message` when the stream named none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    pub event: &'a str,
    pub data: &'a [u8],
}

/// Parser state carried across chunks.
#[derive(Debug)]
pub struct SseParser {
    /// An incomplete line from the previous chunk.
    line: Vec<u8>,
    event: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    /// The previous chunk ended with CR: an LF at the start of the next one belongs to it.
    after_cr: bool,
    /// The current event went over the limit and is being skipped up to its blank line.
    oversized: bool,
    /// The rest of an over-long line is being skipped up to its line end.
    skipping_line: bool,
    max_event_bytes: usize,
    events: u64,
    oversized_events: u64,
}

/// What was left when the stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseSummary {
    pub events: u64,
    pub oversized_events: u64,
    /// The stream ended inside an event (no blank line after its last field): it was not dispatched.
    pub truncated: bool,
}

impl SseParser {
    /// A parser that drops events with more than `max_event_bytes` of data.
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            line: Vec::new(),
            event: Vec::new(),
            data: Vec::new(),
            has_data: false,
            after_cr: false,
            oversized: false,
            skipping_line: false,
            max_event_bytes,
            events: 0,
            oversized_events: 0,
        }
    }

    /// Feeds a chunk; `on_event` is called for each event completed by it.
    pub fn feed(&mut self, mut chunk: &[u8], mut on_event: impl FnMut(SseEvent<'_>)) {
        if chunk.is_empty() {
            return;
        }
        if self.after_cr {
            self.after_cr = false;
            if let [b'\n', rest @ ..] = chunk {
                chunk = rest;
            }
        }
        loop {
            if self.between_events() {
                chunk = self.simple_events(chunk, &mut on_event);
            }
            let Some(end) = memchr2(b'\n', b'\r', chunk) else {
                break;
            };
            let (line, rest) = chunk.split_at(end);
            chunk = match line_end(rest) {
                Some(length) => &rest[length..],
                None => {
                    // A CR that ends the chunk: an LF starting the next one belongs to it.
                    self.after_cr = true;
                    &[]
                }
            };
            if self.skipping_line {
                self.skipping_line = false;
            } else if self.line.is_empty() {
                self.process_line(line, &mut on_event);
            } else {
                let mut joined = std::mem::take(&mut self.line);
                joined.extend_from_slice(line);
                self.process_line(&joined, &mut on_event);
                joined.clear();
                self.line = joined;
            }
        }
        if !chunk.is_empty() && !self.skipping_line {
            if self.line.len() + chunk.len() > self.max_event_bytes {
                // A single line longer than any event we keep: drop it, and the event it belongs to.
                self.mark_oversized();
                self.line.clear();
                self.skipping_line = true;
            } else {
                self.line.extend_from_slice(chunk);
            }
        }
    }

    /// Ends the stream. An event without its terminating blank line is not dispatched (as in the
    /// EventSource rules) and is reported as truncation.
    pub fn finish(&mut self) -> SseSummary {
        let truncated = !self.line.is_empty()
            || self.has_data
            || !self.event.is_empty()
            || self.oversized
            || self.skipping_line;
        SseSummary {
            events: self.events,
            oversized_events: self.oversized_events,
            truncated,
        }
    }

    /// Nothing of an event or line is held: the next byte starts an event.
    fn between_events(&self) -> bool {
        self.line.is_empty()
            && !self.has_data
            && self.event.is_empty()
            && !self.oversized
            && !self.skipping_line
            && !self.after_cr
    }

    /// Dispatches the events at the start of `chunk` that have the shape providers send (an optional
    /// `event:` line, one `data:` line, a blank line) straight from the chunk, as the line-by-line
    /// rules would; returns the rest, from the first byte of another shape.
    fn simple_events<'c>(
        &mut self,
        mut chunk: &'c [u8],
        on_event: &mut impl FnMut(SseEvent<'_>),
    ) -> &'c [u8] {
        loop {
            let (name, rest) = match field_line(chunk, b"event:") {
                Some((name, rest)) => (kept_name(name), rest),
                None => (&b""[..], chunk),
            };
            let Some((data, rest)) = field_line(rest, b"data:") else {
                return chunk;
            };
            let Some(rest) = line_end(rest).map(|length| &rest[length..]) else {
                return chunk;
            };
            if data.len() > self.max_event_bytes {
                // The line-by-line rules count and skip it.
                return chunk;
            }
            self.events += 1;
            on_event(SseEvent {
                event: event_type(name),
                data,
            });
            chunk = rest;
        }
    }

    fn mark_oversized(&mut self) {
        if !self.oversized {
            self.oversized = true;
            self.oversized_events += 1;
        }
        self.data.clear();
    }

    fn process_line(&mut self, line: &[u8], on_event: &mut impl FnMut(SseEvent<'_>)) {
        if line.is_empty() {
            self.dispatch(on_event);
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if self.oversized {
                    return;
                }
                let separator = usize::from(self.has_data);
                if self.data.len() + separator + value.len() > self.max_event_bytes {
                    self.mark_oversized();
                    return;
                }
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(kept_name(value));
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(SseEvent<'_>)) {
        if self.oversized {
            self.oversized = false;
        } else if self.has_data {
            self.events += 1;
            on_event(SseEvent {
                event: event_type(&self.event),
                data: &self.data,
            });
        }
        self.event.clear();
        self.data.clear();
        self.has_data = false;
    }
}

/// A whole `field:` line at the start of `input`: its value (one leading space removed) and what
/// follows the line.
fn field_line<'c>(input: &'c [u8], field: &[u8]) -> Option<(&'c [u8], &'c [u8])> {
    let rest = input.strip_prefix(field)?;
    let end = memchr2(b'\n', b'\r', rest)?;
    let value = &rest[..end];
    let after = &rest[end..];
    Some((
        value.strip_prefix(b" ").unwrap_or(value),
        &after[line_end(after)?..],
    ))
}

/// The part of an `event:` value kept (names longer than this are cut).
fn kept_name(value: &[u8]) -> &[u8] {
    &value[..value.len().min(256)]
}

/// The event's type: its name, or `message` when it has none (or one that is not UTF-8).
fn event_type(name: &[u8]) -> &str {
    match std::str::from_utf8(name) {
        Ok("") | Err(_) => "message",
        Ok(name) => name,
    }
}

/// The length of the line end `input` starts with (LF, CRLF or CR), or `None` when it starts with
/// none, or with a CR that ends the input (the next chunk may bring its LF).
pub(crate) fn line_end(input: &[u8]) -> Option<usize> {
    match input {
        [b'\n', ..] => Some(1),
        [b'\r', b'\n', ..] => Some(2),
        [b'\r', _, ..] => Some(1),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(chunks: &[&[u8]], max: usize) -> (Vec<(String, String)>, SseSummary) {
        let mut parser = SseParser::new(max);
        let mut events = Vec::new();
        for chunk in chunks {
            parser.feed(chunk, |e| {
                events.push((e.event.to_owned(), String::from_utf8_lossy(e.data).into_owned()));
            });
        }
        (events, parser.finish())
    }

    #[test]
    fn parses_fields_comments_and_line_endings() {
        let stream = b": keep-alive\r\nevent: ping\r\ndata: {}\r\n\r\ndata: a\rdata:b\r\rdata: c\n\n";
        let (events, summary) = collect(&[stream], 1024);
        assert_eq!(
            events,
            vec![
                ("ping".into(), "{}".into()),
                ("message".into(), "a\nb".into()),
                ("message".into(), "c".into())
            ]
        );
        assert_eq!(summary.events, 3);
        assert!(!summary.truncated);
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let stream: &[u8] = b"event: x\r\ndata: one\r\n\r\ndata: two\rdata: three\r\r: c\n\ndata: four\n\n";
        let (expected, _) = collect(&[stream], 1024);
        for a in 0..=stream.len() {
            for b in a..=stream.len() {
                let (events, summary) = collect(&[&stream[..a], &stream[a..b], &stream[b..]], 1024);
                assert_eq!(events, expected, "split at {a},{b}");
                assert!(!summary.truncated);
            }
        }
    }

    #[test]
    fn events_read_from_whole_chunks_match_the_line_rules() {
        // Whole chunks take the shortcut for provider-shaped events; one byte at a time never does.
        let streams: [&[u8]; 9] = [
            b"data: {\"candidates\":[]}\r\n\r\ndata: cr\rdata: lone\r\rdata: mixed\r\n\n",
            b"event: e\r\ndata: crlf\r\n\r\ndata: last cr\r\r",
            b"data: {\"a\":1}\n\nevent: delta\ndata: x\n\ndata:no-space\n\n",
            b"event: e\nevent: f\ndata: two names\n\ndata: a\ndata: b\n\n",
            b"data: crlf\r\n\r\ndata: lf\n\n: comment\n\ndata: after\n\n",
            b"event: \xff\xfe\ndata: bad name\n\nevent:\ndata: empty name\n\n",
            b"data: one\nid: 7\n\ndata: \n\ndata:\n\n",
            b"data: 0123456789012345678901234567890123456789\n\ndata: short\n\n",
            b"event: only\n\ndata: x\n\rdata: y\n\n",
        ];
        for stream in streams {
            let bytes: Vec<&[u8]> = stream.chunks(1).collect();
            assert_eq!(
                collect(&[stream], 32),
                collect(&bytes, 32),
                "{}",
                String::from_utf8_lossy(stream)
            );
        }
    }

    #[test]
    fn events_without_data_are_not_dispatched_and_eof_truncation_is_reported() {
        let (events, summary) = collect(&[b"event: only-name\n\ndata: partial"], 1024);
        assert!(events.is_empty());
        assert!(summary.truncated);
    }

    #[test]
    fn oversized_events_are_dropped_and_counted_without_growing() {
        let big = format!("data: {}\n\ndata: small\n\n", "x".repeat(100));
        let (events, summary) = collect(&[big.as_bytes()], 50);
        assert_eq!(events, vec![("message".into(), "small".into())]);
        assert_eq!(summary.oversized_events, 1);
        // The same with the long line spread over many chunks.
        for size in 1..big.len() {
            let chunks: Vec<&[u8]> = big.as_bytes().chunks(size).collect();
            let (events, summary) = collect(&chunks, 50);
            assert_eq!(
                events,
                vec![("message".into(), "small".into())],
                "chunks of {size}"
            );
            assert_eq!(summary.oversized_events, 1);
        }
    }
}
