//! Incremental decoder for the AWS event-stream binary framing (`application/vnd.amazon.eventstream`),
//! used by Bedrock's `invoke-with-response-stream` and `converse-stream`.
//!
//! A message is: total length (u32 BE), headers length (u32 BE), CRC32 of those 8 bytes, headers,
//! payload, CRC32 of everything before it. Both CRCs are checked. The decoder keeps at most one
//! message in memory; after a framing error it stops (the framing cannot be resynchronised) and
//! reports the error.

use thiserror::Error;

/// Largest message accepted (AWS documents 16 MiB payloads; headers add at most 128 KiB).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024 + 128 * 1024 + 16;
const PRELUDE: usize = 12;
const MIN_MESSAGE: usize = PRELUDE + 4;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EventStreamError {
    #[error("message length {0} is outside 16..={MAX_MESSAGE_BYTES}")]
    BadLength(u32),
    #[error("headers length {headers} does not fit in a message of {total} bytes")]
    BadHeadersLength { headers: u32, total: u32 },
    #[error("prelude CRC mismatch (expected {expected:08x}, computed {computed:08x})")]
    PreludeCrc { expected: u32, computed: u32 },
    #[error("message CRC mismatch (expected {expected:08x}, computed {computed:08x})")]
    MessageCrc { expected: u32, computed: u32 },
    #[error("malformed header: {0}")]
    BadHeader(&'static str),
    #[error("stream ended inside a message ({0} bytes pending)")]
    Truncated(usize),
}

/// The headers the adapters use, as strings (other header types are skipped).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Headers<'a> {
    /// `:message-type`: `event` or `exception` (or `error`).
    pub message_type: Option<&'a str>,
    /// `:event-type`, e.g. `chunk`, `messageStart`, `metadata`.
    pub event_type: Option<&'a str>,
    /// `:exception-type`, e.g. `throttlingException`.
    pub exception_type: Option<&'a str>,
    /// `:error-code` of `error` messages.
    pub error_code: Option<&'a str>,
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    pub headers: Headers<'a>,
    pub payload: &'a [u8],
}

/// Decoder state carried across chunks.
#[derive(Debug, Default)]
pub struct EventStreamDecoder {
    buffer: Vec<u8>,
    error: Option<EventStreamError>,
    messages: u64,
}

impl EventStreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds a chunk; `on_message` is called for each complete, CRC-valid message.
    pub fn feed(&mut self, chunk: &[u8], mut on_message: impl FnMut(Message<'_>)) {
        if self.error.is_some() {
            return;
        }
        let mut input = chunk;
        // Messages wholly inside the chunk are decoded in place, without copying.
        if self.buffer.is_empty() {
            loop {
                match frame_length(input) {
                    Ok(Some(len)) if len <= input.len() => {
                        if !self.decode_one(&input[..len], &mut on_message) {
                            return;
                        }
                        input = &input[len..];
                    }
                    Ok(_) => break,
                    Err(e) => {
                        self.error = Some(e);
                        return;
                    }
                }
            }
            self.buffer.extend_from_slice(input);
            return;
        }
        self.buffer.extend_from_slice(input);
        let mut start = 0;
        loop {
            match frame_length(&self.buffer[start..]) {
                Ok(Some(len)) if len <= self.buffer.len() - start => {
                    let message = std::mem::take(&mut self.buffer);
                    let ok = self.decode_one(&message[start..start + len], &mut on_message);
                    self.buffer = message;
                    if !ok {
                        self.buffer.clear();
                        return;
                    }
                    start += len;
                }
                Ok(_) => break,
                Err(e) => {
                    self.error = Some(e);
                    self.buffer.clear();
                    return;
                }
            }
        }
        self.buffer.drain(..start);
    }

    /// Ends the stream: the first framing error, or truncation, if any.
    pub fn finish(&mut self) -> Result<u64, EventStreamError> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if !self.buffer.is_empty() {
            return Err(EventStreamError::Truncated(self.buffer.len()));
        }
        Ok(self.messages)
    }

    /// The first framing error seen so far.
    pub fn error(&self) -> Option<&EventStreamError> {
        self.error.as_ref()
    }

    fn decode_one(&mut self, frame: &[u8], on_message: &mut impl FnMut(Message<'_>)) -> bool {
        match decode_message(frame) {
            Ok(message) => {
                self.messages += 1;
                on_message(message);
                true
            }
            Err(e) => {
                self.error = Some(e);
                false
            }
        }
    }
}

