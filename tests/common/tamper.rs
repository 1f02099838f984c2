//! A TCP proxy between WebSocket clients and the server that breaks the
//! client frames carrying a marker text, and passes everything else, and
//! every server byte, through untouched.
//!
//! Why: a protocol error (1002) or a text that is not UTF-8 (1007) cannot be
//! sent through a browser's or a well-behaved library's API, yet the close
//! the server answers with must reach those clients as any other. The
//! client library stays real; only the one frame it was told to send is
//! spoiled on the way, as a broken intermediary or client would.

#![allow(dead_code)]

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// A text frame of exactly this payload reaches the server with RSV2 set.
pub const MARK_RESERVED_BIT: &str = "chorus-tamper:reserved-bit";
/// A text frame of exactly this payload reaches the server as bytes 0xFF.
pub const MARK_BAD_UTF8: &str = "chorus-tamper:bad-utf8";

pub struct TamperProxy {
    pub addr: SocketAddr,
    accept: AbortHandle,
}

impl TamperProxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(link(client, upstream));
            }
        })
        .abort_handle();
        Self { addr, accept }
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }
}

impl Drop for TamperProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn link(client: TcpStream, upstream: SocketAddr) {
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::spawn(pass_through(server_read, client_write));
    let _ = client_to_server(client_read, server_write).await;
}

/// Server to client: every byte as it is; the client sees the end the server made.
async fn pass_through(mut from: OwnedReadHalf, mut to: OwnedWriteHalf) {
    let _ = tokio::io::copy(&mut from, &mut to).await;
    let _ = to.shutdown().await;
}

/// Client to server: the upgrade request as it is, then frame by frame.
async fn client_to_server(mut from: OwnedReadHalf, mut to: OwnedWriteHalf) -> std::io::Result<()> {
    let mut request = Vec::new();
    while !request.ends_with(b"\r\n\r\n") {
        let byte = from.read_u8().await?;
        request.push(byte);
    }
    to.write_all(&request).await?;
    loop {
        let mut head = vec![0u8; 2];
        if from.read_exact(&mut head).await.is_err() {
            // The client ended: so does the server's side.
            return to.shutdown().await;
        }
        let extended = match head[1] & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask_len = if head[1] & 0x80 != 0 { 4 } else { 0 };
        let mut rest = vec![0u8; extended + mask_len];
        from.read_exact(&mut rest).await?;
        head.extend_from_slice(&rest);
        let len = match extended {
            0 => u64::from(head[1] & 0x7F),
            2 => u64::from(u16::from_be_bytes([head[2], head[3]])),
            _ => u64::from_be_bytes(head[2..10].try_into().unwrap()),
        };
        // Markers are short: anything longer streams through unread.
        if len > 64 || mask_len == 0 {
            to.write_all(&head).await?;
            tokio::io::copy(&mut (&mut from).take(len), &mut to).await?;
            continue;
        }
        let mask: [u8; 4] = head[head.len() - 4..].try_into().unwrap();
        let mut payload = vec![0u8; len as usize];
        from.read_exact(&mut payload).await?;
        let text: Vec<u8> = payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
        if text == MARK_RESERVED_BIT.as_bytes() {
            head[0] |= 0x20;
        } else if text == MARK_BAD_UTF8.as_bytes() {
            payload = (0..payload.len()).map(|i| 0xFF ^ mask[i % 4]).collect();
        }
        to.write_all(&head).await?;
        to.write_all(&payload).await?;
    }
}
