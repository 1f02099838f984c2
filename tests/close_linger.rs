//! The server's half of the closing handshake against the real binary:
//! after its close frame it drains what the client still sends until the
//! client's close, so a client still writing reads the close and a FIN, not a
//! reset; and a client that never stops is cut at the drain's bounds
//! (16 MiB, 2 s).

mod common;

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;

use common::*;

/// The drain's byte bound (`Bounds::DEFAULT` in src/ws/linger.rs).
const BYTE_BOUND: usize = 16 * 1024 * 1024;

/// The header of a masked client frame announcing `len` payload bytes. The
/// mask is all zeroes, so the payload goes on the wire as it is.
fn masked_header(opcode: u8, len: u64) -> Vec<u8> {
    let mut head = vec![0x80 | opcode];
    match len {
        n if n < 126 => head.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            head.push(0x80 | 126);
            head.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            head.push(0x80 | 127);
            head.extend_from_slice(&n.to_be_bytes());
        }
    }
    head.extend_from_slice(&[0; 4]);
    head
}

/// Reads until the end of the stream: every byte, and how the stream ended
/// (`Ok` for a FIN, the error for a reset).
async fn read_to_end(mut read: OwnedReadHalf, mut bytes: Vec<u8>) -> (Vec<u8>, std::io::Result<()>) {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(GUARD, read.read(&mut chunk)).await.expect("the server neither wrote nor closed") {
            Ok(0) => return (bytes, Ok(())),
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e) => return (bytes, Err(e)),
        }
    }
}

/// The code and reason of the server close frame at the start of `bytes`.
fn close_frame(bytes: &[u8]) -> (u16, String) {
    assert!(bytes.len() >= 4, "no close frame: {bytes:?}");
    assert_eq!(bytes[0], 0x88, "expected a close frame first: {bytes:?}");
    let len = usize::from(bytes[1]);
    let payload = &bytes[2..2 + len];
    (u16::from_be_bytes([payload[0], payload[1]]), String::from_utf8(payload[2..].to_vec()).unwrap())
}

/// Waits until the server counts one drain that ended as `ended`: the
/// server's FIN goes out with its close frame, before the drain ends.
async fn wait_lingered(server: &TestServer, ended: &str) {
    let name = format!("chorus_close_lingers_total{{ended=\"{ended}\"}}");
    let deadline = Instant::now() + GUARD;
    loop {
        let value = metric_value(&server.metrics().await, &name);
        if value == Some(1.0) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} is {value:?}:\n{}", server.metrics().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The case: a message far larger than the socket buffers, refused
/// with 1009 after its first few kilobytes. The client finishes writing it,
/// answers the close, and gets the server's 1009 and then a FIN.
#[tokio::test]
async fn a_client_still_writing_a_refused_message_reads_the_1009_and_a_clean_end() {
    let server = TestServer::start(&[]).await;
    let alice = token("alice", None, 3600);
    let (stream, early) = RawClient::connect(server.addr, "/ws", &alice).await.into_parts();
    let (read, mut write) = stream.into_split();
    let reading = tokio::spawn(read_to_end(read, early));

    const MESSAGE: usize = 4 * 1024 * 1024;
    let writing = tokio::spawn(async move {
        write.write_all(&masked_header(OP_TEXT, MESSAGE as u64)).await?;
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..MESSAGE / chunk.len() {
            write.write_all(&chunk).await?;
        }
        // Our answer to the server's close, once the message is out.
        write.write_all(&masked_header(OP_CLOSE, 2)).await?;
        write.write_all(&1009u16.to_be_bytes()).await?;
        write.flush().await
    });

    let written = tokio::time::timeout(GUARD, writing).await.expect("writing hung").unwrap();
    assert!(written.is_ok(), "the server cut the client while it wrote: {written:?}");
    let (bytes, end) = tokio::time::timeout(GUARD, reading).await.expect("reading hung").unwrap();
    assert_eq!(close_frame(&bytes), (1009, "message too large".to_owned()));
    assert!(end.is_ok(), "the connection ended with {end:?}, not a FIN");
    wait_lingered(&server, "client_close").await;
}

/// A client that announces a message of a terabyte and keeps sending it is
/// cut once the server has drained the byte bound.
#[tokio::test]
async fn a_client_that_keeps_sending_after_the_close_is_cut_at_the_byte_bound() {
    let server = TestServer::start(&[]).await;
    let alice = token("alice", None, 3600);
    let (stream, early) = RawClient::connect(server.addr, "/ws", &alice).await.into_parts();
    let (read, mut write) = stream.into_split();
    let reading = tokio::spawn(read_to_end(read, early));

    write.write_all(&masked_header(OP_TEXT, 1 << 40)).await.unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0usize;
    // Bounded: 16 times the bound, well past any socket buffers.
    let cut = loop {
        assert!(sent < 16 * BYTE_BOUND, "the server drained {sent} bytes and is still reading");
        match tokio::time::timeout(GUARD, write.write_all(&chunk)).await.expect("writing hung") {
            Ok(()) => sent += chunk.len(),
            Err(e) => break e,
        }
    };
    assert!(matches!(cut.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe), "{cut:?}");
    assert!(sent >= BYTE_BOUND, "cut after {sent} bytes, before the bound");
    let (bytes, _) = tokio::time::timeout(GUARD, reading).await.expect("reading hung").unwrap();
    assert_eq!(close_frame(&bytes), (1009, "message too large".to_owned()));
    wait_lingered(&server, "byte_bound").await;
    assert_eq!(server.metric("chorus_connections").await, 0.0);
}

/// A client that trickles bytes after the close, never reaching the byte
/// bound, is cut at the time bound.
#[tokio::test]
async fn a_client_that_trickles_after_the_close_is_cut_at_the_time_bound() {
    let server = TestServer::start(&[]).await;
    let alice = token("alice", None, 3600);
    let (stream, early) = RawClient::connect(server.addr, "/ws", &alice).await.into_parts();
    let (read, mut write) = stream.into_split();
    let reading = tokio::spawn(read_to_end(read, early));

    write.write_all(&masked_header(OP_TEXT, 1 << 40)).await.unwrap();
    let started = Instant::now();
    let cut = loop {
        assert!(started.elapsed() < GUARD, "still open after {:?}", started.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Err(e) = write.write_all(b"x").await {
            break e;
        }
    };
    assert!(matches!(cut.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe), "{cut:?}");
    // The drain lasts 2 s from the close; nothing can cut the client sooner.
    assert!(started.elapsed() >= Duration::from_millis(1500), "cut after {:?}", started.elapsed());
    let (bytes, _) = tokio::time::timeout(GUARD, reading).await.expect("reading hung").unwrap();
    assert_eq!(close_frame(&bytes), (1009, "message too large".to_owned()));
    wait_lingered(&server, "time_bound").await;
}
