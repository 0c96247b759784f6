//! Prompt and completion capture for the audit log, only for the identities a policy selects
//! (`audit.content`). The bodies are copied as they pass (bounded), and decoded on the writer thread.

use std::io::Read as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::HeaderValue;
use serde::ser::SerializeMap as _;

/// One direction's copy, cut at the limit.
#[derive(Default)]
struct Side {
    bytes: Mutex<Vec<u8>>,
    truncated: AtomicBool,
}

impl Side {
    fn push(&self, data: &Bytes, limit: usize) {
        let mut bytes = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let room = limit.saturating_sub(bytes.len());
        if data.len() > room {
            self.truncated.store(true, Ordering::Relaxed);
        }
        bytes.extend_from_slice(&data[..data.len().min(room)]);
    }

    fn take(&self) -> (Vec<u8>, bool) {
        let bytes = std::mem::take(&mut *self.bytes.lock().unwrap_or_else(|p| p.into_inner()));
        (bytes, self.truncated.load(Ordering::Relaxed))
    }
}

/// The bodies of one exchange, as the client sent and received them.
pub struct ContentCapture {
    limit: usize,
    request: Side,
    response: Side,
    response_encoding: Mutex<Option<HeaderValue>>,
}

impl ContentCapture {
    /// Keeps at most `limit` bytes of each body.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            request: Side::default(),
            response: Side::default(),
            response_encoding: Mutex::new(None),
        }
    }

    pub fn request_data(&self, data: &Bytes) {
        self.request.push(data, self.limit);
    }

    pub fn response_data(&self, data: &Bytes) {
        self.response.push(data, self.limit);
    }

    /// The response's `content-encoding`, to decode it for the log.
    pub fn response_encoding(&self, encoding: Option<&HeaderValue>) {
        *self.response_encoding.lock().unwrap_or_else(|p| p.into_inner()) = encoding.cloned();
    }

    /// What was captured, for the audit entry.
    pub fn finish(&self) -> CapturedContent {
        let (request, request_truncated) = self.request.take();
        let (response, response_truncated) = self.response.take();
        CapturedContent {
            request,
            response,
            truncated: request_truncated || response_truncated,
            encoding: self
                .response_encoding
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        }
    }
}

/// Captured bodies, serialized (and decoded) by the writer thread.
pub struct CapturedContent {
    request: Vec<u8>,
    response: Vec<u8>,
    truncated: bool,
    encoding: Option<HeaderValue>,
}

/// Decodes a (possibly cut) compressed body as far as it goes.
fn decode(body: &[u8], encoding: Option<&str>) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let result = match encoding.map(str::trim) {
        None | Some("") | Some("identity") => {
            out.extend_from_slice(body);
            Ok(0)
        }
        Some("gzip") | Some("x-gzip") => flate2::read::GzDecoder::new(body).read_to_end(&mut out),
        Some("deflate") => flate2::read::ZlibDecoder::new(body).read_to_end(&mut out),
        Some("br") => brotli_decompressor::Decompressor::new(body, 4096).read_to_end(&mut out),
        Some(other) => return Err(format!("{other}-encoded body, {} bytes, not decoded", body.len())),
    };
    match result {
        Ok(_) => Ok(out),
        // A body cut at the limit ends early: keep what was decoded.
        Err(_) if !out.is_empty() => Ok(out),
        Err(e) => Err(format!("undecodable body ({e})")),
    }
}

impl serde::Serialize for CapturedContent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(3))?;
        map.serialize_entry("request", &String::from_utf8_lossy(&self.request))?;
        let encoding = self.encoding.as_ref().and_then(|v| v.to_str().ok());
        match decode(&self.response, encoding) {
            Ok(body) => map.serialize_entry("response", &String::from_utf8_lossy(&body))?,
            Err(note) => map.serialize_entry("response", &format!("[{note}]"))?,
        }
        map.serialize_entry("truncated", &self.truncated)?;
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn bodies_are_cut_at_the_limit_and_decoded() {
        let capture = ContentCapture::new(8);
        capture.request_data(&Bytes::from_static(b"{\"a\":"));
        capture.request_data(&Bytes::from_static(b"\"long value\"}"));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"hello").expect("gzip");
        let compressed = gz.finish().expect("gzip");
        let capture_gz = ContentCapture::new(1024);
        capture_gz.response_data(&Bytes::from(compressed));
        capture_gz.response_encoding(Some(&HeaderValue::from_static("gzip")));

        let cut = serde_json::to_value(capture.finish()).expect("json");
        assert_eq!(cut["request"], "{\"a\":\"lo");
        assert_eq!(cut["truncated"], true);
        let decoded = serde_json::to_value(capture_gz.finish()).expect("json");
        assert_eq!(decoded["response"], "hello");
        assert_eq!(decoded["truncated"], false);
        assert_eq!(
            decode(b"xx", Some("zstd")),
            Err("zstd-encoded body, 2 bytes, not decoded".to_owned())
        );
    }
}
