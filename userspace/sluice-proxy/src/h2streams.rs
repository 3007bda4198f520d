//! HTTP/2 client streams polled inside their connection's own task.
//!
//! hyper's HTTP/2 server hands every stream to an executor. With tokio's that is a task
//! spawned per request: an allocation, the future copied into the task cell several
//! times, the scheduler's state machine, and, per response, one task waking another (the
//! stream's task wakes the connection's to flush). Here the connection's task owns its
//! streams: [`StreamExec`] queues what hyper executes, and [`WithStreams`] polls the
//! connection and then whichever streams are ready, in the same task, as nginx and
//! HAProxy run a connection's streams on its own event loop. Streams of one connection
//! share a CPU either way; nothing here crosses threads.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt as _};

type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The executor handed to hyper's HTTP/2 builder: it only queues. hyper calls it from
/// inside the connection's poll, so the queue is never contended: the mutex exists
/// because the builder demands a `Send + Sync` executor, not to coordinate threads.
#[derive(Clone, Default)]
pub(crate) struct StreamExec {
    queue: Arc<Mutex<Vec<Stream>>>,
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner).push(Box::pin(fut));
    }
}

pin_project_lite::pin_project! {
    /// A connection future and the streams it spawned through its [`StreamExec`]: it
    /// resolves with the connection. Streams still pending then are dropped, as they
    /// would be cancelled anyway: the connection they answer on is gone.
    pub(crate) struct WithStreams<C> {
        #[pin]
        conn: C,
        exec: StreamExec,
        streams: FuturesUnordered<Stream>,
    }
}

impl<C> WithStreams<C> {
    /// Pairs `conn` with the executor its builder was given.
    pub(crate) fn new(conn: C, exec: StreamExec) -> Self {
        Self { conn, exec, streams: FuturesUnordered::new() }
    }

    /// The connection itself, for graceful shutdown.
    pub(crate) fn conn(self: Pin<&mut Self>) -> Pin<&mut C> {
        self.project().conn
    }
}

impl<C: Future> Future for WithStreams<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.project();
        let done = this.conn.poll(cx);
        if done.is_ready() {
            return done;
        }
        // Every stream that is ready runs now. A stream that answers wakes the connection
        // (this task) to write, so the writes of one round go out together. A stream may
        // queue another (an HTTP/2 CONNECT tunnel's pipe): the lock is not held while
        // streams run, and what they queued runs in the same round.
        loop {
            {
                let mut queue = this.exec.queue.lock().unwrap_or_else(PoisonError::into_inner);
                for stream in queue.drain(..) {
                    this.streams.push(stream);
                }
            }
            while let Poll::Ready(Some(())) = this.streams.poll_next_unpin(cx) {}
            if this.exec.queue.lock().unwrap_or_else(PoisonError::into_inner).is_empty() {
                return Poll::Pending;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor as _;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn streams_run_in_the_connection_task_and_end_with_it() {
        let exec = StreamExec::default();
        let ran = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let conn = {
            let (exec, ran) = (exec.clone(), ran.clone());
            async move {
                // The connection spawns two streams, then ends when told to.
                for _ in 0..2 {
                    let ran = ran.clone();
                    exec.execute(async move {
                        tokio::task::yield_now().await;
                        ran.fetch_add(1, Ordering::Relaxed);
                    });
                }
                let _ = rx.await;
            }
        };
        let both = WithStreams::new(conn, exec.clone());
        let mut both = std::pin::pin!(both);
        tokio::select! {
            _ = both.as_mut() => panic!("the connection ended early"),
            _ = async { while ran.load(Ordering::Relaxed) < 2 { tokio::task::yield_now().await } } => {}
        }
        tx.send(()).ok();
        both.await;
        assert_eq!(ran.load(Ordering::Relaxed), 2);
    }
}
