//! A minimal HTTP/1.1 replica that a test can run in another process (in its own
//! network namespace and cgroup) by re-executing its own test binary: `GET /<n>`
//! answers `n` pattern bytes, `POST` echoes its body (Content-Length only), keep-alive.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    thread,
};

/// Environment variable that turns [`run_if_requested`] into the replica: the address
/// to listen on.
pub const LISTEN_ENV: &str = "SLUICE_TEST_HTTP_REPLICA";

/// Byte `i` of every response body: checkable without keeping a copy.
pub fn pattern_byte(i: usize) -> u8 {
    (i % 251) as u8
}

/// If [`LISTEN_ENV`] is set, serves HTTP on it forever (printing `port <N>` once
/// listening) and never returns; otherwise returns at once. Call it from a `#[test]`
/// that the parent runs with `--exact <name>` and the variable set.
pub fn run_if_requested() {
    let Ok(addr) = std::env::var(LISTEN_ENV) else { return };
    let listener = TcpListener::bind(addr.as_str()).expect("replica bind");
    println!("port {}", listener.local_addr().expect("local addr").port());
    let _ = io::stdout().flush();
    for stream in listener.incoming().flatten() {
        thread::spawn(move || serve(stream));
    }
    std::process::exit(0);
}

fn serve(stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().map_err(io::Error::other)?;
            }
        }
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
        let body = if method == "POST" {
            let mut body = vec![0u8; length];
            reader.read_exact(&mut body)?;
            body
        } else {
            let n = path.trim_start_matches('/').parse().unwrap_or(0);
            (0..n).map(pattern_byte).collect()
        };
        write!(out, "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len())?;
        out.write_all(&body)?;
    }
}
