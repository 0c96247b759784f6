//! A fast reader for the JSON on the accounting path (whole response bodies that came in one
//! chunk, stream chunks, usage objects), for callers that keep serde as the reference: it reads only what
//! serde_json accepts and declines (`None`) everything else, so that on `None` the caller parses
//! the same bytes with serde and gets serde's result or serde's error.
//!
//! What it declines, besides malformed JSON: escapes in member names, strings that are not UTF-8,
//! numbers that are not plain unsigned integers where one is read, and nesting deeper than
//! `MAX_DEPTH`. A declined body costs the time to the point of decline; nothing is allocated.

/// Deepest nesting skipped (serde_json's own limit is 128).
const MAX_DEPTH: u32 = 64;

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH_BITS: u64 = ONES * 0x80;

/// Whether `byte` ends a run of plain string bytes: the closing quote, a backslash, or a control
/// character (serde rejects those in strings).
fn stops_string(byte: u8) -> bool {
    byte < 0x20 || byte == b'"' || byte == b'\\'
}

/// The position of the first byte from `pos` that stops a string scan (see [`stops_string`]),
/// OR-ing the high bits of the bytes before it into `high_bits` (non-ASCII when set); `None` when
/// the input ends first. Eight bytes at a time while eight are left, with the bit tricks after
/// "Determine if a word has a byte less than n" (Sean Anderson's bithacks): a borrow only ever
/// flags bytes above a byte that really matches, so the lowest flag is exact and its position is the
/// stop, with no byte-wise loop (whose exit, at a string length that varies, mispredicts).
fn next_string_stop(input: &[u8], mut pos: usize, high_bits: &mut u64) -> Option<usize> {
    while let Some(chunk) = input.get(pos..pos + 8) {
        let Ok(bytes) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let word = u64::from_le_bytes(bytes);
        let quote = word ^ (ONES * u64::from(b'"'));
        let backslash = word ^ (ONES * u64::from(b'\\'));
        let control = word.wrapping_sub(ONES * 0x20) & !word;
        let quote = quote.wrapping_sub(ONES) & !quote;
        let backslash = backslash.wrapping_sub(ONES) & !backslash;
        let stops = (control | quote | backslash) & HIGH_BITS;
        if stops != 0 {
            let index = stops.trailing_zeros() / 8;
            let before = (1u64 << (index * 8)) - 1;
            *high_bits |= word & HIGH_BITS & before;
            return Some(pos + index as usize);
        }
        *high_bits |= word & HIGH_BITS;
        pos += 8;
    }
    let tail = input.get(pos..)?;
    for (offset, &byte) in tail.iter().enumerate() {
        if stops_string(byte) {
            return Some(pos + offset);
        }
        *high_bits |= u64::from(byte & 0x80);
    }
    None
}

