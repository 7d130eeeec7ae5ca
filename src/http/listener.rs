//! Accepting connections: hyper's HTTP/1 server with the limits axum's
//! `serve` does not expose. Header read timeout (slowloris, and the idle
//! keep-alive timeout), maximum head size (431), a cap on open connections,
//! and graceful shutdown that lets in-flight requests finish.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::config::HttpConfig;
use super::tls::Tls;
use crate::ingest::IngestCounters;

/// Serves `app` until `shutdown` resolves, then waits for open requests.
/// With `tls`, each connection first completes a TLS handshake, which must
/// finish within the header timeout like any other slow client.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    cfg: &HttpConfig,
    counters: Arc<IngestCounters>,
    tls: Option<Arc<Tls>>,
    shutdown: impl Future<Output = ()>,
) {
    let handshake_timeout = Duration::from_millis(cfg.header_timeout_ms);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(cfg.header_timeout_ms))
        // A coarse guard only: the exact head limit is checked on the parsed
        // request (`head_limit`), since this buffer also holds body bytes
        // and grows in steps.
        .max_buf_size(cfg.max_header_bytes.saturating_mul(2))
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            counters.connections_refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        counters.connections_open.fetch_add(1, Ordering::Relaxed);
        let service = TowerToHyperService::new(app.clone());
        let counters = counters.clone();
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        tokio::spawn(async move {
            let result = match acceptor {
                None => {
                    let conn =
                        builder.serve_connection(TokioIo::new(JsonErrors::new(stream)), service);
                    watcher.watch(conn).await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            let conn = builder.serve_connection(
                                TokioIo::new(JsonErrors::new(tls_stream)),
                                service,
                            );
                            watcher.watch(conn).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            counters.connections_open.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Gives the answers hyper writes by itself (400 for a malformed request,
/// 414, 431 for a head over its buffer or more than 100 header lines) the
/// `{"error"}` body every other 4xx has. hyper sends these with an empty body
/// and then closes the connection; no handler of ours answers a 4xx with an
/// empty body, so such a head is always hyper's.
struct JsonErrors<T> {
    inner: T,
    /// Replacement bytes still to write, from `pos`.
    pending: Vec<u8>,
    pos: usize,
}

impl<T> JsonErrors<T> {
    fn new(inner: T) -> Self {
        JsonErrors {
            inner,
            pending: Vec::new(),
            pos: 0,
        }
    }
}

/// The response with a JSON body, if `head` is a whole bodiless 4xx head.
fn with_error_body(head: &[u8]) -> Option<Vec<u8>> {
    if !head.starts_with(b"HTTP/1.1 4") || !head.ends_with(b"\r\n\r\n") {
        return None;
    }
    let text = std::str::from_utf8(head).ok()?;
    let (status_line, rest) = text.split_once("\r\n")?;
    let mut lines: Vec<&str> = rest.trim_end_matches("\r\n").split("\r\n").collect();
    let cl = lines
        .iter()
        .position(|l| l.eq_ignore_ascii_case("content-length: 0"))?;
    let code: u16 = status_line.get(9..12)?.parse().ok()?;
    let message = match code {
        400 => "malformed HTTP request",
        414 => "request URI too long",
        431 => "request head too large: see http.max-header-bytes; at most 100 header lines",
        _ => status_line.get(13..).unwrap_or("client error"),
    };
    let body = serde_json::json!({ "error": message }).to_string();
    let length = format!("content-length: {}", body.len());
    lines[cl] = &length;
    let mut out = format!("{status_line}\r\ncontent-type: application/json\r\n");
    for l in lines {
        out.push_str(l);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&body);
    Some(out.into_bytes())
}

impl<T: AsyncWrite + Unpin> JsonErrors<T> {
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.pos < self.pending.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.pos += n;
        }
        self.pending.clear();
        self.pos = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonErrors<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonErrors<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        if let Some(replaced) = with_error_body(buf) {
            self.pending = replaced;
            // The caller's bytes count as written once queued; flush and
            // shutdown drain the queue first.
            let _ = self.poll_pending(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_bodiless_4xx_head_gets_a_json_body() {
        let head =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let out = String::from_utf8(super::with_error_body(head).unwrap()).unwrap();
        let (h, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(
            h.contains(&format!("content-length: {}", body.len())),
            "{out}"
        );
        assert!(
            body.starts_with(r#"{"error":"request head too large"#),
            "{out}"
        );
        assert!(
            super::with_error_body(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n").is_none()
        );
        assert!(
            super::with_error_body(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 5\r\n\r\n")
                .is_none()
        );
    }
}