/// The total length of the message starting at `input`, once its prelude is complete and valid.
fn frame_length(input: &[u8]) -> Result<Option<usize>, EventStreamError> {
    let Some(prelude) = input.get(..PRELUDE) else {
        return Ok(None);
    };
    let total = be_u32(&prelude[0..4]);
    let headers = be_u32(&prelude[4..8]);
    let expected = be_u32(&prelude[8..12]);
    let computed = crc32fast::hash(&prelude[..8]);
    if expected != computed {
        return Err(EventStreamError::PreludeCrc { expected, computed });
    }
    let total_usize = total as usize;
    if !(MIN_MESSAGE..=MAX_MESSAGE_BYTES).contains(&total_usize) {
        return Err(EventStreamError::BadLength(total));
    }
    if headers as usize > total_usize - MIN_MESSAGE {
        return Err(EventStreamError::BadHeadersLength { headers, total });
    }
    Ok(Some(total_usize))
}

/// Decodes one complete message (`frame` is exactly its bytes, prelude already validated).
pub fn decode_message(frame: &[u8]) -> Result<Message<'_>, EventStreamError> {
    let total = frame.len();
    let expected = be_u32(&frame[total - 4..]);
    let computed = crc32fast::hash(&frame[..total - 4]);
    if expected != computed {
        return Err(EventStreamError::MessageCrc { expected, computed });
    }
    let headers_len = be_u32(&frame[4..8]) as usize;
    let headers = parse_headers(&frame[PRELUDE..PRELUDE + headers_len])?;
    Ok(Message {
        headers,
        payload: &frame[PRELUDE + headers_len..total - 4],
    })
}

