//! Reads the server name (SNI) of a TLS ClientHello from the first bytes of a TCP stream, in a form
//! the eBPF verifier accepts and userspace can test and fuzz. Only what fits in the examined bytes
//! ([`crate::dns::DNS_MAX`], the first segment) is seen; every loop has a constant bound.

use crate::dns::{DNS_EXAMINED, DNS_MASK, DNS_MAX};
use crate::names::{NAME_MASK, NAME_MAX, lower};

/// Extensions examined before giving up.
pub const MAX_EXTENSIONS: usize = 32;

/// Why no server name was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloError {
    /// Not a TLS handshake record holding a ClientHello.
    NotClientHello,
    /// The name lies beyond the examined bytes, or a length points past them.
    Truncated,
    /// The ClientHello has no server_name extension (or it holds no host name).
    NoServerName,
    /// The server name is empty or longer than 253 bytes.
    BadName,
}

impl core::fmt::Display for HelloError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::NotClientHello => "not a TLS ClientHello",
            Self::Truncated => "the server name lies beyond the examined bytes",
            Self::NoServerName => "no server_name extension",
            Self::BadName => "an empty or over-long server name",
        })
    }
}

impl core::error::Error for HelloError {}

#[inline(always)]
fn byte(msg: &[u8; DNS_MAX], len: usize, at: usize) -> Result<u8, HelloError> {
    crate::dns::byte_at(msg, len, at).ok_or(HelloError::Truncated)
}

#[inline(always)]
fn u16_at(msg: &[u8; DNS_MAX], len: usize, at: usize) -> Result<usize, HelloError> {
    Ok(((byte(msg, len, at)? as usize) << 8) | byte(msg, len, at + 1)? as usize)
}

/// Whether the first bytes of a segment start a TLS record carrying a ClientHello.
#[inline(always)]
pub fn looks_like_client_hello(head: &[u8; 6]) -> bool {
    head[0] == 0x16 && head[1] == 0x03 && head[5] == 0x01
}

/// Copies the ClientHello's host name (lower case) into `name` and returns its length.
#[inline(always)]
pub fn server_name(msg: &[u8; DNS_MAX], len: usize, name: &mut [u8; NAME_MAX]) -> Result<usize, HelloError> {
    let len = if len > DNS_EXAMINED { DNS_EXAMINED } else { len };
    if len < 6 || msg[0] != 0x16 || msg[1] != 0x03 || msg[5] != 0x01 {
        return Err(HelloError::NotClientHello);
    }
    // Record header (5), handshake header (4), legacy version (2), random (32).
    let mut at = 5 + 4 + 2 + 32;
    at += 1 + byte(msg, len, at)? as usize; // session id
    at += 2 + u16_at(msg, len, at)?; // cipher suites
    at += 1 + byte(msg, len, at)? as usize; // compression methods
    let extensions_end = at + 2 + u16_at(msg, len, at)?;
    at += 2;
    if at >= len {
        return Err(HelloError::Truncated);
    }
    // In bounds, so the mask changes nothing; it keeps the verifier's view coarse (states merge).
    at &= DNS_MASK;
    let mut index = 0;
    while index < MAX_EXTENSIONS {
        if at + 4 > extensions_end {
            return Err(HelloError::NoServerName);
        }
        let kind = u16_at(msg, len, at)?;
        let ext_len = u16_at(msg, len, at + 2)?;
        if kind == 0 {
            // server_name: list length (2), name type (1, 0 = host_name), name length (2), name.
            if byte(msg, len, at + 6)? != 0 {
                return Err(HelloError::NoServerName);
            }
            let name_len = u16_at(msg, len, at + 7)?;
            if name_len == 0 || name_len > 253 || name_len + 5 > ext_len {
                return Err(HelloError::BadName);
            }
            let start = at + 9;
            let mut i = 0;
            while i < 253 {
                if i >= name_len {
                    break;
                }
                name[i & NAME_MASK] = lower(byte(msg, len, start + i)?);
                i += 1;
            }
            return Ok(name_len);
        }
        at += 4 + ext_len;
        if at >= len {
            return Err(HelloError::Truncated);
        }
        at &= DNS_MASK;
        index += 1;
    }
    Err(HelloError::NoServerName)
}
