//! Reads the client's first bytes to decide how a connection is handled: the TLS ClientHello's SNI
//! and ALPN, without consuming anything (the bytes are kept and replayed).

use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

/// Content type of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Largest ClientHello accepted (several records; post-quantum key shares make them bigger).
const MAX_HELLO: usize = 64 * 1024;

/// What the first bytes were.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// A TLS ClientHello.
    Tls { sni: Option<String>, alpn: Vec<Vec<u8>> },
    /// Not TLS, or a malformed ClientHello.
    NotTls(String),
    /// The client closed before sending a complete ClientHello.
    Closed,
    /// The client sent nothing within the first-byte timeout (a server-speaks-first protocol).
    Silent,
}

/// Reads until a complete ClientHello is parsed, appending every byte read to `buffer`. A client that
/// sends nothing within `first_byte` is [`Hello::Silent`]; one that starts but does not complete a
/// ClientHello within `complete` is [`Hello::NotTls`].
pub async fn read_client_hello(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    first_byte: Duration,
    complete: Duration,
) -> Hello {
    match tokio::time::timeout(first_byte, stream.readable()).await {
        Err(_) => return Hello::Silent,
        Ok(Err(e)) => return Hello::NotTls(format!("waiting for the ClientHello: {e}")),
        Ok(Ok(())) => {}
    }
    match tokio::time::timeout(complete, read(stream, buffer)).await {
        Ok(hello) => hello,
        Err(_) => Hello::NotTls(format!("no complete ClientHello within {complete:?}")),
    }
}

async fn read(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Hello {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) => return Hello::Closed,
            Ok(n) => n,
            Err(e) => return Hello::NotTls(format!("reading the ClientHello: {e}")),
        };
        buffer.extend_from_slice(&chunk[..n]);
        // A TLS connection starts with a handshake record (content type 22); anything else is decided
        // on the first byte instead of waiting for a record header that may never come.
        if buffer.first() != Some(&TLS_HANDSHAKE) {
            return Hello::NotTls(format!(
                "first byte {:#04x} is not a TLS handshake record",
                buffer[0]
            ));
        }
        let mut fresh = &chunk[..n];
        while !fresh.is_empty() {
            if let Err(e) = acceptor.read_tls(&mut fresh) {
                return Hello::NotTls(format!("invalid TLS record: {e}"));
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let hello = accepted.client_hello();
                return Hello::Tls {
                    sni: hello.server_name().map(str::to_owned),
                    alpn: hello
                        .alpn()
                        .map(|protocols| protocols.map(<[u8]>::to_vec).collect())
                        .unwrap_or_default(),
                };
            }
            Ok(None) if buffer.len() < MAX_HELLO => {}
            Ok(None) => return Hello::NotTls(format!("ClientHello larger than {MAX_HELLO} bytes")),
            Err((e, _alert)) => return Hello::NotTls(format!("not a TLS ClientHello: {e}")),
        }
    }
}
