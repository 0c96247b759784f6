//! Matching domain names against the watched provider domains, the same way in the kernel and in
//! userspace.
//!
//! The kernel cannot compare strings against a list cheaply, so the daemon stores one 64-bit hash per
//! watched *suffix* in a map ([`crate::MAP_WATCHED`]): the whole name for an exact domain, the part
//! after the `*` for a pattern such as `*.openai.azure.com` (suffix `.openai.azure.com`) or
//! `*-aiplatform.googleapis.com`. A pattern with text before the `*` (`bedrock-runtime.*.amazonaws.com`)
//! also carries the hash and length of that prefix.
//!
//! The hash ([`suffix_hash`]) is FNV-1a over the lower-case name read from its *last* byte to its
//! first, so one backward pass over a name yields the hash of every suffix: the kernel looks the
//! running hash up where a suffix starts with `.` or `-`, and at the first byte (the whole name).
//! A 64-bit collision could at worst redirect an unrelated address to the proxy, which relays
//! connections whose SNI is not a provider untouched.

/// Longest name handled (a DNS name has at most 253 characters in text form).
pub const NAME_MAX: usize = 256;
/// Index mask for [`NAME_MAX`]-sized buffers (keeps every index provably in bounds for the verifier).
pub const NAME_MASK: usize = NAME_MAX - 1;
/// Longest prefix before a `*` that can be matched (one less than a power of two).
pub const PREFIX_MAX: usize = 63;
const PREFIX_MASK: usize = PREFIX_MAX;
/// Most suffix lookups made for one name.
pub const MAX_SUFFIX_LOOKUPS: usize = 16;
/// Patterns sharing one suffix.
pub const PATTERNS_PER_SUFFIX: usize = 4;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// `WatchedPattern::kind`: unused slot.
pub const PATTERN_NONE: u8 = 0;
/// `WatchedPattern::kind`: the suffix is the whole name.
pub const PATTERN_EXACT: u8 = 1;
/// `WatchedPattern::kind`: the suffix must be preceded by at least one byte (and by the prefix, if any).
pub const PATTERN_WILDCARD: u8 = 2;

/// One watched pattern ending with a given suffix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchedPattern {
    /// [`prefix_hash`] of the text before the `*` (zero when there is none).
    pub prefix_hash: u64,
    /// Index of the domain in the daemon's table ([`crate::MAP_DOMAINS`]).
    pub domain_index: u16,
    /// `PATTERN_*`.
    pub kind: u8,
    /// Length of the text before the `*` (at most [`PREFIX_MAX`]).
    pub prefix_len: u8,
    /// Always zero.
    pub _pad: [u8; 4],
}

/// Value of the watched-suffix map: the patterns ending with one suffix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchedSuffix {
    pub patterns: [WatchedPattern; PATTERNS_PER_SUFFIX],
}

#[inline(always)]
const fn fnv_step(hash: u64, byte: u8) -> u64 {
    (hash ^ byte as u64).wrapping_mul(FNV_PRIME)
}

/// ASCII lower case.
#[inline(always)]
pub const fn lower(byte: u8) -> u8 {
    if byte >= b'A' && byte <= b'Z' {
        byte + 32
    } else {
        byte
    }
}

/// Hash of `name` read backwards (its suffix hash), case-insensitive.
pub fn suffix_hash(name: &[u8]) -> u64 {
    let mut hash = FNV_OFFSET;
    let mut i = name.len();
    while i > 0 {
        i -= 1;
        hash = fnv_step(hash, lower(name[i]));
    }
    hash
}

/// Hash of `name` read forwards (for the text before a `*`), case-insensitive.
pub fn prefix_hash(name: &[u8]) -> u64 {
    let mut hash = FNV_OFFSET;
    let mut i = 0;
    while i < name.len() {
        hash = fnv_step(hash, lower(name[i]));
        i += 1;
    }
    hash
}

/// Looks a suffix hash up (the kernel's map, or a table in tests).
pub trait SuffixTable {
    fn get(&self, hash: u64) -> Option<WatchedSuffix>;
}

/// Where a name's suffixes start and their hashes (filled by [`match_name`]; kept outside the stack
/// in the kernel, where its count also stays opaque to the verifier so loop states merge).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Candidates {
    pub hash: [u64; MAX_SUFFIX_LOOKUPS],
    pub at: [u32; MAX_SUFFIX_LOOKUPS],
    pub count: u32,
    /// Length of the name being matched.
    pub len: u32,
    /// `prefix[n]` = [`prefix_hash`] of the name's first `n` bytes, for `n` up to [`PREFIX_MAX`].
    pub prefix: [u64; PREFIX_MAX + 1],
}

impl Candidates {
    /// The name length, read from memory each time: a comparison that ends a loop then narrows only
    /// this copy, and the eBPF verifier does not carry one precise length per way out of the loop
    /// into the code after it.
    #[inline(always)]
    fn len(&self) -> usize {
        crate::opaque::get(&self.len) as usize
    }
}

impl Default for Candidates {
    fn default() -> Self {
        Self {
            hash: [0; MAX_SUFFIX_LOOKUPS],
            at: [0; MAX_SUFFIX_LOOKUPS],
            count: 0,
            len: 0,
            prefix: [0; PREFIX_MAX + 1],
        }
    }
}

