use super::*;

const HEX64: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const B62_32: &str = "Ab3dEf7hIj1lMn0pQr5tUv9xYz2aBc4D";

/// A deterministic "RNG" for known-answer tests: counts up.
struct Counter(u8);
impl rand_core::TryRng for Counter {
    type Error = std::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for d in dst {
            *d = self.0;
            self.0 = self.0.wrapping_add(1);
        }
        Ok(())
    }
}
impl rand_core::TryCryptoRng for Counter {}

#[test]
fn nhk_bounds() {
    let ok = format!("nhk_us_{HEX64}");
    let k = NHK.parse(&ok).unwrap();
    assert_eq!(k.region(), Some(Region::US));
    assert_eq!(k.environment(), None);
    assert_eq!(k.hint(), "nhk_us_0123");
    assert_eq!(k.expose_secret(), ok);
    assert_eq!(NHK.parse(&format!("nhk_eu_{HEX64}")).unwrap().region(), Some(Region::EU));
    assert_eq!(
        NHK.parse(&format!("nhk_us_{}", &HEX64[..63])).err(),
        Some(ParseError::WrongLength { part: Part::Secret, expected: 64, found: 63 })
    );
    assert_eq!(NHK.parse(&format!("nhk_us_{HEX64}0")).err(), Some(ParseError::TooLong { max: 71 }));
    assert_eq!(NHK.parse(&format!("nhk_US_{HEX64}")).err(), Some(ParseError::InvalidRegion));
    assert_eq!(NHK.parse(&format!("nhk_u_{HEX64}0")).err(), Some(ParseError::InvalidRegion));
    assert_eq!(
        NHK.parse(&format!("nhk_usa{HEX64}")).err(),
        Some(ParseError::MissingSeparator { after: Part::Region })
    );
    let upper = format!("nhk_us_{}", HEX64.to_uppercase());
    assert_eq!(
        NHK.parse(&upper).err(),
        Some(ParseError::InvalidCharacter { part: Part::Secret, offset: 17 })
    );
    assert_eq!(NHK.parse(&format!("NHK_us_{HEX64}")).err(), Some(ParseError::UnknownPrefix));
    assert_eq!(
        NHK.parse(&format!(" nhk_us_{}", &HEX64[1..])).err(),
        Some(ParseError::UnknownPrefix)
    );
}

#[test]
fn nhm_and_nh_bounds() {
    let k = NHM.parse(&format!("nhm_{HEX64}")).unwrap();
    assert_eq!(k.hint(), "nhm_0123");
    let k = NH.parse(&format!("nh_{HEX64}")).unwrap();
    assert_eq!(k.hint(), "nh_0123");
    assert_eq!(k.expose_secret().len(), 67);
    assert_eq!(NH.len_range(), (67, 67));
    assert!(NH.parse(&format!("nh_{HEX64}a")).is_err());
    assert!(NH.parse(&format!("nh_{}", &HEX64[..63])).is_err());
    assert!(NH.parse(&format!("nh_{}g", &HEX64[..63])).is_err());
    // Trailing whitespace and newlines are not trimmed.
    assert!(NH.parse(&format!("nh_{}\n", &HEX64[..63])).is_err());
    assert_eq!(NH.parse("").err(), Some(ParseError::Empty));
    assert_eq!(
        NH.parse("nh_").err(),
        Some(ParseError::WrongLength { part: Part::Secret, expected: 64, found: 0 })
    );
    assert_eq!(NH.parse("nh").err(), Some(ParseError::UnknownPrefix));
}