fn parse_headers(mut bytes: &[u8]) -> Result<Headers<'_>, EventStreamError> {
    let mut headers = Headers::default();
    while !bytes.is_empty() {
        let name_len = usize::from(bytes[0]);
        let name = bytes
            .get(1..1 + name_len)
            .ok_or(EventStreamError::BadHeader("name runs past the headers"))?;
        let value_type = *bytes
            .get(1 + name_len)
            .ok_or(EventStreamError::BadHeader("missing value type"))?;
        let rest = &bytes[2 + name_len..];
        let (value, consumed) = match value_type {
            0 | 1 => (None, 0),
            2 => (None, 1),
            3 => (None, 2),
            4 => (None, 4),
            5 | 8 => (None, 8),
            9 => (None, 16),
            6 | 7 => {
                let len = rest
                    .get(..2)
                    .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
                    .ok_or(EventStreamError::BadHeader("missing value length"))?;
                let value = rest
                    .get(2..2 + len)
                    .ok_or(EventStreamError::BadHeader("value runs past the headers"))?;
                ((value_type == 7).then_some(value), 2 + len)
            }
            _ => return Err(EventStreamError::BadHeader("unknown value type")),
        };
        if rest.len() < consumed {
            return Err(EventStreamError::BadHeader("value runs past the headers"));
        }
        if let Some(value) = value {
            let value = std::str::from_utf8(value).map_err(|_| EventStreamError::BadHeader("not UTF-8"))?;
            match name {
                b":message-type" => headers.message_type = Some(value),
                b":event-type" => headers.event_type = Some(value),
                b":exception-type" => headers.exception_type = Some(value),
                b":error-code" => headers.error_code = Some(value),
                _ => {}
            }
        }
        bytes = &rest[consumed..];
    }
    Ok(headers)
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// Encodes a message with string headers (test fixtures and the benchmark build streams with it).
pub fn encode_message(headers: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
    let mut header_bytes = Vec::new();
    for (name, value) in headers {
        header_bytes.push(name.len() as u8);
        header_bytes.extend_from_slice(name.as_bytes());
        header_bytes.push(7);
        header_bytes.extend_from_slice(&(value.len() as u16).to_be_bytes());
        header_bytes.extend_from_slice(value.as_bytes());
    }
    let total = PRELUDE + header_bytes.len() + payload.len() + 4;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&(total as u32).to_be_bytes());
    out.extend_from_slice(&(header_bytes.len() as u32).to_be_bytes());
    let prelude_crc = crc32fast::hash(&out);
    out.extend_from_slice(&prelude_crc.to_be_bytes());
    out.extend_from_slice(&header_bytes);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, payload: &str) -> Vec<u8> {
        encode_message(
            &[
                (":event-type", kind),
                (":content-type", "application/json"),
                (":message-type", "event"),
            ],
            payload.as_bytes(),
        )
    }

    fn decode_all(chunks: &[&[u8]]) -> (Vec<(String, String)>, Result<u64, EventStreamError>) {
        let mut decoder = EventStreamDecoder::new();
        let mut out = Vec::new();
        for chunk in chunks {
            decoder.feed(chunk, |m| {
                out.push((
                    m.headers.event_type.unwrap_or_default().to_owned(),
                    String::from_utf8_lossy(m.payload).into_owned(),
                ))
            });
        }
        (out, decoder.finish())
    }

    #[test]
    fn decodes_at_every_split_point() {
        let mut stream = event("messageStart", r#"{"role":"assistant"}"#);
        stream.extend(event("metadata", r#"{"usage":{"inputTokens":3}}"#));
        let expected = vec![
            ("messageStart".to_owned(), r#"{"role":"assistant"}"#.to_owned()),
            ("metadata".to_owned(), r#"{"usage":{"inputTokens":3}}"#.to_owned()),
        ];
        for a in 0..=stream.len() {
            for b in (a..=stream.len()).step_by(3) {
                let (messages, end) = decode_all(&[&stream[..a], &stream[a..b], &stream[b..]]);
                assert_eq!(messages, expected, "split at {a},{b}");
                assert_eq!(end, Ok(2));
            }
        }
    }

    #[test]
    fn corrupt_crcs_and_truncation_are_errors() {
        let mut stream = event("metadata", "{}");
        let last = stream.len() - 5;
        stream[last] ^= 1;
        let (messages, end) = decode_all(&[&stream]);
        assert!(messages.is_empty());
        assert!(matches!(end, Err(EventStreamError::MessageCrc { .. })), "{end:?}");

        let mut stream = event("metadata", "{}");
        stream[2] ^= 1;
        let (_, end) = decode_all(&[&stream]);
        assert!(matches!(end, Err(EventStreamError::PreludeCrc { .. })), "{end:?}");

        let stream = event("metadata", "{}");
        let (_, end) = decode_all(&[&stream[..stream.len() - 1]]);
        assert_eq!(end, Err(EventStreamError::Truncated(stream.len() - 1)));
    }

    #[test]
    fn all_header_value_types_are_skipped_correctly() {
        let mut headers = Vec::new();
        for (name, ty, value) in [
            (&b"b"[..], 0u8, &b""[..]),
            (b"i8", 2, &[1][..]),
            (b"i16", 3, &[0, 1][..]),
            (b"i32", 4, &[0, 0, 0, 1][..]),
            (b"i64", 5, &[0; 8][..]),
            (b"ts", 8, &[0; 8][..]),
            (b"uuid", 9, &[0; 16][..]),
            (b"bin", 6, &[0, 2, 0xff, 0xfe][..]),
        ] {
            headers.push(name.len() as u8);
            headers.extend_from_slice(name);
            headers.push(ty);
            headers.extend_from_slice(value);
        }
        headers.extend_from_slice(&[11]);
        headers.extend_from_slice(b":event-type");
        headers.extend_from_slice(&[7, 0, 5]);
        headers.extend_from_slice(b"chunk");
        let total = 12 + headers.len() + 2 + 4;
        let mut frame = (total as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        let crc = crc32fast::hash(&frame);
        frame.extend_from_slice(&crc.to_be_bytes());
        frame.extend_from_slice(&headers);
        frame.extend_from_slice(b"{}");
        let crc = crc32fast::hash(&frame);
        frame.extend_from_slice(&crc.to_be_bytes());
        let (messages, end) = decode_all(&[&frame]);
        assert_eq!(messages, vec![("chunk".to_owned(), "{}".to_owned())]);
        assert_eq!(end, Ok(1));
    }
}
