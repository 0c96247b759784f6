//! Incremental splitter for a streamed top-level JSON array (`[{...},\r\n{...}]`, Gemini's
//! `streamGenerateContent` without `alt=sse`): yields each element as soon as it is complete.
//! A top-level object (an error response instead of an array) is yielded whole. Elements larger
//! than the limit are skipped and counted.

/// Splitter state carried across chunks.
#[derive(Debug)]
pub struct JsonArraySplitter {
    element: Vec<u8>,
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// The top level is an array (elements are at depth 1) rather than a single value.
    top_array: bool,
    started: bool,
    /// The top-level value ended; only whitespace may follow.
    done: bool,
    oversized: bool,
    max_element_bytes: usize,
    elements: u64,
    oversized_elements: u64,
    invalid: bool,
}

/// What was seen by the end of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonArraySummary {
    pub elements: u64,
    pub oversized_elements: u64,
    /// The stream ended inside a value, or held bytes that cannot start one.
    pub malformed: bool,
}

impl JsonArraySplitter {
    pub fn new(max_element_bytes: usize) -> Self {
        Self {
            element: Vec::new(),
            depth: 0,
            in_string: false,
            escaped: false,
            top_array: false,
            started: false,
            done: false,
            oversized: false,
            max_element_bytes,
            elements: 0,
            oversized_elements: 0,
            invalid: false,
        }
    }

    /// Feeds a chunk; `on_element` gets each complete element (an object or array) as bytes.
    pub fn feed(&mut self, chunk: &[u8], mut on_element: impl FnMut(&[u8])) {
        if self.invalid {
            return;
        }
        let mut capture_from = if self.depth > self.base() { Some(0) } else { None };
        for (i, &byte) in chunk.iter().enumerate() {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if byte == b'\\' {
                    self.escaped = true;
                } else if byte == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            if self.done && !byte.is_ascii_whitespace() {
                // Bytes after the top-level value ended.
                self.invalid = true;
                return;
            }
            match byte {
                b'"' => {
                    if self.depth <= self.base() {
                        // Strings are only valid inside elements.
                        self.invalid = true;
                        return;
                    }
                    self.in_string = true;
                }
                b'[' | b'{' => {
                    if !self.started {
                        self.started = true;
                        if byte == b'[' {
                            self.top_array = true;
                            self.depth = 1;
                            continue;
                        }
                    }
                    if self.depth == self.base() {
                        capture_from = Some(i);
                        self.element.clear();
                        self.oversized = false;
                    }
                    self.depth += 1;
                }
                b']' | b'}' => {
                    if self.depth == 0 {
                        self.invalid = true;
                        return;
                    }
                    self.depth -= 1;
                    if self.depth == self.base() {
                        if let Some(from) = capture_from.take() {
                            self.append(&chunk[from..=i]);
                        }
                        self.emit(&mut on_element);
                    }
                    if self.depth == 0 {
                        self.done = true;
                    }
                }
                b' ' | b'\t' | b'\r' | b'\n' | b',' => {}
                _ => {
                    if self.depth <= self.base() {
                        // Scalars (numbers, literals) are only expected inside elements.
                        self.invalid = true;
                        return;
                    }
                }
            }
        }
        if let Some(from) = capture_from {
            self.append(&chunk[from..]);
        }
    }

    pub fn finish(&self) -> JsonArraySummary {
        JsonArraySummary {
            elements: self.elements,
            oversized_elements: self.oversized_elements,
            malformed: self.invalid || self.depth != 0 || self.in_string || !self.started,
        }
    }

    /// The depth at which elements start: 1 inside a top-level array, else 0.
    fn base(&self) -> u32 {
        u32::from(self.top_array)
    }

    fn append(&mut self, bytes: &[u8]) {
        if self.oversized {
            return;
        }
        if self.element.len() + bytes.len() > self.max_element_bytes {
            self.oversized = true;
            self.element.clear();
        } else {
            self.element.extend_from_slice(bytes);
        }
    }

    fn emit(&mut self, on_element: &mut impl FnMut(&[u8])) {
        if self.oversized {
            self.oversized_elements += 1;
            self.oversized = false;
        } else {
            self.elements += 1;
            on_element(&self.element);
        }
        self.element.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]], max: usize) -> (Vec<String>, JsonArraySummary) {
        let mut splitter = JsonArraySplitter::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            splitter.feed(chunk, |e| out.push(String::from_utf8_lossy(e).into_owned()));
        }
        (out, splitter.finish())
    }

    #[test]
    fn splits_elements_at_every_byte_boundary() {
        let stream: &[u8] = b"[{\"a\":\"}]\\\"{\",\"n\":[1,{\"b\":2}]}\r\n,\r\n{\"c\":3}]";
        let expected = vec![
            r#"{"a":"}]\"{","n":[1,{"b":2}]}"#.to_owned(),
            r#"{"c":3}"#.to_owned(),
        ];
        for a in 0..=stream.len() {
            for b in a..=stream.len() {
                let (elements, summary) = split(&[&stream[..a], &stream[a..b], &stream[b..]], 1024);
                assert_eq!(elements, expected, "split at {a},{b}");
                assert!(!summary.malformed);
            }
        }
    }

    #[test]
    fn a_top_level_object_is_one_element() {
        let (elements, summary) = split(&[br#"{"error":{"code":429}}"#], 1024);
        assert_eq!(elements, vec![r#"{"error":{"code":429}}"#.to_owned()]);
        assert!(!summary.malformed);
    }

    #[test]
    fn truncation_garbage_and_oversize_are_reported() {
        assert!(split(&[b"[{\"a\":1}, {\"b\""], 1024).1.malformed);
        assert!(split(&[b"<html>"], 1024).1.malformed);
        assert!(split(&[b""], 1024).1.malformed);
        let (elements, summary) = split(&[b"[{\"a\":\"0123456789\"},{\"b\":1}]"], 10);
        assert_eq!(elements, vec![r#"{"b":1}"#.to_owned()]);
        assert_eq!(summary.oversized_elements, 1);
    }
}
