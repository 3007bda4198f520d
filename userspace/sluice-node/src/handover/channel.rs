//! The handover channel between an old and a new `sluice run` during an upgrade.
//!
//! The serving process listens on a unix seqpacket socket named after its pid (and pid
//! namespace) in the temp dir. A taking-over process connects to it before it becomes
//! the active listener generation, and both send a hello naming the protocol version
//! and the splice sockhash they use. They agree when the versions match; otherwise the
//! old process keeps today's behaviour (its established connections drain). Once the new
//! process is active, the old one offers it every spliced pair, the two sockets passed
//! with SCM_RIGHTS, one message per pair, and closes its copies of a pair's sockets only
//! once the new process has acknowledged it. Then, until it exits, it passes every
//! idle HTTP/1.1 keep-alive connection (one socket per message, between requests, so
//! with no bytes read) as it goes idle, and every stream it relays in userspace as it
//! reaches a clean point (two sockets, and the bytes read and not yet written), and says
//! [`Msg::Done`] last.
//!
//! Seqpacket keeps message boundaries, so a message and the descriptors it carries
//! arrive together; each message is one JSON document.

use std::{
    io::{self, IoSlice, IoSliceMut},
    mem::MaybeUninit,
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::fs::PermissionsExt,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
    sockopt::Timeout,
};
use serde::{Deserialize, Serialize};

/// The protocol's name in a hello: anything else on the socket is not a sluice.
pub const PROTOCOL: &str = "sluice-handover";
/// This build's protocol version. Bump it with any change to [`Msg`] or to what a
/// handed-over connection carries; builds with different versions refuse each other.
/// Version 2: idle HTTP/1.1 connections ([`Msg::Idle`]) after the spliced pairs.
/// Version 3: userspace-relayed streams ([`Msg::Relay`]) too.
pub const VERSION: u32 = 3;
/// Makes this process claim another protocol version in its hello, so that a handover
/// with it is refused and its predecessor's streams drain: the test (and operations)
/// knob for the fallback.
pub const VERSION_ENV: &str = "SLUICE_HANDOVER_VERSION";
/// Largest message: a pair's offer is a few hundred bytes; a relayed stream's carries
/// up to two relay buffers (16 KiB each) of unwritten bytes, hex-encoded.
const MAX_MSG: usize = 160 * 1024;
/// Most descriptors one message carries (a spliced pair's two legs).
const MAX_FDS: usize = 2;
/// Bound on every send and receive: a peer that stops answering costs the upgrade this
/// long, then the old process falls back to draining.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A failure on the channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// A socket call failed.
    #[error("handover channel: {0}")]
    Io(#[from] io::Error),
    /// The peer sent something that is not a message of this protocol.
    #[error("handover channel: malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// A message or its descriptors did not fit.
    #[error("handover channel: message truncated")]
    Truncated,
    /// The peer closed the channel.
    #[error("handover channel: closed by the peer")]
    Closed,
    /// The two builds do not speak the same protocol.
    #[error("handover refused: {0}")]
    Refused(String),
}

impl From<rustix::io::Errno> for ChannelError {
    fn from(e: rustix::io::Errno) -> Self {
        ChannelError::Io(e.into())
    }
}

/// What each side says first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`PROTOCOL`].
    pub protocol: String,
    /// [`VERSION`] of the sender's build.
    pub version: u32,
    /// The sender's pid (the old process checks it against the owner record).
    pub pid: u32,
    /// The kernel id of the sender's splice sockhash, when it splices: pairs can only
    /// be handed over between two processes that share it.
    pub splice_map: Option<u32>,
}

impl Hello {
    /// This process's hello.
    pub fn mine(splice_map: Option<u32>) -> Hello {
        let version = std::env::var(VERSION_ENV).ok().and_then(|v| v.parse().ok());
        Hello {
            protocol: PROTOCOL.to_owned(),
            version: version.unwrap_or(VERSION),
            pid: std::process::id(),
            splice_map,
        }
    }
}

