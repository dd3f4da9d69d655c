//! The secret wrapper and the constant-time digest: the only place plaintext lives.

use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// A value that must not leak: zeroized on drop, `[REDACTED]` in `Debug`, no
/// `Display`, no `Serialize`, no `Hash`, no `PartialEq`.
///
/// The only way to the plaintext is [`Secret::expose_secret`], so every use of
/// a secret in the code base can be found with one `grep`.
///
/// ```
/// use keygate::Secret;
///
/// let s = Secret::new(String::from("nh_0123"));
/// assert_eq!(format!("{s:?}"), "Secret([REDACTED])");
/// assert_eq!(s.expose_secret(), "nh_0123");
/// ```
pub struct Secret<S: Zeroize + ?Sized>(Box<S>);

/// The common case: a secret string (an API key, a portal code, a token).
pub type SecretString = Secret<str>;

impl<S: Zeroize> Secret<S> {
    /// Wraps `value`; it is zeroized when the wrapper is dropped.
    #[must_use]
    pub fn new(value: S) -> Self {
        Self(Box::new(value))
    }
}

impl From<String> for SecretString {
    /// Takes `value`'s buffer when it is exactly full; otherwise copies it
    /// to an exact-size box and wipes the original, since shrinking in place
    /// may move the bytes and free the old block unwiped.
    fn from(mut value: String) -> Self {
        if value.len() == value.capacity() {
            return Self(value.into_boxed_str());
        }
        let exact = Box::<str>::from(value.as_str());
        value.zeroize();
        Self(exact)
    }
}

impl<S: Zeroize + ?Sized> Secret<S> {
    /// The plaintext. Named loudly so that every use can be found and reviewed.
    #[must_use]
    pub fn expose_secret(&self) -> &S {
        &self.0
    }
}

impl<S: Zeroize + Clone> Clone for Secret<S> {
    fn clone(&self) -> Self {
        Self::new(self.0.as_ref().clone())
    }
}

impl Clone for SecretString {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<S: Zeroize + ?Sized> Drop for Secret<S> {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl<S: Zeroize + ?Sized> ZeroizeOnDrop for Secret<S> {}

impl<S: Zeroize + ?Sized> fmt::Debug for Secret<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([REDACTED])")
    }
}

/// A 32-byte digest (SHA-256 or HMAC-SHA256 output) whose `==` runs in
/// constant time.
///
/// A digest is not a secret — stores index records by it — but comparing the
/// digest of a presented key with a stored one must not reveal, through
/// timing, how many leading bytes matched. `Hash` is implemented so that
/// stores can key maps by digest; hashing happens on the presented key's own
/// digest, which an attacker already knows.
#[derive(Clone, Copy)]
pub struct Digest([u8; Digest::LEN]);

impl Digest {
    /// Length of a digest in bytes.
    pub const LEN: usize = 32;

    /// Wraps raw digest bytes.
    #[must_use]
    pub const fn from_bytes(bytes: [u8; Self::LEN]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; Self::LEN] {
        &self.0
    }

    /// Lowercase hex, 64 characters.
    #[must_use]
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 lowercase hex characters.
    ///
    /// # Errors
    ///
    /// [`DigestParseError`] when `s` is not exactly 64 lowercase hex digits.
    pub fn from_hex(s: &str) -> Result<Self, DigestParseError> {
        let bytes = s.as_bytes();
        if bytes.len() != 2 * Self::LEN {
            return Err(DigestParseError);
        }
        // `hex` accepts uppercase too; the stored form is canonical lowercase.
        if !bytes.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(DigestParseError);
        }
        let mut out = [0u8; Self::LEN];
        hex::decode_to_slice(bytes, &mut out).map_err(|_| DigestParseError)?;
        Ok(Self(out))
    }
}

impl ConstantTimeEq for Digest {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        // OR together the XOR of each 8-byte word, then let `subtle` decide
        // on the one folded word: no branch depends on the bytes, and the
        // optimisation barrier is paid once instead of once per byte (as
        // `<[u8]>::ct_eq` does).
        let diff = self
            .0
            .chunks_exact(8)
            .zip(other.0.chunks_exact(8))
            .map(|(a, b)| word(a) ^ word(b))
            .fold(0u64, |acc, x| acc | x);
        diff.ct_eq(&0)
    }
}

/// The 8 bytes of `chunk` as a word (`chunk` is always 8 bytes long).
fn word(chunk: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(chunk);
    u64::from_ne_bytes(w)
}