#[test]
fn nk_bounds() {
    let ok = format!("nk_live_Ab12CdEf_{B62_32}");
    let k = NK.parse(&ok).unwrap();
    assert_eq!(k.environment(), Some(Environment::LIVE));
    assert_eq!(k.key_id().unwrap().as_str(), "Ab12CdEf");
    assert_eq!(k.hint(), "nk_live_Ab12CdEf");
    assert_eq!(
        NK.parse(&format!("nk_test_Ab12CdEf_{B62_32}")).unwrap().environment(),
        Some(Environment::TEST)
    );
    assert_eq!(
        NK.parse(&format!("nk_prod_Ab12CdEf_{B62_32}")).err(),
        Some(ParseError::InvalidEnvironment)
    );
    assert_eq!(
        NK.parse(&format!("nk_Live_Ab12CdEf_{B62_32}")).err(),
        Some(ParseError::InvalidEnvironment)
    );
    assert_eq!(
        NK.parse(&format!("nk_live_Ab12CdE_{B62_32}")).err(),
        Some(ParseError::WrongLength { part: Part::KeyId, expected: 8, found: 7 })
    );
    assert_eq!(
        NK.parse(&format!("nk_live_Ab12CdEfG_{}", &B62_32[..31])).err(),
        Some(ParseError::WrongLength { part: Part::KeyId, expected: 8, found: 9 })
    );
    assert_eq!(
        NK.parse(&format!("nk_live_Ab12-dEf_{B62_32}")).err(),
        Some(ParseError::InvalidCharacter { part: Part::KeyId, offset: 12 })
    );
    assert!(NK.parse(&format!("nk_live_Ab12CdEf_{}", &B62_32[..31])).is_err());
    assert!(NK.parse(&format!("nk_live_Ab12CdEf_{B62_32}x")).is_err());
    // A key id of exactly its length at the very end, with no `_` after
    // it, used to read past the input (a subtraction overflow: a panic in
    // debug builds, a bogus length in release).
    for cut in ["nk_live_Ab12CdEf", "nk_live_Ab12CdE", "nk_live_Ab12CdEfG", "nk_live_"] {
        assert_eq!(
            NK.parse(cut).err(),
            Some(ParseError::MissingSeparator { after: Part::KeyId }),
            "{cut}"
        );
    }
}

#[test]
fn sk_bounds() {
    let k = SK.parse(&format!("sk_live_abc{}", &B62_32[3..])).unwrap();
    assert_eq!(k.hint(), "sk_live_abc");
    assert_eq!(
        SK.parse(&format!("sk_test_{B62_32}")).unwrap().environment(),
        Some(Environment::TEST)
    );
    assert!(SK.parse(&format!("sk_live_{}", &B62_32[..31])).is_err());
    assert!(SK.parse(&format!("sk_live_{B62_32}A")).is_err());
    assert!(SK.parse(&format!("sk_live_{}_", &B62_32[..31])).is_err());
    assert!(SK.parse(&format!("sk_staging_{B62_32}")).is_err());
}

#[test]
fn mint_parse_round_trip_every_preset() {
    for f in FormatSet::presets().formats() {
        let k = f.mint_default().unwrap();
        let p = f.parse(k.expose_secret()).unwrap();
        assert_eq!(p.environment(), k.environment());
        assert_eq!(p.region(), k.region());
        assert_eq!(p.key_id(), k.key_id());
        assert_eq!(p.hint(), k.hint());
        assert_eq!(k.expose_secret().parse::<ApiKey>().unwrap().format(), f);
    }
}

#[test]
fn mint_spec_is_checked() {
    let k = SK.mint(MintSpec::new().environment(Environment::TEST)).unwrap();
    assert!(k.expose_secret().starts_with("sk_test_"));
    let k = NHK.mint(MintSpec::new().region(Region::EU)).unwrap();
    assert!(k.expose_secret().starts_with("nhk_eu_"));
    let staging: Environment = "staging".parse().unwrap();
    assert_eq!(SK.mint(MintSpec::new().environment(staging)).unwrap_err(), MintError::Environment);
    assert_eq!(
        NH.mint(MintSpec::new().environment(Environment::LIVE)).unwrap_err(),
        MintError::Environment
    );
    assert_eq!(SK.mint(MintSpec::new().region(Region::US)).unwrap_err(), MintError::Region);
    // A region format has no environment to set either.
    assert_eq!(
        NHK.mint(MintSpec::new().environment(Environment::TEST)).unwrap_err(),
        MintError::Environment
    );
}

