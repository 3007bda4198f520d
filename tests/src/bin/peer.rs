//! Test peer for kernel-tier tests: a loopback listener and a client connected to it,
//! exchanging framed messages, all in this process (and so in its cgroup).
//!
//! Default mode (`peer [count] [size]`): prints `port <N>` once listening, waits for a
//! `go` line, then sends `<count>` messages of `<size>` bytes each way, checks every
//! byte, and prints `ok <bytes>` (or `error <reason>`, exit 1).
//!
//! `peer connect <addr> [n]`: connects `n` times in sequence, reads the first line the
//! server sends each time, prints `got <line1>,<line2>,...`.
//!
//! `peer hold <addr>`: connects, prints `got <line>`, then reads until the connection
//! ends and prints `closed`.

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

fn read_line(stream: &mut TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte)? == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn client_mode(mode: &str, args: &[String]) -> io::Result<()> {
    let addr = args.first().ok_or_else(|| io::Error::other("missing address"))?;
    match mode {
        "connect" => {
            let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1);
            let mut got = Vec::with_capacity(n);
            for _ in 0..n {
                let mut s = TcpStream::connect(addr.as_str())?;
                got.push(read_line(&mut s)?);
            }
            println!("got {}", got.join(","));
        }
        "hold" => {
            let mut s = TcpStream::connect(addr.as_str())?;
            println!("got {}", read_line(&mut s)?);
            io::stdout().flush()?;
            let mut buf = [0u8; 64];
            // Ends on EOF or on an error such as ECONNABORTED from SOCK_DESTROY.
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
            println!("closed");
        }
        other => return Err(io::Error::other(format!("unknown mode {other}"))),
    }
    Ok(())
}

fn main() {
    let all: Vec<String> = std::env::args().skip(1).collect();
    if let Some(mode) = all.first().filter(|m| m.parse::<usize>().is_err()) {
        if let Err(e) = client_mode(mode, &all[1..]) {
            println!("error {e}");
            std::process::exit(1);
        }
        return;
    }
    let mut args = all.into_iter();
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
