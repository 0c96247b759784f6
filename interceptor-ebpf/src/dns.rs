//! A DNS response parser small enough for the eBPF verifier and shared with userspace (unit tests,
//! fuzzing, benchmark).
//!
//! It reads only what target learning needs: the question name (copied lower-case, in text form, into
//! a [`NAME_MAX`] buffer) and the answer records' type, class, TTL and data. It never follows
//! compression pointers, so compression loops cannot make it spin; a pointer that does not point
//! backwards, a pointer in the question, a label longer than 63 bytes, a name longer than 253
//! characters, or a record past the end of the message make it stop with a [`DnsError`]. Every loop
//! has a constant bound.

use crate::names::{NAME_MASK, NAME_MAX, lower};
use crate::opaque;

/// Size of the message buffer. At most `DNS_MAX - 1` bytes are examined (longer messages are read up
/// to there), so every in-bounds offset survives masking with [`DNS_MASK`] unchanged.
pub const DNS_MAX: usize = 2048;
/// Bytes of a message examined.
pub const DNS_EXAMINED: usize = DNS_MAX - 1;
/// Index mask for [`DNS_MAX`]-sized buffers.
pub const DNS_MASK: usize = DNS_MAX - 1;
/// Answer records examined per response.
pub const MAX_ANSWERS: usize = 16;
/// Length of the DNS header.
pub const HEADER_LEN: usize = 12;
/// Record type A.
pub const TYPE_A: u16 = 1;
/// Record type AAAA.
pub const TYPE_AAAA: u16 = 28;
/// Record type CNAME.
pub const TYPE_CNAME: u16 = 5;
/// Class IN.
pub const CLASS_IN: u16 = 1;

/// Why a message was not parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsError {
    /// The message ends inside the header, a name or a record.
    Truncated,
    /// A label length with the reserved bits 01 or 10 set, or a question label containing a dot.
    BadLabel,
    /// A compression pointer in the question, or one that does not point backwards.
    BadPointer,
    /// A name longer than 253 characters or with more labels than any valid name.
    NameTooLong,
}

impl core::fmt::Display for DnsError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Truncated => "the message ends inside a name or record",
            Self::BadLabel => "a label length uses the reserved types 01 or 10, or a label holds a dot",
            Self::BadPointer => "a compression pointer in the question or not pointing backwards",
            Self::NameTooLong => "a name longer than 253 characters",
        })
    }
}

impl core::error::Error for DnsError {}

/// Parser state kept in memory rather than in registers. In the kernel it lives in the per-CPU
/// scratch map, whose contents the verifier does not track: every iteration of the name loop then
/// starts from one state instead of one per path, which keeps verification linear.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ParseWork {
    label_left: u32,
    out: u32,
    at: u32,
    len: u32,
}

impl ParseWork {
    #[inline(always)]
    fn len(&self) -> usize {
        opaque::get(&self.len) as usize & DNS_MASK
    }

    #[inline(always)]
    fn set_len(&mut self, value: usize) {
        opaque::set(&mut self.len, value as u32);
    }

    #[inline(always)]
    fn at(&self) -> usize {
        opaque::get(&self.at) as usize & DNS_MASK
    }

    #[inline(always)]
    fn set_at(&mut self, value: usize) {
        opaque::set(&mut self.at, value as u32);
    }

    #[inline(always)]
    fn out(&self) -> usize {
        opaque::get(&self.out) as usize
    }

    #[inline(always)]
    fn set_out(&mut self, value: usize) {
        opaque::set(&mut self.out, value as u32);
    }

    #[inline(always)]
    fn label_left(&self) -> u8 {
        opaque::get(&self.label_left) as u8
    }

    #[inline(always)]
    fn set_label_left(&mut self, value: u8) {
        opaque::set(&mut self.label_left, u32::from(value));
    }
}

/// The question of a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Question {
    /// Length of the question name in the name buffer (text form, no trailing dot).
    pub name_len: usize,
    /// Query type.
    pub qtype: u16,
    /// Number of answer records the header announces.
    pub answers: u16,
    /// Offset of the first answer record.
    pub next: usize,
}

/// One resource record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub rtype: u16,
    pub class: u16,
    pub ttl: u32,
    /// Offset of the record data.
    pub data: usize,
    pub data_len: usize,
    /// Offset of the next record.
    pub next: usize,
}