#[test]
fn known_answer_mint() {
    // Counter bytes 0,1,2,... map to hex chars 0..f repeating (no rejection).
    let k = NH.mint_with_rng(MintSpec::new(), &mut Counter(0)).unwrap();
    assert_eq!(k.expose_secret(), format!("nh_{HEX64}"));
}

#[test]
fn crc32_checksum() {
    const ENVS: &[Environment] = &[Environment::LIVE];
    const F: KeyFormat = KeyFormat::builder("acme")
        .environments(ENVS)
        .secret(&Alphabet::BASE62, 30)
        .crc32()
        .build_unwrap();
    let k = F.mint_default().unwrap();
    let s = k.expose_secret();
    assert_eq!(s.len(), 5 + 5 + 30 + 6);
    assert!(F.parse(s).is_ok());
    // Any single-character change in the secret is caught offline.
    let mut b = s.as_bytes().to_vec();
    let i = 12;
    b[i] = if b[i] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(b).unwrap();
    assert_eq!(F.parse(&forged).err(), Some(ParseError::ChecksumMismatch));
    // Checksum characters outside the alphabet.
    let bad = format!("{}-", &s[..s.len() - 1]);
    assert!(matches!(
        F.parse(&bad),
        Err(ParseError::InvalidCharacter { part: Part::Checksum, .. })
    ));
}

#[test]
fn crc32_checksums_in_small_alphabets_round_trip() {
    // A u32 takes 10 decimal characters and 32 binary ones: wider than the
    // 8 of hex, which once bounded the parser's buffer.
    const DECIMAL: Alphabet = Alphabet::new_unwrap("0123456789");
    const BINARY: Alphabet = Alphabet::new_unwrap("01");
    for (alphabet, width) in [(&DECIMAL, 10), (&BINARY, 32)] {
        let f =
            KeyFormat::builder("pin").secret(alphabet, 128).hint_chars(0).crc32().build().unwrap();
        let k = f.mint_default().unwrap();
        assert_eq!(k.expose_secret().len(), 4 + 128 + width);
        assert!(f.parse(k.expose_secret()).is_ok());
        let mut forged = k.expose_secret().to_owned();
        let last = forged.pop().unwrap();
        forged.push(if last == '0' { '1' } else { '0' });
        assert_eq!(f.parse(&forged).err(), Some(ParseError::ChecksumMismatch));
    }
}