/// A spliced pair offered to the new process; legs A (client) and B (replica) travel
/// as the message's two descriptors. A spliced pair owes no userspace bytes: they were
/// all written before it was spliced, and what is in flight is the kernel's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpliceOffer {
    /// The old process's name for the pair (echoed in the [`Msg::Ack`]).
    pub tag: u64,
    /// Server id the stream counts against.
    pub server: String,
    /// Replica id the stream counts against.
    pub replica: String,
    /// Bytes written into legs A and B before the splice (the drain baselines).
    pub written_before: (u64, u64),
    /// Bytes userspace moved each way before the splice (for the stream's totals).
    pub moved: (u64, u64),
}

/// An idle HTTP/1.1 keep-alive client connection offered to the new process, its socket
/// the message's one descriptor. It owes no bytes: it is idle only with nothing read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdleOffer {
    /// The old process's name for it (echoed in the [`Msg::Ack`]).
    pub tag: u64,
    /// The socket peer.
    pub peer: std::net::SocketAddr,
    /// The client: the peer, or what a trusted peer's PROXY header reported.
    pub client: std::net::IpAddr,
}

/// A plaintext stream relayed in userspace, stopped at a clean point (both directions
/// open), offered to the new process; legs A (client) and B (replica) are the message's
/// two descriptors. The bytes read from one side and not yet written to the other
/// travel here and are written first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayOffer {
    /// The old process's name for it (echoed in the [`Msg::Ack`]).
    pub tag: u64,
    /// Server id the stream counts against.
    pub server: String,
    /// Replica id the stream counts against.
    pub replica: String,
    /// Bytes written each way so far (client → replica, replica → client).
    pub moved: (u64, u64),
    /// Whether the adaptive policy may still splice it (the server is at `auto`).
    pub auto: bool,
    /// Read from the client, not yet written to the replica (hex).
    pub up: String,
    /// Read from the replica, not yet written to the client (hex).
    pub down: String,
}

/// `bytes` as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The bytes `hex` wrote, or `None` if `s` is not such hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// One message on the channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// The first message each way.
    Hello(Hello),
    /// The answer to a hello the receiver will not work with.
    Refuse {
        /// Why, for the logs.
        reason: String,
    },
    /// A spliced pair, with its two sockets.
    Splice(SpliceOffer),
    /// An idle HTTP/1.1 connection, with its socket.
    Idle(IdleOffer),
    /// A userspace-relayed stream, with its two sockets.
    Relay(RelayOffer),
    /// The new process's answer to an offer: `adopted` means it holds the sockets and
    /// watches them; otherwise the old process keeps the pair.
    Ack {
        /// The offer's tag.
        tag: u64,
        /// Whether the new process took the pair.
        adopted: bool,
        /// Why not, when it did not.
        error: Option<String>,
    },
    /// The old process has offered everything it will.
    Done,
}

/// What two hellos agree on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Agreement {
    /// Spliced pairs can be handed over (both use the same sockhash).
    pub splice: bool,
}

/// Whether this build can work with a peer that sent `theirs`: the protocol and version
/// must match exactly (a handover is between two builds, not a compatibility range).
pub fn agree(mine: &Hello, theirs: &Hello) -> Result<Agreement, String> {
    if theirs.protocol != PROTOCOL {
        return Err(format!("peer speaks {:?}, not {PROTOCOL}", theirs.protocol));
    }
    if theirs.version != mine.version {
        return Err(format!(
            "protocol version {} here, {} in the peer (pid {})",
            mine.version, theirs.version, theirs.pid
        ));
    }
    let splice = matches!((mine.splice_map, theirs.splice_map), (Some(a), Some(b)) if a == b);
    Ok(Agreement { splice })
}

/// Where the process `pid` (in pid namespace `ns`) listens for its successor.
pub fn socket_path(pid: u32, ns: u64) -> PathBuf {
    std::env::temp_dir().join(format!("sluice-handover-{pid}-{ns}"))
}

