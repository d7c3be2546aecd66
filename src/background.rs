//! The runtime the background stages (processors, projections, the attachment fetcher) run on,
//! apart from the one that answers clients, with its threads at a lower CPU priority.
//!
//! A write is acknowledged once its event is durable on the log; the stages then catch up. When
//! the CPUs are short (a bulk `payerx load`, a burst of submissions), a stage that is behind is
//! always runnable, and at equal priority it takes its share of every core from the clients being
//! acknowledged. At a higher nice value the scheduler gives the clients first call and the stages
//! everything left over, which is all of it once the burst ends. A write that waits for the view
//! waits on the stages, not for a CPU, so it is not slowed while the stages keep up.

use std::io;

/// A tokio runtime whose threads run at `nice` (0 = the process's own priority). Dropping it
/// (also inside an async context) abandons whatever still runs on it: stop the tasks first.
pub struct BackgroundRuntime {
    runtime: Option<tokio::runtime::Runtime>,
}

impl BackgroundRuntime {
    pub fn new(nice: i32) -> io::Result<BackgroundRuntime> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("payerx-stages")
            .enable_all()
            // Also the blocking pool's threads, where the stages' CPU work and log reads run, and
            // so every thread those start. (The views database opens its connections on the
            // runtime that opened it, so a stage never holds its write lock at this priority.)
            .on_thread_start(move || lower_priority(nice))
            .build()?;
        Ok(BackgroundRuntime { runtime: Some(runtime) })
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        #[allow(clippy::expect_used)]
        self.runtime.as_ref().expect("the runtime lives until dropped").handle()
    }
}

impl Drop for BackgroundRuntime {
    fn drop(&mut self) {
        // A plain drop blocks until its threads end, which tokio refuses inside an async context.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Raises the calling thread's nice value (a per-thread attribute on Linux). Best effort: a
/// thread that cannot change it runs at the process's priority, which is only slower to catch up.
fn lower_priority(nice: i32) {
    if nice <= 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        let tid = rustix::thread::gettid();
        if let Err(e) = rustix::process::setpriority_process(Some(tid), nice.min(19)) {
            tracing::debug!(error = %e, nice, "could not lower a stage thread's priority");
        }
    }
}

/// The calling thread's nice value (Linux; `None` elsewhere).
pub fn thread_nice() -> Option<i32> {
    #[cfg(target_os = "linux")]
    {
        rustix::process::getpriority_process(Some(rustix::thread::gettid())).ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn its_threads_and_their_blocking_pool_run_at_the_nice_value_given() {
        let base = thread_nice().expect("linux");
        let bg = BackgroundRuntime::new(7).unwrap();
        let worker = bg.handle().block_on(async { tokio::spawn(async { thread_nice() }).await.unwrap() });
        let blocking = bg.handle().block_on(async { tokio::task::spawn_blocking(thread_nice).await.unwrap() });
        // A thread started from one of them inherits its priority.
        let child = bg
            .handle()
            .block_on(async { tokio::spawn(async { std::thread::spawn(thread_nice).join().unwrap() }).await.unwrap() });
        assert_eq!(worker, Some((base + 7).min(19)));
        assert_eq!(blocking, Some((base + 7).min(19)));
        assert_eq!(child, Some((base + 7).min(19)));
        // The caller's own thread is left alone.
        assert_eq!(thread_nice(), Some(base));
    }

    #[test]
    fn nice_zero_leaves_the_priority_as_it_is() {
        let base = thread_nice().expect("linux");
        let bg = BackgroundRuntime::new(0).unwrap();
        let worker = bg.handle().block_on(async { tokio::spawn(async { thread_nice() }).await.unwrap() });
        assert_eq!(worker, Some(base));
    }

    #[tokio::test]
    async fn dropping_it_inside_an_async_context_does_not_panic() {
        let bg = BackgroundRuntime::new(5).unwrap();
        let h = bg.handle().spawn(async { 1 });
        assert_eq!(h.await.unwrap(), 1);
        drop(bg);
    }
}