#[test]
fn builder_rejects_bad_definitions() {
    assert_eq!(KeyFormat::builder("").build(), Err(FormatError::Name));
    assert_eq!(KeyFormat::builder("a_b").build(), Err(FormatError::Name));
    assert_eq!(KeyFormat::builder("Ab").build(), Err(FormatError::Name));
    assert_eq!(KeyFormat::builder("ab").environments(&[]).build(), Err(FormatError::Environments));
    assert_eq!(
        KeyFormat::builder("ab").environments(&[Environment::LIVE, Environment::LIVE]).build(),
        Err(FormatError::Environments)
    );
    // 31 hex chars = 124 bits < 128; 32 = 128 bits (with no hint
    // characters; the default hint shows 4, so 36 are needed).
    assert_eq!(
        KeyFormat::builder("ab").secret(&Alphabet::LOWER_HEX, 31).hint_chars(0).build(),
        Err(FormatError::SecretStrength)
    );
    assert!(
        KeyFormat::builder("ab").secret(&Alphabet::LOWER_HEX, 32).hint_chars(0).build().is_ok()
    );
    assert!(KeyFormat::builder("ab").secret(&Alphabet::LOWER_HEX, 35).build().is_err());
    assert!(KeyFormat::builder("ab").secret(&Alphabet::LOWER_HEX, 36).build().is_ok());
    // 21 base62 = 125 bits; 22 = 131 bits.
    assert!(KeyFormat::builder("ab").secret(&Alphabet::BASE62, 21).hint_chars(0).build().is_err());
    assert!(KeyFormat::builder("ab").secret(&Alphabet::BASE62, 22).hint_chars(0).build().is_ok());
    // What the hint shows is public: 22 base62 showing 4 leaves 18 (107
    // bits); 26 showing 4 leaves 22. A key id's hint shows no secret.
    assert_eq!(
        KeyFormat::builder("ab").secret(&Alphabet::BASE62, 22).hint_chars(4).build(),
        Err(FormatError::SecretStrength)
    );
    assert!(KeyFormat::builder("ab").secret(&Alphabet::BASE62, 26).hint_chars(4).build().is_ok());
    assert!(
        KeyFormat::builder("ab")
            .key_id(&Alphabet::BASE62, 8)
            .secret(&Alphabet::BASE62, 22)
            .build()
            .is_ok()
    );
    assert_eq!(
        KeyFormat::builder("ab").key_id(&Alphabet::BASE62, 33).build(),
        Err(FormatError::KeyIdLength { max: 32 })
    );
    assert_eq!(KeyFormat::builder("ab").hint_chars(9).build(), Err(FormatError::HintTooLong));
    assert!(KeyFormat::builder("ab").hint_chars(8).build().is_ok());
    for f in FormatSet::presets().formats() {
        assert!(f.secret_bits() >= 128.0, "{}", f.name());
    }
}

#[test]
fn format_set_dispatches_by_prefix() {
    let set = FormatSet::presets();
    assert_eq!(set.parse(&format!("nh_{HEX64}")).unwrap().format().name(), "nh");
    assert_eq!(set.parse(&format!("nhm_{HEX64}")).unwrap().format().name(), "nhm");
    assert_eq!(set.parse("xx_1").err(), Some(ParseError::UnknownPrefix));
    assert_eq!(set.parse(&"a".repeat(72)).err(), Some(ParseError::TooLong { max: 71 }));
    assert_eq!(FormatSet::new([NH, NH]).unwrap_err(), FormatError::OverlappingPrefixes);
}

#[test]
fn errors_never_echo_the_input() {
    let secretish = format!("nhk_us_{}Z", &HEX64[..63]);
    let err = NHK.parse(&secretish).unwrap_err().to_string();
    assert!(!err.contains(&HEX64[..16]), "{err}");
    let k = NHK.parse(&format!("nhk_us_{HEX64}")).unwrap();
    assert!(!format!("{k:?}").contains(&HEX64[4..]));
}

#[test]
fn no_format_the_builder_accepts_is_longer_than_max_key_len() {
    // Every part at the builder's maximum: a 16-character name and
    // environment, a 32-character key id, 128 secret characters of a
    // two-character alphabet (128 bits, no hint) and its 32-character CRC.
    static ENVS: [Environment; 1] = [Environment::new_unwrap("abcdefghijklmnop")];
    static BITS: Alphabet = Alphabet::new_unwrap("01");
    let longest = KeyFormat::builder("abcdefghijklmnop")
        .environments(&ENVS)
        .key_id(&Alphabet::BASE62, 32)
        .secret(&BITS, 128)
        .hint_chars(0)
        .crc32()
        .build()
        .unwrap();
    assert_eq!(longest.len_range().1, 227);
    assert!(longest.len_range().1 <= MAX_KEY_LEN);
    // One more secret character, key id character or name character is
    // refused by the builder.
    assert!(
        KeyFormat::builder("abcdefghijklmnop").secret(&BITS, 129).hint_chars(0).build().is_err()
    );
    assert!(KeyFormat::builder("abcdefghijklmnopq").build().is_err());
    assert!(KeyFormat::builder("ab").key_id(&Alphabet::BASE62, 33).build().is_err());
}

