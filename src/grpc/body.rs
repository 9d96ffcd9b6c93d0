//! Bodies of a balanced call: the request body kept for a retry ([`Replay`]), and the response
//! body that reports the call's gRPC status and latency when it ends ([`BalancedBody`]).
//!
//! Invariants: a request body is read ahead only as far as it is *already* available (never
//! waiting on the caller, so client and bidirectional streams keep their timing), and a
//! partly read body is sent once, its read prefix first; a response body reports its outcome
//! exactly once (trailers, end of stream or error), and a body dropped before that only ends
//! the request (the in-flight count falls, nothing is recorded).

use std::pin::Pin as StdPin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Instant;
use tonic::Code;
use tonic::body::Body;

use super::channel::StreamGuard;
use super::trace::OpenAttempt;
use crate::breaker::Admission;
use crate::pick::{Outcome, Pick};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body as far as it could be read without waiting.
pub(crate) enum Replay {
    /// The whole body: can be sent any number of times.
    Complete(Bytes),
    /// The start of a body that was not complete (or too big to keep): sent once.
    Partial(Option<PrefixedBody>),
}

impl Replay {
    /// Reads `body` ahead while frames are ready, keeping up to `limit` bytes.
    pub(crate) async fn read(mut body: Body, limit: usize) -> Result<Replay, BoxError> {
        let mut kept = BytesMut::new();
        std::future::poll_fn(move |cx| {
            loop {
                if body.is_end_stream() {
                    return Poll::Ready(Ok(Replay::Complete(std::mem::take(&mut kept).freeze())));
                }
                match StdPin::new(&mut body).poll_frame(cx) {
                    Poll::Ready(None) => {
                        return Poll::Ready(Ok(Replay::Complete(std::mem::take(&mut kept).freeze())));
                    }
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(mut data) => {
                            kept.extend_from_slice(&data.copy_to_bytes(data.remaining()));
                            if kept.len() > limit {
                                return Poll::Ready(Ok(Replay::partial(&mut kept, &mut body, None)));
                            }
                        }
                        // Request trailers: keep them in order and send the body once.
                        Err(frame) => {
                            let trailers = frame.into_trailers().ok();
                            return Poll::Ready(Ok(Replay::partial(&mut kept, &mut body, trailers)));
                        }
                    },
                    Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(error.into())),
                    // Not all there yet (a client stream): send what we have, then the rest.
                    Poll::Pending => return Poll::Ready(Ok(Replay::partial(&mut kept, &mut body, None))),
                }
            }
        })
        .await
    }

    fn partial(kept: &mut BytesMut, rest: &mut Body, trailers: Option<HeaderMap>) -> Replay {
        Replay::Partial(Some(PrefixedBody {
            prefix: Some(std::mem::take(kept).freeze()).filter(|b| !b.is_empty()),
            trailers,
            rest: Some(std::mem::replace(rest, Body::empty())),
        }))
    }

    /// Whether the body can be sent again.
    pub(crate) fn is_replayable(&self) -> bool {
        matches!(self, Replay::Complete(_))
    }

    /// The body for the next attempt; `None` when a partial body was already sent.
    pub(crate) fn next_body(&mut self) -> Option<Body> {
        match self {
            Replay::Complete(bytes) => Some(if bytes.is_empty() {
                Body::empty()
            } else {
                Body::new(http_body_util::Full::new(bytes.clone()))
            }),
            Replay::Partial(body) => body.take().map(Body::new),
        }
    }
}

/// The frames read ahead, then the rest of the original body.
pub(crate) struct PrefixedBody {
    prefix: Option<Bytes>,
    trailers: Option<HeaderMap>,
    rest: Option<Body>,
}

impl HttpBody for PrefixedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: StdPin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        if let Some(trailers) = self.trailers.take() {
            self.rest = None;
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        match self.rest.as_mut() {
            Some(rest) => StdPin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }
}

/// Which gRPC status codes count against the endpoint (passive health, error metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FailureCodes(u32);

impl FailureCodes {
    /// `UNKNOWN`, `DEADLINE_EXCEEDED`, `INTERNAL`, `UNAVAILABLE`, `DATA_LOSS`: the codes a
    /// sick server answers with (Envoy's gateway-error family); the other codes describe the
    /// request, not the endpoint.
    pub(crate) const DEFAULT: FailureCodes = FailureCodes::of(&[
        Code::Unknown,
        Code::DeadlineExceeded,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
    ]);

    pub(crate) const fn of(codes: &[Code]) -> FailureCodes {
        let mut bits = 0;
        let mut i = 0;
        while i < codes.len() {
            bits |= 1 << (codes[i] as u32);
            i += 1;
        }
        FailureCodes(bits)
    }

    pub(crate) fn outcome(self, code: Code) -> Outcome {
        if code != Code::Ok && self.0 & (1 << (code as u32)) != 0 {
            Outcome::Failure
        } else {
            Outcome::Success
        }
    }
}

