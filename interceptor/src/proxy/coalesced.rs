//! Streamed response bodies handed to the client in as few writes as the provider's reads allow.
//!
//! hyper's HTTP/1.1 client hands a chunked body over one chunk at a time: the upstream connection's
//! task decodes the next chunk only once the previous one has been taken, and the client
//! connection's server flushes whenever the body has nothing ready. Chunks the provider sent
//! together (OpenAI's finish chunk, usage chunk and `[DONE]`, read in one go) would each leave as
//! a write and a TLS record of their own, and the body's end as one more.
//!
//! [`Coalesced`] lets the scheduler finish its current round (the upstream task's turn included)
//! before handing a chunk over, and joins what arrived meanwhile: one write for what one upstream
//! read brought, the body's end included. A chunk that arrives alone is handed over after that round
//! (no timer, no waiting for more), so streams keep their pace. Bodies of known length pass through
//! untouched.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker, ready};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

/// At most this much is gathered before it is handed over (a TLS record's plaintext).
const MAX_GATHERED: usize = 16 * 1024;

/// A response body whose chunks, when several are ready together, reach the client as one.
pub struct Coalesced<B: Body> {
    inner: B,
    /// Bodies of unknown length (chunked, streams) are gathered; others pass through.
    gathers: bool,
    held: Held,
    /// The deferred wake-up that ends a wait (made at the first wait, reused by the next ones).
    round: Option<Arc<Round>>,
    /// The held data waits for `round` (no chunk arrived since it was started).
    waiting: bool,
    /// What ended the gathering, returned after the held data.
    after: Option<After<B::Error>>,
}

// Nothing of it is pinned but `inner`, which must be `Unpin` itself (the held error never is).
impl<B: Body + Unpin> Unpin for Coalesced<B> {}

/// The end of the scheduler's current round, as a deferred wake-up (tokio's `yield_now`): every
/// task already woken runs before it, the upstream connection's included.
#[derive(Default)]
struct Round {
    ended: AtomicBool,
    task: futures::task::AtomicWaker,
}

impl Round {
    /// Wakes the task of `cx` at the end of the current round; one allocation per body, at its first
    /// wait.
    fn wait(round: &mut Option<Arc<Round>>, cx: &mut Context<'_>) {
        let round = round.get_or_insert_with(Arc::default);
        round.ended.store(false, Ordering::Release);
        round.task.register(cx.waker());
        let waker = Waker::from(round.clone());
        let mut deferred = Context::from_waker(&waker);
        // The first poll of `yield_now` defers its waker (outside a runtime: wakes it at once)
        // and returns `Pending`; the future itself is not needed after that.
        let _ = std::pin::pin!(tokio::task::yield_now()).poll(&mut deferred);
    }

    fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }
}

impl Wake for Round {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ended.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// The data gathered and not yet handed over.
enum Held {
    Nothing,
    /// One chunk, kept as it came (no copy).
    One(Bytes),
    /// Several, joined.
    Joined(BytesMut),
}

/// The frame (or end) that stopped the gathering.
enum After<E> {
    Trailers(Frame<Bytes>),
    Error(E),
    End,
}

impl Held {
    fn len(&self) -> usize {
        match self {
            Held::Nothing => 0,
            Held::One(data) => data.len(),
            Held::Joined(data) => data.len(),
        }
    }

    fn push(&mut self, data: Bytes) {
        *self = match std::mem::replace(self, Held::Nothing) {
            Held::Nothing => Held::One(data),
            Held::One(first) => {
                let mut joined = BytesMut::with_capacity((first.len() + data.len()).max(1024));
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&data);
                Held::Joined(joined)
            }
            Held::Joined(mut joined) => {
                joined.extend_from_slice(&data);
                Held::Joined(joined)
            }
        };
    }

    fn take(&mut self) -> Option<Bytes> {
        match std::mem::replace(self, Held::Nothing) {
            Held::Nothing => None,
            Held::One(data) => Some(data),
            Held::Joined(data) => Some(data.freeze()),
        }
    }
}

impl<B: Body> Coalesced<B> {
    pub fn new(inner: B) -> Self {
        let gathers = inner.size_hint().exact().is_none();
        Self {
            inner,
            gathers,
            held: Held::Nothing,
            round: None,
            waiting: false,
            after: None,
        }
    }