#[test]
fn a_hint_may_show_at_most_a_quarter_of_the_secret() {
    // 8 of 31 base62 characters is more than a quarter, although the 23
    // hidden ones carry 136 bits and 8 is the most a hint may show; 8 of 32
    // is exactly a quarter.
    assert_eq!(
        KeyFormat::builder("ab").secret(&Alphabet::BASE62, 31).hint_chars(8).build(),
        Err(FormatError::HintTooLong)
    );
    assert!(KeyFormat::builder("ab").secret(&Alphabet::BASE62, 32).hint_chars(8).build().is_ok());
}

#[test]
fn a_format_describes_its_grammar() {
    const F: KeyFormat =
        KeyFormat::builder("acme").secret(&Alphabet::BASE62, 30).crc32().build_unwrap();
    let described: Vec<_> = [NHK, NHM, NK, SK, NH, F]
        .iter()
        .map(|f| (f.name(), f.separators(), f.key_id_spec(), f.checksum()))
        .collect();
    assert_eq!(
        described,
        [
            ("nhk", 2, None, None),
            ("nhm", 1, None, None),
            ("nk", 3, Some((&Alphabet::BASE62, 8)), None),
            ("sk", 2, None, None),
            ("nh", 1, None, None),
            ("acme", 1, None, Some(Checksum::Crc32)),
        ]
    );
}

#[test]
fn parse_errors_name_the_part_in_words() {
    let parts =
        [Part::Prefix, Part::Environment, Part::Region, Part::KeyId, Part::Secret, Part::Checksum];
    let words: Vec<String> = parts.iter().map(ToString::to_string).collect();
    assert_eq!(words, ["prefix", "environment", "region", "key id", "secret", "checksum"]);
    assert_eq!(
        NK.parse("nk_live_Ab12CdEf").unwrap_err().to_string(),
        "missing `_` after the key id"
    );
}

#[test]
fn a_key_agrees_only_with_its_own_segment() {
    let sk = format!("sk_test_{B62_32}");
    assert!(SK.segment_agrees(sk.as_bytes(), Some(Environment::TEST), None));
    assert!(!SK.segment_agrees(sk.as_bytes(), Some(Environment::LIVE), None));
    assert!(!SK.segment_agrees(sk.as_bytes(), None, Some(Region::US)));
    let nhk = format!("nhk_eu_{HEX64}");
    assert!(NHK.segment_agrees(nhk.as_bytes(), None, Some(Region::EU)));
    assert!(!NHK.segment_agrees(nhk.as_bytes(), None, Some(Region::US)));
    assert!(!NHK.segment_agrees(nhk.as_bytes(), Some(Environment::LIVE), None));
    // Without a segment, the record's environment is the host's to set.
    assert!(NH.segment_agrees(format!("nh_{HEX64}").as_bytes(), Some(Environment::TEST), None));
}

#[test]
fn a_format_set_lists_and_finds_its_formats() {
    let set = FormatSet::presets();
    let names: Vec<&str> = set.formats().iter().map(KeyFormat::name).collect();
    assert_eq!(names, ["nhk", "nhm", "nk", "sk", "nh"]);
    assert_eq!(set.get("sk"), Some(&SK));
    assert_eq!(set.get("nh"), Some(&NH));
    assert_eq!(set.get("xx"), None);
    // The longest preset key: `nhk_us_` and 64 hex characters.
    assert_eq!(set.max_len(), 71);
}

#[test]
fn debug_shows_a_key_by_its_public_parts() {
    let k = NK.parse(&format!("nk_live_Ab12CdEf_{B62_32}")).unwrap();
    assert_eq!(
        format!("{k:?}"),
        r#"ApiKey { format: "nk", environment: Some("live"), region: None, key_id: Some("Ab12CdEf"), hint: "nk_live_Ab12CdEf", .. }"#
    );
    assert_eq!(
        format!("{NH:?}"),
        r#"KeyFormat { name: "nh", segment: None, key_id: None, secret: Alphabet("0123456789abcdef"), secret_len: 64, checksum: None, .. }"#
    );
}
