//! The [`PortalStore`] contract, including the single-use race.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;

use jiff::Timestamp;

use crate::portal::{PortalSession, PortalStore, Redeem};
use crate::scope::Role;
use crate::secret::Digest;

/// The current whole second: the suite's times count from it, so that
/// sessions expire in the future on a store's own clock too (a store may
/// hand the expiry to its backend, as Redis `SET … PXAT` does, and a
/// session already expired there would be gone on arrival).
fn origin() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// `secs` seconds after `origin`.
fn at(origin: Timestamp, secs: i64) -> Timestamp {
    origin.saturating_add(jiff::SignedDuration::from_secs(secs)).unwrap_or(origin)
}

fn digest(n: u64, salt: u8) -> Digest {
    let mut b = [salt; 32];
    b[..8].copy_from_slice(&n.to_le_bytes());
    Digest::from_bytes(b)
}

/// A session for the suite, created now (the current whole second) and
/// expiring `expires` seconds later.
///
/// # Panics
///
/// Never (the ids are valid).
#[must_use]
pub fn sample_session(expires: i64) -> PortalSession {
    session_at(origin(), expires)
}

/// A session created at `origin`, expiring `expires` seconds later.
fn session_at(origin: Timestamp, expires: i64) -> PortalSession {
    PortalSession {
        workspace: "ws_portal".parse().expect("valid id"),
        application: "app_123".parse().expect("valid id"),
        role: Role::Editor,
        metadata: BTreeMap::from([("userId".into(), "usr_456".into())]),
        created_at: origin,
        expires_at: at(origin, expires),
        environment: Some(crate::format::Environment::TEST),
        region: None,
        minter: Some("key_minter0000000001".parse().expect("valid id")),
    }
}

/// Runs the sequential checks against `store`. `salt` keeps digests of
/// different runs against one shared backend apart.
///
/// # Panics
///
/// When the store breaks the [`PortalStore`] contract.
pub async fn run<S: PortalStore>(store: &S, salt: u8) {
    let o = origin();
    let ts = |secs| at(o, secs);
    let sample_session = |expires| session_at(o, expires);
    let code = digest(1, salt);
    let s = sample_session(60);
    assert!(store.insert(code, s.clone()).await.unwrap(), "insert");
    let mut other = s.clone();
    other.role = Role::Viewer;
    assert!(!store.insert(code, other).await.unwrap(), "a digest is stored once");
    assert_eq!(store.redeem(&code, ts(10)).await.unwrap(), Redeem::Session(s), "first redeem wins");
    assert_eq!(store.redeem(&code, ts(11)).await.unwrap(), Redeem::AlreadyUsed);
    assert_eq!(store.redeem(&code, ts(61)).await.unwrap(), Redeem::AlreadyUsed, "used stays used");

    let late = digest(2, salt);
    store.insert(late, sample_session(60)).await.unwrap();
    assert_eq!(store.redeem(&late, ts(60)).await.unwrap(), Redeem::Expired, "expiry is exclusive");
    // An expired code was never used: asking again does not make it so
    // (and a store that forgets it may answer unknown).
    let again = store.redeem(&late, ts(61)).await.unwrap();
    assert!(matches!(again, Redeem::Expired | Redeem::Unknown), "{again:?}");
    // Every role, and empty metadata, come back as stored.
    for (i, role) in [Role::Admin, Role::Viewer].into_iter().enumerate() {
        let mut s = sample_session(60);
        s.role = role;
        s.metadata.clear();
        // Region and environment round-trip too, set or not.
        s.region = (i == 1).then(|| "eu".parse().expect("valid region"));
        s.environment = (i == 0).then_some(crate::format::Environment::LIVE);
        let c = digest(10 + i as u64, salt);
        store.insert(c, s.clone()).await.unwrap();
        assert_eq!(store.redeem(&c, ts(1)).await.unwrap(), Redeem::Session(s), "{role:?}");
    }
    let edge = digest(3, salt);
    let s = sample_session(60);
    store.insert(edge, s.clone()).await.unwrap();
    assert_eq!(
        store.redeem(&edge, ts(59)).await.unwrap(),
        Redeem::Session(s),
        "just before expiry"
    );
    assert_eq!(store.redeem(&digest(4, salt), ts(0)).await.unwrap(), Redeem::Unknown);
}