#[inline(always)]
fn byte(msg: &[u8; DNS_MAX], len: usize, at: usize) -> Result<u8, DnsError> {
    byte_at(msg, len, at).ok_or(DnsError::Truncated)
}

/// The byte at `at` of `msg[..len]`; the mask keeps the index provably in bounds for the verifier.
#[inline(always)]
pub(crate) fn byte_at(msg: &[u8; DNS_MAX], len: usize, at: usize) -> Option<u8> {
    (at < len).then(|| msg[at & DNS_MASK])
}

#[inline(always)]
fn u16_at(msg: &[u8; DNS_MAX], len: usize, at: usize) -> Result<u16, DnsError> {
    Ok(u16::from_be_bytes([byte(msg, len, at)?, byte(msg, len, at + 1)?]))
}

#[inline(always)]
fn u32_at(msg: &[u8; DNS_MAX], len: usize, at: usize) -> Result<u32, DnsError> {
    Ok(u32::from_be_bytes([
        byte(msg, len, at)?,
        byte(msg, len, at + 1)?,
        byte(msg, len, at + 2)?,
        byte(msg, len, at + 3)?,
    ]))
}

/// Parses the header and question of `msg[..len]`. `Ok(None)` for a message that is not a
/// successful standard-query response with exactly one question (queries, NXDOMAIN, updates...).
#[inline(always)]
pub fn parse_question(
    msg: &[u8; DNS_MAX],
    len: usize,
    name: &mut [u8; NAME_MAX],
    work: &mut ParseWork,
) -> Result<Option<Question>, DnsError> {
    let len = if len > DNS_EXAMINED { DNS_EXAMINED } else { len };
    if len < HEADER_LEN {
        return Err(DnsError::Truncated);
    }
    let flags = u16_at(msg, len, 2)?;
    let is_response = flags & 0x8000 != 0;
    let opcode = (flags >> 11) & 0xf;
    let rcode = flags & 0xf;
    if !is_response || opcode != 0 || rcode != 0 || u16_at(msg, len, 4)? != 1 {
        return Ok(None);
    }
    let answers = u16_at(msg, len, 6)?;

    let mut at = HEADER_LEN;
    work.set_out(0);
    work.set_label_left(0);
    let mut ended = false;
    let mut step = 0;
    while step < NAME_MAX {
        let b = byte(msg, len, at)?;
        at += 1;
        let label_left = work.label_left();
        let out = work.out() & NAME_MASK;
        if label_left == 0 {
            if b == 0 {
                ended = true;
                break;
            }
            match b & 0xc0 {
                0xc0 => return Err(DnsError::BadPointer),
                0x00 => {}
                _ => return Err(DnsError::BadLabel),
            }
            if out != 0 {
                name[out] = b'.';
                work.set_out(out + 1);
            }
            work.set_label_left(b);
        } else {
            // A dot inside a label is legal DNS but no host name: in text form it would read as a
            // label boundary (`api.openai` + `com` as `api.openai.com`).
            if b == b'.' {
                return Err(DnsError::BadLabel);
            }
            name[out] = lower(b);
            work.set_out(out + 1);
            work.set_label_left(label_left - 1);
        }
        if work.out() > 253 {
            return Err(DnsError::NameTooLong);
        }
        step += 1;
    }
    if !ended {
        return Err(DnsError::NameTooLong);
    }
    let qtype = u16_at(msg, len, at)?;
    let _qclass = u16_at(msg, len, at + 2)?;
    Ok(Some(Question {
        name_len: work.out(),
        qtype,
        answers,
        // In bounds (the class was read), so masking changes nothing but tells the verifier so.
        next: (at + 4) & DNS_MASK,
    }))
}

