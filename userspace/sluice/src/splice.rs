//! The kernel hand-off for opaque streams: when both legs of an upgraded exchange are
//! plaintext TCP, they are spliced in the kernel (sk_skb verdict) and userspace only
//! watches for close; otherwise (a TLS or HTTP/2 leg: the kernel refuses sockmap on
//! kTLS, and an h2 stream is not a socket) the bytes are relayed in userspace.

use std::{
    io,
    os::fd::OwnedFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use futures_util::future::BoxFuture;
use hyper_util::rt::TokioIo;
use sluice_dataplane::{Dataplane, SpliceWatcher};
use sluice_proxy::{OpaqueStream, OpaqueStreamHandoff, into_tcp};
use tokio::io::AsyncWriteExt;
use tracing::{debug, warn};

/// Splices plaintext pairs in the kernel; relays everything else in userspace.
pub struct KernelSplice {
    inner: Arc<Inner>,
}

struct Inner {
    dp: Arc<Mutex<Dataplane>>,
    watcher: SpliceWatcher,
    /// Set after the first splice failure, so the fallback is said once.
    warned: AtomicBool,
}

impl KernelSplice {
    /// Starts the close watcher over the shared data plane.
    pub fn new(
        dp: Arc<Mutex<Dataplane>>,
    ) -> Result<KernelSplice, sluice_dataplane::DataplaneError> {
        let watcher = SpliceWatcher::spawn(dp.clone())?;
        Ok(KernelSplice { inner: Arc::new(Inner { dp, watcher, warned: AtomicBool::new(false) }) })
    }
}

impl OpaqueStreamHandoff for KernelSplice {
    fn relay(&self, stream: OpaqueStream) -> BoxFuture<'static, io::Result<(u64, u64)>> {
        let this = self.inner.clone();
        Box::pin(async move {
            let OpaqueStream { client, upstream, server, replica, .. } = stream;
            match (into_tcp(client), into_tcp(upstream)) {
                (Ok((mut c, c_buf)), Ok((mut u, u_buf))) => {
                    // Flush what userspace already read past the upgrade, each to the
                    // other side, before the kernel takes over: those bytes come first.
                    u.write_all(&c_buf).await?;
                    c.write_all(&u_buf).await?;
                    let (c_std, u_std) = (c.into_std()?, u.into_std()?);
                    let spliced = this
                        .dp
                        .lock()
                        .map_err(|_| io::Error::other("data plane lock poisoned"))?
                        .splice(&c_std, &u_std);
                    match spliced {
                        Ok(pair) => {
                            debug!(%server, %replica, "opaque stream spliced in the kernel");
                            let (tx, rx) = tokio::sync::oneshot::channel();
                            this.watcher.watch(
                                pair,
                                OwnedFd::from(c_std),
                                OwnedFd::from(u_std),
                                Box::new(move |end| {
                                    let _ = tx.send(end);
                                }),
                            );
                            let end =
                                rx.await.map_err(|_| io::Error::other("splice watcher stopped"))?;
                            Ok((end.a_to_b + c_buf.len() as u64, end.b_to_a + u_buf.len() as u64))
                        }
                        Err(e) => {
                            if !this.warned.swap(true, Ordering::Relaxed) {
                                warn!(error = %e, "kernel splice failed; relaying opaque streams in userspace");
                            }
                            let mut c = tokio::net::TcpStream::from_std(c_std)?;
                            let mut u = tokio::net::TcpStream::from_std(u_std)?;
                            let (up, down) = tokio::io::copy_bidirectional(&mut c, &mut u).await?;
                            Ok((up + c_buf.len() as u64, down + u_buf.len() as u64))
                        }
                    }
                }
                // A TLS or HTTP/2 client leg: userspace, with the replica side raw.
                (Err(c), Ok((mut u, u_buf))) => {
                    let mut c = TokioIo::new(c);
                    c.write_all(&u_buf).await?;
                    let (up, down) = tokio::io::copy_bidirectional(&mut c, &mut u).await?;
                    Ok((up, down + u_buf.len() as u64))
                }
                (Ok((mut c, c_buf)), Err(u)) => {
                    let mut u = TokioIo::new(u);
                    u.write_all(&c_buf).await?;
                    let (up, down) = tokio::io::copy_bidirectional(&mut c, &mut u).await?;
                    Ok((up + c_buf.len() as u64, down))
                }
                (Err(c), Err(u)) => {
                    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                    tokio::io::copy_bidirectional(&mut c, &mut u).await
                }
            }
        })
    }
}