/// A position in a complete JSON text.
pub(crate) struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(input: &'a [u8]) -> Self {
        Self { input, pos: 0 }
    }

    /// Reads a whole text that is one object, calling `member` with each member name (raw, without
    /// escapes) and the reader placed at its value, which `member` must consume.
    pub(crate) fn whole_object(
        mut self,
        member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>,
    ) -> Option<()> {
        self.object(member)?;
        self.skip_space();
        (self.pos == self.input.len()).then_some(())
    }

    /// Reads an object, calling `member` for each member as `whole_object` does.
    pub(crate) fn object(&mut self, mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        self.sequence(b'{', b'}', |reader| {
            let name = reader.member_name_and_colon()?;
            reader.skip_space();
            member(reader, name)
        })
    }

    /// An object's members or an array's elements: `open`, then items (each read by `item` from its
    /// first byte) separated by commas, then `close`; no trailing comma, as serde_json reads them.
    fn sequence(&mut self, open: u8, close: u8, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.skip_space();
        self.expect(open)?;
        self.skip_space();
        if self.peek()? == close {
            self.pos += 1;
            return Some(());
        }
        loop {
            self.skip_space();
            item(self)?;
            self.skip_space();
            match self.next()? {
                b',' => {}
                byte if byte == close => return Some(()),
                _ => return None,
            }
        }
    }

    /// `null` or an object read with `member` (for `Option<Struct>`); `Some(false)` for `null`.
    pub(crate) fn object_or_null(
        &mut self,
        member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>,
    ) -> Option<bool> {
        if self.null() {
            return Some(false);
        }
        self.object(member)?;
        Some(true)
    }

    /// `null` or an object of which only member `wanted` matters, read with `read` (for an
    /// `Option<Struct>` whose struct has one `Option` field): `Some(None)` for `null`,
    /// `Some(Some(value))` for an object, `value` being `None` when the member is absent.
    pub(crate) fn one_member_or_null<T>(
        &mut self,
        wanted: &[u8],
        mut read: impl FnMut(&mut Self) -> Option<Option<T>>,
    ) -> Option<Option<Option<T>>> {
        let mut value = None;
        let mut seen = 0;
        let present = self.object_or_null(|reader, name| {
            if name != wanted {
                return reader.skip();
            }
            first_time(&mut seen, 0)?;
            value = read(reader)?;
            Some(())
        })?;
        Some(present.then_some(value))
    }

    /// An unsigned integer as serde reads a `u64` (no sign, fraction, exponent or leading zero), or
    /// `null`.
    pub(crate) fn u64_or_null(&mut self) -> Option<Option<u64>> {
        if self.null() {
            return Some(None);
        }
        let start = self.pos;
        let mut value: u64 = 0;
        while let Some(&byte) = self.input.get(self.pos)
            && byte.is_ascii_digit()
        {
            value = value.checked_mul(10)?.checked_add(u64::from(byte - b'0'))?;
            self.pos += 1;
        }
        let digits = self.pos - start;
        if digits == 0 || (digits > 1 && self.input[start] == b'0') {
            return None;
        }
        // A fraction or exponent makes it a float, which a `u64` does not take.
        if matches!(self.input.get(self.pos), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        Some(Some(value))
    }

    /// `true` or `false`, or `null`.
    pub(crate) fn bool_or_null(&mut self) -> Option<Option<bool>> {
        match self.peek()? {
            b'n' => self.literal(b"null").map(|()| None),
            b't' => self.literal(b"true").map(|()| Some(true)),
            b'f' => self.literal(b"false").map(|()| Some(false)),
            _ => None,
        }
    }

    /// A string without escapes, or `null`.
    pub(crate) fn str_or_null(&mut self) -> Option<Option<&'a str>> {
        if self.null() {
            return Some(None);
        }
        self.plain_string().map(Some)
    }

    /// Skips any value serde_json would accept and ignore.
    pub(crate) fn skip(&mut self) -> Option<()> {
        self.skip_value(0)
    }

    fn skip_value(&mut self, depth: u32) -> Option<()> {
        match self.peek()? {
            b'"' => self.skip_string(),
            b'{' | b'[' if depth >= MAX_DEPTH => None,
            b'{' => self.object(|reader, _| reader.skip_value(depth + 1)),
            b'[' => self.sequence(b'[', b']', |reader| reader.skip_value(depth + 1)),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.skip_number(),
        }
    }

    /// A member's name and the colon after it; the name.
    fn member_name_and_colon(&mut self) -> Option<&'a [u8]> {
        let name = self.name()?;
        self.skip_space();
        self.expect(b':')?;
        Some(name)
    }

    /// A member name: a string without escapes (serde compares names after unescaping them).
    fn name(&mut self) -> Option<&'a [u8]> {
        let (raw, ascii) = self.string(false)?;
        // serde reads names as text; only UTF-8 ones get that far.
        (ascii || std::str::from_utf8(raw).is_ok()).then_some(raw)
    }

    /// A string without escapes, as UTF-8.
    fn plain_string(&mut self) -> Option<&'a str> {
        let (raw, _) = self.string(false)?;
        std::str::from_utf8(raw).ok()
    }

    /// Skips a string as serde_json ignores one: valid escapes, no control characters. Declining
    /// one that is not UTF-8 is safe whether or not serde would check it.
    fn skip_string(&mut self) -> Option<()> {
        let (raw, ascii) = self.string(true)?;
        (ascii || std::str::from_utf8(raw).is_ok()).then_some(())
    }

    /// The raw bytes of a string without control characters (and without escapes unless
    /// `escapes`; those allowed are checked), and whether they are all ASCII.
    fn string(&mut self, escapes: bool) -> Option<(&'a [u8], bool)> {
        self.expect(b'"')?;
        let start = self.pos;
        let mut high_bits = 0;
        loop {
            let at = next_string_stop(self.input, self.pos, &mut high_bits)?;
            self.pos = at + 1;
            match self.input[at] {
                b'"' => return Some((&self.input[start..at], high_bits == 0)),
                b'\\' if escapes => self.escape()?,
                _ => return None,
            }
        }
    }

    /// The rest of an escape after its backslash, as serde_json checks it.
    fn escape(&mut self) -> Option<()> {
        match self.next()? {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(()),
            b'u' => {
                let hex = self.input.get(self.pos..self.pos + 4)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                self.pos += 4;
                Some(())
            }
            _ => None,
        }
    }

    /// A JSON number: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    fn skip_number(&mut self) -> Option<()> {
        if self.peek()? == b'-' {
            self.pos += 1;
        }
        match self.next()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            self.some_digits()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            self.some_digits()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.pos;
        self.digits();
        (self.pos > start).then_some(())
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if self.input.get(self.pos..self.pos + word.len())? != word {
            return None;
        }
        self.pos += word.len();
        Some(())
    }

    /// Reads a `null` if one is next; false (nothing read) otherwise.
    pub(crate) fn null(&mut self) -> bool {
        self.literal(b"null").is_some()
    }

    fn skip_space(&mut self) {
        while self
            .input
            .get(self.pos)
            .is_some_and(|&b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.pos += 1;
        Some(byte)
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.next()? == byte).then_some(())
    }
}