/// One end of the channel (blocking, every call bounded by `IO_TIMEOUT`).
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    fn new(fd: OwnedFd) -> io::Result<Channel> {
        rustix::net::sockopt::set_socket_timeout(&fd, Timeout::Recv, Some(IO_TIMEOUT))?;
        rustix::net::sockopt::set_socket_timeout(&fd, Timeout::Send, Some(IO_TIMEOUT))?;
        Ok(Channel { fd })
    }

    /// Connects to the channel of the process listening at `path`.
    pub fn connect(path: &Path) -> Result<Channel, ChannelError> {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        // Timeouts first: a listener whose backlog is full blocks connect(2) too.
        let ch = Channel::new(fd)?;
        rustix::net::connect(&ch.fd, &SocketAddrUnix::new(path)?)?;
        Ok(ch)
    }

    /// Sends `msg` with `fds` attached.
    pub fn send(&self, msg: &Msg, fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        debug_assert!(fds.len() <= MAX_FDS);
        let body = serde_json::to_vec(msg)?;
        if body.len() > MAX_MSG {
            return Err(ChannelError::Truncated);
        }
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(ChannelError::Truncated);
        }
        let sent = rustix::net::sendmsg(
            &self.fd,
            &[IoSlice::new(&body)],
            &mut control,
            SendFlags::NOSIGNAL,
        )?;
        if sent != body.len() {
            return Err(ChannelError::Truncated);
        }
        Ok(())
    }

    /// Receives one message and the descriptors that came with it.
    pub fn recv(&self) -> Result<(Msg, Vec<OwnedFd>), ChannelError> {
        let mut body = vec![0u8; MAX_MSG];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            &self.fd,
            &mut [IoSliceMut::new(&mut body)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        // Descriptors first: they are ours now, and close on drop whatever follows.
        let mut fds = Vec::new();
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = m {
                fds.extend(rights);
            }
        }
        if got.flags.intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC) {
            return Err(ChannelError::Truncated);
        }
        if got.bytes == 0 {
            return Err(ChannelError::Closed);
        }
        let msg = serde_json::from_slice(&body[..got.bytes])?;
        Ok((msg, fds))
    }

    /// Sends our hello and reads theirs; `Ok` when the two agree (a refusal is sent
    /// to the peer, and returned).
    pub fn handshake(&self, mine: &Hello) -> Result<(Hello, Agreement), ChannelError> {
        self.send(&Msg::Hello(mine.clone()), &[])?;
        let theirs = match self.recv()?.0 {
            Msg::Hello(h) => h,
            Msg::Refuse { reason } => return Err(ChannelError::Refused(reason)),
            other => {
                return Err(ChannelError::Refused(format!("expected a hello, got {other:?}")));
            }
        };
        match agree(mine, &theirs) {
            Ok(a) => Ok((theirs, a)),
            Err(reason) => {
                let _ = self.send(&Msg::Refuse { reason: reason.clone() }, &[]);
                Err(ChannelError::Refused(reason))
            }
        }
    }

    /// A connected pair of ends (tests).
    #[cfg(test)]
    fn pair() -> io::Result<(Channel, Channel)> {
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        Ok((Channel::new(a)?, Channel::new(b)?))
    }
}

/// The serving process's end: a listening socket, removed on drop. Polled (it is
/// non-blocking) on the serving process's takeover tick: a successor waits for the
/// old process's hello before it activates, so nothing is missed between ticks.
pub struct ChannelListener {
    fd: OwnedFd,
    path: PathBuf,
}

impl ChannelListener {
    /// Listens at `path` (replacing a stale socket there), readable by this user only.
    pub fn bind(path: &Path) -> io::Result<ChannelListener> {
        let _ = std::fs::remove_file(path);
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        rustix::net::bind(&fd, &SocketAddrUnix::new(path)?)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        rustix::net::listen(&fd, 4)?;
        Ok(ChannelListener { fd, path: path.to_owned() })
    }

