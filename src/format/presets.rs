//! The seed products' key formats, as constants.

use super::{Alphabet, Environment, KeyFormat};

const LIVE_TEST: &[Environment] = &[Environment::LIVE, Environment::TEST];

/// Ingestion key: `nhk_{region}_{64 lowercase hex}`, hint `nhk_us_` + 4 hex.
pub const NHK: KeyFormat =
    KeyFormat::builder("nhk").region().secret(&Alphabet::LOWER_HEX, 64).build_unwrap();

/// Management token: `nhm_{64 lowercase hex}`, hint `nhm_` + 4 hex.
pub const NHM: KeyFormat =
    KeyFormat::builder("nhm").secret(&Alphabet::LOWER_HEX, 64).build_unwrap();

/// Id + secret key: `nk_{live|test}_{8 base62 key id}_{32 base62}`, hint
/// `nk_live_` + the key id (the id is public: it is the lookup handle).
pub const NK: KeyFormat = KeyFormat::builder("nk")
    .environments(LIVE_TEST)
    .key_id(&Alphabet::BASE62, 8)
    .secret(&Alphabet::BASE62, 32)
    .build_unwrap();

/// Mode key: `sk_{live|test}_{32 base62}`, hint `sk_live_` + 3 characters,
/// as in the seed's listing `sk_live_abc`.
pub const SK: KeyFormat = KeyFormat::builder("sk")
    .environments(LIVE_TEST)
    .secret(&Alphabet::BASE62, 32)
    .hint_chars(3)
    .build_unwrap();

/// Hex key: `nh_{64 lowercase hex}`, sent in `X-API-Key`.
///
/// The seed says "68 characters total", but its own grammar (`nh_` + 64 hex)
/// makes 67; keygate follows the grammar, which is the part a key's bytes
/// can be checked against.
pub const NH: KeyFormat = KeyFormat::builder("nh").secret(&Alphabet::LOWER_HEX, 64).build_unwrap();
