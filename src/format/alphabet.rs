//! Secret alphabets with O(1) membership and unbiased sampling.

use std::fmt;

use rand_core::TryCryptoRng;

/// The characters a secret (or key id) is drawn from.
///
/// Only ASCII letters and digits are allowed, so that keys are URL-safe, need
/// no quoting in headers, and a key's end is unambiguous to the scanner (the
/// byte after a key is never a letter, digit or `_`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Alphabet {
    chars: &'static str,
    /// `index[b]` is the position of byte `b` in `chars`, or `NONE`.
    index: [u8; 256],
    /// `sample[r]` is the character a uniformly random byte `r` draws, or
    /// `NONE` when `r` must be rejected (at or above the largest multiple of
    /// the alphabet's size): sampling is one lookup, no division.
    sample: [u8; 256],
}

const NONE: u8 = 0xFF;

impl Alphabet {
    /// `0-9a-f`: 4 bits per character.
    pub const LOWER_HEX: Self = Self::new_unwrap("0123456789abcdef");
    /// `0-9A-Za-z`: about 5.95 bits per character.
    pub const BASE62: Self =
        Self::new_unwrap("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz");

    /// Builds an alphabet constant; panics (at compile time in a `const`) when
    /// `chars` has fewer than 2 characters, a duplicate, or a character that
    /// is not an ASCII letter or digit.
    ///
    /// # Panics
    ///
    /// As described above.
    #[must_use]
    pub const fn new_unwrap(chars: &'static str) -> Self {
        match Self::try_new(chars) {
            Some(a) => a,
            None => panic!("alphabet must be 2 to 62 distinct ASCII letters or digits"),
        }
    }

    /// Builds an alphabet, or `None` when `chars` has fewer than 2 characters,
    /// a duplicate, or a character that is not an ASCII letter or digit.
    #[must_use]
    pub const fn try_new(chars: &'static str) -> Option<Self> {
        let b = chars.as_bytes();
        if b.len() < 2 || b.len() > 62 {
            return None;
        }
        let mut index = [NONE; 256];
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            if !c.is_ascii_alphanumeric() || index[c as usize] != NONE {
                return None;
            }
            index[c as usize] = i as u8;
            i += 1;
        }
        let k = b.len();
        let mut sample = [NONE; 256];
        let mut r = 0;
        while r < 256 - (256 % k) {
            sample[r] = b[r % k];
            r += 1;
        }
        Some(Self { chars, index, sample })
    }

    /// Number of characters.
    #[must_use]
    pub const fn len(&self) -> usize {
        self.chars.len()
    }

    /// Always `false`: an alphabet has at least two characters.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// The characters, in order.
    #[must_use]
    pub const fn as_str(&self) -> &'static str {
        self.chars
    }

    /// Whether `b` belongs to the alphabet.
    #[inline]
    #[must_use]
    pub const fn contains(&self, b: u8) -> bool {
        self.index[b as usize] != NONE
    }

    /// Position of `b` in the alphabet.
    #[inline]
    #[must_use]
    pub const fn position(&self, b: u8) -> Option<u8> {
        match self.index[b as usize] {
            NONE => None,
            i => Some(i),
        }
    }

    /// Entropy of `n` characters drawn uniformly, in bits.
    #[must_use]
    pub fn bits(&self, n: usize) -> f64 {
        // Lengths here are at most a few hundred; the conversion is exact.
        #[allow(clippy::cast_precision_loss)]
        let (n, k) = (n as f64, self.len() as f64);
        n * k.log2()
    }

    /// Smallest number of characters that can encode every `u32`.
    #[must_use]
    pub(crate) const fn u32_width(&self) -> usize {
        let k = self.len() as u64;
        let mut width = 0;
        let mut span = 1u64;
        while span <= u32::MAX as u64 {
            span *= k;
            width += 1;
        }
        width
    }

    /// Writes `v` as exactly `u32_width()` characters, most significant first.
    pub(crate) fn encode_u32(&self, mut v: u32, out: &mut [u8]) {
        let k = self.len() as u32;
        for slot in out.iter_mut().rev() {
            *slot = self.chars.as_bytes()[(v % k) as usize];
            v /= k;
        }
    }

    /// Random bytes to fetch for `chars` characters: one byte per character,
    /// plus a margin for rejections where the alphabet's size does not
    /// divide 256 (about 3 % for base62): twice the expected number, plus
    /// two. The margin makes a second fetch rare (under 2 % for 59 base62
    /// characters), not impossible: [`fill`](Self::fill) asks for more when
    /// needed.
    #[must_use]
    pub(crate) const fn bytes_for(&self, chars: usize) -> usize {
        let rejected = 256 % self.len();
        if rejected == 0 {
            return chars;
        }
        chars + chars * rejected * 2 / (256 - rejected) + 2
    }

    /// Fills `out` with characters drawn uniformly from the alphabet.
    ///
    /// Unbiased: random bytes at or above the largest multiple of the alphabet
    /// size are rejected and redrawn (about 3 % for base62, none for hex).
    /// Asks `rng` for exactly the characters still missing each time, so a
    /// batch of OS bytes ([`OsBatch`](crate::secret::OsBatch)) sized with
    /// [`bytes_for`](Self::bytes_for) serves a whole operation.
    ///
    /// Bounded: a generator whose draws are all rejected
    /// [`STUCK_ROUNDS`](Self::STUCK_ROUNDS) times in a row (one stuck on a
    /// rejected value, a test double filling with `0xff`) is
    /// [`FillError::Stuck`], not an endless loop.
    pub(crate) fn fill<R: TryCryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        out: &mut [u8],
    ) -> Result<(), FillError<R::Error>> {
        // Drawn in place: the bytes land in `out` and each accepted one is
        // replaced by its character, packed to the front; the rejected
        // tail is drawn again. No second buffer holds the raw bytes (one
        // would have to be wiped, and copying through it cost a fifth of
        // a draw). On an error `out` may hold raw bytes: the caller wipes
        // its buffer then, as it would the characters.
        let mut i = 0;
        let mut idle = 0;
        while i < out.len() {
            rng.try_fill_bytes(&mut out[i..]).map_err(FillError::Rng)?;
            let before = i;
            for j in before..out.len() {
                // `i <= j`: each write lands on a byte already read.
                let c = self.sample[usize::from(out[j])];
                if c != NONE {
                    out[i] = c;
                    i += 1;
                }
            }
            idle = if i == before { idle + 1 } else { 0 };
            if idle == Self::STUCK_ROUNDS {
                return Err(FillError::Stuck);
            }
        }
        Ok(())
    }

    /// Draws in a row that [`fill`](Self::fill) accepts yielding nothing.
    /// A fair generator's draw is all rejected at most about 19 % of the
    /// time (for the worst alphabet size), so 64 in a row happen with
    /// probability under 10⁻⁴⁵.
    pub(crate) const STUCK_ROUNDS: u32 = 64;
}