    /// A waiting connection from a process of this user, if any (others are closed
    /// unanswered).
    pub fn try_accept(&self) -> io::Result<Option<Channel>> {
        loop {
            // The accepted socket is blocking (flags are not inherited): its calls are
            // bounded by the channel's timeouts instead.
            let fd = match rustix::net::accept_with(&self.fd, SocketFlags::CLOEXEC) {
                Ok(fd) => fd,
                Err(e) if e == rustix::io::Errno::AGAIN => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let peer = rustix::net::sockopt::socket_peercred(&fd)?;
            if peer.uid != rustix::process::geteuid() {
                tracing::warn!(
                    uid = peer.uid.as_raw(),
                    "handover channel: a process of another user connected; ignored"
                );
                continue;
            }
            return Channel::new(fd).map(Some);
        }
    }
}

impl Drop for ChannelListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn versions_must_match_and_splicing_needs_one_sockhash() {
        let mine = Hello::mine(Some(7));
        let same = Hello { pid: 1, ..mine.clone() };
        assert_eq!(agree(&mine, &same), Ok(Agreement { splice: true }));
        let other_map = Hello { splice_map: Some(8), ..same.clone() };
        assert_eq!(agree(&mine, &other_map), Ok(Agreement { splice: false }));
        let no_splice = Hello { splice_map: None, ..same.clone() };
        assert_eq!(agree(&mine, &no_splice), Ok(Agreement { splice: false }));
        let newer = Hello { version: VERSION + 1, ..same.clone() };
        assert!(agree(&mine, &newer).unwrap_err().contains("version"));
        let stranger = Hello { protocol: "x".into(), ..same };
        assert!(agree(&mine, &stranger).is_err());
    }

    #[test]
    fn a_version_mismatch_is_refused_on_both_sides() {
        let (a, b) = Channel::pair().unwrap();
        let old = std::thread::spawn(move || b.handshake(&Hello::mine(None)).map(|_| ()));
        let newer = Hello { version: VERSION + 1, ..Hello::mine(None) };
        assert!(matches!(a.handshake(&newer), Err(ChannelError::Refused(_))));
        assert!(matches!(old.join().unwrap(), Err(ChannelError::Refused(_))));
    }

    #[test]
    fn pending_bytes_round_trip_as_hex() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(unhex(&hex(&bytes)).as_deref(), Some(&bytes[..]));
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("zz"), None);
        // The largest offer fits a message.
        let full = hex(&[0xab; 16 * 1024]);
        let offer = RelayOffer {
            tag: 1,
            server: "s".into(),
            replica: "r".into(),
            moved: (0, 0),
            auto: true,
            up: full.clone(),
            down: full,
        };
        assert!(serde_json::to_vec(&Msg::Relay(offer)).unwrap().len() < MAX_MSG);
    }

    #[test]
    fn descriptors_travel_with_their_message() {
        let (a, b) = Channel::pair().unwrap();
        let (mut l, mut r) = std::os::unix::net::UnixStream::pair().unwrap();
        let offer = SpliceOffer {
            tag: 3,
            server: "s".into(),
            replica: "r".into(),
            written_before: (1, 2),
            moved: (3, 4),
        };
        a.send(&Msg::Splice(offer.clone()), &[l.as_fd(), r.as_fd()]).unwrap();
        a.send(&Msg::Done, &[]).unwrap();
        let (msg, fds) = b.recv().unwrap();
        assert_eq!(msg, Msg::Splice(offer));
        assert_eq!(fds.len(), 2);
        // The received descriptors are the same sockets.
        let mut l2 = std::os::unix::net::UnixStream::from(fds.into_iter().next().unwrap());
        l2.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        l.write_all(b"!").unwrap();
        assert_eq!(b.recv().unwrap().0, Msg::Done);
        drop(a);
        assert!(matches!(b.recv(), Err(ChannelError::Closed)));
    }
}