impl PartialEq for Digest {
    fn eq(&self, other: &Self) -> bool {
        // `Choice` is turned into `bool` only here, at the very end.
        bool::from(self.ct_eq(other))
    }
}

impl Eq for Digest {}

impl std::hash::Hash for Digest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Hashes a [`Digest`] map key by folding its bytes, without `SipHash`.
///
/// Digests are SHA-256/HMAC outputs that a client cannot steer, so maps
/// keyed by them need no keyed hash to resist flooding.
#[derive(Default)]
pub(crate) struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        // MurmurHash3's 64-bit finaliser: every output bit depends on every
        // input bit, so structured (non-random) digests, as in tests, still
        // spread over the table.
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }

    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as a length prefix (via `write_usize`) and then
        // one `write` of its 32 bytes; fold whatever arrives.
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(b);
        }
    }

    fn write_usize(&mut self, _: usize) {}
}

/// `BuildHasher` for maps keyed by [`Digest`].
pub(crate) type DigestBuildHasher = std::hash::BuildHasherDefault<DigestHasher>;

/// A digest string was not 64 lowercase hex characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("digest must be 64 lowercase hex characters")]
pub struct DigestParseError;

/// Bytes from the OS CSPRNG for one operation (a key and its record id, say),
/// fetched with one draw ([`os_fill`]: a system call, or the vDSO with
/// feature `vdso`) instead of one per value: a stack buffer filled on first
/// use, refilled when spent, each byte wiped as it is handed out and the
/// rest on drop.
///
/// The fetch size is the operation's need (`Alphabet::bytes_for`): the
/// kernel's cost grows with the bytes asked for (measured on Linux 6.18:
/// the system call about 220 ns up to 32 bytes, 300 ns up to 64, 410 ns
/// for 128; the vDSO about 2 ns a byte), so a batch asks for what the
/// operation will use, not a fixed large block.
///
/// It lives only as long as the operation: never in a static or a
/// thread-local, so no two operations, and no forked child process, can be
/// handed the same bytes.
pub(crate) struct OsBatch {
    buf: [u8; OsBatch::MAX],
    /// Bytes fetched per system call.
    fetch: usize,
    /// Next byte to hand out.
    pos: usize,
    /// End of the fetched bytes.
    end: usize,
}

impl OsBatch {
    /// The largest fetch.
    pub(crate) const MAX: usize = 128;

    /// A batch fetching `fetch` bytes (1 to [`MAX`](Self::MAX)) per system
    /// call.
    pub(crate) const fn new(fetch: usize) -> Self {
        let fetch = if fetch == 0 {
            1
        } else if fetch > Self::MAX {
            Self::MAX
        } else {
            fetch
        };
        Self { buf: [0; Self::MAX], fetch, pos: 0, end: 0 }
    }
}

impl rand_core::TryRng for OsBatch {
    type Error = getrandom::Error;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        let mut done = 0;
        while done < dst.len() {
            if self.pos == self.end {
                let missing = dst.len() - done;
                if missing > Self::MAX {
                    // Larger than any batch: straight from the OS.
                    return os_fill(&mut dst[done..]);
                }
                let want = self.fetch.max(missing);
                // On failure the batch stays empty (pos == end): a retry
                // fetches again rather than serve stale bytes, and whatever
                // the failed call wrote is wiped.
                if let Err(e) = os_fill(&mut self.buf[..want]) {
                    self.buf[..want].zeroize();
                    return Err(e);
                }
                self.end = want;
                self.pos = 0;
            }
            let n = (dst.len() - done).min(self.end - self.pos);
            let src = &mut self.buf[self.pos..self.pos + n];
            dst[done..done + n].copy_from_slice(src);
            src.zeroize();
            self.pos += n;
            done += n;
        }
        Ok(())
    }
}

impl rand_core::TryCryptoRng for OsBatch {}

