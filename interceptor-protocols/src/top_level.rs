//! Reads chosen top-level members of a JSON object streamed in chunks, without keeping the rest:
//! a 100 MB embeddings response costs the same memory as a 1 kB one. The captured members are
//! rebuilt into a small object for the adapters' typed parsers.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    /// After `{` or `,`: a member name or `}`.
    ExpectKey,
    Key {
        escaped: bool,
    },
    ExpectColon,
    ExpectValue,
    Value(Value),
    /// After a member: `,` or `}`.
    ExpectComma,
    End,
    Malformed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Value {
    String {
        escaped: bool,
    },
    Scalar,
    Container {
        depth: u32,
        in_string: bool,
        escaped: bool,
    },
}

/// Bytes of a member name kept for comparing (wanted names are shorter; a longer name matches none).
const MAX_NAME_BYTES: usize = 64;

/// Scanner state carried across chunks.
#[derive(Debug)]
pub struct TopLevelFields {
    wanted: &'static [&'static str],
    max_value_bytes: usize,
    state: State,
    key: Vec<u8>,
    /// The wanted member whose value is being read.
    capturing: Option<usize>,
    value: Vec<u8>,
    value_too_large: bool,
    /// The rebuilt object, without its closing brace (empty until a member is kept).
    captured: Vec<u8>,
    dropped_values: u32,
}

/// The result of a scan.
#[derive(Debug, PartialEq, Eq)]
pub enum Fields {
    /// A JSON object holding the wanted members that were present.
    Object(Vec<u8>),
    /// The body was not one complete JSON object.
    Malformed,
}