/// The `grpc-status` of a header or trailer map, if present (a malformed value is `UNKNOWN`).
pub(crate) fn grpc_status(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|v| {
            std::str::from_utf8(v.as_bytes())
                .ok()
                .and_then(|s| s.parse::<i32>().ok())
        })
        .map(|code| code.map_or(Code::Unknown, Code::from))
}

/// The response body of a balanced call: passes the endpoint's body through and, when it
/// ends, records the call's outcome and latency on its [`Pick`].
pub struct BalancedBody {
    inner: Body,
    recorder: Option<Recorder>,
}

/// What a body needs to report its call.
pub(crate) struct Recorder {
    pub(crate) pick: Pick,
    pub(crate) started: Instant,
    pub(crate) failure_codes: FailureCodes,
    /// The call's stream on its connection, released with the pick.
    pub(crate) stream: StreamGuard,
    /// The circuit breaker's `max_retries` place, when this attempt is a retry.
    pub(crate) retry: Option<Admission>,
    /// The attempt's and the call's spans, ended with the body.
    pub(crate) trace: OpenAttempt,
}

impl Recorder {
    pub(crate) fn finish(self, code: Code) {
        let latency: Duration = self.started.elapsed();
        self.pick.record(self.failure_codes.outcome(code), Some(latency));
        drop(self.stream); // its connection carries one call fewer
        drop(self.retry); // the retry is over
        self.trace.finish(code, latency);
    }
}

impl BalancedBody {
    /// A body that reports through `recorder` when it ends (or nothing, if already reported).
    pub(crate) fn new(inner: Body, recorder: Option<Recorder>) -> Self {
        BalancedBody { inner, recorder }
    }
}

impl HttpBody for BalancedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: StdPin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        let polled = StdPin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    if let Some(recorder) = this.recorder.take() {
                        recorder.finish(grpc_status(trailers).unwrap_or(Code::Unknown));
                    }
                }
            }
            // A stream that breaks, or ends without a status, failed (gRPC: `UNKNOWN`, or the
            // transport's `UNAVAILABLE`/`INTERNAL`).
            Poll::Ready(Some(Err(status))) => {
                if let Some(recorder) = this.recorder.take() {
                    recorder.finish(status.code());
                }
            }
            Poll::Ready(None) => {
                if let Some(recorder) = this.recorder.take() {
                    recorder.finish(Code::Unknown);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Debug for BalancedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalancedBody")
            .field("reported", &self.recorder.is_none())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_codes() {
        let codes = FailureCodes::DEFAULT;
        for code in [
            Code::Unavailable,
            Code::Internal,
            Code::Unknown,
            Code::DataLoss,
            Code::DeadlineExceeded,
        ] {
            assert_eq!(codes.outcome(code), Outcome::Failure, "{code:?}");
        }
        for code in [
            Code::Ok,
            Code::NotFound,
            Code::InvalidArgument,
            Code::PermissionDenied,
            Code::Cancelled,
        ] {
            assert_eq!(codes.outcome(code), Outcome::Success, "{code:?}");
        }
        let mut headers = HeaderMap::new();
        assert_eq!(grpc_status(&headers), None);
        headers.insert("grpc-status", "14".parse().unwrap());
        assert_eq!(grpc_status(&headers), Some(Code::Unavailable));
        headers.insert("grpc-status", "x".parse().unwrap());
        assert_eq!(grpc_status(&headers), Some(Code::Unknown));
    }

    #[tokio::test]
    async fn replay_keeps_complete_bodies_and_sends_partial_ones_once() {
        let body = Body::new(http_body_util::Full::new(Bytes::from_static(b"hello")));
        let mut replay = Replay::read(body, 1024).await.unwrap();
        assert!(replay.is_replayable());
        for _ in 0..2 {
            let body = replay.next_body().unwrap();
            let bytes = http_body_util::BodyExt::collect(body).await.unwrap().to_bytes();
            assert_eq!(&bytes[..], b"hello");
        }

        // Too big to keep: sent once, whole.
        let body = Body::new(http_body_util::Full::new(Bytes::from(vec![7u8; 100])));
        let mut replay = Replay::read(body, 10).await.unwrap();
        assert!(!replay.is_replayable());
        let body = replay.next_body().unwrap();
        assert!(replay.next_body().is_none());
        let bytes = http_body_util::BodyExt::collect(body).await.unwrap().to_bytes();
        assert_eq!(bytes.len(), 100);

        // A stream whose second frame is not ready: the first is read ahead, the rest follows.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, tonic::Status>>(4);
        tx.send(Ok(Frame::data(Bytes::from_static(b"ab")))).await.unwrap();
        let stream = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut replay = Replay::read(Body::new(stream), 1024).await.unwrap();
        assert!(!replay.is_replayable());
        let body = replay.next_body().unwrap();
        tx.send(Ok(Frame::data(Bytes::from_static(b"cd")))).await.unwrap();
        drop(tx);
        let bytes = http_body_util::BodyExt::collect(body).await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"abcd");
    }
}
