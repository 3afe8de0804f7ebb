//! Closing a store's databases off the async workers.
//!
//! Closing the last connection to a database checkpoints its WAL into it: SQLite copies the
//! frames, fsyncs the WAL and the database, and truncates the WAL — a few milliseconds of
//! waiting for the disk per database. A store that closes its files (a long hibernation, or
//! its stop) used to do that on its actor, i.e. on one of the runtime's few async workers, which
//! meanwhile served no other store: measured here (`hibernation` bench row, quick, files
//! closed), cold wakes beside stores closing their files had p99 2.2–2.7 ms, and 1.3 ms when
//! no store closed its files at the same time; reopening `store.db` alone had p99 1.3 ms
//! beside closing stores, 0.4 ms without.
//!
//! A store closing its files after a long hibernation skips that checkpoint when the WAL is
//! small (see [`crate::sqlite::keep_small_wal_on_close`]): the next open reads it back.
//!
//! Instead the store hands its connections to the host's closing threads and waits for them
//! without holding a worker: when [`close`] returns, every file is closed, so whoever then
//! sees the store stopped or hibernated with its files closed sees no open file.
//!
//! A store that stops goes before every store that hibernates: when thousands of stores fall
//! idle together (a host that just started them all), their closes queue for tens of seconds,
//! and a removal waiting behind them took 0.4–2 s (`reconcile` bench row, the pass after the
//! host had started 10,000 stores; 0.1–0.2 s for the other passes).

use std::collections::VecDeque;
use std::sync::{Condvar, LazyLock, Mutex};

use tokio::sync::oneshot;

use crate::sqlite::lock;

/// Threads closing databases for the whole host: the work is mostly waiting for fsyncs, and
/// more of them at once would only queue on the disk (as the checkpoint threads).
const THREADS: usize = 2;

/// Something that holds open files until it is dropped: a connection, or a store's database
/// with what wraps it.
pub(crate) type OpenFiles = Box<dyn Send>;

/// Why files are closed, which decides their place in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    /// The store stops (removed, its data archived next, or the host shuts down): someone
    /// waits. Goes before every [`Why::Idle`] close.
    Stop,
    /// The store hibernates: nobody waits.
    Idle,
}

/// Files to close, in order, and who waits for them.
struct Job {
    files: Vec<OpenFiles>,
    closed: oneshot::Sender<()>,
}

/// What the closing threads have to do: stops first, then hibernations, each in order.
#[derive(Default)]
struct Jobs {
    stops: VecDeque<Job>,
    idle: VecDeque<Job>,
}

#[derive(Default)]
struct Queue {
    jobs: Mutex<Jobs>,
    added: Condvar,
}

impl Queue {
    fn push(&self, why: Why, job: Job) {
        let mut jobs = lock(&self.jobs);
        match why {
            Why::Stop => jobs.stops.push_back(job),
            Why::Idle => jobs.idle.push_back(job),
        }
        drop(jobs);
        self.added.notify_one();
    }

    fn next(&self) -> Job {
        let mut jobs = lock(&self.jobs);
        loop {
            if let Some(job) = jobs.stops.pop_front().or_else(|| jobs.idle.pop_front()) {
                return job;
            }
            jobs = self
                .added
                .wait(jobs)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    fn serve(&self) -> ! {
        loop {
            let job = self.next();
            // A panic while closing must not end the thread: the jobs behind it would wait
            // forever. The files are closed (dropped while unwinding) all the same.
            let files = job.files;
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(files))).is_err()
            {
                tracing::error!("closing a store's files panicked");
            }
            crate::heap::freed();
            let _ = job.closed.send(());
        }
    }
}

/// The queue the closing threads serve, started on first use; `None` when no thread started
/// (files are then closed by the caller, as before).
static QUEUE: LazyLock<Option<&'static Queue>> = LazyLock::new(|| {
    let queue: &'static Queue = Box::leak(Box::default());
    let mut started = 0;
    for n in 0..THREADS {
        let spawned = std::thread::Builder::new()
            .name(format!("sqlite-close-{n}"))
            .spawn(|| queue.serve());
        match spawned {
            Ok(_) => started += 1,
            Err(err) => tracing::error!("could not start thread sqlite-close-{n}: {err}"),
        }
    }
    (started > 0).then_some(queue)
});