/// The domain index of the first pattern that matches the lower-case `name[..len]`, if any.
///
/// Two passes with constant bounds: one backward pass hashes the name and notes the hash where a
/// suffix starts with `.` or `-` and at the first byte (at most [`MAX_SUFFIX_LOOKUPS`]); then the
/// noted hashes are looked up longest suffix first, so the most specific pattern wins (an exact
/// domain before a wildcard covering it).
#[inline(always)]
pub fn match_name<T: SuffixTable>(
    name: &[u8; NAME_MAX],
    len: usize,
    table: &T,
    candidates: &mut Candidates,
) -> Option<u16> {
    if len == 0 || len >= NAME_MAX {
        return None;
    }
    crate::opaque::set(&mut candidates.len, len as u32);
    // Forward hashes of the first bytes, for patterns with text before the `*`.
    let mut hash = FNV_OFFSET;
    candidates.prefix[0] = hash;
    let mut i = 0;
    while i < PREFIX_MAX {
        if i >= candidates.len() {
            break;
        }
        hash = fnv_step(hash, name[i & NAME_MASK]);
        candidates.prefix[(i + 1) & PREFIX_MASK] = hash;
        i += 1;
    }
    candidates.count = 0;
    let mut hash = FNV_OFFSET;
    let mut step = 0;
    while step < NAME_MAX {
        let len = candidates.len();
        if step >= len {
            break;
        }
        let at = len.wrapping_sub(1 + step) & NAME_MASK;
        let byte = name[at];
        hash = fnv_step(hash, byte);
        if at == 0 || byte == b'.' || byte == b'-' {
            let n = crate::opaque::get(&candidates.count) as usize;
            if n < MAX_SUFFIX_LOOKUPS {
                candidates.hash[n & (MAX_SUFFIX_LOOKUPS - 1)] = hash;
                candidates.at[n & (MAX_SUFFIX_LOOKUPS - 1)] = at as u32;
                candidates.count = n as u32 + 1;
            }
        }
        step += 1;
    }
    let count = crate::opaque::get(&candidates.count) as usize;
    // Longest suffix first: the whole name (an exact domain), then the most specific wildcard.
    let mut i = 0;
    while i < MAX_SUFFIX_LOOKUPS {
        if i >= count {
            break;
        }
        let slot = count.wrapping_sub(1 + i) & (MAX_SUFFIX_LOOKUPS - 1);
        if let Some(suffix) = table.get(candidates.hash[slot])
            && let Some(domain) = match_patterns(&suffix, candidates, candidates.at[slot] as usize)
        {
            return Some(domain);
        }
        i += 1;
    }
    None
}

/// The first pattern of `suffix` that matches when the suffix starts at `at`.
#[inline(always)]
fn match_patterns(suffix: &WatchedSuffix, candidates: &Candidates, at: usize) -> Option<u16> {
    let mut i = 0;
    while i < PATTERNS_PER_SUFFIX {
        let pattern = &suffix.patterns[i];
        let prefix_len = pattern.prefix_len as usize;
        let matched = match pattern.kind {
            PATTERN_EXACT => at == 0,
            PATTERN_WILDCARD if prefix_len == 0 => at > 0,
            PATTERN_WILDCARD => {
                at > prefix_len
                    && prefix_len <= PREFIX_MAX
                    && candidates.prefix[prefix_len & PREFIX_MASK] == pattern.prefix_hash
            }
            _ => false,
        };
        if matched {
            return Some(pattern.domain_index);
        }
        i += 1;
    }
    None
}

/// How a domain pattern is stored in the watched-suffix map: (suffix, pattern) or why it cannot be.
pub fn pattern_entry(pattern: &str, domain_index: u16) -> Result<(u64, WatchedPattern), &'static str> {
    let pattern = pattern.trim_end_matches('.');
    if pattern.is_empty() || pattern.len() >= NAME_MAX {
        return Err("name is empty or too long");
    }
    match pattern.split_once('*') {
        None => Ok((
            suffix_hash(pattern.as_bytes()),
            WatchedPattern {
                domain_index,
                kind: PATTERN_EXACT,
                ..WatchedPattern::default()
            },
        )),
        Some((prefix, suffix)) => {
            if suffix.is_empty() || suffix.contains('*') {
                return Err("the `*` must be followed by a fixed suffix");
            }
            let first = suffix.as_bytes()[0];
            if first != b'.' && first != b'-' {
                return Err("the text after `*` must start with `.` or `-`");
            }
            if prefix.len() > PREFIX_MAX {
                return Err("the text before `*` is longer than 63 characters");
            }
            Ok((
                suffix_hash(suffix.as_bytes()),
                WatchedPattern {
                    prefix_hash: if prefix.is_empty() {
                        0
                    } else {
                        prefix_hash(prefix.as_bytes())
                    },
                    domain_index,
                    kind: PATTERN_WILDCARD,
                    prefix_len: prefix.len() as u8,
                    _pad: [0; 4],
                },
            ))
        }
    }
}

/// Copies `text` lower-cased into a name buffer; `None` when it does not fit.
pub fn name_buffer(text: &[u8]) -> Option<([u8; NAME_MAX], usize)> {
    if text.len() >= NAME_MAX {
        return None;
    }
    let mut buffer = [0u8; NAME_MAX];
    for (slot, byte) in buffer.iter_mut().zip(text) {
        *slot = lower(*byte);
    }
    Some((buffer, text.len()))
}
