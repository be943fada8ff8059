//! The HTTP endpoint kluisd serves: `GET /metrics` (Prometheus), `GET /status` (JSON, for
//! `kluis status`) and `GET /healthz`. A minimal HTTP/1.1 responder: one request per
//! connection, bounded request size, each connection on its own task.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Metrics;

/// Connections the HTTP endpoint serves at once.
const MAX_CONNECTIONS: usize = 128;

/// Serves `GET /metrics`, `GET /status` (JSON, for `kluis status`) and `GET /healthz` on
/// `listener` until the task is dropped. A minimal HTTP/1.1 responder: one request per
/// connection, bounded request size.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<Metrics>,
    board: std::sync::Arc<crate::status::Board>,
) {
    // Connections are served side by side, each on its own task: the accept loop never waits
    // for a slot, so idle or slow clients cannot hold up a scrape. Past the limit a connection
    // is refused at once (503); an idle one is dropped after 5 s.
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            // Out of file descriptors, say: do not spin.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let busy = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\
                            Connection: close\r\n\r\n";
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                    // Read the request first: closing on unread input would reset the
                    // connection before the client reads the answer.
                    let mut chunk = [0u8; 1024];
                    let _ = conn.read(&mut chunk).await;
                    conn.write_all(busy.as_bytes()).await?;
                    conn.shutdown().await
                })
                .await;
            });
            continue;
        };
        let (metrics, board) = (metrics.clone(), board.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let request = String::from_utf8_lossy(&buf);
            let mut parts = request.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, kind, body) = match (method, path) {
                ("GET", "/metrics") => (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    metrics.render(),
                ),
                ("GET", "/healthz") => ("200 OK", "text/plain; charset=utf-8", "ok\n".into()),
                ("GET", "/status") => (
                    "200 OK",
                    "application/json",
                    serde_json::to_string(&board.snapshot()).unwrap_or_default(),
                ),
                ("GET", _) => ("404 Not Found", "text/plain", "not found\n".into()),
                _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n",
                body.len()
            );
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                conn.write_all(head.as_bytes()).await?;
                conn.write_all(body.as_bytes()).await?;
                conn.shutdown().await
            })
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).await.unwrap();
        answer
    }

    /// Issue 18, defect 8: the accept loop waited for one of 16 slots, so 16 idle clients
    /// stalled every scrape for 5 s.
    #[tokio::test]
    async fn idle_clients_never_hold_up_a_scrape() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(
            listener,
            Arc::new(Metrics::new()),
            Arc::new(crate::status::Board::default()),
        ));
        // Clients that connect and say nothing.
        let mut idle = Vec::new();
        for _ in 0..40 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let scrape = tokio::time::timeout(Duration::from_secs(3), async {
            (get(addr, "/healthz").await, get(addr, "/metrics").await)
        })
        .await
        .expect("a scrape waited behind idle clients");
        assert!(scrape.0.starts_with("HTTP/1.1 200 OK"), "{}", scrape.0);
        assert!(scrape.1.contains("kluis_"), "{}", scrape.1);

        // Past the connection limit, a client is refused at once rather than kept waiting.
        for _ in 0..MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let refused = tokio::time::timeout(Duration::from_secs(3), get(addr, "/healthz"))
            .await
            .expect("a client past the limit was kept waiting");
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        drop(idle);
        server.abort();
    }
}
