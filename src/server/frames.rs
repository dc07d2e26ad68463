//! `DoGet` of a membership version, written as gRPC frames.
//!
//! Each Flight message is encoded once into a complete gRPC frame (the 5-byte length prefix and
//! the protobuf encoding of the `FlightData`) and handed to the HTTP/2 stream as it is. Through
//! tonic's generated service every pull would copy each message body into the codec's buffer,
//! which grows by reallocation: about two copies of the whole membership per pull, a fifth of
//! the server's time in a profile. The frames of a pull read to its end are kept (within
//! `--serving-cache`), and later pulls of that version only write them. Every other call, and
//! a `DoGet` this path does not serve (another ticket, no valid token, an error before the
//! first message), goes to the generated service unchanged, which answers it as before; an
//! error after the first message ends the stream with its `grpc-status` trailer.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arrow_flight::Ticket;
use arrow_flight::flight_service_server::FlightServiceServer;
use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use prost::Message;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;

use super::flight::Flight;
use crate::export::FrameStream;
use futures::StreamExt;

const DO_GET: &str = "/arrow.flight.protocol.FlightService/DoGet";

/// The largest `DoGet` request body this path reads: what the generated service accepts (a
/// Flight SQL ticket can hold a long statement), and the 5-byte message prefix.
const MAX_TICKET_REQUEST: usize = super::MAX_GRPC_MESSAGE + 5;

/// The Flight service with the kept-version `DoGet` path in front of it.
#[derive(Clone)]
pub(crate) struct FlightWithFrames {
    flight: Arc<Flight>,
    inner: FlightServiceServer<Flight>,
}

impl FlightWithFrames {
    pub(crate) fn new(flight: Arc<Flight>, inner: FlightServiceServer<Flight>) -> Self {
        FlightWithFrames { flight, inner }
    }
}

impl NamedService for FlightWithFrames {
    const NAME: &'static str = <FlightServiceServer<Flight> as NamedService>::NAME;
}

impl Service<http::Request<Body>> for FlightWithFrames {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let mut inner = self.inner.clone();
        if req.uri().path() != DO_GET {
            return inner.call(req);
        }
        let flight = Arc::clone(&self.flight);
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let bytes = match http_body_util::Limited::new(body, MAX_TICKET_REQUEST)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    let status = if e.is::<http_body_util::LengthLimitError>() {
                        tonic::Status::resource_exhausted(format!(
                            "a DoGet request is at most {} bytes",
                            super::MAX_GRPC_MESSAGE
                        ))
                    } else {
                        tonic::Status::cancelled(format!("reading the request: {e}"))
                    };
                    return Ok(status.into_http());
                }
            };
            if let Some(ticket) = ticket(&bytes) {
                let metadata = tonic::metadata::MetadataMap::from_headers(parts.headers.clone());
                let r = tonic::Request::from_parts(metadata, Default::default(), ticket);
                if let Some(frames) = flight.membership_frames(&r).await {
                    return Ok(response(frames));
                }
            }
            let body = Body::new(http_body_util::Full::new(bytes));
            inner.call(http::Request::from_parts(parts, body)).await
        })
    }
}

/// The ticket of an uncompressed one-message gRPC request body.
fn ticket(body: &[u8]) -> Option<Ticket> {
    let (&[0, a, b, c, d], message) = body.split_first_chunk::<5>()? else {
        return None;
    };
    if u32::from_be_bytes([a, b, c, d]) as usize != message.len() {
        return None;
    }
    Ticket::decode(message).ok()
}

/// A Flight message as a gRPC frame: the uncompressed flag, the length, the protobuf encoding.
pub(crate) fn grpc_frame(d: &arrow_flight::FlightData) -> std::result::Result<Bytes, String> {
    let len = d.encoded_len();
    let prefix = u32::try_from(len)
        .map_err(|_| format!("a Flight message of {len} bytes exceeds gRPC's limit"))?;
    let mut b = Vec::with_capacity(5 + len);
    b.push(0);
    b.extend_from_slice(&prefix.to_be_bytes());
    d.encode(&mut b).map_err(|e| e.to_string())?;
    Ok(Bytes::from(b))
}

fn response(frames: FrameStream) -> http::Response<Body> {
    let mut r = http::Response::new(Body::new(Streamed {
        frames,
        done: false,
    }));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    r
}

/// A response body: the frames (kept, or as they are encoded), then the `grpc-status` trailer
/// (0, or the error that ended the stream).
struct Streamed {
    frames: FrameStream,
    done: bool,
}

impl http_body::Body for Streamed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let status = match std::task::ready!(self.frames.poll_next_unpin(cx)) {
            Some(Ok(b)) => return Poll::Ready(Some(Ok(Frame::data(b)))),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "membership stream failed");
                tonic::Status::internal(e.to_string())
            }
            None => tonic::Status::ok(""),
        };
        self.done = true;
        let mut t = http::HeaderMap::new();
        if status.add_header(&mut t).is_err() {
            t.insert("grpc-status", http::HeaderValue::from_static("13"));
        }
        Poll::Ready(Some(Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_decode_as_the_messages_and_tickets_parse_only_when_whole() {
        let data = vec![
            arrow_flight::FlightData {
                data_header: Bytes::from_static(b"header"),
                data_body: Bytes::from(vec![7u8; 300]),
                ..Default::default()
            },
            arrow_flight::FlightData::default(),
        ];
        let frames: Vec<Bytes> = data.iter().map(|d| grpc_frame(d).unwrap()).collect();
        for (f, d) in frames.iter().zip(&data) {
            assert_eq!(f[0], 0, "uncompressed");
            let len = u32::from_be_bytes(f[1..5].try_into().unwrap()) as usize;
            assert_eq!(len, f.len() - 5);
            assert_eq!(&arrow_flight::FlightData::decode(&f[5..]).unwrap(), d);
        }
        let t = Ticket::new("t-1");
        let mut body = vec![0u8];
        body.extend_from_slice(&(t.encoded_len() as u32).to_be_bytes());
        t.encode(&mut body).unwrap();
        assert_eq!(ticket(&body), Some(t));
        assert_eq!(ticket(&body[..body.len() - 1]), None, "truncated");
        let mut compressed = body.clone();
        compressed[0] = 1;
        assert_eq!(ticket(&compressed), None, "compressed: left to tonic");
        assert_eq!(ticket(&[0, 0]), None);
    }
}
