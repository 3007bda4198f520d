//! Test peer for kernel-tier tests: a loopback listener and a client connected to it,
//! exchanging framed messages, all in this process (and so in its cgroup).
//!
//! Protocol on stdin/stdout: prints `port <N>` once listening, waits for a `go` line,
//! then sends `<count>` messages of `<size>` bytes each way, checks every byte, and
//! prints `ok <bytes>` (or `error <reason>`, exit 1).

use std::{
    io::{self, BufRead, Read, Write},
    net::{TcpListener, TcpStream},
    thread,
};

fn pattern(i: usize, size: usize) -> Vec<u8> {
    (0..size).map(|j| ((i * 31 + j) % 251) as u8).collect()
}

fn run(count: usize, size: usize) -> io::Result<u64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("port {}", listener.local_addr()?.port());
    io::stdout().flush()?;
    let mut line = String::new();
    io::stdin().lock().read_line(&mut line)?;
    if line.trim() != "go" {
        return Err(io::Error::other(format!("expected go, got {line:?}")));
    }
    let mut client = TcpStream::connect(listener.local_addr()?)?;
    let (mut server, _) = listener.accept()?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    // The server echoes everything back; the client checks each message round trip.
    let echo = thread::spawn(move || -> io::Result<()> {
        let mut buf = vec![0u8; size];
        for _ in 0..count {
            server.read_exact(&mut buf)?;
            server.write_all(&buf)?;
        }
        Ok(())
    });
    let mut got = vec![0u8; size];
    for i in 0..count {
        let msg = pattern(i, size);
        client.write_all(&msg)?;
        client.read_exact(&mut got)?;
        if got != msg {
            return Err(io::Error::other(format!("message {i} corrupted")));
        }
    }
    echo.join().map_err(|_| io::Error::other("echo thread panicked"))??;
    Ok((count * size * 2) as u64)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let count = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let size = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    match run(count, size) {
        Ok(bytes) => println!("ok {bytes}"),
        Err(e) => {
            println!("error {e}");
            std::process::exit(1);
        }
    }
}