/// Parses the resource record at `at`, skipping its owner name.
#[inline(always)]
pub fn parse_record(
    msg: &[u8; DNS_MAX],
    len: usize,
    at: usize,
    work: &mut ParseWork,
) -> Result<Record, DnsError> {
    // Offsets are checked against `len` (< DNS_MAX) before they are stored, so masking them changes
    // no value; the owner-name offset lives in `work` (see `ParseWork`).
    work.set_len(if len > DNS_EXAMINED { DNS_EXAMINED } else { len });
    let start = at & DNS_MASK;
    work.set_at(start);
    let mut ended = false;
    // A name of at most 253 characters has at most 127 labels.
    let mut step = 0;
    while step < 128 {
        let at = work.at();
        let len = work.len();
        let b = byte(msg, len, at)?;
        match b & 0xc0 {
            0x00 if b == 0 => {
                work.set_at(at + 1);
                ended = true;
                break;
            }
            0x00 => {
                let next = at + 1 + b as usize;
                if next >= len {
                    return Err(DnsError::Truncated);
                }
                work.set_at(next);
            }
            0xc0 => {
                let target = (((b & 0x3f) as usize) << 8) | byte(msg, len, at + 1)? as usize;
                if target < HEADER_LEN || target >= start {
                    return Err(DnsError::BadPointer);
                }
                work.set_at(at + 2);
                ended = true;
                break;
            }
            _ => return Err(DnsError::BadLabel),
        }
        step += 1;
    }
    if !ended {
        return Err(DnsError::NameTooLong);
    }
    let at = work.at();
    let len = work.len();
    let rtype = u16_at(msg, len, at)?;
    let class = u16_at(msg, len, at + 2)?;
    let ttl = u32_at(msg, len, at + 4)?;
    let data_len = u16_at(msg, len, at + 8)? as usize;
    let data = at + 10;
    let next = data + data_len;
    if next > len {
        return Err(DnsError::Truncated);
    }
    Ok(Record {
        rtype,
        class,
        ttl,
        data: data & DNS_MASK,
        data_len: data_len & DNS_MASK,
        next: next & DNS_MASK,
    })
}

/// The address in an A or AAAA record of class IN, as 16 bytes (IPv4-mapped for A).
#[inline(always)]
pub fn record_address(msg: &[u8; DNS_MAX], len: usize, record: &Record) -> Option<[u8; 16]> {
    if record.class != CLASS_IN {
        return None;
    }
    let mut addr = [0u8; 16];
    match (record.rtype, record.data_len) {
        (TYPE_A, 4) => {
            addr[10] = 0xff;
            addr[11] = 0xff;
            let mut i = 0;
            while i < 4 {
                addr[12 + i] = byte(msg, len, record.data + i).ok()?;
                i += 1;
            }
        }
        (TYPE_AAAA, 16) => {
            let mut i = 0;
            while i < 16 {
                addr[i] = byte(msg, len, record.data + i).ok()?;
                i += 1;
            }
        }
        _ => return None,
    }
    Some(addr)
}

/// What a whole response yields: the question and each answer address with its TTL. This is the
/// loop the kernel program runs, in a form userspace can test and fuzz; the kernel inlines the same
/// functions and acts on each address as it is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Learned {
    pub question: Question,
    pub addresses: [([u8; 16], u32); MAX_ANSWERS],
    pub count: usize,
    /// Set when parsing stopped early (the addresses before the error are kept).
    pub error: Option<DnsError>,
}

/// Parses a whole response (see [`Learned`]).
pub fn learn(
    msg: &[u8; DNS_MAX],
    len: usize,
    name: &mut [u8; NAME_MAX],
) -> Result<Option<Learned>, DnsError> {
    let mut work = ParseWork::default();
    let Some(question) = parse_question(msg, len, name, &mut work)? else {
        return Ok(None);
    };
    let mut learned = Learned {
        question,
        addresses: [([0; 16], 0); MAX_ANSWERS],
        count: 0,
        error: None,
    };
    let mut at = question.next;
    let mut index = 0;
    while index < MAX_ANSWERS && index < question.answers as usize {
        match parse_record(msg, len, at, &mut work) {
            Ok(record) => {
                if let Some(addr) = record_address(msg, len, &record) {
                    learned.addresses[learned.count] = (addr, record.ttl);
                    learned.count += 1;
                }
                at = record.next;
            }
            Err(e) => {
                learned.error = Some(e);
                break;
            }
        }
        index += 1;
    }
    Ok(Some(learned))
}

/// Copies `bytes` into a message buffer as the kernel does (at most [`DNS_EXAMINED`] bytes).
pub fn message_buffer(bytes: &[u8]) -> ([u8; DNS_MAX], usize) {
    let mut msg = [0u8; DNS_MAX];
    let len = bytes.len().min(DNS_EXAMINED);
    msg[..len].copy_from_slice(&bytes[..len]);
    (msg, len)
}