/// Fills `buf` from the OS CSPRNG.
///
/// With feature `vdso` on x86-64 (Linux 6.11+) and aarch64 (6.12+) Linux,
/// through the kernel's vDSO `getrandom`: the kernel's generator, reseeded
/// on its schedule, with per-thread state in pages the kernel wipes on
/// fork, without the system call's cost. glibc 2.41 and later do this
/// inside `getrandom(3)`; the feature brings it to older C libraries.
/// Where the vDSO lacks it, or it fails once, the system call serves
/// instead (for the rest of the process, after a failure).
///
/// The states come from `vdso-rng`'s pool, whose limits are the feature's
/// (documented in the README):
/// - its 0.3.1 release reads an `mmap` failure other than `EPERM` (an
///   address-space limit's `ENOMEM`) as an address, so a pool that must
///   grow under such a limit crashes the process instead of failing;
/// - in the child of a `fork` from a multithreaded process, a thread
///   without a state yet takes the pool's lock, which another thread of
///   the parent may have held: as POSIX has it, such a child should only
///   `exec`;
/// - under Valgrind (3.19), which does not emulate the vDSO's generator,
///   the first draw crashes the process (`SIGSEGV` in the pool's setup):
///   run memory checkers on a build without the feature.
fn os_fill(buf: &mut [u8]) -> Result<(), getrandom::Error> {
    #[cfg(all(
        feature = "vdso",
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    if vdso::fill(buf) {
        return Ok(());
    }
    getrandom::fill(buf)
}

#[cfg(all(
    feature = "vdso",
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod vdso {
    use std::cell::RefCell;
    use std::sync::LazyLock;
    use std::sync::atomic::{AtomicBool, Ordering};

    use vdso_rng::{LocalState, Pool};

    /// The process's pool of vDSO states (`None`: the vDSO has no
    /// `getrandom`).
    static POOL: LazyLock<Option<Pool>> = LazyLock::new(|| Pool::new().ok());

    /// Set when renting a state or a draw failed: from then on the system
    /// call serves, rather than every draw paying for a failing attempt
    /// first.
    static GAVE_UP: AtomicBool = AtomicBool::new(false);

    thread_local! {
        /// This thread's state, rented from [`POOL`] on first use and
        /// returned when the thread ends.
        static STATE: RefCell<Option<LocalState<'static>>> = const { RefCell::new(None) };
    }

    /// Fills `buf` through the vDSO; `false` (with `buf` wiped) when that
    /// is not possible here and now, so the caller uses the system call.
    pub(super) fn fill(buf: &mut [u8]) -> bool {
        if GAVE_UP.load(Ordering::Relaxed) {
            return false;
        }
        let Some(pool) = POOL.as_ref() else { return false };
        let filled = STATE
            .try_with(|state| {
                // Busy only if re-entered (a signal handler): not a failure.
                let Ok(mut state) = state.try_borrow_mut() else { return false };
                if state.is_none() {
                    *state = LocalState::new(pool).ok();
                }
                let filled = state.as_mut().is_some_and(|s| s.fill(buf, 0).is_ok());
                if !filled {
                    GAVE_UP.store(true, Ordering::Relaxed);
                }
                filled
            })
            // The thread is ending and its state is gone.
            .unwrap_or(false);
        if !filled {
            zeroize::Zeroize::zeroize(buf);
        }
        filled
    }

    /// Whether the vDSO serves this process.
    #[cfg(test)]
    pub(super) fn available() -> bool {
        POOL.is_some() && !GAVE_UP.load(Ordering::Relaxed)
    }
}