struct ThreadWaker(Thread);
impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Drives `f` to completion on the current thread (no runtime needed for
/// stores whose futures are self-driving).
pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// Runs `f` on a thread of its own, outside the caller's runtime: called
/// from async code (a `#[tokio::test]`), [`block_on`] would hold a thread
/// whose task budget (Tokio's cooperative scheduling) runs out after some
/// hundred awaits and never refills, since the task never yields: every
/// future waiting on the runtime would then answer "pending" for ever.
pub(crate) fn apart<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| s.spawn(f).join()).unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// The future `make` returns, driven to its end by [`block_on`] [`apart`]
/// from the caller's runtime.
pub(crate) fn block_on_apart<F: Future>(make: impl FnOnce() -> F + Send) -> F::Output
where
    F::Output: Send,
{
    apart(|| block_on(make()))
}

/// The barrier racing threads meet at before each step. Unlike
/// [`std::sync::Barrier`], it breaks when one of them panics (a store error
/// unwrapped, a rule found broken): the others panic at their next wait
/// instead of waiting for the failed one for ever, and the suite fails
/// instead of hanging.
pub(crate) struct RaceBarrier {
    threads: usize,
    /// Threads waiting, the step's number, and whether one has panicked.
    state: Mutex<(usize, u64, bool)>,
    cv: Condvar,
}

impl RaceBarrier {
    pub(crate) fn new(threads: usize) -> Self {
        Self { threads, state: Mutex::new((0, 0, false)), cv: Condvar::new() }
    }

    /// Joins the calling thread to the race: if it panics while the
    /// returned guard lives, the barrier breaks.
    pub(crate) fn member(&self) -> RaceMember<'_> {
        RaceMember(self)
    }

    /// Waits for every thread of the race.
    ///
    /// # Panics
    ///
    /// When another racing thread has panicked.
    pub(crate) fn wait(&self) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let step = s.1;
        if !s.2 {
            s.0 += 1;
            if s.0 == self.threads {
                *s = (0, step + 1, false);
                self.cv.notify_all();
                return;
            }
            while s.1 == step && !s.2 {
                s = self.cv.wait(s).unwrap_or_else(PoisonError::into_inner);
            }
        }
        let broken = s.2;
        drop(s);
        assert!(!broken, "another racing thread failed (its panic is reported above)");
    }
}

/// A racing thread's membership: breaks the barrier if the thread panics.
pub(crate) struct RaceMember<'a>(&'a RaceBarrier);

impl Drop for RaceMember<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.state.lock().unwrap_or_else(PoisonError::into_inner).2 = true;
            self.0.cv.notify_all();
        }
    }
}

/// For each of `codes` codes, `threads` threads redeem at once; exactly one
/// must win every time. Returns the number of wins (equal to `codes`).
///
/// Every thread is the suite's own, outside any runtime, so it may be
/// called from async code as from a plain test; a store whose futures need
/// a runtime's context (`tokio::spawn`, `spawn_blocking`, its timers) must
/// hold a `Handle` and spawn through it.
///
/// # Panics
///
/// When a code is won twice or never.
pub fn race<S: PortalStore>(store: &S, codes: u64, threads: usize, salt: u8) -> usize {
    let o = origin();
    let ts = |secs| at(o, secs);
    apart(|| {
        for n in 0..codes {
            assert!(block_on(store.insert(digest(1000 + n, salt), session_at(o, 600))).unwrap());
        }
    });
    let wins: Vec<AtomicUsize> = (0..codes).map(|_| AtomicUsize::new(0)).collect();
    let barrier = RaceBarrier::new(threads);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (wins, barrier) = (&wins, &barrier);
            s.spawn(move || {
                let _member = barrier.member();
                for n in 0..codes {
                    // All threads line up, then redeem the same code at once.
                    barrier.wait();
                    match block_on(store.redeem(&digest(1000 + n, salt), ts(1))).unwrap() {
                        Redeem::Session(_) => {
                            wins[usize::try_from(n).unwrap_or(0)].fetch_add(1, Ordering::Relaxed);
                        }
                        // Every loser learns the code was used, never that
                        // it is unknown or expired.
                        Redeem::AlreadyUsed => {}
                        other => panic!("a losing redeem of code {n} answered {other:?}"),
                    }
                }
                let _ = t;
            });
        }
    });
    for (n, w) in wins.iter().enumerate() {
        assert_eq!(w.load(Ordering::Relaxed), 1, "code {n} was redeemed {w:?} times");
    }
    wins.len()
}