/// Why [`Alphabet::fill`] drew no characters.
#[derive(Debug)]
pub(crate) enum FillError<E> {
    /// The generator failed.
    Rng(E),
    /// The generator yields only bytes the alphabet rejects.
    Stuck,
}

impl fmt::Debug for Alphabet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Alphabet").field(&self.chars).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_for_covers_rejections_and_fill_draws_exactly_what_is_missing() {
        // A generator that counts what it is asked for and serves bytes
        // that base62 rejects every fourth time.
        struct Counting(usize, u8);
        impl rand_core::TryRng for Counting {
            type Error = std::convert::Infallible;
            fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
                unreachable!()
            }
            fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
                unreachable!()
            }
            fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
                for b in dst {
                    self.0 += 1;
                    self.1 = self.1.wrapping_add(1);
                    *b = if self.1.is_multiple_of(4) { 255 } else { self.1 };
                }
                Ok(())
            }
        }
        impl rand_core::TryCryptoRng for Counting {}
        assert_eq!(Alphabet::LOWER_HEX.bytes_for(32), 32, "no rejections for hex");
        assert_eq!(Alphabet::BASE62.bytes_for(59), 64);
        assert_eq!(Alphabet::BASE62.bytes_for(16), 19);
        let mut rng = Counting(0, 0);
        let mut out = [0u8; 30];
        Alphabet::BASE62.fill(&mut rng, &mut out).unwrap();
        assert!(out.iter().all(u8::is_ascii_alphanumeric));
        // 30 accepted bytes, and one rejection per three accepted: exactly
        // 39 or 40 bytes drawn, none wasted beyond the last request.
        assert!((39..=40).contains(&rng.0), "{}", rng.0);
    }

    #[test]
    fn a_generator_stuck_on_rejected_bytes_is_an_error_not_a_hang() {
        // Fills with 0xff, which base62 rejects, and counts its draws.
        struct Stuck(u32);
        impl rand_core::TryRng for Stuck {
            type Error = std::convert::Infallible;
            fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
                Ok(u32::MAX)
            }
            fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
                Ok(u64::MAX)
            }
            fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
                self.0 += 1;
                dst.fill(0xff);
                Ok(())
            }
        }
        impl rand_core::TryCryptoRng for Stuck {}
        let mut rng = Stuck(0);
        let mut out = [0u8; 16];
        assert!(matches!(Alphabet::BASE62.fill(&mut rng, &mut out), Err(FillError::Stuck)));
        assert_eq!(rng.0, Alphabet::STUCK_ROUNDS);
        // Every caller turns it into its error.
        assert_eq!(
            crate::store::RecordId::generate_with(&mut Stuck(0)),
            Err(crate::format::MintError::Rng)
        );
        assert_eq!(
            crate::portal::CODE.mint_with_rng(crate::format::MintSpec::new(), &mut Stuck(0)).err(),
            Some(crate::format::MintError::Rng)
        );
        // Hex takes every byte: the same generator serves it.
        Alphabet::LOWER_HEX.fill(&mut Stuck(0), &mut out).unwrap();
        assert_eq!(&out, b"ffffffffffffffff");
    }

    #[test]
    fn presets() {
        assert_eq!(Alphabet::LOWER_HEX.len(), 16);
        assert_eq!(Alphabet::BASE62.len(), 62);
        assert!(Alphabet::BASE62.contains(b'Z'));
        assert!(!Alphabet::LOWER_HEX.contains(b'A'));
        assert_eq!(Alphabet::LOWER_HEX.position(b'f'), Some(15));
        assert_eq!(Alphabet::LOWER_HEX.u32_width(), 8);
        assert_eq!(Alphabet::BASE62.u32_width(), 6);
    }

    #[test]
    fn rejects_bad_alphabets() {
        assert!(Alphabet::try_new("a").is_none());
        assert!(Alphabet::try_new("aa").is_none());
        assert!(Alphabet::try_new("a_").is_none());
        assert!(Alphabet::try_new("ab").is_some());
    }

    #[test]
    fn u32_encoding_is_fixed_width_and_ordered() {
        let mut out = [0u8; 8];
        Alphabet::LOWER_HEX.encode_u32(0xdead_beef, &mut out);
        assert_eq!(&out, b"deadbeef");
        let mut out = [0u8; 6];
        Alphabet::BASE62.encode_u32(0, &mut out);
        assert_eq!(&out, b"000000");
        Alphabet::BASE62.encode_u32(u32::MAX, &mut out);
        assert_eq!(&out, b"4gfFC3");
    }
}