    /// Takes what the upstream already has of the body, waiting at most one scheduler round, so
    /// that hyper writes the response's head together with it (hyper's client asks the upstream
    /// connection for the body only once it is first polled, and a server whose body is not ready
    /// sends the head alone).
    pub async fn prefetch(&mut self)
    where
        B: Body<Data = Bytes> + Unpin,
    {
        if self.gathers {
            // When the round ends, `waiting` stays set with the round over, so the body's first
            // poll hands over what is held at once.
            std::future::poll_fn(|cx| self.poll_gather(cx, true)).await;
        }
    }

    /// Gathers what the upstream has until a round passes without more (`Ready`: hand over what is
    /// held, then `after`), the body ends or stops with trailers or an error (kept in `after`), or
    /// 16 KiB are held. With nothing held, it waits for a round only when `wait_empty`.
    fn poll_gather(&mut self, cx: &mut Context<'_>, wait_empty: bool) -> Poll<()>
    where
        B: Body<Data = Bytes> + Unpin,
    {
        loop {
            if self.held.len() >= MAX_GATHERED {
                return Poll::Ready(());
            }
            let after = match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if !data.is_empty() {
                            self.held.push(data);
                            self.waiting = false;
                        }
                        if !self.inner.is_end_stream() {
                            continue;
                        }
                        After::End
                    }
                    Err(trailers) => After::Trailers(trailers),
                },
                Poll::Ready(Some(Err(e))) => After::Error(e),
                Poll::Ready(None) => After::End,
                Poll::Pending => {
                    if self.held.len() == 0 && !wait_empty {
                        return Poll::Pending;
                    }
                    if !self.waiting {
                        // One round for the upstream task to decode what it has already read.
                        self.waiting = true;
                        Round::wait(&mut self.round, cx);
                        return Poll::Pending;
                    }
                    return match self.round.as_ref() {
                        // Polled again within the round (hyper re-checks a pending body at once):
                        // the deferred wake-up is still due.
                        Some(round) if !round.ended() => {
                            round.task.register(cx.waker());
                            Poll::Pending
                        }
                        // The upstream had its turn and brought nothing more.
                        _ => Poll::Ready(()),
                    };
                }
            };
            self.after = Some(after);
            return Poll::Ready(());
        }
    }

    /// Hands the held data over; `after` (if any) is returned on the next poll.
    fn hand_over(&mut self) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        self.waiting = false;
        match self.held.take() {
            Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
            None => self.next_after(),
        }
    }

    /// What came after the gathered data; the end, once reached, stays.
    fn next_after(&mut self) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Poll::Ready(match self.after.take() {
            Some(After::Trailers(frame)) => Some(Ok(frame)),
            Some(After::Error(e)) => Some(Err(e)),
            Some(After::End) => {
                self.after = Some(After::End);
                None
            }
            // Not reached: data is handed over only when some is held.
            None => None,
        })
    }
}