impl TopLevelFields {
    pub fn new(wanted: &'static [&'static str], max_value_bytes: usize) -> Self {
        Self {
            wanted,
            max_value_bytes,
            state: State::Start,
            // Buffers are allocated on first use: a body read whole by a quick reader needs none.
            key: Vec::new(),
            capturing: None,
            value: Vec::new(),
            value_too_large: false,
            captured: Vec::new(),
            dropped_values: 0,
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        // Most bodies come in one chunk: read those with a walk over the slice, without the state
        // machine's dispatch on every byte between values.
        if self.untouched() && may_hold_whole_object(chunk) && self.read_whole(chunk) {
            return;
        }
        let mut i = 0;
        while i < chunk.len() {
            let byte = chunk[i];
            match self.state {
                State::Malformed | State::End if byte.is_ascii_whitespace() => {}
                State::Malformed => return,
                State::End => self.state = State::Malformed,
                State::Value(value) => {
                    // Fast path: skip the bytes of values nobody wants in bulk.
                    let consumed = self.value_bytes(value, &chunk[i..]);
                    i += consumed;
                    continue;
                }
                // Before the whitespace skip: white space inside a name is part of it.
                State::Key { mut escaped } => {
                    // The name in bulk, up to and with its closing quote.
                    let rest = &chunk[i..];
                    let end = string_end(rest, 0, &mut escaped);
                    let name = &rest[..end.unwrap_or(rest.len())];
                    let room = MAX_NAME_BYTES.saturating_sub(self.key.len());
                    self.key.extend_from_slice(&name[..name.len().min(room)]);
                    self.state = match end {
                        Some(_) => State::ExpectColon,
                        None => State::Key { escaped },
                    };
                    i += name.len();
                    continue;
                }
                _ if byte.is_ascii_whitespace() => {}
                State::Start => self.expect(byte == b'{', State::ExpectKey),
                State::ExpectKey => match byte {
                    b'"' => {
                        self.key.clear();
                        self.state = State::Key { escaped: false };
                    }
                    b'}' => self.state = State::End,
                    _ => self.state = State::Malformed,
                },
                State::ExpectColon => self.expect(byte == b':', State::ExpectValue),
                State::ExpectValue => {
                    // The key was collected with its closing quote.
                    self.key.pop();
                    self.capturing = self.wanted_index();
                    self.value.clear();
                    self.value_too_large = false;
                    self.state = State::Value(match byte {
                        b'"' => Value::String { escaped: false },
                        b'{' | b'[' => Value::Container {
                            depth: 1,
                            in_string: false,
                            escaped: false,
                        },
                        _ => Value::Scalar,
                    });
                    self.keep(&[byte]);
                }
                State::ExpectComma => match byte {
                    b',' => self.state = State::ExpectKey,
                    b'}' => self.state = State::End,
                    _ => self.state = State::Malformed,
                },
            }
            i += 1;
        }
    }

    /// Nothing but white space has been fed yet.
    pub fn untouched(&self) -> bool {
        self.state == State::Start
    }

    /// The largest value kept.
    pub fn max_value_bytes(&self) -> usize {
        self.max_value_bytes
    }

    pub fn finish(mut self) -> Fields {
        if let State::Value(Value::Scalar) = self.state {
            self.end_value();
            self.state = State::End;
        }
        if self.state != State::End {
            return Fields::Malformed;
        }
        if self.captured.is_empty() {
            self.captured.push(b'{');
        }
        self.captured.push(b'}');
        Fields::Object(self.captured)
    }

    /// How many wanted values were dropped for being larger than the limit.
    pub fn dropped_values(&self) -> u32 {
        self.dropped_values
    }

    /// Reads `body` when it holds a whole object (white space around it allowed), to the same result
    /// as the state machine. Returns false, with nothing changed, when the object goes on past it.
    fn read_whole(&mut self, body: &[u8]) -> bool {
        let captured_len = self.captured.len();
        let dropped = self.dropped_values;
        match self.walk(body) {
            Some(state) => {
                self.state = state;
                true
            }
            None => {
                self.captured.truncate(captured_len);
                self.dropped_values = dropped;
                false
            }
        }
    }

    /// The state after `body`: `End` or `Malformed`; `None` when `body` ends inside the object.
    fn walk(&mut self, body: &[u8]) -> Option<State> {
        let skip_space = |mut i: usize| {
            while body.get(i).is_some_and(u8::is_ascii_whitespace) {
                i += 1;
            }
            i
        };
        let mut i = skip_space(0);
        if *body.get(i)? != b'{' {
            return Some(State::Malformed);
        }
        i += 1;
        loop {
            // A member name, or `}` (also after a comma, as the state machine reads it).
            i = skip_space(i);
            match *body.get(i)? {
                b'"' => {}
                b'}' => break,
                _ => return Some(State::Malformed),
            }
            let name_start = i + 1;
            i = string_end(body, name_start, &mut false)?;
            // As collected by the state machine: at most `MAX_NAME_BYTES` with the closing quote.
            let name = &body[name_start..i - 1];
            let capturing = self.wanted_index_of(&name[..name.len().min(MAX_NAME_BYTES - 1)]);
            i = skip_space(i);
            if *body.get(i)? != b':' {
                return Some(State::Malformed);
            }
            i = skip_space(i + 1);
            let value_start = i;
            i = match *body.get(i)? {
                b'"' => string_end(body, i + 1, &mut false)?,
                b'{' | b'[' => i + 1 + container_end(&body[i + 1..], &mut 1, &mut false, &mut false)?,
                // The first byte is part of a scalar whatever it is; the scalar ends before a
                // delimiter, and must end in `body` (a number could go on in the next chunk).
                _ => {
                    let rest = &body[i + 1..];
                    i + 1 + rest.iter().position(|&b| is_scalar_end(b))?
                }
            };
            if let Some(index) = capturing {
                self.capture(index, &body[value_start..i]);
            }
            i = skip_space(i);
            match *body.get(i)? {
                b',' => i += 1,
                b'}' => break,
                _ => return Some(State::Malformed),
            }
        }
        // After the closing brace, only white space.
        let rest = &body[i + 1..];
        Some(if rest.iter().all(u8::is_ascii_whitespace) {
            State::End
        } else {
            State::Malformed
        })
    }

    /// Appends a wanted member's whole value to the rebuilt object, unless it is over the limit.
    fn capture(&mut self, index: usize, value: &[u8]) {
        if value.len() > self.max_value_bytes {
            self.dropped_values += 1;
            return;
        }
        self.append_member(index, value);
    }

    /// Which wanted member the collected name is (see `wanted_index_of`).
    fn wanted_index(&self) -> Option<usize> {
        self.wanted_index_of(&self.key)
    }

    /// Which wanted member `raw` names. A name with escapes (`"us\u0061ge"`) is compared as JSON
    /// reads it; a name cut at the collection limit matches nothing (wanted names are short).
    fn wanted_index_of(&self, raw: &[u8]) -> Option<usize> {
        if !raw.contains(&b'\\') {
            return self.wanted.iter().position(|w| w.as_bytes() == raw);
        }
        let mut quoted = Vec::with_capacity(raw.len() + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(raw);
        quoted.push(b'"');
        let name: String = serde_json::from_slice(&quoted).ok()?;
        self.wanted.iter().position(|w| *w == name)
    }

    fn expect(&mut self, ok: bool, next: State) {
        self.state = if ok { next } else { State::Malformed };
    }

    /// Consumes bytes of the current value; returns how many (the value's end byte included, but not
    /// the byte that ends a scalar).
    fn value_bytes(&mut self, mut value: Value, input: &[u8]) -> usize {
        let end = match &mut value {
            Value::String { escaped } => string_end(input, 0, escaped),
            Value::Scalar => input.iter().position(|&b| is_scalar_end(b)),
            Value::Container {
                depth,
                in_string,
                escaped,
            } => container_end(input, depth, in_string, escaped),
        };
        match end {
            Some(consumed) => {
                self.keep(&input[..consumed]);
                self.end_value();
                self.state = State::ExpectComma;
                consumed
            }
            None => {
                self.keep(input);
                self.state = State::Value(value);
                input.len()
            }
        }
    }

    fn keep(&mut self, bytes: &[u8]) {
        if self.capturing.is_none() || self.value_too_large {
            return;
        }
        if self.value.len() + bytes.len() > self.max_value_bytes {
            self.value_too_large = true;
            self.dropped_values += 1;
            self.value = Vec::new();
            return;
        }
        if self.value.capacity() == 0 {
            // Sized for the usual members (a usage object, a model name, an id): no regrowth.
            self.value.reserve(512);
        }
        self.value.extend_from_slice(bytes);
    }

    fn end_value(&mut self) {
        if let Some(index) = self.capturing.take()
            && !self.value_too_large
        {
            let value = std::mem::take(&mut self.value);
            self.append_member(index, &value);
            self.value = value;
        }
        self.value.clear();
    }

    fn append_member(&mut self, index: usize, value: &[u8]) {
        if self.captured.is_empty() {
            // Sized for the usual members (a usage object, a model name, an id): no regrowth.
            self.captured.reserve(1024);
            self.captured.push(b'{');
        } else {
            self.captured.push(b',');
        }
        self.captured.push(b'"');
        self.captured.extend_from_slice(self.wanted[index].as_bytes());
        self.captured.extend_from_slice(b"\":");
        self.captured.extend_from_slice(value);
    }
}

/// Whether `chunk` can hold a whole object: its last byte other than white space is `}`. A cheap
/// check before a whole-body read, which fails only at the end of a chunk that goes on: the first
/// chunk of a long body is then scanned once, not once per attempt.
pub fn may_hold_whole_object(chunk: &[u8]) -> bool {
    chunk.iter().rev().find(|b| !b.is_ascii_whitespace()) == Some(&b'}')
}

/// Whether `byte` ends a scalar value (it is not part of it).
fn is_scalar_end(byte: u8) -> bool {
    matches!(byte, b',' | b'}' | b']') || byte.is_ascii_whitespace()
}

/// Inside a string from `from`: the index just past its closing quote, or `None` when `input` ends
/// first (`escaped` then says whether its last byte was a backslash).
pub(crate) fn string_end(input: &[u8], from: usize, escaped: &mut bool) -> Option<usize> {
    let mut i = from;
    loop {
        if *escaped {
            if i >= input.len() {
                return None;
            }
            *escaped = false;
            i += 1;
        }
        i += quote_or_backslash(input.get(i..)?)?;
        if input[i] == b'"' {
            return Some(i + 1);
        }
        *escaped = true;
        i += 1;
    }
}

/// The first `"` or `\` in `input`. Most JSON strings are a few bytes long: a plain loop over their
/// first bytes costs less than a vectorized search's setup; longer ones get the vectorized search.
fn quote_or_backslash(input: &[u8]) -> Option<usize> {
    const SHORT: usize = 32;
    let head = &input[..input.len().min(SHORT)];
    if let Some(found) = head.iter().position(|&b| b == b'"' || b == b'\\') {
        return Some(found);
    }
    let tail = input.get(SHORT..)?;
    memchr::memchr2(b'"', b'\\', tail).map(|found| SHORT + found)
}

/// Bytes that matter outside strings in a container.
static STRUCTURAL: [bool; 256] = {
    let mut table = [false; 256];
    table[b'"' as usize] = true;
    table[b'{' as usize] = true;
    table[b'[' as usize] = true;
    table[b'}' as usize] = true;
    table[b']' as usize] = true;
    table
};

/// Inside an object or array: the index just past its closing bracket, or `None` when `input` ends
/// first (the state is then carried to the next chunk).
pub(crate) fn container_end(
    input: &[u8],
    depth: &mut u32,
    in_string: &mut bool,
    escaped: &mut bool,
) -> Option<usize> {
    let mut i = 0;
    loop {
        if *in_string {
            i = string_end(input, i, escaped)?;
            *in_string = false;
        }
        i += input.get(i..)?.iter().position(|&b| STRUCTURAL[usize::from(b)])?;
        match input[i] {
            b'"' => *in_string = true,
            b'{' | b'[' => *depth += 1,
            _ => {
                *depth -= 1;
                if *depth == 0 {
                    return Some(i + 1);
                }
            }
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WANTED: &[&str] = &["model", "usage", "id"];

    #[test]
    fn names_are_read_as_json_reads_them() {
        // White space inside a name is part of it (the fuzzer found `"i  d"` read as `id`).
        assert_eq!(
            scan(&[br#"{"i  d":6, "u sage": {"a":1}}"#], 64),
            Fields::Object(b"{}".to_vec())
        );
        // Escapes in a name are decoded before comparing.
        assert_eq!(
            scan(&[br#"{"\u0069d":6,"us\u0061ge":{"a":1}}"#], 64),
            Fields::Object(br#"{"id":6,"usage":{"a":1}}"#.to_vec())
        );
    }

    fn scan(chunks: &[&[u8]], max: usize) -> Fields {
        let mut scanner = TopLevelFields::new(WANTED, max);
        for chunk in chunks {
            scanner.feed(chunk);
        }
        scanner.finish()
    }

    #[test]
    fn keeps_only_wanted_members_at_every_split() {
        let body: &[u8] = br#" {"object":"list","data":[{"embedding":[0.1,-2e-3],"x":"}\"usage"}],"model" : "text-embedding-3-small","n":12,"usage":{"prompt_tokens":8,"total_tokens":8},"id":"e\"1"} "#;
        let expected =
            br#"{"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8},"id":"e\"1"}"#;
        for a in 0..=body.len() {
            for b in a..=body.len() {
                let fields = scan(&[&body[..a], &body[a..b], &body[b..]], 1024);
                assert_eq!(fields, Fields::Object(expected.to_vec()), "split {a},{b}");
            }
        }
    }

    #[test]
    fn only_a_chunk_ending_in_a_brace_may_hold_a_whole_object() {
        assert!(may_hold_whole_object(b" {\"a\":{}} \r\n"));
        assert!(!may_hold_whole_object(br#"{"a":[1,2"#));
        assert!(!may_hold_whole_object(b"  "));
        assert!(!may_hold_whole_object(b""));
    }

    #[test]
    fn scalar_members_and_a_scalar_last_member() {
        assert_eq!(
            scan(&[br#"{"a":true,"id":12}"#], 64),
            Fields::Object(br#"{"id":12}"#.to_vec())
        );
        assert_eq!(scan(&[br#"{}"#], 64), Fields::Object(b"{}".to_vec()));
    }

    #[test]
    fn oversized_values_are_dropped_and_garbage_is_malformed() {
        let mut scanner = TopLevelFields::new(WANTED, 8);
        scanner.feed(br#"{"model":"a-very-long-model-name","id":"x"}"#);
        assert_eq!(scanner.dropped_values(), 1);
        assert_eq!(scanner.finish(), Fields::Object(br#"{"id":"x"}"#.to_vec()));
        assert_eq!(scan(&[b"[1,2]"], 64), Fields::Malformed);
        assert_eq!(scan(&[br#"{"id":"x""#], 64), Fields::Malformed);
        assert_eq!(scan(&[br#"{"id":"x"} trailing"#], 64), Fields::Malformed);
        assert_eq!(scan(&[b"<html>"], 64), Fields::Malformed);
        assert_eq!(scan(&[b""], 64), Fields::Malformed);
    }
}