/// Marks member `index` as read in `seen`; `None` when it was read before (serde rejects duplicate
/// fields).
pub(crate) fn first_time(seen: &mut u32, index: u32) -> Option<()> {
    let bit = 1 << index;
    if *seen & bit != 0 {
        return None;
    }
    *seen |= bit;
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_string_scan_stops_exactly_at_the_first_quote_backslash_or_control_byte() {
        // Every byte value at every position of the first word, and of the byte-wise tail.
        for len in [16, 5] {
            for byte in 0..=255u8 {
                for at in 0..len.min(8) {
                    let mut text = vec![b'a'; len];
                    text[at] = byte;
                    let mut high_bits = 0;
                    let stop = next_string_stop(&text, 0, &mut high_bits);
                    let stops = byte < 0x20 || byte == b'"' || byte == b'\\';
                    assert_eq!(stop, stops.then_some(at), "byte {byte:#04x} at {at} of {len}");
                    assert_eq!(
                        high_bits != 0,
                        !stops && byte >= 0x80,
                        "byte {byte:#04x} at {at} of {len}"
                    );
                }
            }
        }
        // The first of several stops, and non-ASCII bytes after it are not looked at.
        let mut high_bits = 0;
        assert_eq!(
            next_string_stop(b"ab\\c\"\xc3\xa9fgh", 0, &mut high_bits),
            Some(2)
        );
        assert_eq!(high_bits, 0);
        // Non-ASCII bytes in whole words before the stop are.
        let mut high_bits = 0;
        assert_eq!(
            next_string_stop("abcdefgé\"xyz1234".as_bytes(), 0, &mut high_bits),
            Some(9)
        );
        assert_ne!(high_bits, 0);
        assert_eq!(next_string_stop(b"abcdefghij", 0, &mut 0), None);
        assert_eq!(next_string_stop(b"abcdefghij\"", 3, &mut 0), Some(10));
    }

    /// Skips a whole text that is one object.
    fn accepts(text: &str) -> bool {
        Reader::new(text.as_bytes())
            .whole_object(|reader, _| reader.skip())
            .is_some()
    }

    #[test]
    fn skips_what_serde_accepts() {
        for text in [
            r#"{}"#,
            r#" { "a" : 1 , "b":[ ] ,"c":{}} "#,
            r#"{"a":-0.5e+3,"b":"x\n\"\u00e9\\","c":[true,false,null,[{"d":"é"}]],"e":0}"#,
            "{\"a\":1}\n",
        ] {
            assert!(accepts(text), "{text}");
            serde_json::from_str::<serde::de::IgnoredAny>(text).expect(text);
        }
    }

    #[test]
    fn declines_what_serde_rejects() {
        for text in [
            r#"{"a":1,}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":-}"#,
            r#"{"a":1e}"#,
            r#"{"a":"\x"}"#,
            r#"{"a":"\u12g4"}"#,
            "{\"a\":\"tab\there\"}",
            r#"{"a":tru}"#,
            r#"{"a":1} x"#,
            r#"{"a" 1}"#,
            r#"{"a":1"#,
            r#"[1]"#,
        ] {
            assert!(!accepts(text), "{text}");
            assert!(
                serde_json::from_str::<serde::de::IgnoredAny>(text).is_err() || text.starts_with('['),
                "{text}"
            );
        }
    }

    #[test]
    fn declines_what_it_leaves_to_serde() {
        // Escaped names and deep nesting are valid JSON that serde reads; the reader leaves them.
        assert!(!accepts(r#"{"\u0061":1}"#));
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(70), "]".repeat(70));
        assert!(!accepts(&deep));
    }

    #[test]
    fn integers_are_read_as_serde_reads_a_u64() {
        let read = |text: &str| Reader::new(text.as_bytes()).u64_or_null();
        assert_eq!(read("0"), Some(Some(0)));
        assert_eq!(read("18446744073709551615"), Some(Some(u64::MAX)));
        assert_eq!(read("null"), Some(None));
        for declined in ["18446744073709551616", "-1", "1.0", "1e3", "01", "", "\"1\""] {
            assert_eq!(read(declined), None, "{declined}");
        }
    }

    #[test]
    fn duplicate_members_are_declined() {
        let mut seen = 0;
        assert_eq!(first_time(&mut seen, 3), Some(()));
        assert_eq!(first_time(&mut seen, 4), Some(()));
        assert_eq!(first_time(&mut seen, 3), None);
    }
}