impl Drop for OsBatch {
    fn drop(&mut self) {
        // Served bytes were wiped as they were handed out; never-fetched
        // bytes are still zero.
        self.buf[self.pos..self.end].zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let s = SecretString::from(String::from("super-secret-value"));
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("super-secret-value"));
        assert_eq!(dbg, "Secret([REDACTED])");
        assert_eq!(s.clone().expose_secret(), "super-secret-value");
    }

    #[test]
    fn dropping_a_secret_zeroizes_it() {
        use std::cell::Cell;
        use std::rc::Rc;
        // Records that it was wiped, which a dropped value cannot show.
        struct Wiped(Rc<Cell<bool>>);
        impl Zeroize for Wiped {
            fn zeroize(&mut self) {
                self.0.set(true);
            }
        }
        let wiped = Rc::new(Cell::new(false));
        let s = Secret::new(Wiped(Rc::clone(&wiped)));
        assert!(!wiped.get());
        drop(s);
        assert!(wiped.get());
    }

    #[test]
    fn os_batch_words_are_random() {
        use rand_core::TryRng;
        let mut rng = OsBatch::new(16);
        let u32s: std::collections::HashSet<u32> =
            (0..8).map(|_| rng.try_next_u32().unwrap()).collect();
        let u64s: std::collections::HashSet<u64> =
            (0..8).map(|_| rng.try_next_u64().unwrap()).collect();
        // Eight random words all alike is out of reach; a constant is one value.
        assert!(u32s.len() > 1 && u64s.len() > 1, "{u32s:?} {u64s:?}");
    }

    #[test]
    fn digest_eq_and_hex_round_trip() {
        let a = Digest::from_bytes([0xab; 32]);
        let mut other = [0xab; 32];
        other[31] = 8;
        let b = Digest::from_bytes(other);
        assert_eq!(a, a);
        assert_ne!(a, b);
        assert_eq!(Digest::from_hex(&a.to_hex()), Ok(a));
        assert_eq!(Digest::from_hex(&a.to_hex().to_uppercase()), Err(DigestParseError));
        assert_eq!(Digest::from_hex("00"), Err(DigestParseError));
    }

    #[test]
    fn digest_prints_as_lowercase_hex() {
        let mut bytes = [0u8; 32];
        bytes[0] = 0xab;
        bytes[31] = 0x0f;
        let d = Digest::from_bytes(bytes);
        let hex = format!("ab{}0f", "0".repeat(60));
        assert_eq!(d.to_string(), hex);
        assert_eq!(format!("{d:?}"), format!("Digest({hex})"));
    }

    #[test]
    fn os_batch_hands_out_each_byte_once() {
        use rand_core::TryRng;
        let mut rng = OsBatch::new(64);
        let mut seen = Vec::new();
        // Spans several refills, with odd sizes that straddle them.
        for n in [1usize, 7, 64, 100, 3, 200, 128] {
            let mut b = vec![0u8; n];
            rng.try_fill_bytes(&mut b).unwrap();
            seen.extend_from_slice(&b);
        }
        // 603 random bytes: all-zero or repeated 16-byte windows would mean
        // bytes were handed out twice or never filled.
        let windows: std::collections::HashSet<&[u8]> = seen.chunks_exact(16).collect();
        assert_eq!(windows.len(), seen.len() / 16);
        assert!(memchr::memchr_iter(0, &seen).count() < 20);
        assert!(rng.buf[..rng.pos].iter().all(|&b| b == 0), "served bytes are wiped");
    }

    #[test]
    fn os_fill_serves_distinct_bytes_from_many_threads() {
        // Each thread has its own generator state (with feature `vdso`, a
        // state rented from the shared pool). All 64 hold theirs at once
        // (the barrier), more than one block of the pool has for a machine
        // with few CPUs (a page of about 28 states), so the pool grows.
        // No two threads may be handed the same bytes.
        const THREADS: usize = 64;
        let barrier = std::sync::Barrier::new(THREADS);
        let blocks: Vec<[u8; 32]> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..THREADS)
                .map(|_| {
                    s.spawn(|| {
                        (0..8)
                            .map(|i| {
                                if i == 1 {
                                    barrier.wait();
                                }
                                let mut b = [0u8; 32];
                                os_fill(&mut b).unwrap();
                                b
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            threads.into_iter().flat_map(|t| t.join().unwrap()).collect()
        });
        let distinct: std::collections::HashSet<_> = blocks.iter().collect();
        assert_eq!(distinct.len(), THREADS * 8);
        assert!(blocks.iter().all(|b| memchr::memchr_iter(0, b).count() < 8));
    }

    #[cfg(all(
        feature = "vdso",
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    #[test]
    fn vdso_serves_where_the_kernel_has_it() {
        // Linux 6.11+ on x86-64 has `getrandom` in the vDSO. Elsewhere the
        // system call serves, and this checks only that the fallback says so.
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut parts = kernel.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        let mut b = [0u8; 64];
        let served = vdso::fill(&mut b);
        assert_eq!(served, vdso::available());
        if cfg!(target_arch = "x86_64") && (major, minor) >= (6, 11) {
            assert!(served, "kernel {kernel} has vDSO getrandom");
            assert!(memchr::memchr_iter(0, &b).count() < 8);
        }
        if !served {
            assert_eq!(b, [0; 64], "a refused fill leaves nothing behind");
        }
    }

    #[test]
    fn digest_eq_sees_every_bit() {
        let a = Digest::from_bytes([0x5a; 32]);
        for byte in 0..32 {
            for bit in 0..8 {
                let mut other = [0x5a; 32];
                other[byte] ^= 1 << bit;
                assert_ne!(a, Digest::from_bytes(other), "byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn digest_eq_sees_equal_differences_in_two_words() {
        // The same bit flipped in two 8-byte words: folding the words'
        // differences must keep both, not let one cancel the other.
        let a = Digest::from_bytes([0x5a; 32]);
        for (first, second) in [(0, 8), (3, 27), (8, 16), (7, 31)] {
            let mut other = [0x5a; 32];
            other[first] ^= 0x10;
            other[second] ^= 0x10;
            assert_ne!(a, Digest::from_bytes(other), "bytes {first} and {second}");
        }
    }
}