impl<B> Body for Coalesced<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if !this.gathers {
            return Pin::new(&mut this.inner).poll_frame(cx);
        }
        if this.after.is_none() {
            ready!(this.poll_gather(cx, false));
        }
        this.hand_over()
    }

    fn is_end_stream(&self) -> bool {
        if !self.gathers {
            return self.inner.is_end_stream();
        }
        self.held.len() == 0 && matches!(self.after, Some(After::End))
    }

    fn size_hint(&self) -> SizeHint {
        if !self.gathers {
            return self.inner.size_hint();
        }
        let mut hint = SizeHint::new();
        if let Some(upper) = self.inner.size_hint().upper() {
            hint.set_upper(upper.saturating_add(self.held.len() as u64));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    use super::*;

    const HEAD: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

    fn chunk(data: &str) -> Vec<u8> {
        format!("{:x}\r\n{data}\r\n", data.len()).into_bytes()
    }

    /// A chunk and the end of the chunked body.
    fn last_chunk(data: &str) -> Vec<u8> {
        let mut bytes = chunk(data);
        bytes.extend_from_slice(b"0\r\n\r\n");
        bytes
    }

    /// A whole response in one write: the head, one chunk per event, the end.
    fn burst(events: &[&str]) -> Vec<u8> {
        let mut bytes = HEAD.to_vec();
        for event in events {
            bytes.extend(chunk(event));
        }
        bytes.extend_from_slice(b"0\r\n\r\n");
        bytes
    }

    /// An upstream that answers one request with the byte runs it gets from `writes`, each in one
    /// write, then closes.
    async fn upstream(mut writes: mpsc::Receiver<Vec<u8>>) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut request = vec![0u8; 4096];
            let _ = stream.read(&mut request).await;
            while let Some(bytes) = writes.recv().await {
                stream.write_all(&bytes).await.expect("write");
                stream.flush().await.expect("flush");
            }
        });
        addr
    }

    /// The response body of a GET through hyper's HTTP/1.1 client, its connection driven by a task of
    /// its own (as the proxy's upstream connections are).
    async fn response_body(addr: std::net::SocketAddr) -> Coalesced<Incoming> {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        let request = http::Request::get("/")
            .header("host", "x")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        Coalesced::new(response.into_body())
    }

    /// A response whose first write is `first`, its body as the proxy gets it, and the writer of
    /// the rest.
    async fn streamed(first: Vec<u8>) -> (mpsc::Sender<Vec<u8>>, Coalesced<Incoming>) {
        let (writes, rx) = mpsc::channel(4);
        let addr = upstream(rx).await;
        writes.send(first).await.expect("send");
        (writes, response_body(addr).await)
    }

    /// The head and one chunk, in one write.
    fn head_and(data: &str) -> Vec<u8> {
        let mut bytes = HEAD.to_vec();
        bytes.extend(chunk(data));
        bytes
    }

    async fn next_data(body: &mut Coalesced<Incoming>) -> Option<Bytes> {
        let frame = body.frame().await?.expect("frame");
        Some(frame.into_data().expect("data"))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn chunks_read_together_reach_the_client_as_one_frame_with_the_end() {
        let events = [
            "data: {\"finish\":1}\n\n",
            "data: {\"usage\":2}\n\n",
            "data: [DONE]\n\n",
        ];
        let (_writes, mut body) = streamed(burst(&events)).await;
        let data = next_data(&mut body).await.expect("data");
        assert_eq!(
            data,
            Bytes::from(events.concat()),
            "one frame, every event in order"
        );
        assert!(body.is_end_stream(), "the end goes with the last data");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_second_poll_within_the_same_round_does_not_hand_over_early() {
        let (_writes, mut body) = streamed(burst(&["data: a\n\n", "data: b\n\n", "data: c\n\n"])).await;
        // hyper's server polls a pending body twice in one turn (once more after flushing).
        let frame = std::future::poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
            Poll::Pending => Pin::new(&mut body).poll_frame(cx),
            ready => ready,
        })
        .await;
        let data = frame.expect("a frame").expect("data").into_data().expect("data");
        assert_eq!(&data[..], b"data: a\n\ndata: b\n\ndata: c\n\n");
        assert!(body.is_end_stream());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_chunk_that_arrives_alone_is_handed_over_without_waiting_for_the_next() {
        let (writes, mut body) = streamed(head_and("data: one\n\n")).await;
        // The second chunk is sent only once the first was handed over: holding the first would
        // never finish.
        let data = tokio::time::timeout(Duration::from_secs(5), next_data(&mut body))
            .await
            .expect("the first chunk, alone")
            .expect("data");
        assert_eq!(&data[..], b"data: one\n\n");
        assert!(!body.is_end_stream());
        writes.send(last_chunk("data: two\n\n")).await.expect("send");
        let data = next_data(&mut body).await.expect("data");
        assert_eq!(&data[..], b"data: two\n\n");
        assert!(body.is_end_stream());
    }

    /// Polls `body` once with a waker that does nothing, as hyper's first poll after writing the head.
    fn poll_now(body: &mut Coalesced<Incoming>) -> Poll<Option<Bytes>> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(body)
            .poll_frame(&mut cx)
            .map(|frame| frame.map(|frame| frame.expect("frame").into_data().expect("data")))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_prefetched_first_chunk_is_ready_for_the_head_to_go_with_it() {
        let (writes, mut body) = streamed(head_and("data: first\n\n")).await;
        body.prefetch().await;
        assert_eq!(
            poll_now(&mut body),
            Poll::Ready(Some(Bytes::from_static(b"data: first\n\n")))
        );
        // The rest streams as before.
        writes.send(last_chunk("data: second\n\n")).await.expect("send");
        assert_eq!(
            &next_data(&mut body).await.expect("data")[..],
            b"data: second\n\n"
        );
        assert!(body.is_end_stream());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn prefetching_a_body_not_yet_sent_waits_one_round_only() {
        let (writes, mut body) = streamed(HEAD.to_vec()).await;
        tokio::time::timeout(Duration::from_secs(5), body.prefetch())
            .await
            .expect("prefetch does not wait for the body");
        assert_eq!(poll_now(&mut body), Poll::Pending);
        writes.send(last_chunk("data: late\n\n")).await.expect("send");
        assert_eq!(&next_data(&mut body).await.expect("data")[..], b"data: late\n\n");
        assert!(body.is_end_stream());
    }

    /// A body whose frames are all ready at once.
    type ReadyFrames = StreamBody<futures::stream::Iter<std::vec::IntoIter<TestFrame>>>;
    type TestFrame = Result<Frame<Bytes>, &'static str>;

    fn ready_body(frames: Vec<TestFrame>) -> Coalesced<ReadyFrames> {
        Coalesced::new(StreamBody::new(futures::stream::iter(frames)))
    }

    async fn frames<B>(mut body: Coalesced<B>) -> Vec<Result<Frame<Bytes>, B::Error>>
    where
        B: Body<Data = Bytes> + Unpin,
    {
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let failed = frame.is_err();
            out.push(frame);
            if failed {
                break;
            }
        }
        out
    }

    fn data(text: &'static str) -> TestFrame {
        Ok(Frame::data(Bytes::from_static(text.as_bytes())))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn trailers_and_errors_follow_the_data_gathered_before_them() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let out = frames(ready_body(vec![
            data("a"),
            data("b"),
            Ok(Frame::trailers(trailers)),
        ]))
        .await;
        assert_eq!(out.len(), 2, "joined data, then the trailers");
        assert_eq!(
            out[0].as_ref().expect("data").data_ref().expect("data"),
            &Bytes::from_static(b"ab")
        );
        assert!(out[1].as_ref().expect("trailers").is_trailers());

        let out = frames(ready_body(vec![data("a"), data("b"), Err("reset"), data("c")])).await;
        assert_eq!(out.len(), 2, "joined data, then the error");
        assert_eq!(
            out[0].as_ref().expect("data").data_ref().expect("data"),
            &Bytes::from_static(b"ab")
        );
        assert_eq!(out[1].as_ref().err(), Some(&"reset"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn gathering_stops_at_a_tls_record_of_data() {
        let piece = Bytes::from(vec![b'x'; 1000]);
        let out = frames(ready_body(
            (0..40).map(|_| Ok(Frame::data(piece.clone()))).collect(),
        ))
        .await;
        let sizes: Vec<usize> = out
            .iter()
            .map(|frame| frame.as_ref().expect("data").data_ref().expect("data").len())
            .collect();
        assert_eq!(sizes.iter().sum::<usize>(), 40_000, "nothing lost");
        assert!(sizes.iter().all(|&size| size <= MAX_GATHERED + 1000), "{sizes:?}");
        assert_eq!(sizes[0], 17_000, "{sizes:?}");
    }

    /// A body of known length whose frames are all ready.
    struct KnownLength(ReadyFrames, u64);

    impl Body for KnownLength {
        type Data = Bytes;
        type Error = &'static str;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, &'static str>>> {
            Pin::new(&mut self.0).poll_frame(cx)
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.1)
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn bodies_of_known_length_pass_through_frame_by_frame() {
        let inner = KnownLength(
            StreamBody::new(futures::stream::iter(vec![data("a"), data("b")])),
            2,
        );
        let body = Coalesced::new(inner);
        assert_eq!(body.size_hint().exact(), Some(2));
        let out = frames(body).await;
        assert_eq!(out.len(), 2, "not joined");
    }
}