/// Closes `files` in the order given (a database's readers before its writer: the last
/// connection to close checkpoints the WAL, which a read-only one cannot) on the host's
/// closing threads; resolves once all are closed.
pub(crate) async fn close(files: Vec<OpenFiles>, why: Why) {
    if files.is_empty() {
        return;
    }
    let Some(queue) = *QUEUE else {
        drop(files);
        return;
    };
    let (closed, done) = oneshot::channel();
    queue.push(why, Job { files, closed });
    // A thread that panicked mid-job dropped the sender: its files are closed (dropped while
    // it unwound) all the same.
    let _ = done.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::{self, Durability, Schema};
    use std::sync::Arc;

    #[tokio::test(flavor = "current_thread")]
    async fn closing_checkpoints_and_empties_the_wal_before_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let conn = sqlite::open(
            &path,
            Durability::Process,
            &Schema::of(&["CREATE TABLE t (v)"]),
        )
        .unwrap();
        conn.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let reader = sqlite::open_reader(&path).unwrap();
        let wal = sqlite::wal_path(&path);
        assert!(std::fs::metadata(&wal).unwrap().len() > 0);

        let closing_thread = Arc::new(Mutex::new(None));
        struct Spy(Arc<Mutex<Option<String>>>);
        impl Drop for Spy {
            fn drop(&mut self) {
                *lock(&self.0) = std::thread::current().name().map(str::to_owned);
            }
        }
        close(
            vec![
                Box::new(reader),
                Box::new(conn),
                Box::new(Spy(closing_thread.clone())),
            ],
            Why::Idle,
        )
        .await;

        assert_eq!(
            std::fs::metadata(&wal).unwrap().len(),
            0,
            "closed when close returns: the WAL is checkpointed and emptied"
        );
        let thread = lock(&closing_thread).clone().unwrap_or_default();
        assert!(
            thread.starts_with("sqlite-close-"),
            "closed on a closing thread, not the caller's: {thread:?}"
        );
    }

    /// Holds a closing thread until its gate opens.
    struct Blocker {
        started: std::sync::mpsc::Sender<()>,
        gate: std::sync::mpsc::Receiver<()>,
    }

    impl Drop for Blocker {
        fn drop(&mut self) {
            let _ = self.started.send(());
            let _ = self.gate.recv();
        }
    }

    /// Notes its name when closed.
    struct Recorder(&'static str, Arc<Mutex<Vec<&'static str>>>);

    impl Drop for Recorder {
        fn drop(&mut self) {
            lock(&self.1).push(self.0);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopping_store_closes_before_the_hibernating_ones_queued_earlier() {
        // Both closing threads held, so what comes next waits in the queue.
        let (started, started_rx) = std::sync::mpsc::channel();
        let mut gates = Vec::new();
        let mut blocked = Vec::new();
        for _ in 0..THREADS {
            let (open, gate) = std::sync::mpsc::channel();
            gates.push(open);
            let blocker = Blocker {
                started: started.clone(),
                gate,
            };
            blocked.push(tokio::spawn(close(vec![Box::new(blocker)], Why::Idle)));
        }
        for _ in 0..THREADS {
            started_rx
                .recv_timeout(std::time::Duration::from_secs(20))
                .expect("a closing thread takes the blocker");
        }

        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiting = Vec::new();
        for name in ["idle-1", "idle-2", "idle-3"] {
            let files: Vec<OpenFiles> = vec![Box::new(Recorder(name, order.clone()))];
            waiting.push(tokio::spawn(close(files, Why::Idle)));
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let files: Vec<OpenFiles> = vec![Box::new(Recorder("stop", order.clone()))];
        waiting.push(tokio::spawn(close(files, Why::Stop)));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(
            lock(&order).is_empty(),
            "nothing closed while both threads are held"
        );

        // One thread freed: it takes the queue in its order of priority.
        gates[0].send(()).unwrap();
        for job in waiting {
            job.await.unwrap();
        }
        assert_eq!(*lock(&order), ["stop", "idle-1", "idle-2", "idle-3"]);
        for gate in &gates {
            let _ = gate.send(());
        }
        for job in blocked {
            job.await.unwrap();
        }
    }
}
