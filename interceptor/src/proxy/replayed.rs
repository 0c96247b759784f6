//! A client stream whose first bytes were already read (the ClientHello, to classify the
//! connection): reads return those bytes first, then the socket's; writes go straight to the socket.
//! One layer over the socket, where a `Chain` of a cursor and a split read half joined with the write
//! half took three, and an `Arc` per read and write.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `inner`, with `replay` read before it.
pub struct Replayed<S> {
    replay: Vec<u8>,
    /// How much of `replay` was read.
    replayed: usize,
    inner: S,
}

impl<S> Replayed<S> {
    pub fn new(replay: Vec<u8>, inner: S) -> Self {
        Self {
            replay,
            replayed: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replayed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let rest = &this.replay[this.replayed..];
        if rest.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        this.replayed += n;
        if this.replayed == this.replay.len() {
            // Replayed: its memory goes.
            this.replay = Vec::new();
            this.replayed = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replayed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_the_replayed_bytes_then_the_stream_and_writes_to_the_stream() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut stream = Replayed::new(b"hello ".to_vec(), near);
        far.write_all(b"world").await.expect("write");
        drop(far.shutdown().await);

        // A small buffer takes the replayed bytes in pieces.
        let mut piece = [0u8; 4];
        let n = stream.read(&mut piece).await.expect("read");
        assert_eq!(&piece[..n], b"hell");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.expect("read");
        assert_eq!(rest, b"o world");
        assert!(stream.replay.is_empty(), "the replayed bytes are freed");
    }

    #[tokio::test]
    async fn writes_go_to_the_stream_before_and_after_the_replay() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut stream = Replayed::new(b"x".to_vec(), near);
        stream.write_all(b"ab").await.expect("write");
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.expect("read");
        stream.write_all(b"cd").await.expect("write");
        stream.shutdown().await.expect("shutdown");
        let mut written = Vec::new();
        far.read_to_end(&mut written).await.expect("read");
        assert_eq!(written, b"abcd");
    }
}
